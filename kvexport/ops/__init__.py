"""The kvexport op registry (see :mod:`kvexport.ops.registry`)."""

from .registry import (AttrSpec, OpSpec, TensorSpec, all_ops, get_op, known_ops, op_version, ops_for,
                       ops_table_markdown)

__all__ = ["AttrSpec", "OpSpec", "TensorSpec", "all_ops", "get_op", "known_ops", "op_version", "ops_for",
           "ops_table_markdown"]
