import pytest
import torch

from shadow_kernels import topk_indices_ref
from shadow_kernels.head_plan import HeadPlanBuffers, head_plan, head_plan_ref

from conftest import DEVICE
from helpers import randn


def _bufs(n, S, H, D, KVH, s_units, fill):
    i32 = dict(dtype=torch.int32, device=DEVICE)
    gqa = KVH is not None
    return HeadPlanBuffers(
        head_slot=torch.full((n, H + 1), fill, **i32),
        qkv_rows=torch.full((n, (s_units if gqa else 3 * S) * D), fill, **i32),
        qkv_count=torch.full((n,), fill, **i32),
        out_rows=torch.full((n, S * D), fill, **i32),
        out_count=torch.full((n,), fill, **i32),
        q_unit=torch.full((n, H), fill, **i32) if gqa else None,
        kv_unit=torch.full((n, KVH), fill, **i32) if gqa else None)


def _selection(n, H, k, policy, seed):
    scores = randn(n, H, gen=torch.Generator().manual_seed(seed))
    return topk_indices_ref(scores, k * (n if policy == "global" else 1), policy)


@pytest.mark.parametrize("H,KVH,D,k,policy,kv_always", [
    (9, 3, 8, 5, "local", False),  # SmolLM2's grouping: groups of 3
    (9, 3, 8, 5, "local", True),
    (9, 3, 8, 1, "local", False),  # one head: two groups write nothing
    (8, 2, 4, 8, "local", False),  # every head
    (8, 8, 4, 3, "global", False),  # one query per group (MHA in the grouped layout), a global budget
    (12, None, 6, 5, "local", False),  # OPT: head-major Q/K/V rows
    (12, None, 6, 4, "global", False),
])
def test_head_plan_matches_reference(H, KVH, D, k, policy, kv_always):
    n = 4
    sel = _selection(n, H, k, policy, seed=H + k)
    S = sel.idx.shape[1]
    if KVH is None:
        s_units = 0
    else:
        G = H // KVH
        s_units = min(KVH * (G + 2), S + 2 * (KVH if kv_always else min(KVH, S)))
    # stale values in the buffers (a previous token's plan) must not survive
    got, ref = _bufs(n, S, H, D, KVH, s_units, 7), _bufs(n, S, H, D, KVH, s_units, -5)
    kw = dict(n_heads=H, head_dim=D, n_kv_heads=KVH, kv_always=kv_always)
    head_plan(sel.idx, sel.count, got, **kw)
    head_plan_ref(sel.idx, sel.count, ref, **kw)
    for name, t in vars(ref).items():
        if t is not None:
            assert torch.equal(getattr(got, name), t), name
    # the plan itself: kept heads get their rank as slot, out rows are theirs
    for layer in range(n):
        c = int(sel.count[layer])
        kept = sel.idx[layer, :c].long().cpu()
        slot = ref.head_slot[layer].cpu()
        assert slot[kept].tolist() == list(range(c)) and int((slot >= 0).sum()) == c
        assert int(ref.out_count[layer]) == c * D
        rows = ref.out_rows[layer, : c * D].view(c, D).cpu()
        assert torch.equal(rows, kept[:, None].int() * D + torch.arange(D, dtype=torch.int32))
        if KVH is not None:
            G = H // KVH
            groups = set((kept // G).tolist())
            live_groups = set(range(KVH)) if kv_always else groups
            kv = ref.kv_unit[layer].cpu()
            assert {g for g in range(KVH) if kv[g] >= 0} == live_groups
            assert int(ref.qkv_count[layer]) == (c + 2 * len(live_groups)) * D


def test_head_plan_names_a_bad_buffer():
    sel = _selection(2, 9, 4, "local", seed=0)
    bufs = _bufs(2, 4, 9, 8, 3, 10, 0)
    bad = HeadPlanBuffers(**{**vars(bufs), "kv_unit": torch.zeros((2, 4), dtype=torch.int32, device=DEVICE)})
    with pytest.raises(ValueError, match="kv_unit must be int32"):
        head_plan(sel.idx, sel.count, bad, n_heads=9, head_dim=8, n_kv_heads=3)
    with pytest.raises(ValueError, match="give both"):
        head_plan(sel.idx, sel.count, HeadPlanBuffers(**{**vars(bufs), "q_unit": None}), n_heads=9, head_dim=8,
                  n_kv_heads=3)
