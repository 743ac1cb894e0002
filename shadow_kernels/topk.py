"""Top-k selection, local (per layer) and global (one budget across layers), as masks and as the
padded index lists that the GEMV kernels take.

Index format (``LayerIndices``): for scores of L layers with n units each,
- ``idx``   int32 [L, k_max]: row l holds the selected units of layer l in ascending order in its
  first ``count[l]`` slots and 0 in the rest (a valid index, never read by the kernels);
- ``count`` int32 [L] on the device.
Local top-k selects exactly k per layer (k_max = k). Global top-k selects exactly k over all
L*n scores, so a layer may get anything from 0 to n units: k_max = min(n, k), and the kernels read
``count[l]`` on the device to know how many slots are live. Every shape depends only on (L, n, k),
never on the scores, so selection and the sparse layers can be captured in one CUDA graph.

``topk_indices`` selects with a radix select of its own: four passes build 256-bin histograms of
one byte of each score's order-preserving 32-bit key, from the top byte down, each pass counting only
scores whose higher bytes match the threshold found so far (a program per chunk of 2048 scores; the last
pass also keeps each chunk's counts); a write kernel, a program per chunk again, recomputes the
threshold key T from the histograms and writes the sorted, padded lists of the scores above T plus the
first of those equal to T needed to reach exactly k, each chunk at the slot its earlier chunks leave it.
Ties at T go to the lowest indices (layer-major with the global policy); the reference does the same with
a stable descending sort. A tile of at most 4096 scores (the head scores) takes one launch instead: one
program holds it in registers and does the same steps. No step needs the host, so the selection is
captured with the decode step. OPT-13B global top-k over 39 x 20480 neuron scores: 45.5 us against
138.8 us for ``torch.topk`` + compaction (H100, notes/kernels.md).

``topk_mask`` keeps ``torch.topk`` (ties broken as it breaks them); :func:`mask_to_indices` turns any
selection mask into the padded lists in one launch, where plain PyTorch needs a sort or a nonzero
(which has a data-dependent shape and cannot be captured).
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import check_device, is_capturing, next_pow2
from .pdl import pdl_kwargs, pdl_sync

POLICIES = ("local", "global")


class LayerIndices(NamedTuple):
    idx: torch.Tensor  # int32 [L, k_max], sorted live entries first, zero padding after
    count: torch.Tensor  # int32 [L]

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, count) of one layer, in the form gather_rows_gemv/gather_cols_gemv take."""
        return self.idx[layer], self.count[layer : layer + 1]


@triton.jit
def _compact_kernel(mask_ptr, idx_ptr, count_ptr, n, k_max, stride_mask, stride_idx, BLOCK: tl.constexpr):
    # One program per layer: a running prefix sum over the mask gives each selected unit its slot,
    # so the output is sorted by construction.
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    total = row * 0
    for start in range(0, n, BLOCK):
        cols = start + offs
        m = tl.load(mask_ptr + row * stride_mask + cols, mask=cols < n, other=0).to(tl.int32)
        slot = total + tl.cumsum(m, axis=0) - 1
        tl.store(idx_ptr + row * stride_idx + slot, cols.to(tl.int32), mask=(m != 0) & (slot < k_max))
        total += tl.sum(m, axis=0)
    for start in range(0, k_max, BLOCK):
        slots = start + offs
        tl.store(idx_ptr + row * stride_idx + slots, tl.zeros([BLOCK], dtype=tl.int32),
                 mask=(slots >= total) & (slots < k_max))
    tl.store(count_ptr + row, tl.minimum(total, k_max))


def _check_scores(scores, validate: bool) -> None:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if not scores.is_floating_point():
        raise TypeError(f"scores has dtype {scores.dtype}; expected a floating-point tensor")
    if validate and not is_capturing(scores.device) and bool(torch.isnan(scores).any()):
        n_nan = int(torch.isnan(scores).sum())
        raise ValueError(f"scores holds {n_nan} NaN value(s); top-k over NaN has no meaning, fix the predictor "
                         "or the criterion that produced them")


def _check_k(k, n: int, what: str) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__} {k!r}")
    if k < 0 or k > n:
        raise ValueError(f"k is {k}; expected 0 <= k <= {n} ({what})")


