import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shadow_kernels import (
    fold_norm,
    norm_rows_gemv,
    norm_rows_gemv_ref,
    norm_swiglu_gemv,
    norm_swiglu_gemv_ref,
)

from conftest import DEVICE, DTYPES
from helpers import assert_close_rel, assert_within_dot_bound, randn


def layer(N, K, dtype, gen, *, mean=0.0, kind="layer", bias=True):
    """A weight with its norm's parameters and bias, and its fold."""
    w = randn(N, K, dtype=dtype, gen=gen, scale=0.2)
    g = (1.0 + 0.3 * randn(K, gen=gen)).to(dtype)
    beta = randn(K, dtype=dtype, gen=gen, scale=0.3) if kind == "layer" else None
    b = randn(N, dtype=dtype, gen=gen) if bias else None
    return w, g, beta, b, fold_norm(w, g, beta, b, kind=kind, eps=1e-5)


def inputs(batch, K, dtype, gen, mean=0.0):
    shape = (K,) if batch is None else (batch, K)
    x = (randn(*shape, gen=gen, scale=2.0) + mean).to(dtype)
    return x, randn(*shape, dtype=dtype, gen=gen)


def assert_stream(z, want):
    """z = x + r rounded to the dtype, bit for bit as the unfused add gives it (bf16: one ulp, the
    interpreter truncates bf16 stores)."""
    assert z.shape == want.shape and z.dtype == want.dtype
    if z.dtype == torch.bfloat16:
        assert torch.allclose(z.float(), want.float(), rtol=2**-7, atol=0)
    else:
        assert torch.equal(z, want)


def want32(w, g, beta, b, z, idx, relu, kind="layer"):
    """fp32 reference on z (the stream after the add, already rounded) and the dot-product magnitude."""
    zf = z.float()
    if kind == "layer":
        a = F.layer_norm(zf, (zf.shape[-1],), g.float(), None if beta is None else beta.float(), 1e-5)
    else:
        a = zf * torch.rsqrt(zf.pow(2).mean(-1, keepdim=True) + 1e-5) * g.float()
    rows = w.float() if idx is None else w.float().index_select(0, idx.long())
    y = a @ rows.T
    mag = a.abs() @ rows.abs().T
    if b is not None:
        bb = b.float() if idx is None else b.float().index_select(0, idx.long())
        y, mag = y + bb, mag + bb.abs()
    return (torch.relu(y) if relu else y), mag


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [None, 1, 3, 17])
@pytest.mark.parametrize("rows", ["gather", "all"])
@pytest.mark.parametrize("with_residual", [True, False])
def test_matches_the_norm_then_the_gemv(dtype, batch, rows, with_residual):
    gen = torch.Generator().manual_seed(1)
    N, K = 45, 200  # neither a multiple of a block size
    w, g, beta, b, fold = layer(N, K, dtype, gen)
    x, r = inputs(batch, K, dtype, gen, mean=0.7)
    idx = torch.tensor([7, 0, 44, 3, 3, 12], dtype=torch.int32, device=DEVICE) if rows == "gather" else None
    res = r if with_residual else None
    y, z = norm_rows_gemv(w, x, idx, fold, res, activation="relu")
    z_want = x + r if with_residual else x
    assert_stream(z, z_want)
    want, mag = want32(w, g, beta, b, z_want, idx, relu=True)
    assert y.dtype == dtype and y.shape == want.shape
    assert_within_dot_bound(y, want, mag, dtype)
    y_ref, z_ref = norm_rows_gemv_ref(w, x, idx, fold, res, activation="relu")
    assert torch.equal(z_ref, z_want)
    assert_within_dot_bound(y_ref, want, mag, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [None, 5])
def test_rms_fold_and_swiglu(dtype, batch):
    gen = torch.Generator().manual_seed(2)
    N, K = 30, 96
    w, g, _, b, fold = layer(N, K, dtype, gen, kind="rms")
    x, r = inputs(batch, K, dtype, gen)
    idx = torch.tensor([29, 4, 0, 11], dtype=torch.int32, device=DEVICE)
    y, z = norm_rows_gemv(w, x, idx, fold, r)
    want, mag = want32(w, g, None, b, x + r, idx, relu=False, kind="rms")
    assert_within_dot_bound(y, want, mag, dtype)

    up = randn(N, K, dtype=dtype, gen=gen, scale=0.2)
    fold_g = fold_norm(w, g, kind="rms", eps=1e-5)
    y, z = norm_swiglu_gemv(w, up, x, idx, fold_g, r)
    assert_stream(z, x + r)
    y_ref, _ = norm_swiglu_gemv_ref(w, up, x, idx, fold_g, r)
    zf = (x + r).float()
    a = zf * torch.rsqrt(zf.pow(2).mean(-1, keepdim=True) + 1e-5) * g.float()
    want = F.silu(a @ w.float()[idx.long()].T) * (a @ up.float()[idx.long()].T)
    assert_close_rel(y, want, dtype)
    assert_close_rel(y_ref, want, dtype)


@pytest.mark.parametrize("batch", [None, 3])
def test_a_large_mean_does_not_cancel(batch):
    # The statistics are summed about the row's first element: with a mean of 3000 against a spread of 2, sums
    # of z and z * z in fp32 would leave about 1e-3 of the variance; fp32 must stay at fp32 accuracy.
    gen = torch.Generator().manual_seed(3)
    w, g, beta, b, fold = layer(24, 256, torch.float32, gen)
    x, r = inputs(batch, 256, torch.float32, gen, mean=3000.0)
    y, _ = norm_rows_gemv(w, x, None, fold, r)
    want, mag = want32(w, g, beta, b, x + r, None, relu=False)
    assert_within_dot_bound(y, want, mag, torch.float32)


