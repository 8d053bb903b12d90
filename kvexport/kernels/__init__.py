"""CUDA kernels on the packed cache: fused decode attention and in-place append.

Built from ``plugins/`` with nvcc on first use and cached (see ``_build``); the
launchers are ``extern "C"`` functions taking raw device pointers, sizes, byte
strides and a ``cudaStream_t``, bound here with ctypes (no torch C++ extension).
Where no toolkit or GPU exists, :func:`available` is False and :func:`library`
raises :class:`KernelsUnavailable` with the reason; the Python codecs still work.

    cache_k = KernelCache.allocate(codec, "key", B, Hkv, D, capacity)
    append(cache_k, k_new, lens)                   # encode in place at lens[b]..
    out = decode_attention(q, cache_k, cache_v, lens)   # q (B, Hq, Tq, D) fp16/bf16
"""

from __future__ import annotations

import ctypes
import functools
import math

import torch

from . import _abi
from ._build import KernelsUnavailable, build
from .cache import KernelCache, extra_workspace_floats, kernel_params, supported

_DTYPE = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
_BLOCK_TOKENS = 64  # tokens per block iteration (4 warps x 16-token subtiles)
_WARPS = 4  # partials per split (plugins/common/decode_attention.cuh kWARPS)
V2_CODECS = ("fp16", "turbo", "fibquant")  # codecs with a kvx_<codec>_decode_v2 launcher


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL:
    """The loaded kernel library (built on first call)."""
    if not torch.cuda.is_available():
        raise KernelsUnavailable("no CUDA GPU available; the CUDA kernels need one (the Python codecs do not)")
    lib = ctypes.CDLL(str(build()))
    lib.kvx_last_error.restype = ctypes.c_char_p
    if lib.kvx_abi_version() != _abi.ABI_VERSION:
        raise KernelsUnavailable(f"kernel ABI {lib.kvx_abi_version()} != Python ABI {_abi.ABI_VERSION}")
    d, a = ctypes.c_int(), ctypes.c_int()
    lib.kvx_args_sizes(ctypes.byref(d), ctypes.byref(a))
    if (d.value, a.value) != (ctypes.sizeof(_abi.KvxDecodeArgs), ctypes.sizeof(_abi.KvxAppendArgs)):
        raise KernelsUnavailable("kernel argument structs differ between C and ctypes")
    return lib


def available() -> bool:
    try:
        library()
        return True
    except KernelsUnavailable:
        return False


def _call(name: str, args) -> None:
    lib = library()
    fn = getattr(lib, name)
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    rc = fn(ctypes.byref(args), stream)
    if rc:
        raise RuntimeError(f"{name}: {lib.kvx_last_error().decode()} (cuda error {rc})")


def _fields(cache: KernelCache, arr) -> None:
    for i, t in enumerate(cache.fields.values()):
        es = t.element_size()
        arr[i] = _abi.KvxField(t.data_ptr(), t.stride(0) * es, t.stride(1) * es, t.stride(2) * es)


def _check_lens(lens: torch.Tensor, batch: int, what="lens") -> None:
    if lens.dtype != torch.int32 or lens.shape != (batch,) or not lens.is_cuda:
        raise ValueError(f"{what} must be a CUDA int32 tensor of shape ({batch},), got {lens.dtype} {tuple(lens.shape)}")


def _capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _lens_range(lens: torch.Tensor, what="lens") -> tuple[int, int] | None:
    """(min, max) of ``lens`` read to the host (one small device sync), or None while a CUDA graph
    is being captured: device memory cannot be read then and the caller's ``max_len`` stands."""
    if lens.dtype != torch.int32 or lens.dim() != 1:
        raise ValueError(f"{what} must be an int32 tensor of shape (B,), got {lens.dtype} {tuple(lens.shape)}")
    if lens.numel() == 0:
        return 0, 0
    if _capturing(lens):
        return None
    lo, hi = torch.stack((lens.min(), lens.max())).tolist()
    return lo, hi