def topk_mask(scores, k, dim=-1, *, validate=True):
    """Boolean mask with exactly k True per row along ``dim`` (local), or with ``dim=None`` exactly
    k True over the whole tensor (global). Ties are broken by ``torch.topk``."""
    _check_scores(scores, validate)
    if dim is None:
        # global: the same selection along the one dimension of the flattened scores
        target, dim, what = scores.reshape(-1), 0, f"the number of scores, {scores.numel()}"
    elif isinstance(dim, int) and -scores.dim() <= dim < scores.dim():
        target, what = scores, f"the size of dim {dim}"
    else:
        raise ValueError(f"dim must be None or an int in [{-scores.dim()}, {scores.dim() - 1}], got {dim!r}")
    _check_k(k, target.shape[dim], what)
    mask = torch.zeros(target.shape, dtype=torch.bool, device=scores.device)
    # scatter_ with a scalar, not `mask[i] = True`: that copies a host tensor, which a CUDA graph
    # capture refuses
    return mask.scatter_(dim, torch.topk(target, k, dim=dim, sorted=False).indices, True).view(scores.shape)


def _check_mask(mask, k_max):
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
    if mask.dim() != 2:
        raise ValueError(f"mask must be 2-D [layers, units], got shape {tuple(mask.shape)}")
    n = mask.shape[1]
    if isinstance(k_max, bool) or not isinstance(k_max, int) or not 0 <= k_max <= n:
        raise ValueError(f"k_max must be an int in [0, {n}], got {k_max!r}")


def mask_to_indices(mask, k_max, *, validate=True) -> LayerIndices:
    """Sorted padded index lists of a [L, n] bool mask (Triton, one launch). A row with more than
    k_max True values is an error when validated; unvalidated, its extra entries are dropped."""
    _check_mask(mask, k_max)
    check_device("mask", mask)
    L, n = mask.shape
    if validate and not is_capturing(mask.device) and L > 0:
        most = int(mask.sum(dim=1).max())
        if most > k_max:
            raise ValueError(f"a row of mask has {most} True values but k_max is {k_max}")
    idx = torch.empty((L, k_max), dtype=torch.int32, device=mask.device)
    count = torch.empty((L,), dtype=torch.int32, device=mask.device)
    if L == 0:
        return LayerIndices(idx, count)
    m8 = mask.contiguous().view(torch.uint8)
    _compact_kernel[(L,)](m8, idx, count, n, k_max, m8.stride(0), idx.stride(0) if k_max else 1, BLOCK=1024)
    return LayerIndices(idx, count)


def mask_to_indices_ref(mask, k_max, *, validate=True) -> LayerIndices:
    """Plain-PyTorch reference of :func:`mask_to_indices` (a stable sort, also capturable)."""
    _check_mask(mask, k_max)
    L, n = mask.shape
    cols = torch.arange(n, device=mask.device).expand(L, n)
    keyed = torch.where(mask, cols, n)  # unselected sort to the end
    ordered = torch.sort(keyed, dim=1).values[:, :k_max]
    count = mask.sum(dim=1).clamp(max=k_max).to(torch.int32)
    live = torch.arange(k_max, device=mask.device)[None, :] < count[:, None]
    return LayerIndices(torch.where(live, ordered, 0).to(torch.int32), count)


@triton.jit
def _ukey(x):
    # fp32 -> int32 bits whose *unsigned* order is the order of the floats (-0.0 counts as +0.0)
    b = (x + 0.0).to(tl.int32, bitcast=True)
    return b ^ ((b >> 31) | -2147483648)


@triton.jit
def _descend_bins(h, k_rem):
    # One byte of the threshold from a histogram h (bins past the 256 counted ones must be zero): the
    # largest digit d with at least k_rem counted scores at digit >= d; returns d and how many of those
    # at digit d are still to take.
    offs = tl.arange(0, h.shape[0])
    at_least = tl.sum(h, axis=0) - tl.cumsum(h, axis=0) + h
    d = tl.max(tl.where(at_least >= k_rem, offs, -1), axis=0)
    above = tl.sum(tl.where(offs == d, at_least - h, 0), axis=0)
    return d, k_rem - above


@triton.jit
def _digit_hist(u, shift, ok, spread, NBINS: tl.constexpr):
    # Counts of byte ``shift`` of the keys u where ok. tl.histogram adds into shared memory element by element,
    # so the keys left out must not all land in one bin, or those adds serialise (20 us a pass on OPT-13B): where
    # tl.histogram takes a mask (NBINS 256) they are masked; else they go to the spare bins 256..511, spread
    # by the low byte of ``spread``, and the caller ignores those bins.
    if NBINS == 256:
        h = tl.histogram((u >> shift) & 255, 256, mask=ok)
    else:
        h = tl.histogram(tl.where(ok, (u >> shift) & 255, 256 + (spread & 255)), 512)
    return h


