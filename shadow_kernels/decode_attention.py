"""One decode step of multi-head attention over the selected heads, with the KV-cache write fused in.

Layout (one token per sequence, ``B`` sequences, ``H`` heads of ``D`` features, cache length ``T``):

- ``qkv`` [B, S * 3 * D]: the projections of the ``S`` computed head *slots*, slot by slot, each
  ``q | k | v`` (this is what ``gather_rows_gemv`` returns for the Q/K/V rows of the selected heads,
  and what a dense projection returns when the rows are stored head by head).
- ``head_slot`` int32 [H]: the slot that holds head ``h``, or -1 when the token skips head ``h``.
- ``k_cache``, ``v_cache`` [B, H, T, D]; ``valid`` uint8 [B, H, T]: 1 where the cache holds a key and
  value for that head and position.
- ``pos``: one-element integer device tensor, the position of the current token.

For every head the step writes ``valid[:, h, pos]``: 1 and the new key/value when the head is
computed, 0 when it is skipped. A skipped head therefore has no entry for this token, and later
tokens that compute the head attend only to positions where it was computed (the token is invisible
to that head). Writing 0 also makes the step idempotent: replaying it at the same position with a
different selection leaves no stale entries.

The output ``out`` [B, S * D] holds each computed head's attention output in its slot; slots that no
head maps to are not written (``gather_cols_gemv`` with the plan's ``count`` never reads them).
Queries are multiplied by ``scale`` (OPT scales after the bias; same thing).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import check_device, check_flag, check_float, check_pos, next_pow2
from .pdl import pdl_kwargs, pdl_sync


@triton.jit
def _attend_tile(q, k, v, live, m_i, l_i, acc):
    """One tile of cached keys/values into the online softmax state (m_i, l_i, acc); dead positions masked."""
    s = tl.where(live, tl.sum(k.to(tl.float32) * q[None, :], axis=1), float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=0))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new)
    acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
    l_i = l_i * alpha + tl.sum(p, axis=0)
    return m_new, l_i, acc


@triton.jit
def _decode_attention_kernel(
    qkv_ptr, k_ptr, v_ptr, valid_ptr, pos_ptr, slot_ptr, out_ptr,
    H, T, scale,
    stride_qkv_b, stride_out_b, stride_cb, stride_ch, stride_ct,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    USE_PDL: tl.constexpr, PRELOAD: tl.constexpr = False,
):
    # PRELOAD: the first tile of cached keys and values (the whole cache when it fits one tile), pos, the
    # slot and the valid flags are read before the PDL wait; this token's q | k | v after it.
    if USE_PDL and not PRELOAD:  # see shadow_kernels.pdl
        pdl_sync()
    b = tl.program_id(0)
    h = tl.program_id(1)
    pos = tl.load(pos_ptr).to(tl.int32)
    slot = tl.load(slot_ptr + h)
    vrow = valid_ptr + b * H * T + h * T
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    cache = b.to(tl.int64) * stride_cb + h.to(tl.int64) * stride_ch
    t_offs = tl.arange(0, BLOCK_T)
    t_ok = t_offs < tl.where(slot >= 0, pos, 0)
    live0 = (tl.load(vrow + t_offs, mask=t_ok, other=0) != 0) & t_ok
    kv_off0 = cache + t_offs[:, None] * stride_ct + d[None, :]
    k0 = tl.load(k_ptr + kv_off0, mask=live0[:, None] & d_ok[None, :], other=0.0)
    v0 = tl.load(v_ptr + kv_off0, mask=live0[:, None] & d_ok[None, :], other=0.0)
    if USE_PDL and PRELOAD:
        pdl_sync()
    if slot < 0:
        tl.store(vrow + pos, tl.zeros([], dtype=tl.uint8))
    else:
        base = qkv_ptr + b * stride_qkv_b + slot * (3 * D)
        q = tl.load(base + d, mask=d_ok, other=0.0).to(tl.float32) * scale
        k_new = tl.load(base + D + d, mask=d_ok, other=0.0)
        v_new = tl.load(base + 2 * D + d, mask=d_ok, other=0.0)
        tl.store(k_ptr + cache + pos * stride_ct + d, k_new, mask=d_ok)
        tl.store(v_ptr + cache + pos * stride_ct + d, v_new, mask=d_ok)
        tl.store(vrow + pos, tl.full([], 1, dtype=tl.uint8))
        # The current token first (its own key is always present), then earlier positions in
        # blocks with an online softmax; positions this head skipped are masked out.
        m_i = tl.sum(q * k_new.to(tl.float32), axis=0)
        l_i = m_i * 0.0 + 1.0
        acc = v_new.to(tl.float32)
        m_i, l_i, acc = _attend_tile(q, k0, v0, live0, m_i, l_i, acc)
        for t0 in range(BLOCK_T, pos, BLOCK_T):
            t = t0 + t_offs
            t_ok = t < pos
            live = (tl.load(vrow + t, mask=t_ok, other=0) != 0) & t_ok
            kv_off = cache + t[:, None] * stride_ct + d[None, :]
            kv_mask = live[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0)
            m_i, l_i, acc = _attend_tile(q, k, v, live, m_i, l_i, acc)
        out = acc / l_i
        tl.store(out_ptr + b * stride_out_b + slot * D + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def _decode_attention_split_kernel(
    qkv_ptr, k_ptr, v_ptr, valid_ptr, pos_ptr, slot_ptr, part_ptr,
    H, T, scale,
    stride_qkv_b, stride_cb, stride_ch, stride_ct,
    NSPLIT: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
    USE_PDL: tl.constexpr, PRELOAD: tl.constexpr = False,
):
    # PRELOAD: with PDL, the cached keys and values of earlier positions (and pos, the head's slot, the
    # valid flags) are read before the wait; only this token's q | k | v, the producer's output, after it.
    if USE_PDL and not PRELOAD:  # see shadow_kernels.pdl
        pdl_sync()
    # Flash-decoding: program (b, h, s) covers cached positions [s * CHUNK, (s + 1) * CHUNK) below pos;
    # split 0 also writes the new key/value and takes the current token. Partials (m, l, acc[D])
    # go to part [B, H, NSPLIT, BLOCK_D + 2] and _decode_attention_combine_kernel merges them.
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    pos = tl.load(pos_ptr).to(tl.int32)
    slot = tl.load(slot_ptr + h)
    vrow = valid_ptr + b * H * T + h * T
    t0 = s * CHUNK
    work = (slot >= 0) & ((s == 0) | (t0 < pos))
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    cache = b.to(tl.int64) * stride_cb + h.to(tl.int64) * stride_ch
    t = t0 + tl.arange(0, CHUNK)
    t_ok = t < tl.where(work, pos, 0)  # (a scalar bool in a mask is what the interpreter refuses)
    live = (tl.load(vrow + t, mask=t_ok, other=0) != 0) & t_ok
    kv_off = cache + t[:, None] * stride_ct + d[None, :]
    kv_mask = live[:, None] & d_ok[None, :]
    k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0)
    if USE_PDL and PRELOAD:
        pdl_sync()
    if slot < 0:
        if s == 0:
            tl.store(vrow + pos, tl.zeros([], dtype=tl.uint8))
    elif work:
        base = qkv_ptr + b * stride_qkv_b + slot * (3 * D)
        q = tl.load(base + d, mask=d_ok, other=0.0).to(tl.float32) * scale
        sc = tl.where(live, tl.sum(k.to(tl.float32) * q[None, :], axis=1), float("-inf"))
        m = tl.max(sc, axis=0)
        if s == 0:
            k_new = tl.load(base + D + d, mask=d_ok, other=0.0)
            v_new = tl.load(base + 2 * D + d, mask=d_ok, other=0.0)
            tl.store(k_ptr + cache + pos * stride_ct + d, k_new, mask=d_ok)
            tl.store(v_ptr + cache + pos * stride_ct + d, v_new, mask=d_ok)
            tl.store(vrow + pos, tl.full([], 1, dtype=tl.uint8))
            s_cur = tl.sum(q * k_new.to(tl.float32), axis=0)
            m = tl.maximum(m, s_cur)
            p = tl.exp(sc - m)
            p_cur = tl.exp(s_cur - m)
            l_i = tl.sum(p, axis=0) + p_cur
            acc = tl.sum(p[:, None] * v.to(tl.float32), axis=0) + p_cur * v_new.to(tl.float32)
        else:
            m_safe = tl.where(m == float("-inf"), 0.0, m)  # a chunk with no live position
            p = tl.exp(sc - m_safe)
            l_i = tl.sum(p, axis=0)
            acc = tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        row = part_ptr + ((b * H + h) * NSPLIT + s) * (BLOCK_D + 2)
        tl.store(row + d, acc)
        tl.store(row + BLOCK_D, m)
        tl.store(row + BLOCK_D + 1, l_i)


@triton.jit
def merge_splits(rows, s_ok, d, WIDTH: tl.constexpr):
    """Merges flash-decoding partials: ``rows`` points at one row per split laid out as
    ``acc[WIDTH] | m | l`` (m the running max, l the sum of exponentials); returns acc / l over the
    splits where ``s_ok``."""
    m = tl.load(rows + WIDTH, mask=s_ok, other=float("-inf"))
    w = tl.where(s_ok, tl.exp(m - tl.max(m, axis=0)), 0.0)
    l_i = tl.sum(w * tl.load(rows + WIDTH + 1, mask=s_ok, other=0.0), axis=0)
    acc = tl.load(rows[:, None] + d[None, :], mask=s_ok[:, None], other=0.0)
    return tl.sum(w[:, None] * acc, axis=0) / l_i


@triton.jit
def _decode_attention_combine_kernel(
    part_ptr, pos_ptr, slot_ptr, out_ptr, H, stride_out_b,
    NSPLIT: tl.constexpr, SPLIT_P2: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
    USE_PDL: tl.constexpr, PRELOAD: tl.constexpr = False,
):
    if USE_PDL and not PRELOAD:  # see shadow_kernels.pdl
        pdl_sync()
    b = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slot_ptr + h)
    pos = tl.load(pos_ptr).to(tl.int32)
    if USE_PDL and PRELOAD:  # the partials are the producer's output; pos and the slot are not
        pdl_sync()
    if slot >= 0:
        n_live = tl.maximum(1, tl.cdiv(pos, CHUNK))
        sp = tl.arange(0, SPLIT_P2)
        s_ok = sp < n_live
        d = tl.arange(0, BLOCK_D)
        rows = part_ptr + ((b * H + h) * NSPLIT + sp) * (BLOCK_D + 2)
        out = merge_splits(rows, s_ok, d, BLOCK_D)
        tl.store(out_ptr + b * stride_out_b + slot * D + d, out.to(out_ptr.dtype.element_ty), mask=d < D)


def _check(qkv, k_cache, v_cache, valid, pos, head_slot, ref=False):
    check_float("k_cache", k_cache, ndims=(4,), any_device=ref)
    B, H, T, D = k_cache.shape
    dev = k_cache.device
    if not k_cache.is_contiguous():
        raise ValueError("k_cache must be contiguous [B, H, T, D]")
    check_float("v_cache", v_cache, ndims=(4,), dtype=k_cache.dtype, device=dev, any_device=ref)
    if v_cache.shape != k_cache.shape or not v_cache.is_contiguous():
        raise ValueError(f"v_cache must be a contiguous tensor of shape {tuple(k_cache.shape)} like k_cache, "
                         f"got {tuple(v_cache.shape)}")
    check_float("qkv", qkv, ndims=(2,), dtype=k_cache.dtype, device=dev, last_contiguous=True, any_device=ref)
    if qkv.shape[0] != B or qkv.shape[1] % (3 * D) != 0:
        raise ValueError(f"qkv has shape {tuple(qkv.shape)}; expected [{B}, S * {3 * D}] (S slots of q|k|v)")
    if not isinstance(valid, torch.Tensor) or valid.dtype != torch.uint8 or valid.shape != (B, H, T):
        raise ValueError(f"valid must be a uint8 tensor of shape {(B, H, T)}, got "
                         f"{getattr(valid, 'dtype', type(valid).__name__)} {tuple(getattr(valid, 'shape', ()))}")
    check_device("valid", valid, dev, any_device=ref)
    if not valid.is_contiguous():
        raise ValueError("valid must be contiguous")
    check_pos(pos, dev, any_device=ref)
    if not isinstance(head_slot, torch.Tensor) or head_slot.dtype != torch.int32 or head_slot.shape != (H,):
        raise TypeError(f"head_slot must be an int32 tensor of shape ({H},), got "
                        f"{getattr(head_slot, 'dtype', type(head_slot).__name__)} "
                        f"{tuple(getattr(head_slot, 'shape', ()))}")
    check_device("head_slot", head_slot, dev, any_device=ref)
    return B, H, T, D, qkv.shape[1] // (3 * D)


CHUNK = 64  # cached positions per program of the split kernel
# The default form (``chunk=None``):
# - with ``preload``, one launch when the whole cache fits one tile of at most ``preload_tile`` elements
#   (``next_pow2(T) * BLOCK_D``): every program reads all of its head's cached keys and values before the PDL
#   wait, and the combine launch is gone;
# - otherwise one launch, one program per head, where the cache holds at most ``one_launch_t`` positions, each
#   program's K and V tiles ``block_t`` positions long with ``block_t * BLOCK_D <= tile`` and
#   ``block_t <= max_block_t``; past that the flash-decoding split (two launches) above.
# Eight warps past 8192 elements a tile; ``tile_warps`` for the preloaded one (4: OPT-1.3B decode 1.1585 vs 1.1621 ms
# with 8 and 1.1955 with 16 when whole decode steps were timed; notes/kernels.md). The split's programs take ``chunk``
# positions each.
_ATTN = {"one_launch_t": 64, "max_block_t": 64, "tile": 8192, "preload_tile": 16384, "chunk": CHUNK,
         "tile_warps": 4}


def settings() -> dict:
    """The default form's thresholds and tile sizes (latency rows record them)."""
    return dict(_ATTN)


