"""The threshold mode's GEMV: the Triton select-and-gather equals its reference and a masked dense product."""

import pytest
import torch
import torch.nn.functional as F

from shadow_kernels import (
    add_rms_threshold_cols_gemv,
    add_rms_threshold_cols_gemv_ref,
    threshold_cols_gemv,
    threshold_cols_gemv_ref,
    threshold_select,
)
from shadow_kernels.add_norm import rms_norm
from shadow_kernels.threshold import ADD_RMS_MAX_BATCH

from conftest import DEVICE, DTYPES
from helpers import assert_close_rel, randn, rel_err


def masked_dense(wt, a, t, bias=None):
    """fp32 ``(a * [any row |a| > t]) @ wt + bias``: what the kept inputs contribute, no index list."""
    a2 = a if a.dim() == 2 else a[None]
    keep = (a2.abs() > t.to(a2.dtype)).any(dim=0)
    y = (a2.float() * keep.float()) @ wt.float()
    if bias is not None:
        y = y + bias.float()
    return y if a.dim() == 2 else y[0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [None, 1, 3, 17])  # 17: more rows than one block of the batch
@pytest.mark.parametrize("K", [60, 1500])  # 1500: two blocks of the running prefix sum
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_reference_and_masked_dense(dtype, batch, K, with_bias):
    gen = torch.Generator().manual_seed(K + (batch or 0))
    M = 70
    wt = randn(K, M, dtype=dtype, gen=gen)
    a = randn(K, dtype=dtype, gen=gen) if batch is None else randn(batch, K, dtype=dtype, gen=gen)
    a[..., 5] = 0  # an exact zero is never kept, whatever the threshold
    bias = randn(M, dtype=dtype, gen=gen) if with_bias else None
    t = torch.tensor(0.9 if batch is None or batch < 10 else 2.0, device=DEVICE, dtype=dtype)
    y, count = threshold_cols_gemv(wt, a, t, bias)
    y_ref, count_ref = threshold_cols_gemv_ref(wt, a, t, bias)
    a2 = a if a.dim() == 2 else a[None]
    kept = int((a2.abs() > t).any(dim=0).sum())
    assert 0 < kept < K and int(count) == int(count_ref) == kept
    assert y.shape == y_ref.shape == ((M,) if batch is None else (batch, M)) and y.dtype == dtype
    assert_close_rel(y, masked_dense(wt, a, t, bias), dtype)
    assert_close_rel(y_ref, masked_dense(wt, a, t, bias), dtype)


@pytest.mark.parametrize("batch", [1, 3, 17])
def test_select_gives_sorted_inputs_their_values_and_zero_padding(batch):
    gen = torch.Generator().manual_seed(batch)
    K = 1300
    a = randn(batch, K, gen=gen)
    a[:, 7] = float("nan")  # never above a threshold: dropped, as the reference's comparison drops it
    t = torch.tensor(1.5, device=DEVICE)
    h, idx, count = threshold_select(a, t)
    keep = (a.abs() > t).any(dim=0)
    n = int(count)
    assert n == int(keep.sum()) and 7 not in idx[:n].tolist()
    assert idx[:n].tolist() == keep.nonzero().flatten().tolist()
    torch.testing.assert_close(h[:, :n], a[:, idx[:n].long()], rtol=0, atol=0)
    assert not idx[n:].any() and not h[:, n:].any()


@pytest.mark.parametrize("threshold, kept", [(1e9, 0), (-1.0, "all")])
def test_nothing_or_everything_kept(threshold, kept):
    gen = torch.Generator().manual_seed(3)
    wt, a, bias = randn(50, 30, gen=gen), randn(2, 50, gen=gen), randn(30, gen=gen)
    y, count = threshold_cols_gemv(wt, a, torch.tensor(threshold, device=DEVICE), bias)
    if kept == 0:  # no input kept: the bias alone
        assert int(count) == 0
        torch.testing.assert_close(y, bias.expand(2, -1))
    else:
        assert int(count) == 50
        assert_close_rel(y, a @ wt + bias, torch.float32)


def test_bad_inputs_are_refused_by_name():
    wt, a = randn(20, 10), randn(20)
    t = torch.tensor(0.5, device=DEVICE)
    for fn in (threshold_cols_gemv, threshold_cols_gemv_ref):
        with pytest.raises(TypeError, match="threshold must be a one-element tensor"):
            fn(wt, a, 0.5)
        with pytest.raises(TypeError, match="threshold must be a one-element tensor"):
            fn(wt, a, torch.ones(2, device=DEVICE))
        with pytest.raises(ValueError, match="a has 19 entries but weight_t has 20 rows"):
            fn(wt, randn(19), t)
        with pytest.raises(ValueError, match=r"expected 40 \(gate and up, 20 each\)"):
            fn(wt, a, t, swiglu=True)
        with pytest.raises(TypeError, match="a has dtype torch.float16"):
            fn(wt, a.half(), t)
        with pytest.raises(ValueError, match="bias has 9 entries but weight_t has 10 outputs"):
            fn(wt, a, t, randn(9))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [None, 1, 3, 17])