@triton.jit
def _radix_small_kernel(s_ptr, idx_ptr, count_ptr, k, n, L, k_max, stride_s, stride_idx, ROWS: tl.constexpr,
                        NP: tl.constexpr, NBINS: tl.constexpr, SEARCH: tl.constexpr, USE_PDL: tl.constexpr):
    # The whole selection in one program for a tile of ROWS x NP scores held in registers: one row (local,
    # a program per layer) or every layer (global, one program). Same threshold, ties and layout as the
    # multi-launch path; one launch instead of six for the head scores and DejaVu's per-layer scores.
    # SEARCH: the threshold key bit by bit, from the top, by counting the keys at or above each candidate (32
    # counts, no atomics); else four byte histograms (tl.histogram's shared-memory adds serialise where many keys
    # share a byte, as the top byte of scores of one magnitude does).
    if USE_PDL:  # see shadow_kernels.pdl
        pdl_sync()
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, NP)
    ok = (rows[:, None] < L) & (cols[None, :] < n)
    u = _ukey(tl.load(s_ptr + rows[:, None].to(tl.int64) * stride_s + cols[None, :], mask=ok, other=0.0))
    uf = tl.reshape(u, [ROWS * NP])
    okf = tl.reshape(ok, [ROWS * NP])
    if SEARCH:
        sk = uf ^ -2147483648  # signed order of the unsigned keys
        prefix = k * 0
        for b in tl.static_range(32):
            if b == 0:
                cand = prefix | -2147483648
            else:
                cand = prefix | (1 << (31 - b))
            n_ge = tl.sum((okf & (sk >= (cand ^ -2147483648))).to(tl.int32), axis=0)
            prefix = tl.where(n_ge >= k, cand, prefix)
        k_rem = k - tl.sum((okf & (sk > (prefix ^ -2147483648))).to(tl.int32), axis=0)
    else:
        bins = tl.arange(0, NBINS)
        k_rem = k
        prefix = k * 0
        for p in tl.static_range(4):
            shift = 24 - 8 * p
            m = okf
            if p > 0:
                m = m & ((uf >> (shift + 8)) == (prefix >> (shift + 8)))
            h = _digit_hist(uf, shift, m, uf, NBINS)
            if NBINS != 256:
                h = tl.where(bins < 256, h, 0)
            d, k_rem = _descend_bins(h, k_rem)
            prefix = prefix | (d << shift)
    key = u ^ -2147483648  # signed order
    t_signed = prefix ^ -2147483648
    eq = (ok & (key == t_signed)).to(tl.int32)
    eq_rank = tl.reshape(tl.cumsum(tl.reshape(eq, [ROWS * NP]), axis=0), [ROWS, NP]) - 1  # layer-major
    sel = (ok & (key > t_signed)) | ((eq != 0) & (eq_rank < k_rem))
    slot = tl.cumsum(sel.to(tl.int32), axis=1) - 1
    out = idx_ptr + rows[:, None].to(tl.int64) * stride_idx
    tl.store(out + slot, cols[None, :] + 0 * slot, mask=sel & (slot < k_max))
    total = tl.sum(sel.to(tl.int32), axis=1)
    pad = (rows[:, None] < L) & (cols[None, :] >= total[:, None]) & (cols[None, :] < k_max)
    tl.store(out + cols[None, :], tl.zeros([ROWS, NP], dtype=tl.int32), mask=pad)
    tl.store(count_ptr + rows, tl.minimum(total, k_max), mask=rows < L)


@triton.jit
def _chain(hist_ptr, g, k, L, LEVELS: tl.constexpr):
    # The threshold's top LEVELS bytes from the histograms of group g (a layer, or L: all layers);
    # returns the key prefix, the last digit and how many scores at that prefix are still to take.
    k_rem = k
    prefix = g * 0
    d = g * 0
    for p in tl.static_range(LEVELS):
        d, k_rem = _descend_bins(tl.load(hist_ptr + (p * (L + 1) + g) * 256 + tl.arange(0, 256)), k_rem)
        prefix = prefix | (d << (24 - 8 * p))
    return prefix, d, k_rem


