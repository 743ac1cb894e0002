import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shadow_kernels import mask_to_indices, mask_to_indices_ref, topk_indices, topk_indices_ref, topk_mask

from conftest import DEVICE
from helpers import randn


def check_layer_indices(sel, mask):
    """Every live slot is a selected unit, in ascending order; padding is zero; count is the row sum."""
    L, n = mask.shape
    assert sel.idx.dtype == torch.int32 and sel.count.dtype == torch.int32
    assert torch.equal(sel.count.cpu().long(), mask.sum(1).cpu())
    for layer in range(L):
        c = int(sel.count[layer])
        live = sel.idx[layer, :c].cpu()
        assert torch.equal(live, torch.nonzero(mask[layer].cpu()).flatten().int())
        assert (sel.idx[layer, c:] == 0).all()


@pytest.mark.parametrize("k", [0, 1, 5, 33])
def test_local_mask_has_k_per_row(k):
    scores = randn(4, 33)
    mask = topk_mask(scores, k, dim=-1)
    assert (mask.sum(-1) == k).all()
    if 0 < k < 33:
        # every selected score is at least every unselected one in its row
        assert (scores.masked_fill(~mask, float("inf")).min(-1).values
                >= scores.masked_fill(mask, -float("inf")).max(-1).values).all()


def test_mask_along_other_dim():
    scores = randn(6, 3)
    assert (topk_mask(scores, 2, dim=0).sum(0) == 2).all()


@pytest.mark.parametrize("k", [0, 7, 40, 120])
def test_global_mask_has_k_in_total(k):
    scores = randn(4, 30)
    mask = topk_mask(scores, k, dim=None)
    assert int(mask.sum()) == k
    if 0 < k < 120:
        assert scores[mask].min() >= scores[~mask].max()


@pytest.mark.parametrize("policy,k", [("local", 0), ("local", 6), ("local", 50), ("global", 1), ("global", 90),
                                      ("global", 200)])
def test_indices_match_reference_and_mask(policy, k):
    scores = randn(4, 50)
    sel = topk_indices(scores, k, policy)
    ref = topk_indices_ref(scores, k, policy)
    assert torch.equal(sel.idx, ref.idx) and torch.equal(sel.count, ref.count)
    assert sel.idx.shape == (4, k if policy == "local" else min(50, k))
    check_layer_indices(sel, topk_mask(scores, k, dim=-1 if policy == "local" else None))


def test_global_budget_follows_the_scores():
    scores = torch.zeros(3, 10, device=DEVICE)
    scores[1] += 5  # layer 1 dominates: a budget of 12 takes all of it and 2 elsewhere
    sel = topk_indices(scores + randn(3, 10, scale=0.01), 12, "global")
    assert int(sel.count[1]) == 10 and int(sel.count.sum()) == 12
    assert sel.layer(1)[0].tolist() == list(range(10))


def _is_top_k(scores, sel, k, policy):
    """The selection holds exactly k units and no unselected score beats a selected one."""
    L, n = scores.shape
    mask = torch.zeros((L, n), dtype=torch.bool)
    for layer in range(L):
        mask[layer, sel.idx[layer, : int(sel.count[layer])].long().cpu()] = True
    s = scores.float().cpu()
    if policy == "local":
        assert (mask.sum(1) == k).all()
        if 0 < k < n:
            assert (s.masked_fill(~mask, float("inf")).min(1).values
                    >= s.masked_fill(mask, -float("inf")).max(1).values).all()
    else:
        assert int(mask.sum()) == k
        if 0 < k < L * n:
            assert s[mask].min() >= s[~mask].max()