@pytest.mark.parametrize("batch", [None, 4])
@pytest.mark.parametrize("live", [0, 2, 5])
def test_count_pads_with_zeros_and_z_is_always_written(batch, live):
    gen = torch.Generator().manual_seed(4)
    w, g, beta, b, fold = layer(40, 64, torch.float32, gen)
    x, r = inputs(batch, 64, torch.float32, gen)
    idx = torch.tensor([5, 1, 33, 8, 0], dtype=torch.int32, device=DEVICE)
    cnt = torch.tensor([live], dtype=torch.int32, device=DEVICE)
    y, z = norm_rows_gemv(w, x, idx, fold, r, count=cnt)
    assert torch.equal(z, x + r)  # with no live row too: the first program walks the input regardless
    want, mag = want32(w, g, beta, b, x + r, idx, relu=False)
    assert_within_dot_bound(y[..., :live], want[..., :live], mag[..., :live], torch.float32)
    assert torch.all(y[..., live:] == 0)


def test_fold_matches_the_folded_algebra():
    # rowsum = W @ g and shift = W @ beta + bias, in fp32, whatever the chunking.
    gen = torch.Generator().manual_seed(5)
    w, g, beta, b, _ = layer(37, 16, torch.float16, gen)
    for chunk in (1, 5, 100):
        fold = fold_norm(w, g, beta, b, eps=1e-5, chunk_rows=chunk)
        assert fold.rowsum.dtype == torch.float32 and fold.shift.dtype == torch.float32
        torch.testing.assert_close(fold.rowsum, w.float() @ g.float())
        torch.testing.assert_close(fold.shift, w.float() @ beta.float() + b.float())
    rms = fold_norm(w, g, kind="rms")
    assert rms.rowsum is None and rms.shift is None


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 50),
    k=st.integers(1, 300),
    batch=st.sampled_from([None, 1, 2, 7]),
    picks=st.one_of(st.none(), st.lists(st.integers(0, 10_000), min_size=0, max_size=10)),
    kind=st.sampled_from(["layer", "rms"]),
    with_residual=st.booleans(),
    use_bias=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_property_any_shape(n, k, batch, picks, kind, with_residual, use_bias, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    w, g, beta, b, fold = layer(n, k, dtype, gen, kind=kind, bias=use_bias)
    x, r = inputs(batch, k, dtype, gen, mean=1.0)
    idx = None if picks is None else torch.tensor([p % n for p in picks], dtype=torch.int32, device=DEVICE)
    y, z = norm_rows_gemv(w, x, idx, fold, r if with_residual else None)
    z_want = x + r if with_residual else x
    assert_stream(z, z_want)
    want, mag = want32(w, g, beta, b, z_want, idx, relu=False, kind=kind)
    # one more rounding than a plain GEMV: the normalised input (the reference's is exact in fp32)
    assert_within_dot_bound(y, want, 2 * mag, dtype)


class TestBadInput:
    gen = torch.Generator().manual_seed(6)
    w, g, beta, b, fold = layer(8, 16, torch.float16, gen)
    x = randn(16, dtype=torch.float16)

    def test_not_a_fold(self):
        with pytest.raises(TypeError, match="fold must be a NormFold"):
            norm_rows_gemv(self.w, self.x, None, (self.g, self.beta))

    def test_fold_of_another_weight(self):
        other = fold_norm(randn(9, 16, dtype=torch.float16), self.g)
        with pytest.raises(ValueError, match=r"fold was made for a \[9, 16\] weight; weight is \[8, 16\]"):
            norm_rows_gemv(self.w, self.x, None, other)

    def test_residual_shape(self):
        with pytest.raises(ValueError, match=r"residual has shape \(2, 16\); expected \(16,\) like x"):
            norm_rows_gemv(self.w, self.x, None, self.fold, randn(2, 16, dtype=torch.float16))

    def test_count_without_idx(self):
        with pytest.raises(ValueError, match="count needs an index list"):
            norm_rows_gemv(self.w, self.x, None, self.fold, count=torch.tensor([1], dtype=torch.int32, device=DEVICE))

    def test_index_out_of_range(self):
        with pytest.raises(ValueError, match="idx"):
            norm_rows_gemv(self.w, self.x, torch.tensor([8], device=DEVICE), self.fold)

    def test_bad_activation(self):
        with pytest.raises(ValueError, match="activation must be one of"):
            norm_rows_gemv(self.w, self.x, None, self.fold, activation="gelu")

    def test_swiglu_needs_rms(self):
        with pytest.raises(ValueError, match="folds an RMS norm; fold.kind is 'layer'"):
            norm_swiglu_gemv(self.w, self.w, self.x, None, self.fold)

    @pytest.mark.parametrize("kwargs, match", [
        ({"kind": "batch"}, "kind must be one of"),
        ({"eps": 0.0}, "eps must be a positive number"),
        ({"eps": "1e-5"}, "eps must be a positive number"),
        ({"chunk_rows": 0}, "chunk_rows must be a positive int"),
    ])
    def test_bad_fold_arguments(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            fold_norm(self.w, self.g, **kwargs)

    def test_fold_shapes(self):
        with pytest.raises(ValueError, match="norm_weight has 15 entries; expected 16"):
            fold_norm(self.w, self.g[:15])
        with pytest.raises(ValueError, match="bias has 7 entries; expected 8"):
            fold_norm(self.w, self.g, bias=self.b[:7])
        with pytest.raises(ValueError, match="an RMS norm has no bias"):
            fold_norm(self.w, self.g, self.beta, kind="rms")