@triton.jit
def _radix_pass_kernel(s_ptr, hist_ptr, chunk_hist_ptr, gt_ptr, k, n, L, C, stride_s, PASS: tl.constexpr,
                       GLOBAL: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, NBINS: tl.constexpr,
                       USE_PDL: tl.constexpr):
    # Program (layer, c) counts the digits of byte PASS (from the top) of chunk c of a layer's scores,
    # among those whose higher bytes match the threshold so far, into the layer's histogram
    # hist[PASS, layer] and, with the global policy, into hist[PASS, L]. The last pass also keeps its
    # chunk's histogram and how many of its scores lie above the 24-bit prefix (for the write kernel).
    if USE_PDL:  # see shadow_kernels.pdl
        pdl_sync()
    layer = tl.program_id(0)
    c = tl.program_id(1)
    prefix, d, k_rem = _chain(hist_ptr, L if GLOBAL else layer, k, L, PASS)
    shift: tl.constexpr = 24 - 8 * PASS
    offs = tl.arange(0, BLOCK)
    h = tl.zeros([NBINS], dtype=tl.int32)
    above = layer * 0
    row = s_ptr + layer.to(tl.int64) * stride_s
    for start in range(c * CHUNK, tl.minimum(c * CHUNK + CHUNK, n), BLOCK):
        cols = start + offs
        ok = cols < n
        u = _ukey(tl.load(row + cols, mask=ok, other=0.0))
        if PASS > 0:
            if PASS == 3:  # signed order of (key ^ INT_MIN) is the unsigned order of the key
                above += tl.sum((ok & (((u ^ -2147483648) >> 8) > ((prefix ^ -2147483648) >> 8))).to(tl.int32),
                                axis=0)
            ok = ok & ((u >> (shift + 8)) == (prefix >> (shift + 8)))
        h += _digit_hist(u, shift, ok, cols, NBINS)  # the spare bins (NBINS 512) are never added below
    bins = tl.arange(0, NBINS)
    # relaxed: the histograms are read only by later launches
    tl.atomic_add(hist_ptr + (PASS * (L + 1) + layer) * 256 + bins, h, mask=bins < 256, sem="relaxed")
    if GLOBAL:
        tl.atomic_add(hist_ptr + (PASS * (L + 1) + L) * 256 + bins, h, mask=bins < 256, sem="relaxed")
    if PASS == 3:
        tl.store(chunk_hist_ptr + (layer * C + c) * 256 + bins, h, mask=bins < 256)
        tl.store(gt_ptr + layer * C + c, above)