# Each tile size compiles its own kernels on a GPU (a second or more each; 40 sizes took minutes), while the interpreter
# compiles nothing: on a GPU the sizes come from a few classes, n at random within each (the same kernels, other
# bounds and counts), both paths and both policies among them.
_SIZES = (st.integers(1, 5000) if DEVICE.type != "cuda" else
          st.sampled_from([(1, 16), (257, 512), (1537, 2048), (4097, 5000)]).flatmap(lambda r: st.integers(*r)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(L=st.integers(1, 4), n=_SIZES, k_frac=st.floats(0, 1), levels=st.sampled_from([0, 3, 50]),
       policy=st.sampled_from(["local", "global"]), seed=st.integers(0, 2**16))
def test_property_radix_select_matches_stable_sort(L, n, k_frac, levels, policy, seed):
    # (tiles up to 4096 scores take the one-launch path, larger ones the multi-launch path)
    # levels > 0 quantises the scores to that many values: many ties at the threshold, which the
    # kernel must break by index (layer-major when global) exactly as the stable-sort reference does
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn((L, n), generator=gen) * 100
    if levels:
        scores = torch.randint(-levels, levels + 1, (L, n), generator=gen).float() / 7
    scores = scores.to(DEVICE)
    k = round(k_frac * (n if policy == "local" else L * n))
    sel = topk_indices(scores, k, policy)
    ref = topk_indices_ref(scores, k, policy)
    assert torch.equal(sel.idx, ref.idx) and torch.equal(sel.count, ref.count)
    _is_top_k(scores, sel, k, policy)


@pytest.mark.parametrize("policy", ["local", "global"])
def test_radix_select_special_values(policy):
    # infinities, signed zeros (equal, so ties by index), subnormals, huge negatives, repeats
    row = [-0.0, 0.0, float("inf"), -float("inf"), -1e30, 1e-38, -1e-38, 3.0, 3.0, -0.0, 2.5, -7.0, 1e-45, -1e-45]
    scores = torch.tensor([row, row[::-1]], device=DEVICE)
    for k in range(0, len(row) + 1):
        sel = topk_indices(scores, k, policy)
        ref = topk_indices_ref(scores, k, policy)
        assert torch.equal(sel.idx, ref.idx) and torch.equal(sel.count, ref.count), k
        _is_top_k(scores, sel, k, policy)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_radix_select_half_scores(dtype):
    scores = randn(3, 700).to(dtype)  # few distinct values: ties at the threshold
    for policy, k in (("local", 350), ("global", 1000)):
        sel = topk_indices(scores, k, policy)
        ref = topk_indices_ref(scores, k, policy)
        assert torch.equal(sel.idx, ref.idx) and torch.equal(sel.count, ref.count)
        _is_top_k(scores, sel, k, policy)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(L=st.integers(1, 5), n=st.integers(1, 2100), k_max_frac=st.floats(0, 1), density=st.floats(0, 1),
       seed=st.integers(0, 2**16))
def test_property_mask_to_indices(L, n, k_max_frac, density, seed):
    gen = torch.Generator().manual_seed(seed)
    mask = (torch.rand((L, n), generator=gen) < density).to(DEVICE)
    k_max = max(int(mask.sum(1).max()), round(k_max_frac * n))
    sel = mask_to_indices(mask, k_max)
    ref = mask_to_indices_ref(mask, k_max)
    assert torch.equal(sel.idx, ref.idx) and torch.equal(sel.count, ref.count)
    check_layer_indices(sel, mask)


class TestBadInput:
    def test_nan_scores(self):
        scores = randn(2, 5)
        scores[1, 3] = float("nan")
        with pytest.raises(ValueError, match="1 NaN value"):
            topk_indices(scores, 2)

    @pytest.mark.parametrize("k", [-1, 6])
    def test_k_out_of_range(self, k):
        with pytest.raises(ValueError, match=rf"k is {k}; expected 0 <= k <= 5"):
            topk_mask(randn(2, 5), k)

    def test_global_k_out_of_range(self):
        with pytest.raises(ValueError, match=r"k is 11; expected 0 <= k <= 10"):
            topk_indices(randn(2, 5), 11, "global")

    @pytest.mark.parametrize("k", [2.0, True, "3"])
    def test_k_not_int(self, k):
        with pytest.raises(TypeError, match="k must be an int"):
            topk_mask(randn(2, 5), k)

    def test_policy(self):
        with pytest.raises(ValueError, match="policy must be one of"):
            topk_indices(randn(2, 5), 2, "per-layer")

    def test_scores_not_2d(self):
        with pytest.raises(ValueError, match=r"scores must be 2-D \[layers, units\]"):
            topk_indices(randn(10), 2)

    def test_integer_scores(self):
        with pytest.raises(TypeError, match="expected a floating-point tensor"):
            topk_mask(torch.arange(5, device=DEVICE), 2)

    def test_bad_dim(self):
        with pytest.raises(ValueError, match="dim must be None or an int"):
            topk_mask(randn(2, 5), 2, dim=2)

    def test_mask_over_k_max(self):
        with pytest.raises(ValueError, match="a row of mask has 3 True values but k_max is 2"):
            mask_to_indices(torch.ones(2, 3, dtype=torch.bool, device=DEVICE), 2)

    def test_mask_dtype(self):
        with pytest.raises(TypeError, match="mask must be a bool tensor"):
            mask_to_indices(torch.ones(2, 3, device=DEVICE), 3)


@pytest.mark.parametrize("one_launch", [True, False])
@pytest.mark.parametrize("masked_histogram", [True, False])
def test_radix_select_both_histogram_forms(monkeypatch, masked_histogram, one_launch):
    """The passes count a byte with a masked 256-bin tl.histogram where Triton has the mask, else with
    512 bins whose upper half absorbs the scores outside the prefix; both select the same, in the
    one-launch path (a tile in one program's registers) and in the multi-launch one."""
    from shadow_kernels import topk

    monkeypatch.setattr(topk, "_HIST_MASK", masked_histogram and topk._HIST_MASK)
    monkeypatch.setattr(topk, "_SMALL", 1 << 16 if one_launch else 0)
    gen = torch.Generator().manual_seed(9)
    scores = (torch.randn((3, 4500), generator=gen) * 3).round().to(DEVICE)  # ties, several chunks
    for policy, k in (("local", 1700), ("global", 6000)):
        sel = topk_indices(scores, k, policy)
        ref = topk_indices_ref(scores, k, policy)
        assert torch.equal(sel.idx, ref.idx) and torch.equal(sel.count, ref.count)


@pytest.mark.parametrize("policy,k,n", [("local", 5, 50), ("global", 60, 50), ("local", 3000, 5000)])
def test_indices_into_given_buffers(policy, k, n):
    # plan buffers as the output: rows of a larger buffer, stale values overwritten
    scores = randn(3, n)
    k_max = k if policy == "local" else min(n, k)
    idx = torch.full((5, k_max), 9, dtype=torch.int32, device=DEVICE)
    count = torch.full((5,), 9, dtype=torch.int32, device=DEVICE)
    for fn in (topk_indices, topk_indices_ref):
        got = fn(scores, k, policy, out=(idx[1:4], count[1:4]))
        ref = topk_indices_ref(scores, k, policy)
        assert got[0].data_ptr() == idx[1:4].data_ptr()
        assert torch.equal(idx[1:4], ref.idx) and torch.equal(count[1:4], ref.count)
        assert (idx[0] == 9).all() and (idx[4] == 9).all() and int(count[0]) == 9 and int(count[4]) == 9
    with pytest.raises(ValueError, match=r"out must be int32 idx \[3, "):
        topk_indices(scores, k, policy, out=(idx[:2], count[:2]))


@pytest.mark.parametrize("search", [True, False])
@pytest.mark.parametrize("policy,L,n", [("local", 3, 1536), ("local", 2, 9), ("global", 4, 9), ("global", 8, 300)])
def test_one_launch_thresholds_by_counting_and_by_histograms_agree(monkeypatch, search, policy, L, n):
    # both ways of finding the threshold in the one-launch path (counting is taken for local selections), on scores
    # with many ties and negative values
    import shadow_kernels.topk as topk

    monkeypatch.setattr(topk, "_SMALL_SEARCH", search)
    gen = torch.Generator().manual_seed(L * n)
    scores = (torch.randint(-40, 41, (L, n), generator=gen).float() / 3).to(DEVICE)
    for frac in (0.3, 0.5, 0.9):
        k = max(1, round(frac * (n if policy == "local" else L * n)))
        sel, ref = topk_indices(scores, k, policy), topk_indices_ref(scores, k, policy)
        assert torch.equal(sel.idx, ref.idx) and torch.equal(sel.count, ref.count)
