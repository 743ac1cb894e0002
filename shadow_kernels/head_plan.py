"""The head plan of a layer from its selected heads, in one launch: what the attention and its projections read.

A predictor mode selects heads with :func:`shadow_kernels.topk.topk_indices` (padded index lists ``idx`` [n, S] in
ascending head order, ``count`` [n]) and then needs, per layer (see :mod:`models.plan`):

- ``head_slot`` [n, H + 1]: the output slot of each head (its rank among the kept heads), -1 when skipped;
- ``out_rows`` [n, S * D] and ``out_count`` [n]: the rows of the transposed out_proj weight, slot by slot;
- without grouped-query attention (OPT): ``qkv_rows`` [n, S * 3D] and ``qkv_count``, the head-major Q/K/V rows;
- with it (Llama): the *units* of D rows that the Q/K/V GEMV computes, group by group in the dense order (the
  queries of the kept heads, and the key and value of every group with a kept head, or of every group under the
  key/value rule ``always``): ``q_unit`` [n, H] and ``kv_unit`` [n, KVH] (the unit each lands in, -1 when not
  computed), ``qkv_rows`` [n, S_units * D] and ``qkv_count``.

In PyTorch that is a dozen small kernels per call (fill, scatter, cumsum, where, cat, copies); a per-layer predictor
(DejaVu) pays them in every layer of every decoded token. :func:`head_plan` writes all of it in one launch, one
program per layer. :func:`head_plan_ref` is the PyTorch reference, with the same effects.

Slots past ``count`` keep the padding that PyTorch's index arithmetic gives them (rows of head 0 or unit 0): the
kernels read only ``count`` rows, and the padding is the same in both implementations, so the buffers match
bit for bit.

The kernel launches without programmatic dependent launch (:mod:`shadow_kernels.pdl`), as a PyTorch kernel does:
the decode step's GEMVs preload their index lists before waiting for the kernel before them, so the last writer of
a plan must finish before the next kernel starts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import next_pow2


@dataclass(frozen=True)
class HeadPlanBuffers:
    """Views of the plan buffers that :func:`head_plan` writes, rows ``[n]`` of the layers being filled. ``q_unit``
    and ``kv_unit`` are None without grouped-query attention."""

    head_slot: torch.Tensor  # int32 [n, H + 1]
    qkv_rows: torch.Tensor  # int32 [n, S * 3D] or [n, S_units * D]
    qkv_count: torch.Tensor  # int32 [n]
    out_rows: torch.Tensor  # int32 [n, S * D]
    out_count: torch.Tensor  # int32 [n]
    q_unit: torch.Tensor | None = None  # int32 [n, H]
    kv_unit: torch.Tensor | None = None  # int32 [n, KVH]


def _check(idx, count, bufs: HeadPlanBuffers, n_heads: int, head_dim: int, n_kv_heads: int | None):
    if idx.dim() != 2 or idx.dtype != torch.int32 or count.shape != (idx.shape[0],) or count.dtype != torch.int32:
        raise ValueError(f"idx must be int32 [n, S] and count int32 [n], got {tuple(idx.shape)} {idx.dtype} and "
                         f"{tuple(count.shape)} {count.dtype}")
    n, S = idx.shape
    gqa = n_kv_heads is not None
    if gqa and (n_kv_heads < 1 or n_heads % n_kv_heads):
        raise ValueError(f"n_heads {n_heads} must be a positive multiple of n_kv_heads {n_kv_heads}")
    if gqa != (bufs.q_unit is not None and bufs.kv_unit is not None):
        raise ValueError("q_unit and kv_unit are the grouped-query buffers: give both with n_kv_heads, neither without")
    want = {"head_slot": (n, n_heads + 1), "out_rows": (n, S * head_dim), "qkv_count": (n,), "out_count": (n,)}
    if gqa:
        want.update(q_unit=(n, n_heads), kv_unit=(n, n_kv_heads))
    else:
        want["qkv_rows"] = (n, S * 3 * head_dim)
    for name, shape in want.items():
        t = getattr(bufs, name)
        if tuple(t.shape) != shape or t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32 {shape}, got {t.dtype} {tuple(t.shape)}")
    if gqa and (bufs.qkv_rows.dim() != 2 or bufs.qkv_rows.shape[0] != n or bufs.qkv_rows.shape[1] % head_dim
                or bufs.qkv_rows.dtype != torch.int32):
        raise ValueError(f"qkv_rows must be int32 [{n}, units * {head_dim}], got {bufs.qkv_rows.dtype} "
                         f"{tuple(bufs.qkv_rows.shape)}")


def head_plan_ref(idx, count, bufs: HeadPlanBuffers, *, n_heads: int, head_dim: int, n_kv_heads: int | None = None,
                  kv_always: bool = False, validate: bool = True) -> None:
    """PyTorch reference of :func:`head_plan`."""
    if validate:
        _check(idx, count, bufs, n_heads, head_dim, n_kv_heads)
    n, S = idx.shape
    H, D, dev = n_heads, head_dim, idx.device
    slot_ids = torch.arange(S, dtype=torch.int32, device=dev)
    live = slot_ids[None, :] < count[:, None]
    target = torch.where(live, idx, H).long()
    bufs.head_slot.fill_(-1)
    bufs.head_slot.scatter_(1, target, slot_ids.expand(n, S))
    bufs.head_slot[:, H].fill_(-1)  # the padding column took the padding slots' ids
    rows1 = torch.arange(D, dtype=torch.int32, device=dev)
    torch.add(rows1, idx[:, :, None], alpha=D, out=bufs.out_rows.view(n, S, D))
    torch.mul(count, D, out=bufs.out_count)
    if n_kv_heads is None:
        rows3 = torch.arange(3 * D, dtype=torch.int32, device=dev)
        torch.add(rows3, idx[:, :, None], alpha=3 * D, out=bufs.qkv_rows.view(n, S, 3 * D))
        torch.mul(count, 3 * D, out=bufs.qkv_count)
        return
    KVH = n_kv_heads
    G = H // KVH
    U = KVH * (G + 2)
    s_units = bufs.qkv_rows.shape[1] // D
    hl = (bufs.head_slot[:, :H] >= 0).view(n, KVH, G)
    group_live = torch.ones_like(hl[:, :, :1]) if kv_always else hl.any(dim=2, keepdim=True)
    unit_live = torch.cat([hl, group_live, group_live], dim=2).view(n, U)
    offs = torch.cumsum(unit_live, dim=1, dtype=torch.int32) - 1
    unit_at = torch.where(unit_live, offs, -1).view(n, KVH, G + 2)
    bufs.q_unit.copy_(unit_at[:, :, :G].reshape(n, H))
    bufs.kv_unit.copy_(unit_at[:, :, G])
    compact = torch.zeros((n, U + 1), dtype=torch.int32, device=dev)
    compact.scatter_(1, torch.where(unit_live, offs, U).long(), torch.arange(U, dtype=torch.int32, device=dev)
                     .expand(n, U))
    if s_units > U:
        raise ValueError(f"qkv_rows holds {s_units} units, the layer has {U}")
    torch.add(rows1, compact[:, :s_units, None], alpha=D, out=bufs.qkv_rows.view(n, s_units, D))
    torch.mul(unit_live.sum(dim=1, dtype=torch.int32), D, out=bufs.qkv_count)


@triton.jit
def _head_plan_kernel(idx_ptr, count_ptr, slot_ptr, out_rows_ptr, out_count_ptr, qkv_rows_ptr, qkv_count_ptr,
                      q_unit_ptr, kv_unit_ptr, S, H, D, KVH, S_UNITS, s_idx, s_slot, s_out, s_qkv, s_q, s_kv,
                      SP: tl.constexpr, HP: tl.constexpr, DP: tl.constexpr, UP: tl.constexpr, G: tl.constexpr,
                      GQA: tl.constexpr, KV_ALWAYS: tl.constexpr):
    layer = tl.program_id(0).to(tl.int64)
    cnt = tl.load(count_ptr + layer)
    s = tl.arange(0, SP)
    in_s = s < S
    live = s < cnt
    h = tl.load(idx_ptr + layer * s_idx + s, mask=in_s, other=0)  # padding slots hold head 0, as topk writes them
    # each head's slot: the live slot that names it, else -1 (head H, the padding column, is never named)
    hh = tl.arange(0, HP)
    match = (h[None, :] == hh[:, None]) & live[None, :]
    slot_of = tl.max(tl.where(match, s[None, :], -1), axis=1)
    tl.store(slot_ptr + layer * s_slot + hh, slot_of, mask=hh < H + 1)
    d = tl.arange(0, DP)
    dm = d < D
    tl.store(out_rows_ptr + layer * s_out + s[:, None] * D + d[None, :], h[:, None] * D + d[None, :],
             mask=in_s[:, None] & dm[None, :])
    tl.store(out_count_ptr + layer, cnt * D)
    if GQA:
        # units in the dense order, group by group: the group's G queries, then its key and its value
        u = tl.arange(0, UP)
        g = u // (G + 2)
        j = u % (G + 2)
        in_u = u < KVH * (G + 2)
        head_live = tl.max(match.to(tl.int32), axis=1)  # [HP]
        q_live = tl.max((((g * G + j)[:, None] == hh[None, :]) & (j < G)[:, None] & (head_live[None, :] > 0))
                        .to(tl.int32), axis=1)
        # a group's key and value: live when one of its queries is (or always)
        grp_live = tl.max(((hh[None, :] // G == g[:, None]) & (hh[None, :] < H) & (head_live[None, :] > 0))
                          .to(tl.int32), axis=1)
        if KV_ALWAYS:
            grp_live = grp_live * 0 + 1
        unit_live = tl.where(j < G, q_live, grp_live) * in_u.to(tl.int32)
        offs = tl.cumsum(unit_live, axis=0) - 1
        unit_at = tl.where(unit_live > 0, offs, -1)
        tl.store(q_unit_ptr + layer * s_q + g * G + j, unit_at, mask=in_u & (j < G))
        tl.store(kv_unit_ptr + layer * s_kv + g, unit_at, mask=in_u & (j == G))
        # the compact unit list: live units at their offsets; the slots after them hold unit 0 (zero padding)
        n_live = tl.sum(unit_live, axis=0)
        row_base = tl.where(unit_live > 0, offs, S_UNITS)
        tl.store(qkv_rows_ptr + layer * s_qkv + row_base[:, None] * D + d[None, :], u[:, None] * D + d[None, :],
                 mask=(unit_live > 0)[:, None] & (offs < S_UNITS)[:, None] & dm[None, :])
        pad = (u >= n_live) & (u < S_UNITS)
        tl.store(qkv_rows_ptr + layer * s_qkv + u[:, None] * D + d[None, :], d[None, :] + 0 * u[:, None],
                 mask=pad[:, None] & dm[None, :])
        tl.store(qkv_count_ptr + layer, n_live * D)
    else:
        r = tl.arange(0, 4 * DP)
        rm = r < 3 * D
        tl.store(qkv_rows_ptr + layer * s_qkv + s[:, None] * (3 * D) + r[None, :], h[:, None] * (3 * D) + r[None, :],
                 mask=in_s[:, None] & rm[None, :])
        tl.store(qkv_count_ptr + layer, cnt * 3 * D)


def head_plan(idx, count, bufs: HeadPlanBuffers, *, n_heads: int, head_dim: int, n_kv_heads: int | None = None,
              kv_always: bool = False, validate: bool = True) -> None:
    """Write the head plans of ``n`` layers from their selected heads (``idx`` [n, S], ``count`` [n], int32, as
    :func:`shadow_kernels.topk.topk_indices` returns them) into ``bufs``, one program per layer. ``n_kv_heads``:
    the grouped-query layout (``q_unit``, ``kv_unit`` and the unit rows); ``kv_always``: every group's key and
    value computed. See the module docstring for the layout."""
    if validate:
        _check(idx, count, bufs, n_heads, head_dim, n_kv_heads)
    n, S = idx.shape
    if n == 0:
        return
    gqa = n_kv_heads is not None
    G = n_heads // n_kv_heads if gqa else 1
    U = n_kv_heads * (G + 2) if gqa else 1
    s_units = bufs.qkv_rows.shape[1] // head_dim if gqa else 0
    if gqa and s_units > U:
        raise ValueError(f"qkv_rows holds {s_units} units, the layer has {U}")
    q = bufs.q_unit if gqa else bufs.head_slot
    kv = bufs.kv_unit if gqa else bufs.head_slot
    for name, t in vars(bufs).items():
        if t is not None and t.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride in its last dimension")
    _head_plan_kernel[(n,)](idx, count, bufs.head_slot, bufs.out_rows, bufs.out_count, bufs.qkv_rows, bufs.qkv_count,
                            q, kv, S, n_heads, head_dim, n_kv_heads or 1, s_units, idx.stride(0),
                            bufs.head_slot.stride(0), bufs.out_rows.stride(0), bufs.qkv_rows.stride(0), q.stride(0),
                            kv.stride(0), SP=next_pow2(max(S, 1)), HP=next_pow2(n_heads + 1),
                            DP=next_pow2(head_dim), UP=next_pow2(U), G=G, GQA=gqa, KV_ALWAYS=bool(kv_always),
                            num_warps=4)
