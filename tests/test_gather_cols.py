import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shadow_kernels import gather_cols_gemv, gather_cols_gemv_ref

from conftest import DEVICE, DTYPES
from helpers import assert_close_rel, assert_within_dot_bound, only_configs, randn


def ref32(wt, h, idx, b=None, count=None):
    return gather_cols_gemv_ref(wt.float(), h.float(), idx, None if b is None else b.float(), count)


def index(values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [None, 1, 3, 17])
@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("split", [None, 1, 3])
def test_matches_reference(dtype, batch, deterministic, split):
    gen = torch.Generator().manual_seed(1)
    N, M = 60, 200  # M not a multiple of the block size
    wt = randn(N, M, dtype=dtype, gen=gen)
    b = randn(M, dtype=dtype, gen=gen)
    idx = index([5, 59, 0, 31, 5, 12, 40, 41, 2])
    h = randn(idx.numel(), dtype=dtype, gen=gen) if batch is None else randn(batch, idx.numel(), dtype=dtype, gen=gen)
    out = gather_cols_gemv(wt, h, idx, b, deterministic=deterministic, split=split)
    assert out.dtype == dtype
    assert_close_rel(out, ref32(wt, h, idx, b), dtype)


@pytest.mark.parametrize("batch", [None, 3])
@pytest.mark.parametrize("split", [2, 9, 17, 33, 65])
@pytest.mark.parametrize("count", [None, 13])
def test_every_sum_of_the_partials_adds_each_chunk_once(batch, split, count):
    # One token's partials are summed as pairwise trees over up to 32 chunks, a batch's eight loaded at once.
    # Splits around the group sizes, several groups of the tree, and a count that leaves some chunks empty must
    # still add every chunk once.
    gen = torch.Generator().manual_seed(3)
    wt = randn(140, 40, dtype=torch.float32, gen=gen)
    idx = torch.randperm(140, generator=gen)[:100].to(device=DEVICE, dtype=torch.int32)
    h = randn(100, dtype=torch.float32, gen=gen) if batch is None else randn(batch, 100, dtype=torch.float32, gen=gen)
    cnt = None if count is None else torch.tensor([count], dtype=torch.int32, device=DEVICE)
    out = gather_cols_gemv(wt, h, idx, count=cnt, split=split)
    hh = h if count is None else torch.where(torch.arange(100, device=DEVICE) < count, h, 0.0)
    assert_close_rel(out, ref32(wt, hh, idx, None), torch.float32)
    assert torch.equal(out, gather_cols_gemv(wt, h, idx, count=cnt, split=split))


@pytest.mark.parametrize("batch", [None, 4])
@pytest.mark.parametrize("count", [0, 1, 5, 9])
@pytest.mark.parametrize("split", [1, 4])
def test_count_ignores_padded_entries(batch, count, split):
    gen = torch.Generator().manual_seed(2)
    wt = randn(30, 70, dtype=torch.float16, gen=gen)
    b = randn(70, dtype=torch.float16, gen=gen)
    idx = index([1, 3, 5, 7, 9, 11, 13, 15, 17])
    h = randn(9, dtype=torch.float16, gen=gen) if batch is None else randn(batch, 9, dtype=torch.float16, gen=gen)
    h = h + 100  # padded entries would dominate the sum if they were read
    cnt = torch.tensor([count], dtype=torch.int32, device=DEVICE)
    out = gather_cols_gemv(wt, h, idx, b, count=cnt, split=split)
    assert_close_rel(out, ref32(wt, h, idx, b, cnt), torch.float16)


def test_deterministic_mode_is_bit_reproducible():
    gen = torch.Generator().manual_seed(3)
    wt = randn(512, 64, dtype=torch.float16, gen=gen)
    idx = torch.arange(512, device=DEVICE)
    h = randn(2, 512, dtype=torch.float16, gen=gen)
    first = gather_cols_gemv(wt, h, idx, split=8)
    assert all(torch.equal(first, gather_cols_gemv(wt, h, idx, split=8)) for _ in range(3))


