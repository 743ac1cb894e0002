"""Gather-segments GEMV: ``y = x @ weight[:, idx].T + bias`` where ``idx`` is made of whole segments.

The output projection of attention over the selected heads. ``weight`` stays in its natural layout
([N outputs, K inputs], as in the checkpoint); the inputs of one head are ``segment`` (= head_dim)
consecutive columns, so each output row holds a head's weights as one contiguous piece of
``segment`` elements. A program owns whole output rows and walks the selected heads, reading every
head's piece of each of its rows: complete dot products, no split of the reduction and nothing to add
up afterwards.

The same op as :func:`shadow_kernels.gather_cols_gemv` on the transposed weight,
which splits the selected inputs over programs (split-K) and then sums partials: at out_proj's sizes
(13-26 MB on OPT-13B) that kernel spent half its time on the split's start and finish (47% of the copy
bandwidth on OPT-13B at s=0.5), while a whole-row GEMV over the same bytes made contiguous reached 82%.

Index format (the decoder's ``out_rows`` plans, see models.plan): ``idx`` holds the selected columns,
head by head: ``idx[s * segment + d] = idx[s * segment] + d`` with ``idx[s * segment]`` a multiple of
``segment``. The kernel reads only the first column of each segment. ``count`` (device-side, a multiple
of ``segment``) says how many entries are live, as for the other GEMVs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRET,
    autotune_bench,
    bias_only,
    check_float,
    check_indexed_input,
    configs_for_platform,
    dot_acc,
    gemv_kernel_for,
    is_capturing,
    next_pow2,
    zero_past_count,
)
from .pdl import pdl_kwargs, pdl_sync
from .tuned import pinned_prune


@triton.jit
def _head_starts(idx_ptr, offs_s, n_seg, SEG: tl.constexpr, SEG_ALIGN: tl.constexpr):
    """The first column of the selected segments ``offs_s`` (0 past the live ones)."""
    return tl.multiple_of(tl.load(idx_ptr + offs_s * SEG, mask=offs_s < n_seg, other=0), SEG_ALIGN)


@triton.jit
def _head_x(x_row, s, n_seg, d, d_ok, SEG: tl.constexpr):
    """The inputs [len(s), SEG_P2] of the selected segments ``s`` of one batch row (0 past the live ones)."""
    return tl.load(x_row + s[:, None] * SEG + d[None, :], mask=(s < n_seg)[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def _head_tile(w_rows, base, s_ok, r_ok, d, d_ok, PAD: tl.constexpr):
    """The weights [BLOCK_N, HB, SEG_P2] of rows ``w_rows`` in the segments starting at columns ``base``; ``PAD``
    when the segment is narrower than its power of two (masked along the contiguous dimension only then)."""
    ok = r_ok[:, None, None] & s_ok[None, :, None]
    if PAD:
        ok = ok & d_ok[None, None, :]
    return tl.load(w_rows[:, None, None] + (base[:, None] + d[None, :])[None, :, :], mask=ok, other=0.0)


@triton.jit
def _segments_kernel(
    w_ptr, x_ptr, idx_ptr, count_ptr, bias_ptr, y_ptr,
    B, N, n_idx,
    stride_wn, stride_xb, stride_yb,
    SEGS_BUCKET,  # only an autotune key: the power of two above the number of segments
    SEG: tl.constexpr, SEG_P2: tl.constexpr, SEG_ALIGN: tl.constexpr,
    HAS_COUNT: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_IEEE: tl.constexpr,
    USE_PDL: tl.constexpr, PRELOAD: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, HB: tl.constexpr, PREFETCH: tl.constexpr = 0,
    AHEAD: tl.constexpr = 1,
):
    # A program owns BLOCK_N output rows for BLOCK_B batch rows and walks the live segments, HB at a time
    # (batch 1: a [BLOCK_N, HB, SEG] tile of weights; a batch: one segment a step, a tensor-core dot).
    if USE_PDL and not PRELOAD:  # see shadow_kernels.pdl
        pdl_sync()
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    r_ok = rows < N
    limit = n_idx
    if HAS_COUNT:
        limit = tl.minimum(tl.load(count_ptr), n_idx)
    n_seg = limit // SEG
    d = tl.arange(0, SEG_P2)
    d_ok = d < SEG
    w_rows = w_ptr + rows.to(tl.int64) * stride_wn
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = offs_b < B

    if BLOCK_B == 1 and AHEAD == 2:
        # Two tiles read before the wait and kept two ahead in the loop. Only x depends on the kernel before
        # this one, so with preload a program has 2 * HB segments of weights in flight while that kernel finishes
        # (OPT-13B out_proj at s=0.7 is 6 steps of HB = 2 a program: the wait is a third of its time)
        x_row = x_ptr + pid_b * stride_xb
        offs_s = tl.arange(0, HB)
        w = _head_tile(w_rows, _head_starts(idx_ptr, offs_s, n_seg, SEG, SEG_ALIGN), offs_s < n_seg, r_ok, d, d_ok,
                       SEG != SEG_P2)
        w1 = _head_tile(w_rows, _head_starts(idx_ptr, offs_s + HB, n_seg, SEG, SEG_ALIGN), offs_s + HB < n_seg, r_ok,
                        d, d_ok, SEG != SEG_P2)
        base = _head_starts(idx_ptr, offs_s + 2 * HB, n_seg, SEG, SEG_ALIGN)
        if USE_PDL and PRELOAD:
            pdl_sync()
        x = _head_x(x_row, offs_s, n_seg, d, d_ok, SEG)
        x1 = _head_x(x_row, offs_s + HB, n_seg, d, d_ok, SEG)
        acc = tl.zeros([BLOCK_N, HB, SEG_P2], dtype=tl.float32)
        for s0 in range(0, n_seg, HB):
            sn = s0 + 2 * HB + offs_s
            sn_ok = sn < n_seg
            w2 = _head_tile(w_rows, base, sn_ok, r_ok, d, d_ok, SEG != SEG_P2)
            x2 = _head_x(x_row, sn, n_seg, d, d_ok, SEG)
            base = _head_starts(idx_ptr, sn + HB, n_seg, SEG, SEG_ALIGN)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :, :]
            w = w1
            x = x1
            w1 = w2
            x1 = x2
        out = tl.sum(tl.sum(acc, axis=2), axis=1)[None, :]
    elif BLOCK_B == 1:
        x_row = x_ptr + pid_b * stride_xb
        offs_s = tl.arange(0, HB)
        s_ok = offs_s < n_seg
        w = _head_tile(w_rows, _head_starts(idx_ptr, offs_s, n_seg, SEG, SEG_ALIGN), s_ok, r_ok, d, d_ok,
                       SEG != SEG_P2)
        base = _head_starts(idx_ptr, offs_s + HB, n_seg, SEG, SEG_ALIGN)
        if USE_PDL and PRELOAD:  # index list, count and first weights read before the wait
            pdl_sync()
        x = _head_x(x_row, offs_s, n_seg, d, d_ok, SEG)
        acc = tl.zeros([BLOCK_N, HB, SEG_P2], dtype=tl.float32)
        for s0 in range(0, n_seg, HB):
            # Prefetch: the next tile is loaded before this one's products are summed
            sn = s0 + HB + offs_s
            sn_ok = sn < n_seg
            w_next = _head_tile(w_rows, base, sn_ok, r_ok, d, d_ok, SEG != SEG_P2)
            x_next = _head_x(x_row, sn, n_seg, d, d_ok, SEG)
            base = _head_starts(idx_ptr, sn + HB, n_seg, SEG, SEG_ALIGN)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :, :]
            w = w_next
            x = x_next
        out = tl.sum(tl.sum(acc, axis=2), axis=1)[None, :]
    elif PREFETCH:
        # HB segments a step as one [BLOCK_N, HB * SEG_P2] tile and one tensor-core dot, the next step's
        # weights loaded before this step's dot (the loop below, one segment a step and nothing in flight during
        # the dot, ran 2-6x slower than cuBLAS on the whole weight at batch 8: 17ee6be sweep)
        offs_s = tl.arange(0, HB)
        w = _head_tile(w_rows, _head_starts(idx_ptr, offs_s, n_seg, SEG, SEG_ALIGN), offs_s < n_seg, r_ok, d, d_ok,
                       SEG != SEG_P2)
        base = _head_starts(idx_ptr, offs_s + HB, n_seg, SEG, SEG_ALIGN)
        if USE_PDL and PRELOAD:  # index list, count and first weights read before the wait
            pdl_sync()
        x_rows = x_ptr + offs_b.to(tl.int64) * stride_xb
        acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
        for s0 in range(0, n_seg, HB):
            sn = s0 + HB + offs_s
            w_next = _head_tile(w_rows, base, sn < n_seg, r_ok, d, d_ok, SEG != SEG_P2)
            base = _head_starts(idx_ptr, sn + HB, n_seg, SEG, SEG_ALIGN)
            ss = s0 + offs_s
            x_ok = b_ok[:, None, None] & ((ss < n_seg)[:, None] & d_ok[None, :])[None, :, :]
            x = tl.load(x_rows[:, None, None] + (ss[:, None] * SEG + d[None, :])[None, :, :], mask=x_ok, other=0.0)
            acc = dot_acc(acc, tl.reshape(x, (BLOCK_B, HB * SEG_P2)), tl.trans(tl.reshape(w, (BLOCK_N, HB * SEG_P2))),
                          UPCAST_DOT, DOT_IEEE)
            w = w_next
        out = acc
    else:
        if USE_PDL and PRELOAD:
            pdl_sync()
        acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
        for s in range(0, n_seg):
            start = tl.multiple_of(tl.load(idx_ptr + s * SEG), SEG_ALIGN)
            w = tl.load(w_rows[:, None] + start + d[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0)
            x = tl.load(x_ptr + offs_b[:, None] * stride_xb + s * SEG + d[None, :], mask=b_ok[:, None] & d_ok[None, :],
                        other=0.0)
            acc = dot_acc(acc, x, tl.trans(w), UPCAST_DOT, DOT_IEEE)
        out = acc

    if HAS_BIAS:
        out += tl.load(bias_ptr + rows, mask=r_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_b[:, None] * stride_yb + rows[None, :], out.to(y_ptr.dtype.element_ty),
             mask=b_ok[:, None] & r_ok[None, :])


_SINGLE_ALL = [
    triton.Config({"BLOCK_N": 4, "HB": 2}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_N": 8, "HB": 2}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_N": 4, "HB": 4}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_N": 2, "HB": 4}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_N": 8, "HB": 1}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_N": 16, "HB": 1}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_N": 8, "HB": 4}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_N": 16, "HB": 2}, num_warps=8, num_stages=1),
    # two tiles read before the PDL wait and kept two ahead (AHEAD)
    triton.Config({"BLOCK_N": 4, "HB": 2, "AHEAD": 2}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_N": 8, "HB": 2, "AHEAD": 2}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_N": 4, "HB": 4, "AHEAD": 2}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_N": 2, "HB": 4, "AHEAD": 2}, num_warps=4, num_stages=1),
]
_SINGLE_CONFIGS = configs_for_platform(_SINGLE_ALL)
_BATCHED_ALL = [
    # HB segments a dot, the next tile loaded ahead (PREFETCH); first, so the interpreter tests this path
    triton.Config({"BLOCK_N": 16, "HB": 2, "PREFETCH": 1}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_N": 16, "HB": 4, "PREFETCH": 1}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_N": 32, "HB": 1, "PREFETCH": 1}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_N": 32, "HB": 2, "PREFETCH": 1}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_N": 32, "HB": 4, "PREFETCH": 1}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_N": 64, "HB": 1, "PREFETCH": 1}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_N": 64, "HB": 2, "PREFETCH": 1}, num_warps=8, num_stages=1),
    # one segment a step
    triton.Config({"BLOCK_N": 32, "HB": 1}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_N": 64, "HB": 1}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_N": 16, "HB": 1}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_N": 128, "HB": 1}, num_warps=8, num_stages=1),
]
_BATCHED_CONFIGS = configs_for_platform(_BATCHED_ALL)
_KEY = ["N", "SEGS_BUCKET", "SEG", "BLOCK_B", "HAS_COUNT"]
# shapes with a pinned config for this device (shadow_kernels.tuned) skip the timing
_segments_single = triton.autotune(
    _SINGLE_CONFIGS, key=_KEY, do_bench=autotune_bench,
    prune_configs_by={"early_config_prune": pinned_prune("segments_single", "w_ptr")})(_segments_kernel)
_segments_batched = triton.autotune(_BATCHED_CONFIGS, key=_KEY, do_bench=autotune_bench)(_segments_kernel)


def _pow2_factor(n: int) -> int:
    return n & -n


def launch_segments_gemv(weight, x2d, idx, bias, count, segment: int, preload: bool = False) -> torch.Tensor:
    B = x2d.shape[0]
    N = weight.shape[0]
    y = torch.empty((B, N), device=weight.device, dtype=weight.dtype)
    if B == 0 or N == 0:
        return y
    n_idx = idx.shape[0]
    if n_idx == 0:
        return bias_only(y, bias)
    x2d = x2d.contiguous()
    kernel, block_b = gemv_kernel_for(B, _segments_single, _segments_batched)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(B, block_b))
    kernel[grid](
        weight, x2d, idx, count if count is not None else weight,
        bias if bias is not None else weight, y,
        B, N, n_idx,
        weight.stride(0), x2d.stride(0), y.stride(0),
        next_pow2(max(1, n_idx // segment)),
        SEG=segment, SEG_P2=next_pow2(segment), SEG_ALIGN=min(_pow2_factor(segment), 16),
        HAS_COUNT=count is not None, HAS_BIAS=bias is not None,
        UPCAST_DOT=INTERPRET, DOT_IEEE=weight.dtype == torch.float32, PRELOAD=preload, BLOCK_B=block_b,
        **pdl_kwargs(weight.device),
    )
    return y


def _check_segments(idx, count, segment: int, validate: bool, device) -> None:
    """``idx`` is whole aligned segments; values are checked (host read-back) only with ``validate``."""
    if isinstance(segment, bool) or not isinstance(segment, int) or segment < 1:
        raise ValueError(f"segment must be a positive int, got {segment!r}")
    k = idx.shape[0]
    if k % segment:
        raise ValueError(f"idx has {k} entries; expected a multiple of segment={segment} (whole segments)")
    if not validate or k == 0 or is_capturing(device):
        return
    seg = idx.reshape(-1, segment).long()
    first = seg[:, :1]
    if bool((first % segment != 0).any()) or not torch.equal(seg - first, torch.arange(segment, device=idx.device)
                                                             .expand_as(seg)):
        raise ValueError(f"idx must hold whole segments: runs of {segment} consecutive columns, each starting at "
                         f"a multiple of {segment}")
    if count is not None and int(count.reshape(())) % segment:
        raise ValueError(f"count is {int(count.reshape(()))}; expected a multiple of segment={segment}")


def gather_segments_gemv(weight, x, idx, bias=None, count=None, *, segment, validate=True, preload=False):
    """``x @ weight[:, idx].T + bias`` with a Triton kernel, for ``idx`` made of whole segments (heads).

    weight: [N, K] fp16/bf16/fp32, contiguous rows (out_proj.weight as stored in a checkpoint).
    x: [k] or [B, k], same dtype; x[..., j] multiplies column idx[j].
    idx: int32/int64 [k], k a multiple of ``segment``: for each selected segment s (a head), the columns
    ``s * segment .. s * segment + segment - 1`` in order. Segments may come in any order.
    bias: [N] or None. count: optional one-element int32 device tensor, a multiple of ``segment``: only
    ``idx[:count]`` (and x's first ``count`` entries) are used.
    validate: check index values and the segment structure (reads them back to the host; skipped during
    CUDA graph capture). preload: as in :func:`shadow_kernels.gather_rows_gemv`.
    Returns [N] or [B, N] in the weight dtype; accumulation is fp32.
    """
    check_float("weight", weight, ndims=(2,), last_contiguous=True)
    dev = weight.device
    N, K = weight.shape
    check_indexed_input("x", x, weight, idx, bias, count, n_idx=K, n_out=N, validate=validate, preload=preload)
    _check_segments(idx, count, segment, validate, dev)
    y = launch_segments_gemv(weight, x if x.dim() == 2 else x[None], idx, bias, count, segment, preload=preload)
    return y.reshape(N) if x.dim() == 1 else y


def gather_segments_gemv_ref(weight, x, idx, bias=None, count=None, *, segment, validate=True, preload=False):
    """Plain-PyTorch reference of :func:`gather_segments_gemv` (same signature, fp32 accumulate)."""
    idx = idx.long()
    xf = zero_past_count(x.float(), count)
    y = xf @ weight.index_select(1, idx).float().T
    if bias is not None:
        y = y + bias.float()
    return y.to(weight.dtype)