def decode_attention(qkv, k_cache, v_cache, valid, pos, head_slot, scale=None, *, chunk=None, preload=False):
    """Attention of one new token per sequence over the selected heads; see the module docstring.

    Writes the new keys/values and ``valid`` in place; returns ``out`` [B, S * D] in the cache dtype.
    ``pos`` must be below the cache length T (not checked on the device).
    ``chunk``: cached positions per program (flash-decoding split, two launches); 0 runs one
    program per head over all positions (one launch). Default (``_ATTN``): with ``preload``, one launch when the
    cache fits one tile (``next_pow2(T) * next_pow2(D) <= 16384``, e.g. 256 positions of 64 features); otherwise
    split when T > 64.
    ``preload`` (with programmatic dependent launch): read ``pos``, ``head_slot``, ``valid`` and the cached keys
    and values of earlier positions (the split form: all of them; one launch: its first tile) before waiting for
    the kernel before this one, which must not write any of them (in the decoders it is the Q/K/V GEMV); only
    ``qkv`` is waited for.
    """
    B, H, T, D, S = _check(qkv, k_cache, v_cache, valid, pos, head_slot)
    check_flag("preload", preload)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    out = torch.empty((B, S * D), device=qkv.device, dtype=qkv.dtype)
    if B == 0 or H == 0:
        return out
    block_d = next_pow2(D)
    one_tile = preload and next_pow2(T) * block_d <= _ATTN["preload_tile"]
    if chunk is None:
        chunk = 0 if one_tile or _ATTN["one_launch_t"] >= T else _ATTN["chunk"]
    if chunk:
        if chunk & (chunk - 1) or chunk < 16:
            raise ValueError(f"chunk must be a power of two >= 16 or 0, got {chunk}")
        nsplit = triton.cdiv(T, chunk)
        part = torch.empty((B, H, nsplit, block_d + 2), device=qkv.device, dtype=torch.float32)
        _decode_attention_split_kernel[(B, H, nsplit)](
            qkv, k_cache, v_cache, valid, pos, head_slot, part, H, T, scale,
            qkv.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            NSPLIT=nsplit, D=D, BLOCK_D=block_d, CHUNK=chunk, num_warps=4, PRELOAD=preload,
            **pdl_kwargs(qkv.device),
        )
        _decode_attention_combine_kernel[(B, H)](
            part, pos, head_slot, out, H, out.stride(0),
            NSPLIT=nsplit, SPLIT_P2=max(2, next_pow2(nsplit)), D=D, BLOCK_D=block_d, CHUNK=chunk, num_warps=4,
            PRELOAD=preload, **pdl_kwargs(qkv.device),
        )
        return out
    if one_tile:
        block_t = max(16, next_pow2(T))
    else:
        block_t = max(16, min(_ATTN["max_block_t"], next_pow2(T), _ATTN["tile"] // block_d))
    _decode_attention_kernel[(B, H)](
        qkv, k_cache, v_cache, valid, pos, head_slot, out,
        H, T, scale,
        qkv.stride(0), out.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        D=D, BLOCK_D=block_d, BLOCK_T=block_t, PRELOAD=preload,
        num_warps=_ATTN["tile_warps"] if one_tile else (8 if block_t * block_d > 8192 else 4),
        **pdl_kwargs(qkv.device),
    )
    return out


def decode_attention_ref(qkv, k_cache, v_cache, valid, pos, head_slot, scale=None, *, chunk=None, preload=False):
    """Plain-PyTorch reference of :func:`decode_attention` (same effects; fixed shapes, so it can be
    captured in a CUDA graph too)."""
    B, H, T, D, S = _check(qkv, k_cache, v_cache, valid, pos, head_slot, ref=True)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    dev = qkv.device
    pos = pos.reshape(1).long()
    computed = head_slot >= 0  # [H]
    slot = head_slot.clamp(min=0).long()
    padded = torch.cat([qkv.view(B, S, 3, D), qkv.new_zeros(B, 1, 3, D)], dim=1)  # S may be 0
    parts = padded.index_select(1, slot)  # [B, H, 3, D] in head order
    old_k = k_cache.index_select(2, pos)[:, :, 0]
    old_v = v_cache.index_select(2, pos)[:, :, 0]
    new_k = torch.where(computed[None, :, None], parts[:, :, 1], old_k)
    new_v = torch.where(computed[None, :, None], parts[:, :, 2], old_v)
    k_cache.index_copy_(2, pos, new_k[:, :, None])
    v_cache.index_copy_(2, pos, new_v[:, :, None])
    valid.index_copy_(2, pos, computed.to(torch.uint8)[None, :, None].expand(B, H, 1).contiguous())
    q = parts[:, :, 0].float() * scale
    scores = torch.einsum("bhd,bhtd->bht", q, k_cache.float())
    live = (valid != 0) & (torch.arange(T, device=dev) <= pos)[None, None, :]
    scores = scores.masked_fill(~live, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # skipped heads may have no live entry
    o = torch.einsum("bht,bhtd->bhd", probs, v_cache.float()).to(qkv.dtype)
    # Each computed head goes to its slot; skipped heads go to a spare slot that is dropped.
    target = torch.where(computed, slot, S)
    out = torch.zeros((B, S + 1, D), device=dev, dtype=qkv.dtype)
    out.index_copy_(1, target, o)
    return out[:, :S].reshape(B, S * D)