def _check_int(name: str, v) -> int:
    if isinstance(v, bool) or int(v) != v:
        raise ValueError(f"{name} must be an int, got {v!r}")
    return int(v)


def check_decode_bounds(capacity: int, lens: torch.Tensor, max_len: int | None,
                        window: int = 0, window_lens: torch.Tensor | None = None) -> int:
    """The ``max_len`` to launch with: ``cache.capacity`` if None; refuses ``max_len`` outside
    [0, capacity], any lens[b] outside [0, max_len] and any window_lens[b] outside [0, W]
    (ValueError, one line).  ``lens`` values are read unless a CUDA graph is being captured."""
    max_len = capacity if max_len is None else _check_int("decode_attention.max_len", max_len)
    if not 0 <= max_len <= capacity:
        raise ValueError(f"decode_attention.max_len ({max_len}) must be in [0, capacity {capacity}]")
    r = _lens_range(lens)
    if r is not None and (r[0] < 0 or r[1] > max_len):
        raise ValueError(f"decode_attention: lens in [{r[0]}, {r[1]}] but max_len is {max_len} "
                         f"(each lens[b] must be in [0, max_len]; capacity {capacity})")
    if window_lens is not None:
        wr = _lens_range(window_lens, "window_lens")
        if wr is not None and (wr[0] < 0 or wr[1] > window):
            raise ValueError(f"decode_attention: window_lens in [{wr[0]}, {wr[1]}] but the window holds {window} tokens")
    return max_len


def check_append_bounds(capacity: int, n_new: int, lens: torch.Tensor, max_len: int | None = None) -> int:
    """The host bound of ``lens`` to launch with (``max_len`` if given, else max(lens)); refuses
    lens[b] < 0, lens[b] > max_len and max_len + n_new > capacity (ValueError, one line).  While a
    CUDA graph is being captured lens cannot be read: ``max_len`` is then required."""
    r = _lens_range(lens)
    if max_len is not None:
        max_len = _check_int("append.max_len", max_len)
    if r is None:
        if max_len is None:
            raise ValueError("append under CUDA-graph capture needs max_len= (a host bound of lens: lens cannot be "
                             "read while capturing)")
    elif r[0] < 0 or (max_len is not None and r[1] > max_len):
        raise ValueError(f"append: lens in [{r[0]}, {r[1]}] outside [0, max_len {max_len}]")
    elif max_len is None:
        max_len = r[1]
    if max_len < 0 or max_len + n_new > capacity:
        raise ValueError(f"append of {n_new} tokens at lens up to {max_len} exceeds the cache capacity "
                         f"of {capacity} tokens per sequence")
    return max_len


