"""One decode step of grouped-query attention with rotary embeddings and the KV-cache write fused in
(Llama family, every head computed; the sparse-head variant is the next step of issue #7).

Layout: ``qkv`` [B, KVH * (G + 2) * D] group-major (for key-value group g: the queries of its G heads,
then its key, then its value: what a dense projection with the decoder's weight layout returns);
``k_cache``/``v_cache`` [B, KVH, T, D] hold keys after the rotary embedding; ``valid`` uint8
[B, KVH, T]; ``cos``/``sin`` fp32 [max_positions, D] (the half-split RoPE of transformers' Llama);
``pos`` a one-element device tensor. Returns the heads' outputs [B, H * D], head by head.

Flash-decoding: program (b, g, s) covers cached positions [s * CHUNK, (s + 1) * CHUNK) below ``pos``
for the G query heads of group g at once (each key and value is read once per group); split 0 also
rotates and writes the new key/value and takes the current token; a second kernel merges the splits.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import check_float, next_pow2
from .decode_attention import merge_splits


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
    qkv_ptr, k_ptr, v_ptr, valid_ptr, pos_ptr, cos_ptr, sin_ptr, part_ptr,
    KVH, T, scale, stride_qkv_b, stride_cb, stride_ch, stride_ct,
    G: tl.constexpr, G_P2: tl.constexpr, D: tl.constexpr, NSPLIT: tl.constexpr, CHUNK: tl.constexpr,
):
    b = tl.program_id(0)
    g = tl.program_id(1)
    s = tl.program_id(2)
    pos = tl.load(pos_ptr).to(tl.int32)
    t0 = s * CHUNK
    if (s == 0) | (t0 < pos):
        d = tl.arange(0, D)
        j = tl.arange(0, G_P2)
        j_ok = j < G
        base = qkv_ptr + b * stride_qkv_b + g * ((G + 2) * D)
        cos = tl.load(cos_ptr + pos * D + d)
        sin = tl.load(sin_ptr + pos * D + d)
        # queries of the group [G_P2, D], rotated
        q = _rope(base, j[:, None] * D, d[None, :], cos[None, :], sin[None, :], j_ok[:, None], D) * scale
        cache = b.to(tl.int64) * stride_cb + g.to(tl.int64) * stride_ch
        vrow = valid_ptr + (b * KVH + g) * T
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
            k_new = _rope(base + G * D, 0, d, cos, sin, d < D, D)
            v_new = tl.load(base + (G + 1) * D + d)
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
def _gqa_combine_kernel(part_ptr, pos_ptr, out_ptr, KVH, stride_out_b,
                        G: tl.constexpr, G_P2: tl.constexpr, D: tl.constexpr, NSPLIT: tl.constexpr,
                        SPLIT_P2: tl.constexpr, CHUNK: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    g = h // G
    j = h % G
    pos = tl.load(pos_ptr).to(tl.int32)
    n_live = tl.maximum(1, tl.cdiv(pos, CHUNK))
    sp = tl.arange(0, SPLIT_P2)
    s_ok = sp < n_live
    d = tl.arange(0, D)
    rows = part_ptr + (((b * KVH + g) * NSPLIT + sp) * G_P2 + j) * (D + 2)
    out = merge_splits(rows, s_ok, d, D)
    tl.store(out_ptr + b * stride_out_b + h * D + d, out.to(out_ptr.dtype.element_ty))


def _check(qkv, k_cache, v_cache, valid, pos, cos, sin, ref):
    check_float("k_cache", k_cache, ndims=(4,), any_device=ref)
    B, KVH, T, D = k_cache.shape
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"v_cache must match k_cache {tuple(k_cache.shape)} {k_cache.dtype}")
    check_float("qkv", qkv, ndims=(2,), dtype=k_cache.dtype, device=k_cache.device, last_contiguous=True,
                any_device=ref)
    if qkv.shape[0] != B or qkv.shape[1] % (KVH * D) or qkv.shape[1] // (KVH * D) < 3:
        raise ValueError(f"qkv has shape {tuple(qkv.shape)}; expected [{B}, {KVH} * (G + 2) * {D}]")
    if valid.dtype != torch.uint8 or tuple(valid.shape) != (B, KVH, T):
        raise ValueError(f"valid must be uint8 {(B, KVH, T)}, got {valid.dtype} {tuple(valid.shape)}")
    if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[1] != D or cos.dtype != torch.float32:
        raise ValueError(f"cos and sin must be fp32 [max_positions, {D}]")
    if not isinstance(pos, torch.Tensor) or pos.numel() != 1:
        raise TypeError("pos must be a one-element integer tensor on the device")
    G = qkv.shape[1] // (KVH * D) - 2
    return B, KVH, T, D, G


def gqa_decode_attention(qkv, k_cache, v_cache, valid, pos, cos, sin, scale=None, *, chunk=None):
    """See the module docstring. Writes the rotated key, the value and ``valid`` at ``pos``."""
    B, KVH, T, D, G = _check(qkv, k_cache, v_cache, valid, pos, cos, sin, ref=False)
    if D & (D - 1):
        raise ValueError(f"head_dim {D} must be a power of two for the Triton kernel")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    out = torch.empty((B, KVH * G * D), device=qkv.device, dtype=qkv.dtype)
    g_p2 = max(1, next_pow2(G))
    chunk = chunk or max(16, min(64, 8192 // (g_p2 * D)))
    nsplit = triton.cdiv(T, chunk)
    part = torch.empty((B, KVH, nsplit, g_p2, D + 2), device=qkv.device, dtype=torch.float32)
    _gqa_split_kernel[(B, KVH, nsplit)](
        qkv, k_cache, v_cache, valid, pos, cos, sin, part, KVH, T, scale,
        qkv.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        G=G, G_P2=g_p2, D=D, NSPLIT=nsplit, CHUNK=chunk, num_warps=4,
    )
    _gqa_combine_kernel[(B, KVH * G)](
        part, pos, out, KVH, out.stride(0),
        G=G, G_P2=g_p2, D=D, NSPLIT=nsplit, SPLIT_P2=max(2, next_pow2(nsplit)), CHUNK=chunk, num_warps=4,
    )
    return out


def apply_rope(x, cos, sin):
    """The half-split rotary embedding of transformers' Llama: x [..., D] with cos/sin broadcastable."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def gqa_decode_attention_ref(qkv, k_cache, v_cache, valid, pos, cos, sin, scale=None, *, chunk=None):
    """Plain-PyTorch reference of :func:`gqa_decode_attention` (capturable: fixed shapes)."""
    B, KVH, T, D, G = _check(qkv, k_cache, v_cache, valid, pos, cos, sin, ref=True)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    pos1 = pos.reshape(1).long()
    parts = qkv.view(B, KVH, G + 2, D)
    c = cos.index_select(0, pos1).to(qkv.dtype)
    s = sin.index_select(0, pos1).to(qkv.dtype)
    q = apply_rope(parts[:, :, :G], c, s)  # [B, KVH, G, D]
    k_cache.index_copy_(2, pos1, apply_rope(parts[:, :, G : G + 1], c, s))
    v_cache.index_copy_(2, pos1, parts[:, :, G + 1 : G + 2].contiguous())
    valid.index_fill_(2, pos1, 1)
    scores = torch.einsum("bgqd,bgtd->bgqt", q.float(), k_cache.float()) * scale
    live = (valid != 0) & (torch.arange(T, device=qkv.device) <= pos1)[None, None, :]
    scores = scores.masked_fill(~live[:, :, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    heads = torch.einsum("bgqt,bgtd->bgqd", probs, v_cache.float()).to(qkv.dtype)
    return heads.reshape(B, KVH * G * D)
