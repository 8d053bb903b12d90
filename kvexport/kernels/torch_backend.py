"""The compressed session on the CUDA kernels: a drop-in for :class:`kvexport.models.cache.LayerCache`.

``CompressedKVCache(plan, ..., backend="cuda")`` gives every layer a :class:`KernelLayerCache`:
preallocated :class:`~kvexport.kernels.KernelCache` key / value buffers (grown geometrically),
tokens leaving the fp16 window encoded in place by the append kernel, attention by the fused
decode kernel.  State after ``n`` tokens is the reference's (docs/KERNELS.md "Torch binding"):
packed tokens ``[0, m)``, ``m = max(0, n - W)``, the newest ``n - m`` in an fp16 window buffer;
a codec's own raw residual (kivi / qjl / ternary-channel keys) lives in the kernel cache's ring.

- Decode (Tq = 1): append the token leaving the window, write the new one into the window
  buffer, one decode launch for the batch.
- Prefill (Tq > 1): the per-row path of the TensorRT plugin (plugins/trt/src/kvx_plugin.cpp
  ``enqueueAttention``): per sequence, the Tq queries are the rows of one launch over the same
  cache (batch stride 0) with per-row packed lengths ``m_t = max(0, p_t + 1 - W)`` and per-row
  fp16 windows (tokens ``[m_t, p_t]`` gathered), so query ``p_t`` sees exactly what it would
  have seen decoding token by token.  Codecs with a raw residual ring are run in sub-chunks of
  rows whose ``m_t`` lie in one ring period, so the ring still holds every row's residual keys.

Not supported (errors naming the layer, never a silent fallback): codecs without kernels,
different key / value codecs in one layer (the decode kernel reads one codec), and softcap /
sliding-window layers while :func:`kvexport.kernels.decode_attention` does not take them.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch

from ..codecs import Codec
from ..codecs._core.numerics import store_fp16, to_fp16
from .cache import KernelCache, SLOTS, supported

_MAX_ROWS = 512  # query rows per prefill launch (bounds the gathered window: rows × Hkv × W × D fp16)
DEVICE_TYPE = "cuda"  # where the kernels run (the CPU tests swap in a reference emulation of the kernels)


def check_layer(layer: int, key_codec: Codec, value_codec: Codec) -> None:
    """Raise ``ValueError`` naming ``layer`` if the kernels cannot run its codecs."""
    for c in (key_codec, value_codec):
        if not supported(c):
            raise ValueError(f"layer {layer}: codec {c.name!r} has no CUDA kernels (have {', '.join(SLOTS)}); "
                             f"use backend='torch'")
    if key_codec.spec_hash != value_codec.spec_hash:
        raise ValueError(f"layer {layer}: keys use {key_codec.name} and values {value_codec.name}; the CUDA "
                         f"decode kernel reads one codec for both (compress='k'/'v' and value_codec need "
                         f"backend='torch')")


def require_kernels() -> None:
    """Raise :class:`KernelsUnavailable` (no GPU, no nvcc, failed build) with a backend-named reason."""
    from . import KernelsUnavailable, library
    try:
        library()
    except KernelsUnavailable as e:
        raise KernelsUnavailable(f"backend='cuda' needs the CUDA kernels: {e}") from None


def _mask_kwargs(layer: int, softcap: float, sliding_window: int) -> dict:
    """Keyword arguments for ``decode_attention``; an error naming the layer where it lacks them."""
    from . import decode_attention
    params = inspect.signature(decode_attention).parameters
    out = {}
    for name, val in (("softcap", softcap), ("sliding_window", sliding_window)):
        if val:
            if name not in params:
                raise ValueError(f"layer {layer}: {name}={val} is not supported by the CUDA decode kernel yet; "
                                 f"use backend='torch'")
            out[name] = val
    return out


def _grow(cache: KernelCache, capacity: int) -> KernelCache:
    """A copy of ``cache`` with room for ``capacity`` tokens (token / group axes copied as a prefix)."""
    new = KernelCache.allocate(cache.codec, cache.role, cache.batch, cache.heads, cache.head_dim, capacity,
                               device=next(iter(cache.fields.values())).device)
    for name, buf in cache.fields.items():
        dst = new.fields[name]
        if dst.shape[3:] != buf.shape[3:] or dst.shape[2] < buf.shape[2]:
            raise RuntimeError(f"{cache.codec.name}.{name}: layout changes with capacity, cannot grow")
        dst[:, :, :buf.shape[2]].copy_(buf)
    return new


def _rows_view(cache: KernelCache, b: int, rows: int) -> KernelCache:
    """Sequence ``b`` of ``cache`` seen by ``rows`` query rows (batch stride 0, no copy)."""
    return dataclasses.replace(cache, batch=rows,
                               fields={n: t[b:b + 1].expand(rows, *t.shape[1:]) for n, t in cache.fields.items()})


class KernelLayerCache:
    """One layer's cache on the CUDA kernels; same interface as ``LayerCache`` (``attend``, ``n``,
    ``packed_tokens``, ``nbytes``).  Buffers are allocated on the first ``attend`` (B, Hkv, D and
    the device come from k) with ``capacity`` tokens (default 256), doubled when full."""

    def __init__(self, codec: Codec, window: int, value_codec: Codec | None = None, *, layer: int = 0,
                 capacity: int | None = None) -> None:
        self.codec = codec
        self.vcodec = codec if value_codec is None else value_codec
        check_layer(layer, self.codec, self.vcodec)
        self.window = int(window)
        self.layer = layer
        self.capacity = capacity
        self.n = 0   # tokens seen
        self.m = 0   # tokens in the packed cache
        self.ck: KernelCache | None = None
        self.cv: KernelCache | None = None
        self.lens: torch.Tensor | None = None       # (B,) int32 = m, the kernels' view
        self.wk: torch.Tensor | None = None         # (B, Hkv, 2W, D) fp16: tokens [ws, n)
        self.wv: torch.Tensor | None = None
        self.ws = 0

    @property
    def packed_tokens(self) -> int:
        return self.m

    def nbytes(self) -> int:
        """Bytes held, counted as ``LayerCache.nbytes``: packed layout of m tokens + fp16 window."""
        if self.ck is None:
            return 0
        b, h, d = self.ck.batch, self.ck.heads, self.ck.head_dim
        total = 0
        if self.m:
            total += self.codec.nbytes(d, self.m, "key", b, h) + self.vcodec.nbytes(d, self.m, "value", b, h)
        return total + 2 * 2 * b * h * (self.n - self.m) * d

    # ----- buffers -------------------------------------------------------------------------
    def _ensure(self, b: int, h: int, d: int, device: torch.device, need: int) -> None:
        if self.ck is None:
            cap = max(self.capacity or 256, need, 1)
            self.ck = KernelCache.allocate(self.codec, "key", b, h, d, cap, device=device)
            self.cv = KernelCache.allocate(self.vcodec, "value", b, h, d, cap, device=device)
            self.lens = torch.zeros(b, dtype=torch.int32, device=device)
            if self.window:
                self.wk = torch.zeros(b, h, 2 * self.window, d, dtype=torch.float16, device=device)
                self.wv = torch.zeros_like(self.wk)
            return
        if (b, h, d) != (self.ck.batch, self.ck.heads, self.ck.head_dim):
            raise ValueError(f"layer {self.layer}: k (B={b}, Hkv={h}, D={d}) does not match the cache "
                             f"(B={self.ck.batch}, Hkv={self.ck.heads}, D={self.ck.head_dim}); reset first")
        if need > self.ck.capacity:
            cap = max(need, 2 * self.ck.capacity)
            self.ck, self.cv = _grow(self.ck, cap), _grow(self.cv, cap)

    def _append(self, xk: torch.Tensor, xv: torch.Tensor) -> None:
        """Encode fp16 xk / xv (B, Hkv, c, D) at packed tokens [m, m + c)."""
        from . import append
        c = xk.shape[2]
        if c == 0:
            return
        append(self.ck, xk, self.lens)
        append(self.cv, xv, self.lens)
        self.lens += c
        self.m += c

    # ----- attention -----------------------------------------------------------------------
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
               sliding_window: int | None = None, softcap: float | None = None) -> torch.Tensor:
        """Append k, v (B, Hkv, Tq, D) at positions [n, n+Tq) and attend q (B, Hq, Tq, D) → fp32
        (B, Hq, Tq, D), each query with the view it had when its own token was appended."""
        if not all(t.device.type == DEVICE_TYPE for t in (q, k, v)):
            raise ValueError(f"layer {self.layer}: backend='cuda' needs the model on a CUDA device, "
                             f"got q on {q.device}")
        extra = _mask_kwargs(self.layer, float(softcap or 0.0), int(sliding_window or 0))
        b, h, tq, d = k.shape
        # The kernels read fp16 / bf16 queries: fp32 models are staged through fp16 (as the plugin),
        # saturating so that |q| > 65504 does not become Inf.
        if q.dtype not in (torch.float16, torch.bfloat16):
            q = to_fp16(q)
        # The encoder sees the fp16 token LayerCache packs from its raw tail (same conversion).
        kf, vf = store_fp16(k), store_fp16(v)
        self._ensure(b, h, d, q.device, max(0, self.n + tq - self.window))
        out = self._decode(q, kf, vf, scale, extra) if tq == 1 else self._prefill(q, kf, vf, scale, extra)
        self.n += tq
        return out.to(torch.float32)

    def _decode(self, q, kf, vf, scale, extra):
        from . import decode_attention
        n, w = self.n, self.window
        win = {}
        if w == 0:
            self._append(kf, vf)
        else:
            pos = n - self.ws
            if pos >= self.wk.shape[2]:  # buffer full: move the live tokens [m, n) to the front
                live = slice(self.m - self.ws, pos)
                self.wk[:, :, :n - self.m] = self.wk[:, :, live].clone()
                self.wv[:, :, :n - self.m] = self.wv[:, :, live].clone()
                self.ws = self.m
                pos = n - self.ws
            self.wk[:, :, pos] = kf[:, :, 0]
            self.wv[:, :, pos] = vf[:, :, 0]
            if n + 1 - w > self.m:  # token m leaves the window for the packed cache
                i = self.m - self.ws
                self._append(self.wk[:, :, i:i + 1], self.wv[:, :, i:i + 1])
            lo, hi = self.m - self.ws, n + 1 - self.ws
            win = dict(window_k=self.wk[:, :, lo:hi], window_v=self.wv[:, :, lo:hi])
        return decode_attention(q, self.ck, self.cv, self.lens, scale=scale, max_len=max(self.m, 1),
                                **win, **extra)

    def _ring(self) -> list[int]:
        """Periods of the codecs' raw residual rings (kivi / qjl / ternary-channel keys)."""
        return [c.fields["residual"].shape[2] for c in (self.ck, self.cv) if "residual" in c.fields]

    def _prefill(self, q, kf, vf, scale, extra):
        from . import decode_attention
        n0, w, m0 = self.n, self.window, self.m
        b, h, tq, d = kf.shape
        dev = q.device
        # fp16 tokens [m0, n0 + tq): the window's live tokens, then the new ones.
        if w and n0 > m0:
            rk = torch.cat([self.wk[:, :, m0 - self.ws:n0 - self.ws], kf], dim=2)
            rv = torch.cat([self.wv[:, :, m0 - self.ws:n0 - self.ws], vf], dim=2)
        else:
            rk, rv = kf, vf
        pos = list(range(n0, n0 + tq))
        mt = [max(0, p + 1 - w) for p in pos]  # packed tokens each query sees
        rings = self._ring()
        # Row sub-chunks: one ring period of m_t each (rows whose residual the ring still holds).
        bounds, key = [0], None
        for t, m in enumerate(mt):
            kk = tuple(-(-m // g) for g in rings)
            if t and (kk != key or t - bounds[-1] >= _MAX_ROWS):
                bounds.append(t)
            key = kk
        bounds.append(tq)
        out = torch.empty(b, q.shape[1], tq, d, dtype=q.dtype, device=dev)
        for t0, t1 in zip(bounds, bounds[1:]):
            top = mt[t1 - 1]
            if top > self.m:
                self._append(rk[:, :, self.m - m0:top - m0], rv[:, :, self.m - m0:top - m0])
            r = t1 - t0
            lens = torch.tensor(mt[t0:t1], dtype=torch.int32, device=dev)
            win = {}
            if w:
                wl = [pos[t] + 1 - mt[t] for t in range(t0, t1)]
                wmax = max(wl)
                idx = (torch.tensor(mt[t0:t1], device=dev) - m0)[:, None] + torch.arange(wmax, device=dev)[None]
                idx = idx.clamp(max=rk.shape[2] - 1).reshape(-1)  # entries past window_lens are never read
                wlens = torch.tensor(wl, dtype=torch.int32, device=dev)
            for bi in range(b):
                if w:
                    gk = rk[bi].index_select(1, idx).view(h, r, wmax, d).permute(1, 0, 2, 3)
                    gv = rv[bi].index_select(1, idx).view(h, r, wmax, d).permute(1, 0, 2, 3)
                    win = dict(window_k=gk, window_v=gv, window_lens=wlens)
                qr = q[bi, :, t0:t1].transpose(0, 1).unsqueeze(2)  # (rows, Hq, 1, D)
                o = decode_attention(qr, _rows_view(self.ck, bi, r), _rows_view(self.cv, bi, r), lens,
                                     scale=scale, max_len=max(top, 1), **win, **extra)
                out[bi, :, t0:t1] = o[:, :, 0].transpose(0, 1)
        assert self.m == mt[-1], (self.m, mt[-1])
        if w:  # the window's live tokens [m, n0 + tq) to the buffer's front
            live = rk[:, :, self.m - m0:]
            self.wk[:, :, :live.shape[2]] = live
            self.wv[:, :, :live.shape[2]] = rv[:, :, self.m - m0:]
            self.ws = self.m
        return out


__all__ = ["KernelLayerCache", "check_layer", "require_kernels"]