def num_splits_for(batch: int, kv_heads: int, tokens: int, head_dim: int, sms: int | None = None) -> int:
    """Split-K parts: at most one wave of 4 blocks per multiprocessor (4 fit at 128 registers:
    a partial second wave would double the time), each at least 8 block iterations of tokens.
    ``kv_heads``: blocks per sequence and split (kv heads × query row tiles for Tq > 1)."""
    if sms is None:
        sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    per = max(1, (4 * sms) // max(1, batch * kv_heads))
    return max(1, min(per, math.ceil(max(1, tokens) / (8 * _BLOCK_TOKENS))))


def decode_attention(q: torch.Tensor, cache_k: KernelCache, cache_v: KernelCache, lens: torch.Tensor, *,
                     window_k: torch.Tensor | None = None, window_v: torch.Tensor | None = None,
                     window_lens: torch.Tensor | None = None, scale: float | None = None,
                     max_len: int | None = None, num_splits: int | None = None, softcap: float = 0.0,
                     sliding_window: int = 0, kernel: str = "v1") -> torch.Tensor:
    """Softmax attention of Tq query tokens per sequence over its packed cache (+ fp16 window).

    q (B, Hq, Tq, D) or (B, Hq, D) fp16/bf16; lens (B,) int32 packed tokens per sequence;
    window_k/v (B, Hkv, W, D) fp16 newest tokens after the packed ones (window_lens (B,)
    int32 or all W).  Key j (packed, then window) sits at position j; query t at
    lens[b] + window_lens[b] - Tq + t and sees key j iff j <= its position and, with
    ``sliding_window`` w > 0, j > position - w (transformers' sliding window).  ``softcap`` c > 0
    caps the scaled score s → c·tanh(s / c) (Gemma 2).  Returns q's shape and dtype; fp32
    softmax and accumulation.  Without softcap / sliding window equals
    ``codec.attend(q, packed_k, packed_v, window_k=..., window_v=...)``.
    ``kernel``: "v1" (default) or "v2" (decode_v2.cuh: pipelined packed tiles dequantized into
    MMA fragments; codecs in ``V2_CODECS`` only; calls it does not cover run v1, docs/KERNELS.md).
    """
    codec = cache_k.codec
    if kernel not in ("v1", "v2"):
        raise ValueError(f"decode_attention.kernel must be 'v1' or 'v2', got {kernel!r}")
    if kernel == "v2" and codec.name not in V2_CODECS:
        raise ValueError(f"no v2 decode kernel for codec {codec.name!r}; have {', '.join(V2_CODECS)}")
    if cache_v.codec.spec_hash != codec.spec_hash or cache_k.role != "key" or cache_v.role != "value":
        raise ValueError("cache_k / cache_v must be the key and value caches of one codec")
    capacity = min(cache_k.capacity, cache_v.capacity)
    w = 0 if window_k is None else window_k.shape[2]
    max_len = check_decode_bounds(capacity, lens, max_len, w, window_lens if window_k is not None else None)
    three = q.dim() == 3
    q4 = q.unsqueeze(2) if three else q
    if q4.dim() != 4 or q4.dtype not in (torch.float16, torch.bfloat16) or not q4.is_cuda:
        raise ValueError(f"q must be a CUDA fp16/bf16 (B, Hq, Tq, D), got {q.dtype} {tuple(q.shape)}")
    b, hq, tq, d = q4.shape
    if q4.stride(3) != 1:
        q4 = q4.contiguous()
    softcap = float(softcap)
    if not (math.isfinite(softcap) and softcap >= 0.0):
        raise ValueError(f"decode_attention.softcap must be a finite float >= 0 (0 = off), got {softcap}")
    if int(sliding_window) != sliding_window or sliding_window < 0:
        raise ValueError(f"decode_attention.sliding_window must be an int >= 0 (0 = off), got {sliding_window}")
    hkv = cache_k.heads
    if (b, d) != (cache_k.batch, cache_k.head_dim):
        raise ValueError(f"q {tuple(q.shape)} does not match the cache (B={cache_k.batch}, D={cache_k.head_dim})")
    _check_lens(lens, b)
    w = 0
    if window_k is not None:
        if window_v is None or window_k.dtype != torch.float16 or window_k.shape != window_v.shape \
                or window_k.stride() != window_v.stride() or window_k.stride(3) != 1:
            raise ValueError("window_k / window_v must be fp16 (B, Hkv, W, D) of equal shape and strides")
        w = window_k.shape[2]
        if window_lens is not None:
            _check_lens(window_lens, b, "window_lens")
    row_tiles = -(-(hq // max(1, hkv)) * tq // 16)
    splits = num_splits or num_splits_for(b, hkv * row_tiles, max_len + w, d)
    out = torch.empty((b, hq, tq, d), dtype=q4.dtype, device=q4.device)
    rows = b * hq * tq  # query rows: q and the partials per row, then the codec's extra
    ws = torch.empty(rows * d + rows * splits * _WARPS * (d + 4) + extra_workspace_floats(codec, b, hq * tq, d),
                     dtype=torch.float32, device=q4.device)
    a = _abi.KvxDecodeArgs()
    a.batch, a.q_heads, a.kv_heads, a.head_dim = b, hq, hkv, d
    a.q_dtype = _DTYPE[q4.dtype]
    a.q, a.q_sB, a.q_sH, a.q_sT = q4.data_ptr(), q4.stride(0), q4.stride(1), q4.stride(2)
    a.out, a.o_sB, a.o_sH, a.o_sT = out.data_ptr(), out.stride(0), out.stride(1), out.stride(2)
    a.q_tokens = tq
    a.softcap, a.sliding_window = softcap, int(sliding_window)
    a.lens, a.max_len, a.capacity = lens.data_ptr(), max_len, capacity
    _fields(cache_k, a.k)
    _fields(cache_v, a.v)
    if w:
        a.win_k, a.win_v = window_k.data_ptr(), window_v.data_ptr()
        a.w_sB, a.w_sH, a.w_sT = window_k.stride(0), window_k.stride(1), window_k.stride(2)
        a.win_lens = window_lens.data_ptr() if window_lens is not None else None
    a.win_max = w
    for i, c in enumerate(cache_k.consts):
        a.consts[i] = c.data_ptr()
    for k_, v_ in kernel_params(codec, d).items():
        setattr(a, k_, v_)
    a.scale = 1.0 / math.sqrt(d) if scale is None else scale
    a.num_splits = splits
    a.workspace = ws.data_ptr()
    _call(f"kvx_{codec.name}_decode" + ("_v2" if kernel == "v2" else ""), a)
    return out[:, :, 0] if three else out


def append(cache: KernelCache, x: torch.Tensor, lens: torch.Tensor, *, max_len: int | None = None) -> None:
    """Encode x (B, Hkv, n_new, D) fp16/bf16/fp32 into ``cache`` at tokens lens[b].. in place.

    Bytes equal the Python encoder's (``codec.append``) up to fp32 rounding at cell
    boundaries (docs/KERNELS.md).  ``lens`` is not advanced; the caller adds n_new.
    Refuses lens[b] + n_new > ``cache.capacity`` before launching; ``max_len`` (>= max(lens))
    is needed only under CUDA-graph capture, where lens cannot be read.
    """
    if x.dim() != 4 or x.shape[0] != cache.batch or x.shape[1] != cache.heads or x.shape[3] != cache.head_dim:
        raise ValueError(f"x {tuple(x.shape)} does not match the cache ({cache.batch}, {cache.heads}, *, {cache.head_dim})")
    max_len = check_append_bounds(cache.capacity, x.shape[2], lens, max_len)
    if x.dtype not in _DTYPE or not x.is_cuda:
        raise ValueError(f"x must be a CUDA fp16/bf16/fp32 tensor, got {x.dtype}")
    if x.stride(3) != 1:
        x = x.contiguous()
    _check_lens(lens, cache.batch)
    a = _abi.KvxAppendArgs()
    a.batch, a.kv_heads, a.head_dim, a.n_new = cache.batch, cache.heads, cache.head_dim, x.shape[2]
    a.x_dtype = _DTYPE[x.dtype]
    a.x, a.x_sB, a.x_sH, a.x_sT = x.data_ptr(), x.stride(0), x.stride(1), x.stride(2)
    a.lens, a.max_len, a.capacity = lens.data_ptr(), max_len, cache.capacity
    a.role = 0 if cache.role == "key" else 1
    _fields(cache, a.f)
    for i, c in enumerate(cache.consts):
        a.consts[i] = c.data_ptr()
    for k_, v_ in kernel_params(cache.codec, cache.head_dim).items():
        setattr(a, k_, v_)
    _call(f"kvx_{cache.codec.name}_append", a)


__all__ = ["KernelsUnavailable", "KernelCache", "available", "library", "build", "decode_attention",
           "append", "supported", "num_splits_for", "check_decode_bounds", "check_append_bounds"]
