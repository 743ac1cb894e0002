import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shadow_kernels import gather_rows_gemv, gather_rows_gemv_ref

from conftest import DEVICE, DTYPES
from helpers import assert_close_rel, assert_within_dot_bound, only_configs, randn


def ref32(w, x, idx, b=None, activation=None, count=None):
    return gather_rows_gemv_ref(w.float(), x.float(), idx, None if b is None else b.float(), activation, count)


def index(values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [None, 1, 3, 17])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_matches_reference(dtype, batch, activation):
    gen = torch.Generator().manual_seed(1)
    N, K = 50, 300  # K not a multiple of any block size
    w = randn(N, K, dtype=dtype, gen=gen)
    b = randn(N, dtype=dtype, gen=gen)
    x = randn(K, dtype=dtype, gen=gen) if batch is None else randn(batch, K, dtype=dtype, gen=gen)
    idx = index([7, 3, 49, 0, 3, 22, 11])  # unsorted, with a duplicate
    out = gather_rows_gemv(w, x, idx, b, activation)
    assert out.dtype == dtype
    assert_close_rel(out, ref32(w, x, idx, b, activation), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_without_bias_full_index_is_dense_gemv(dtype):
    gen = torch.Generator().manual_seed(2)
    w = randn(64, 256, dtype=dtype, gen=gen)
    x = randn(2, 256, dtype=dtype, gen=gen)
    idx = torch.arange(64, device=DEVICE)
    assert_close_rel(gather_rows_gemv(w, x, idx), x.float() @ w.float().T, dtype)


def test_empty_index_gives_empty_output():
    w = randn(10, 32, dtype=torch.float16)
    assert gather_rows_gemv(w, randn(32, dtype=torch.float16), index([])).shape == (0,)
    assert gather_rows_gemv(w, randn(4, 32, dtype=torch.float16), index([])).shape == (4, 0)


@pytest.mark.parametrize("batch", [None, 5])
@pytest.mark.parametrize("count", [0, 1, 4, 6])
def test_count_zeroes_padded_slots(batch, count):
    gen = torch.Generator().manual_seed(3)
    w = randn(40, 96, dtype=torch.float16, gen=gen)
    b = randn(40, dtype=torch.float16, gen=gen).abs() + 1  # bias alone would make padded slots non-zero
    x = randn(96, dtype=torch.float16, gen=gen) if batch is None else randn(batch, 96, dtype=torch.float16, gen=gen)
    idx = index([4, 8, 15, 16, 23, 0])
    cnt = torch.tensor([count], dtype=torch.int32, device=DEVICE)
    out = gather_rows_gemv(w, x, idx, b, "relu", count=cnt)
    assert (out[..., count:] == 0).all()
    assert_close_rel(out, ref32(w, x, idx, b, "relu", cnt), torch.float16)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 70),
    k_dim=st.integers(1, 300),
    batch=st.sampled_from([None, 1, 2, 9]),
    picks=st.lists(st.integers(0, 10_000), min_size=0, max_size=40),
    use_bias=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_property_any_shape_and_index_set(n, k_dim, batch, picks, use_bias, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    w = randn(n, k_dim, dtype=dtype, gen=gen)
    x = randn(k_dim, dtype=dtype, gen=gen) if batch is None else randn(batch, k_dim, dtype=dtype, gen=gen)
    b = randn(n, dtype=dtype, gen=gen) if use_bias else None
    idx = torch.tensor([p % n for p in picks], dtype=torch.int64, device=DEVICE)
    out = gather_rows_gemv(w, x, idx, b)
    magnitude = ref32(w.abs(), x.abs(), idx, None if b is None else b.abs())
    assert_within_dot_bound(out, ref32(w, x, idx, b), magnitude, dtype)


class TestBadInput:
    w = randn(8, 16, dtype=torch.float16)
    x = randn(16, dtype=torch.float16)
    idx = index([1, 2])

    def test_dtype_mismatch(self):
        with pytest.raises(TypeError, match="x has dtype torch.float32"):
            gather_rows_gemv(self.w, self.x.float(), self.idx)

    def test_integer_weight(self):
        with pytest.raises(TypeError, match="weight has dtype torch.int32"):
            gather_rows_gemv(self.w.int(), self.x, self.idx)

    def test_feature_mismatch(self):
        with pytest.raises(ValueError, match="x has 15 features"):
            gather_rows_gemv(self.w, self.x[:15], self.idx)

    def test_three_dim_x(self):
        with pytest.raises(ValueError, match="x must be 1-D or 2-D"):
            gather_rows_gemv(self.w, self.x.reshape(1, 1, 16), self.idx)

    def test_float_indices(self):
        with pytest.raises(TypeError, match="idx has dtype torch.float32"):
            gather_rows_gemv(self.w, self.x, self.idx.float())

    def test_two_dim_indices(self):
        with pytest.raises(ValueError, match="idx must be 1-D"):
            gather_rows_gemv(self.w, self.x, self.idx.reshape(1, 2))

    @pytest.mark.parametrize("bad", [-1, 8, 100])
    def test_out_of_range_indices(self, bad):
        with pytest.raises(ValueError, match=r"expected indices in \[0, 7\]"):
            gather_rows_gemv(self.w, self.x, index([0, bad]))

    def test_bias_length(self):
        with pytest.raises(ValueError, match="bias has 7 entries; expected 8"):
            gather_rows_gemv(self.w, self.x, self.idx, self.w[:7, 0].contiguous())

    def test_activation(self):
        with pytest.raises(ValueError, match="activation must be one of"):
            gather_rows_gemv(self.w, self.x, self.idx, activation="gelu")

    def test_count_dtype(self):
        with pytest.raises(TypeError, match="count must be a one-element int32"):
            gather_rows_gemv(self.w, self.x, self.idx, count=torch.tensor([1], device=DEVICE))

    def test_count_too_large(self):
        with pytest.raises(ValueError, match=r"count is 3; expected a value in \[0, 2\]"):
            gather_rows_gemv(self.w, self.x, self.idx, count=torch.tensor([3], dtype=torch.int32, device=DEVICE))

    def test_strided_weight(self):
        with pytest.raises(ValueError, match="weight must be contiguous in its last dimension"):
            gather_rows_gemv(randn(16, 8, dtype=torch.float16).T, self.x, self.idx)

    def test_not_a_tensor(self):
        with pytest.raises(TypeError, match="x must be a torch.Tensor"):
            gather_rows_gemv(self.w, [1.0] * 16, self.idx)

    def test_preload_flag(self):
        with pytest.raises(TypeError, match="preload must be True or False, got 1"):
            gather_rows_gemv(self.w, self.x, self.idx, preload=1)


@settings(max_examples=25, deadline=None)
@given(N=st.integers(1, 70), K=st.integers(1, 300), batch=st.sampled_from([None, 1, 3, 17]),
       dtype=st.sampled_from(DTYPES), padded=st.booleans(), data=st.data())
def test_swiglu_matches_reference(N, K, batch, dtype, padded, data):
    from shadow_kernels import gather_swiglu_gemv, gather_swiglu_gemv_ref

    g = torch.Generator().manual_seed(data.draw(st.integers(0, 99)))
    gate = randn(N, K, dtype=dtype, gen=g, scale=K**-0.5)
    up = randn(N, K, dtype=dtype, gen=g, scale=K**-0.5)
    x = randn(*((batch, K) if batch else (K,)), dtype=dtype, gen=g)
    k = data.draw(st.integers(1, N))
    idx = torch.randperm(N, generator=g)[:k].to(DEVICE)
    count = torch.tensor([data.draw(st.integers(0, k))], dtype=torch.int32, device=DEVICE) if padded else None
    out = gather_swiglu_gemv(gate, up, x, idx, count)
    # each output is silu(g . x) * (u . x): its rounding error scales with the terms of both dot products, not with
    # the result (a small output from cancelling terms is not a kernel error: hypothesis found -0.0006, 1.3e-5 off)
    gi, ui, xd = gate[idx].double().cpu(), up[idx].double().cpu(), x.double().cpu()
    mg, mu = xd.abs() @ gi.abs().T, xd.abs() @ ui.abs().T
    magnitude = 1.1 * mg * (xd @ ui.T).abs() + torch.nn.functional.silu(xd @ gi.T).abs() * mu + mg * mu
    assert_within_dot_bound(out, gather_swiglu_gemv_ref(gate, up, x, idx, count), magnitude, dtype)


def test_swiglu_bad_inputs():
    from shadow_kernels import gather_swiglu_gemv

    gate = randn(8, 16)
    idx = torch.arange(4, device=DEVICE)
    with pytest.raises(ValueError, match="up must have gate's shape"):
        gather_swiglu_gemv(gate, randn(8, 8), randn(16), idx)
    with pytest.raises(ValueError, match="x has 8 features"):
        gather_swiglu_gemv(gate, randn(8, 16), randn(8), idx)
    with pytest.raises(ValueError, match="idx holds values"):
        gather_swiglu_gemv(gate, randn(8, 16), randn(16), torch.tensor([0, 9], device=DEVICE))


@pytest.mark.parametrize("family", ["plain", "prefetch"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_both_single_token_loops(family, dtype):
    """The plain batch-1 loop and the prefetching one (the interpreter runs one config of the
    autotuned list; here each family's first config), K not a multiple of the piece, with a count."""
    from shadow_kernels import gather_rows

    first = (gather_rows._SINGLE_PLAIN if family == "plain" else gather_rows._SINGLE_PREFETCH)[0]
    with only_configs(gather_rows._rows_gemv_single, [first]):
        gen = torch.Generator().manual_seed(4)
        w = randn(200, 700, dtype=dtype, gen=gen)
        idx = torch.randperm(200, generator=gen)[:61].to(DEVICE, torch.int32)
        x = randn(700, dtype=dtype, gen=gen)
        b = randn(200, dtype=dtype, gen=gen)
        count = torch.tensor([50], dtype=torch.int32, device=DEVICE)
        for kw in ({}, {"count": count}):
            assert_close_rel(gather_rows_gemv(w, x, idx, b, "relu", **kw),
                             gather_rows_gemv_ref(w, x, idx, b, "relu", **kw), dtype)