@triton.jit
def _radix_write_kernel(s_ptr, hist_ptr, chunk_hist_ptr, gt_ptr, idx_ptr, count_ptr, k, n, L, C, k_max, pad_chunk,
                        stride_s, stride_idx, GLOBAL: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                        C_BLOCK: tl.constexpr, LC_BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    # Program (layer, c): the threshold key T from the four histograms; from the chunks' counts, how
    # many scores equal to T this chunk takes (those of earlier chunks, and of earlier layers when
    # global, come first) and where its slots start; then its scores above T and its first `take`
    # equal to T, in index order, into the layer's padded list.
    if USE_PDL:  # see shadow_kernels.pdl
        pdl_sync()
    layer = tl.program_id(0)
    c = tl.program_id(1)
    prefix, d, take_eq = _chain(hist_ptr, L if GLOBAL else layer, k, L, 4)
    cs = tl.arange(0, C_BLOCK)
    c_ok = cs < C
    bins = tl.arange(0, 256)
    ch = chunk_hist_ptr + (layer * C + cs)[:, None] * 256 + bins[None, :]
    ch = tl.load(ch, mask=c_ok[:, None], other=0)
    eq_c = tl.sum(tl.where(bins[None, :] == d, ch, 0), axis=1)
    gt_c = tl.load(gt_ptr + layer * C + cs, mask=c_ok, other=0) + tl.sum(tl.where(bins[None, :] > d, ch, 0), axis=1)
    eq_before = layer * 0
    if GLOBAL:  # equal scores in the chunks of earlier layers
        flat = tl.arange(0, LC_BLOCK)
        eq_before = tl.sum(tl.load(chunk_hist_ptr + flat * 256 + d, mask=flat < layer * C, other=0), axis=0)
    eq_excl = eq_before + tl.cumsum(eq_c, axis=0) - eq_c
    take_c = tl.minimum(tl.maximum(take_eq - eq_excl, 0), eq_c)
    sel_c = gt_c + take_c
    base = tl.sum(tl.where(cs < c, sel_c, 0), axis=0)
    total = tl.sum(sel_c, axis=0)
    take = tl.sum(tl.where(cs == c, take_c, 0), axis=0)
    t_signed = prefix ^ -2147483648  # compare in signed order: key ^ INT_MIN
    offs = tl.arange(0, BLOCK)
    row = s_ptr + layer.to(tl.int64) * stride_s
    out = idx_ptr + layer.to(tl.int64) * stride_idx
    written = layer * 0
    eq_seen = layer * 0
    for start in range(c * CHUNK, tl.minimum(c * CHUNK + CHUNK, n), BLOCK):
        cols = start + offs
        ok = cols < n
        key = _ukey(tl.load(row + cols, mask=ok, other=0.0)) ^ -2147483648
        eq = (ok & (key == t_signed)).to(tl.int32)
        sel = (ok & (key > t_signed)) | ((eq != 0) & (eq_seen + tl.cumsum(eq, axis=0) - 1 < take))
        m = sel.to(tl.int32)
        slot = base + written + tl.cumsum(m, axis=0) - 1
        tl.store(out + slot, cols.to(tl.int32), mask=sel & (slot < k_max))
        written += tl.sum(m, axis=0)
        eq_seen += tl.sum(eq, axis=0)
    # the padding after the live slots, split over the layer's programs
    for start in range(c * pad_chunk, tl.minimum(c * pad_chunk + pad_chunk, k_max), BLOCK):
        slots = start + offs
        tl.store(out + slots, tl.zeros([BLOCK], dtype=tl.int32), mask=(slots >= total) & (slots < k_max))
    if c == 0:
        tl.store(count_ptr + layer, tl.minimum(total, k_max))


# Scores per program: OPT-13B's 39 x 20480 neuron scores are 390 programs a pass (one program per layer
# for the write took 105 us on the H100: serial prefix sums; notes/kernels.md).
_RADIX_CHUNK = 2048
# 20 us a pass on OPT-13B when every score outside the prefix was counted in one spare bin (its
# shared-memory adds serialise); where tl.histogram takes a mask they are masked, else spread out.
_HIST_MASK = "mask" in inspect.signature(tl.histogram).parameters
# Scores a tile of the one-launch path may hold (the layers of a global selection padded to powers of two):
# the head scores of OPT up to 66B (64 x 64 padded). v7e tried 16k: a program per layer over 8192 neuron
# scores (OPT-1.3B local) took 38.5 us against 24.7 us for the multi-launch path (notes/kernels.md).
_SMALL = 1 << 12
# The one-launch path of a local selection (a program per row) finds its threshold by counting (SEARCH) rather than
# by byte histograms: DejaVu's 58 single-row selections per SmolLM2 token took 351 us against 476 us (H100, 9b4eef7,
# one call). The global tile (ShadowLLM's 29 x 9 head scores) keeps the histograms: 5.7 us against 6.5 by counting.
_SMALL_SEARCH = True


def _radix_topk(scores: torch.Tensor, k: int, policy: str, k_max: int, out: LayerIndices | None = None
                ) -> LayerIndices:
    """Padded index lists of the top-k of [L, n] scores by radix select (see the module docstring), into ``out``
    when given (its writing launch then runs without programmatic dependent launch: see :func:`topk_indices`)."""
    L, n = scores.shape
    dev = scores.device
    if out is None:
        idx = torch.empty((L, k_max), dtype=torch.int32, device=dev)
        count = torch.empty((L,), dtype=torch.int32, device=dev)
    else:
        idx, count = out
    if L == 0:
        return LayerIndices(idx, count)
    if k == 0 or n == 0:
        return LayerIndices(idx.zero_(), count.zero_())
    s = scores.float().contiguous()
    glob = policy == "global"
    pdl = pdl_kwargs(dev)
    last = pdl_kwargs(dev, pdl=False) if out is not None else pdl  # the launch that writes idx and count
    nbins = 256 if _HIST_MASK else 512
    rows = next_pow2(L) if glob else 1
    if rows * next_pow2(n) <= _SMALL:  # one launch: the tile fits in one program's registers
        np2 = next_pow2(n)
        _radix_small_kernel[(1 if glob else L,)](s, idx, count, k, n, L, k_max, s.stride(0),
                                                 idx.stride(0) if k_max else 1, ROWS=rows, NP=np2, NBINS=nbins,
                                                 SEARCH=_SMALL_SEARCH and not glob,
                                                 num_warps=8 if rows * np2 >= 4096 else 4, **last)
        return LayerIndices(idx, count)
    block = min(1024, next_pow2(n))
    chunk = max(block, min(_RADIX_CHUNK, next_pow2(n)))
    C = triton.cdiv(n, chunk)
    hist = torch.zeros((4, L + 1, 256), dtype=torch.int32, device=dev)
    chunk_hist = torch.empty((L, C, 256), dtype=torch.int32, device=dev)
    above = torch.empty((L, C), dtype=torch.int32, device=dev)
    for p in range(4):
        _radix_pass_kernel[(L, C)](s, hist, chunk_hist, above, k, n, L, C, s.stride(0), PASS=p, GLOBAL=glob,
                                   CHUNK=chunk, BLOCK=block, NBINS=nbins, **pdl)
    _radix_write_kernel[(L, C)](s, hist, chunk_hist, above, idx, count, k, n, L, C, k_max, triton.cdiv(k_max, C),
                                s.stride(0), idx.stride(0) if k_max else 1, GLOBAL=glob, CHUNK=chunk, BLOCK=block,
                                C_BLOCK=next_pow2(C), LC_BLOCK=next_pow2(L * C), **last)
    return LayerIndices(idx, count)


def _check_select(scores, k, policy, validate) -> int:
    """Checks of topk_indices; returns k_max, the slots per layer."""
    _check_scores(scores, validate)
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D [layers, units], got shape {tuple(scores.shape)}")
    L, n = scores.shape
    if policy == "local":
        _check_k(k, n, "the size of dim -1")
        return k
    _check_k(k, L * n, f"the number of scores, {L * n}")
    return min(n, k)


def topk_indices(scores, k, policy="local", *, validate=True, out: LayerIndices | None = None) -> LayerIndices:
    """Select units from [L, n] scores and return the padded index lists (radix select, Triton).

    policy "local": exactly k units in every layer. policy "global": exactly k units over all
    layers together, distributed by score (k_max = min(n, k) slots per layer). Among scores equal to
    the k-th largest, the lowest indices are taken (layer-major when global).

    ``out``: int32 ``(idx [L, k_max], count [L])`` to write into (a plan's buffers), returned. The launch that writes
    them then runs without programmatic dependent launch, as a PyTorch kernel does, so a kernel after it that
    preloads its index list (:mod:`shadow_kernels.pdl`) reads the new one.
    """
    k_max = _check_select(scores, k, policy, validate)
    check_device("scores", scores)
    _check_out(out, scores.shape[0], k_max)
    return _radix_topk(scores, k, policy, k_max, out)


def _check_out(out, L: int, k_max: int) -> None:
    if out is None:
        return
    idx, count = out
    if (idx.dtype != torch.int32 or tuple(idx.shape) != (L, k_max) or idx.stride(-1) != 1 or count.dtype != torch.int32
            or tuple(count.shape) != (L,) or count.stride(0) != 1):
        raise ValueError(f"out must be int32 idx [{L}, {k_max}] and count [{L}] with unit stride, got idx "
                         f"{idx.dtype} {tuple(idx.shape)} and count {count.dtype} {tuple(count.shape)}")


def topk_indices_ref(scores, k, policy="local", *, validate=True, out: LayerIndices | None = None) -> LayerIndices:
    """Plain-PyTorch reference of :func:`topk_indices` (a stable descending sort: equal scores in index
    order, as the kernel takes them)."""
    k_max = _check_select(scores, k, policy, validate)
    _check_out(out, scores.shape[0], k_max)
    L, n = scores.shape
    flat = scores.reshape(-1) if policy == "global" else scores
    order = torch.sort(flat.float() + 0.0, dim=-1, descending=True, stable=True).indices[..., :k]
    mask = torch.zeros(flat.shape, dtype=torch.bool, device=scores.device).scatter_(-1, order, True)
    sel = mask_to_indices_ref(mask.view(L, n), k_max)
    if out is None:
        return sel
    out[0].copy_(sel.idx)
    out[1].copy_(sel.count)
    return out