def test_empty_index_gives_bias():
    wt = randn(10, 12, dtype=torch.float32)
    b = randn(12, dtype=torch.float32)
    empty = index([])
    assert torch.equal(gather_cols_gemv(wt, randn(0, dtype=torch.float32), empty, b), b)
    assert torch.equal(gather_cols_gemv(wt, randn(3, 0, dtype=torch.float32), empty), torch.zeros(3, 12, device=DEVICE))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 80),
    m=st.integers(1, 260),
    batch=st.sampled_from([None, 1, 2, 9]),
    picks=st.lists(st.integers(0, 10_000), min_size=1, max_size=50),
    use_bias=st.booleans(),
    deterministic=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_property_any_shape_and_index_set(n, m, batch, picks, use_bias, deterministic, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    wt = randn(n, m, dtype=dtype, gen=gen)
    idx = torch.tensor([p % n for p in picks], dtype=torch.int64, device=DEVICE)
    k = idx.numel()
    h = randn(k, dtype=dtype, gen=gen) if batch is None else randn(batch, k, dtype=dtype, gen=gen)
    b = randn(m, dtype=dtype, gen=gen) if use_bias else None
    out = gather_cols_gemv(wt, h, idx, b, deterministic=deterministic)
    magnitude = ref32(wt.abs(), h.abs(), idx, None if b is None else b.abs())
    assert_within_dot_bound(out, ref32(wt, h, idx, b), magnitude, dtype)


class TestBadInput:
    wt = randn(8, 16, dtype=torch.bfloat16)
    h = randn(2, dtype=torch.bfloat16)
    idx = index([1, 2])

    def test_h_length(self):
        with pytest.raises(ValueError, match="h has 3 entries per row but idx has 2"):
            gather_cols_gemv(self.wt, randn(3, dtype=torch.bfloat16), self.idx)

    def test_dtype_mismatch(self):
        with pytest.raises(TypeError, match="h has dtype torch.float16"):
            gather_cols_gemv(self.wt, self.h.half(), self.idx)

    def test_out_of_range(self):
        with pytest.raises(ValueError, match=r"holds values in \[1, 9\]"):
            gather_cols_gemv(self.wt, self.h, index([1, 9]))

    def test_bias_length(self):
        with pytest.raises(ValueError, match="bias has 8 entries; expected 16"):
            gather_cols_gemv(self.wt, self.h, self.idx, randn(8, dtype=torch.bfloat16))

    def test_preload_flag(self):
        with pytest.raises(TypeError, match="preload must be True or False, got 'yes'"):
            gather_cols_gemv(self.wt, self.h, self.idx, preload="yes")

    @pytest.mark.parametrize("split", [0, -2, 1.5])
    def test_split(self, split):
        with pytest.raises(ValueError, match="split must be a positive int"):
            gather_cols_gemv(self.wt, self.h, self.idx, split=split)

    def test_count_negative(self):
        with pytest.raises(ValueError, match="count is -1"):
            gather_cols_gemv(self.wt, self.h, self.idx, count=torch.tensor([-1], dtype=torch.int32, device=DEVICE))


@pytest.mark.parametrize("family", ["plain", "prefetch"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_both_single_token_loops(family, dtype):
    """The plain batch-1 loop and the prefetching one (the interpreter runs one config of the autotuned list;
    here each family's first config), with a ragged tail and a device-side count."""
    from shadow_kernels import gather_cols

    first = (gather_cols._SINGLE_PLAIN if family == "plain" else gather_cols._SINGLE_PREFETCH)[0]
    with only_configs(gather_cols._cols_single, [first]):
        gen = torch.Generator().manual_seed(3)
        wt = randn(300, 150, dtype=dtype, gen=gen)
        idx = torch.randperm(300, generator=gen)[:101].to(DEVICE, torch.int32)
        h = randn(101, dtype=dtype, gen=gen)
        b = randn(150, dtype=dtype, gen=gen)
        count = torch.tensor([90], dtype=torch.int32, device=DEVICE)
        for kw in ({}, {"count": count}, {"split": 3}):
            assert_close_rel(gather_cols_gemv(wt, h, idx, b, **kw), gather_cols_gemv_ref(wt, h, idx, b, **kw), dtype)


def test_workspace_size_follows_a_changed_config_list():
    """The largest split is cached per config list and shape: restricting the autotuner to another config (as
    ``shadowbench tune`` does) must size the workspace for that config, not reuse the cached figure."""
    import triton

    from shadow_kernels import gather_cols

    gen = torch.Generator().manual_seed(5)
    wt = randn(4096, 64, dtype=torch.float32, gen=gen)
    idx = torch.randperm(4096, generator=gen)[:3000].to(DEVICE, torch.int32)
    h = randn(3000, dtype=torch.float32, gen=gen)
    want = gather_cols_gemv_ref(wt, h, idx)
    small = triton.Config({"BLOCK_M": 64, "BLOCK_J": 16, "PREFETCH": 1, "OCC": 1}, num_warps=2, num_stages=1)
    large = triton.Config({"BLOCK_M": 64, "BLOCK_J": 16, "PREFETCH": 1, "OCC": 16}, num_warps=2, num_stages=1)
    for cfg in (small, large, small):
        with only_configs(gather_cols._cols_single, [cfg]):
            assert_close_rel(gather_cols_gemv(wt, h, idx), want, torch.float32)
