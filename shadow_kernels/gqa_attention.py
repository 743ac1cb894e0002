"""One decode step of grouped-query attention with rotary embeddings and the KV-cache write fused in
(Llama family), over all query heads or a selected subset.

Layout: ``qkv`` [B, U * D] holds *units* of ``D`` features: a query of one head, or the key or the value
of one key-value group. A dense projection with the decoder's group-major weight layout gives, for group
g, the queries of its G heads, then its key, then its value (U = KVH * (G + 2)); a gather of the rows of
selected units gives any compacted subset. Three int32 maps say where things are:

- ``q_unit`` [H]: the unit holding head h's query, or -1 when the token skips head h;
- ``kv_unit`` [KVH]: the unit holding group g's key (its value is the next unit), or -1 when the token
  skips every query head of the group;
- ``out_slot`` [H]: the slot of head h's output in ``out`` [B, H * D] (-1 when skipped; slots no head
  maps to are not written). Left out, all three describe the dense layout (out_slot = h).

KV policy under grouped-query attention: a group's key and value are computed and cached when at least one
of its query heads is kept (every query head of the group, kept later, sees them); when all of its heads
are skipped the group writes ``valid = 0`` at ``pos`` and the token is invisible to the whole group, as
for a skipped head in multi-head attention (:mod:`shadow_kernels.decode_attention`).

``k_cache``/``v_cache`` [B, KVH, T, D] hold keys after the rotary embedding; ``valid`` uint8
[B, KVH, T]; ``cos``/``sin`` fp32 [max_positions, D] (the half-split RoPE of transformers' Llama);
``pos`` a one-element device tensor.

Flash-decoding: program (b, g, s) covers cached positions [s * CHUNK, (s + 1) * CHUNK) below ``pos``
for the G query heads of group g at once (each key and value is read once per group); split 0 also
rotates and writes the new key/value and takes the current token; a second kernel merges the splits.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import check_device, check_float, next_pow2
from .decode_attention import merge_splits
from .pdl import pdl_kwargs, pdl_sync


@triton.jit
def _rope(ptr, row_offs, d, cos, sin, mask, D: tl.constexpr):
    """Rotated rows ``ptr + row_offs + d`` (fp32): x * cos + rotate_half(x) * sin, where
    rotate_half(x)[d] = -x[d + D/2] in the first half and x[d - D/2] in the second."""
    x = tl.load(ptr + row_offs + d, mask=mask, other=0.0).to(tl.float32)
    partner = tl.where(d < D // 2, d + D // 2, d - D // 2)
    xr = tl.load(ptr + row_offs + partner, mask=mask, other=0.0).to(tl.float32)
    return x * cos + tl.where(d < D // 2, -xr, xr) * sin


@triton.jit
def _gqa_split_kernel(
    qkv_ptr, k_ptr, v_ptr, valid_ptr, pos_ptr, cos_ptr, sin_ptr, qunit_ptr, kvunit_ptr, part_ptr,
    KVH, T, scale, stride_qkv_b, stride_cb, stride_ch, stride_ct,
    G: tl.constexpr, G_P2: tl.constexpr, D: tl.constexpr, NSPLIT: tl.constexpr, CHUNK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    if USE_PDL:  # see shadow_kernels.pdl
        pdl_sync()
    b = tl.program_id(0)
    g = tl.program_id(1)
    s = tl.program_id(2)
    pos = tl.load(pos_ptr).to(tl.int32)
    t0 = s * CHUNK
    kvu = tl.load(kvunit_ptr + g)
    vrow = valid_ptr + (b * KVH + g) * T
    if kvu < 0:  # every query head of the group skipped: the token is invisible to the group
        if s == 0:
            tl.store(vrow + pos, tl.zeros([], dtype=tl.uint8))
    elif (s == 0) | (t0 < pos):
        d = tl.arange(0, D)
        j = tl.arange(0, G_P2)
        qu = tl.load(qunit_ptr + g * G + j, mask=j < G, other=-1)
        q_ok = qu >= 0
        base = qkv_ptr + b * stride_qkv_b
        cos = tl.load(cos_ptr + pos * D + d)
        sin = tl.load(sin_ptr + pos * D + d)
        # queries of the group's kept heads [G_P2, D], rotated (rows of skipped heads are zero)
        q = _rope(base, qu[:, None] * D, d[None, :], cos[None, :], sin[None, :], q_ok[:, None], D) * scale
        cache = b.to(tl.int64) * stride_cb + g.to(tl.int64) * stride_ch
        t = t0 + tl.arange(0, CHUNK)
        t_ok = t < pos
        live = (tl.load(vrow + t, mask=t_ok, other=0) != 0) & t_ok
        kv_off = cache + t[:, None] * stride_ct + d[None, :]
        k = tl.load(k_ptr + kv_off, mask=live[:, None], other=0.0).to(tl.float32)
        v = tl.load(v_ptr + kv_off, mask=live[:, None], other=0.0).to(tl.float32)
        sc = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [G_P2, CHUNK]
        sc = tl.where(live[None, :], sc, float("-inf"))
        m = tl.max(sc, axis=1)
        if s == 0:
            k_new = _rope(base + kvu * D, 0, d, cos, sin, d < D, D)
            v_new = tl.load(base + (kvu + 1) * D + d)
            tl.store(k_ptr + cache + pos * stride_ct + d, k_new.to(k_ptr.dtype.element_ty))
            tl.store(v_ptr + cache + pos * stride_ct + d, v_new)
            tl.store(vrow + pos, tl.full([], 1, dtype=tl.uint8))
            s_cur = tl.sum(q * k_new.to(k_ptr.dtype.element_ty).to(tl.float32)[None, :], axis=1)  # [G_P2]
            m = tl.maximum(m, s_cur)
            p = tl.exp(sc - m[:, None])
            p_cur = tl.exp(s_cur - m)
            l_i = tl.sum(p, axis=1) + p_cur
            acc = tl.sum(p[:, :, None] * v[None, :, :], axis=1) + p_cur[:, None] * v_new.to(tl.float32)[None, :]
        else:
            m_safe = tl.where(m == float("-inf"), 0.0, m)
            p = tl.exp(sc - m_safe[:, None])
            l_i = tl.sum(p, axis=1)
            acc = tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        row = part_ptr + (((b * KVH + g) * NSPLIT + s) * G_P2 + j) * (D + 2)
        tl.store(row[:, None] + d[None, :], acc)
        tl.store(row + D, m)
        tl.store(row + D + 1, l_i)


@triton.jit
def _gqa_combine_kernel(part_ptr, pos_ptr, outslot_ptr, out_ptr, KVH, stride_out_b,
                        G: tl.constexpr, G_P2: tl.constexpr, D: tl.constexpr, NSPLIT: tl.constexpr,
                        SPLIT_P2: tl.constexpr, CHUNK: tl.constexpr, USE_PDL: tl.constexpr):
    if USE_PDL:  # see shadow_kernels.pdl
        pdl_sync()
    b = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(outslot_ptr + h)
    if slot >= 0:
        g = h // G
        j = h % G
        pos = tl.load(pos_ptr).to(tl.int32)
        n_live = tl.maximum(1, tl.cdiv(pos, CHUNK))
        sp = tl.arange(0, SPLIT_P2)
        s_ok = sp < n_live
        d = tl.arange(0, D)
        rows = part_ptr + (((b * KVH + g) * NSPLIT + sp) * G_P2 + j) * (D + 2)
        out = merge_splits(rows, s_ok, d, D)
        tl.store(out_ptr + b * stride_out_b + slot * D + d, out.to(out_ptr.dtype.element_ty))


def dense_units(n_heads: int, n_kv_heads: int, device=None):
    """``q_unit``, ``kv_unit`` and ``out_slot`` of the dense group-major layout (int32)."""
    if n_kv_heads < 1 or n_heads % n_kv_heads:
        raise ValueError(f"n_heads {n_heads} must be a positive multiple of n_kv_heads {n_kv_heads}")
    G = n_heads // n_kv_heads
    h = torch.arange(n_heads, dtype=torch.int32, device=device)
    g = torch.arange(n_kv_heads, dtype=torch.int32, device=device)
    return (h // G) * (G + 2) + h % G, g * (G + 2) + G, h


def _check_maps(q_unit, kv_unit, out_slot, H, KVH, device, ref):
    given = [m is not None for m in (q_unit, kv_unit, out_slot)]
    if any(given) and not all(given):
        raise ValueError("q_unit, kv_unit and out_slot go together: give all three or none")
    if not all(given):
        return dense_units(H, KVH, device)
    for name, m, n in (("q_unit", q_unit, H), ("kv_unit", kv_unit, KVH), ("out_slot", out_slot, H)):
        if not isinstance(m, torch.Tensor) or m.dtype != torch.int32 or tuple(m.shape) != (n,):
            raise TypeError(f"{name} must be an int32 tensor of shape ({n},), got "
                            f"{getattr(m, 'dtype', type(m))} {tuple(getattr(m, 'shape', ()))}")
        check_device(name, m, device, any_device=ref)
        if not m.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    return q_unit, kv_unit, out_slot


def _check(qkv, k_cache, v_cache, valid, pos, cos, sin, ref, dense):
    check_float("k_cache", k_cache, ndims=(4,), any_device=ref)
    B, KVH, T, D = k_cache.shape
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"v_cache must match k_cache {tuple(k_cache.shape)} {k_cache.dtype}")
    check_float("qkv", qkv, ndims=(2,), dtype=k_cache.dtype, device=k_cache.device, last_contiguous=True,
                any_device=ref)
    if qkv.shape[0] != B or qkv.shape[1] % D or (dense and (qkv.shape[1] % (KVH * D) or qkv.shape[1] // (KVH * D) < 3)):
        raise ValueError(f"qkv has shape {tuple(qkv.shape)}; expected [{B}, {KVH} * (G + 2) * {D}]"
                         + ("" if dense else f" or fewer units of {D}"))
    if valid.dtype != torch.uint8 or tuple(valid.shape) != (B, KVH, T):
        raise ValueError(f"valid must be uint8 {(B, KVH, T)}, got {valid.dtype} {tuple(valid.shape)}")
    if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[1] != D or cos.dtype != torch.float32:
        raise ValueError(f"cos and sin must be fp32 [max_positions, {D}]")
    if not isinstance(pos, torch.Tensor) or pos.numel() != 1:
        raise TypeError("pos must be a one-element integer tensor on the device")
    return B, KVH, T, D


def _group(n_heads, KVH, qkv, D):
    if n_heads is None:
        return qkv.shape[1] // (KVH * D) - 2
    if n_heads % KVH:
        raise ValueError(f"n_heads {n_heads} must be a multiple of the cache's {KVH} key-value heads")
    return n_heads // KVH


def gqa_decode_attention(qkv, k_cache, v_cache, valid, pos, cos, sin, scale=None, q_unit=None, kv_unit=None,
                         out_slot=None, *, chunk=None):
    """See the module docstring. Writes the rotated key, the value and ``valid`` at ``pos``.

    Returns [B, H * D]; with maps, only the slots of kept heads are written."""
    dense = q_unit is None
    B, KVH, T, D = _check(qkv, k_cache, v_cache, valid, pos, cos, sin, ref=False, dense=dense)
    G = _group(None if dense else q_unit.shape[0], KVH, qkv, D)
    q_unit, kv_unit, out_slot = _check_maps(q_unit, kv_unit, out_slot, KVH * G, KVH, qkv.device, ref=False)
    if D & (D - 1):
        raise ValueError(f"head_dim {D} must be a power of two for the Triton kernel")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    out = torch.empty((B, KVH * G * D), device=qkv.device, dtype=qkv.dtype)
    g_p2 = max(1, next_pow2(G))
    chunk = chunk or max(16, min(64, 8192 // (g_p2 * D)))
    nsplit = triton.cdiv(T, chunk)
    part = torch.empty((B, KVH, nsplit, g_p2, D + 2), device=qkv.device, dtype=torch.float32)
    _gqa_split_kernel[(B, KVH, nsplit)](
        qkv, k_cache, v_cache, valid, pos, cos, sin, q_unit, kv_unit, part, KVH, T, scale,
        qkv.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        G=G, G_P2=g_p2, D=D, NSPLIT=nsplit, CHUNK=chunk, num_warps=4, **pdl_kwargs(qkv.device),
    )
    _gqa_combine_kernel[(B, KVH * G)](
        part, pos, out_slot, out, KVH, out.stride(0),
        G=G, G_P2=g_p2, D=D, NSPLIT=nsplit, SPLIT_P2=max(2, next_pow2(nsplit)), CHUNK=chunk, num_warps=4,
        **pdl_kwargs(qkv.device),
    )
    return out


def apply_rope(x, cos, sin):
    """The half-split rotary embedding of transformers' Llama: x [..., D] with cos/sin broadcastable."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def gqa_decode_attention_ref(qkv, k_cache, v_cache, valid, pos, cos, sin, scale=None, q_unit=None, kv_unit=None,
                             out_slot=None, *, chunk=None):
    """Plain-PyTorch reference of :func:`gqa_decode_attention` (capturable: fixed shapes, no host reads).
    Slots that no kept head maps to are zero."""
    dense = q_unit is None
    B, KVH, T, D = _check(qkv, k_cache, v_cache, valid, pos, cos, sin, ref=True, dense=dense)
    G = _group(None if dense else q_unit.shape[0], KVH, qkv, D)
    H = KVH * G
    q_unit, kv_unit, out_slot = _check_maps(q_unit, kv_unit, out_slot, H, KVH, qkv.device, ref=True)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    pos1 = pos.reshape(1).long()
    units = qkv.view(B, -1, D)
    c = cos.index_select(0, pos1).to(qkv.dtype)
    s = sin.index_select(0, pos1).to(qkv.dtype)
    q = apply_rope(units[:, q_unit.clamp(min=0).long()], c, s).view(B, KVH, G, D)
    kvu = kv_unit.clamp(min=0).long()
    live_g = (kv_unit >= 0)[None, :, None, None]  # [1, KVH, 1, 1]
    k_new = apply_rope(units[:, kvu, None], c, s)  # [B, KVH, 1, D]
    k_cache.index_copy_(2, pos1, torch.where(live_g, k_new, k_cache.index_select(2, pos1)))
    v_cache.index_copy_(2, pos1, torch.where(live_g, units[:, kvu + 1, None], v_cache.index_select(2, pos1)))
    valid.index_copy_(2, pos1, (kv_unit >= 0).to(torch.uint8)[None, :, None].expand(B, KVH, 1).contiguous())
    scores = torch.einsum("bgqd,bgtd->bgqt", q.float(), k_cache.float()) * scale
    live = (valid != 0) & (torch.arange(T, device=qkv.device) <= pos1)[None, None, :]
    scores = scores.masked_fill(~live[:, :, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a dead group has no live position
    heads = torch.einsum("bgqt,bgtd->bgqd", probs, v_cache.float()).to(qkv.dtype).reshape(B, H, D)
    target = torch.where(out_slot >= 0, out_slot, H).long()
    out = torch.zeros(B, H + 1, D, dtype=qkv.dtype, device=qkv.device)
    out.index_copy_(1, target, heads)  # skipped heads all land in the spare slot H
    return out[:, :H].reshape(B, H * D)