def test_swiglu_inputs_are_made_where_they_are_selected(dtype, batch):
    """``swiglu``: the input is silu(gate) * up of the gate-and-up output, as Llama's down projection reads it."""
    gen = torch.Generator().manual_seed(11 + (batch or 0))
    K, M = 1100, 40
    wt = randn(K, M, dtype=dtype, gen=gen)
    gu = randn(2 * K, dtype=dtype, gen=gen) if batch is None else randn(batch, 2 * K, dtype=dtype, gen=gen)
    t = torch.tensor(0.4, device=DEVICE, dtype=dtype)
    y, count = threshold_cols_gemv(wt, gu, t, swiglu=True)
    y_ref, count_ref = threshold_cols_gemv_ref(wt, gu, t, swiglu=True)
    gate, up = gu.chunk(2, dim=-1)
    f = F.silu(gate) * up
    assert 0 < int(count) < K and abs(int(count) - int(count_ref)) <= 2  # an entry at the threshold may round apart
    # silu(gate) and its product with up are rounded to the dtype apart, as F.silu(gate) * up rounds them: in bf16
    # the interpreter's truncating casts make that two ulps, not one rounding of the output
    tol = 4e-2 if dtype == torch.bfloat16 and DEVICE.type == "cpu" else None
    if tol is None:
        assert_close_rel(y, masked_dense(wt, f, t), dtype)
    else:
        assert rel_err(y, masked_dense(wt, f, t)) <= tol
    assert_close_rel(y_ref, masked_dense(wt, f, t), dtype)
    h, idx, n = threshold_select(gu if gu.dim() == 2 else gu[None], t, swiglu=True)
    assert h.shape[-1] == K and int(n) == int(count)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 3, ADD_RMS_MAX_BATCH, ADD_RMS_MAX_BATCH + 1])  # the last: norm launched apart
def test_add_rms_then_threshold(dtype, batch):
    """Llama's residual add and RMS norm made where the inputs are selected: the sum written out as the next residual,
    the normalised input thresholded; a batch past the fused limit takes the add-and-norm kernel first."""
    gen = torch.Generator().manual_seed(21 + batch)
    K, M = 1300, 50
    wt = randn(K, M, dtype=dtype, gen=gen)
    x, r = randn(batch, K, dtype=dtype, gen=gen), randn(batch, K, dtype=dtype, gen=gen)
    w = (torch.rand(K, generator=gen) + 0.5).to(device=DEVICE, dtype=dtype)
    t = torch.tensor(1.2, device=DEVICE, dtype=dtype)
    y, count, s = add_rms_threshold_cols_gemv(wt, x, r, w, 1e-5, t)
    y_ref, count_ref, s_ref = add_rms_threshold_cols_gemv_ref(wt, x, r, w, 1e-5, t)
    exact = {} if dtype == torch.bfloat16 else dict(rtol=0, atol=0)  # the interpreter truncates bf16 casts
    torch.testing.assert_close(s, x + r, **exact)
    torch.testing.assert_close(s_ref, x + r, rtol=0, atol=0)
    a = rms_norm(x + r, w, 1e-5)
    assert_close_rel(y_ref, masked_dense(wt, a, t), dtype)
    if dtype == torch.bfloat16 and DEVICE.type == "cpu":  # truncating bf16 casts move entries across the threshold
        assert abs(int(count) - int(count_ref)) <= K // 100 and rel_err(y, masked_dense(wt, a, t)) <= 0.1
    else:
        assert 0 < int(count) < K and abs(int(count) - int(count_ref)) <= 1
        assert_close_rel(y, masked_dense(wt, a, t), dtype)
    with pytest.raises(ValueError, match="x and residual must be"):
        add_rms_threshold_cols_gemv(wt, x, r[:, :-1], w, 1e-5, t)


@pytest.mark.parametrize("prologue", ["plain", "swiglu", "add_rms"])
@pytest.mark.parametrize("split", [1, 3, 40])  # 40: more chunks than the input has blocks of 32 (22 are made)
def test_one_token_fused_path_equals_select_then_gather(monkeypatch, prologue, split):
    """One token takes the fused path (every program makes, thresholds and reads its own chunk of the input, no index
    list); its output, count and residual sum equal those of the two-launch path (select, then gather), split into
    chunks or not, with and without a bias."""
    from shadow_kernels import threshold as thr

    monkeypatch.setattr(thr, "choose_split", lambda *args: split)
    gen = torch.Generator().manual_seed(split)
    K, M = 700, 300
    wt, bias = randn(K, M, gen=gen), randn(M, gen=gen)
    x = randn(1, 2 * K if prologue == "swiglu" else K, gen=gen)
    r, w = randn(1, K, gen=gen), (torch.rand(K, generator=gen) + 0.5).to(DEVICE)
    t = torch.tensor(0.6, device=DEVICE)

    def run(fused, b):
        monkeypatch.setitem(thr._FUSED, "on", fused)
        if prologue == "add_rms":
            return add_rms_threshold_cols_gemv(wt, x, r, w, 1e-5, t, b)
        return (*threshold_cols_gemv(wt, x, t, b, swiglu=prologue == "swiglu"), None)

    for b in (None, bias):
        (y, n, s), (y2, n2, s2) = run(True, b), run(False, b)
        assert 0 < int(n2) < K
        # the fused path sums the norm's squares in other blocks: an entry at the threshold may round apart
        assert abs(int(n) - int(n2)) <= (1 if prologue == "add_rms" else 0)
        torch.testing.assert_close(y, y2, rtol=1e-4, atol=1e-4)
        if s is not None:
            torch.testing.assert_close(s, s2, rtol=0, atol=0)
    with pytest.raises(TypeError, match="set_fused takes True or False"):
        thr.set_fused(1)
