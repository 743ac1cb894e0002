import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shadow_kernels.gqa_attention import gqa_decode_attention, gqa_decode_attention_ref

from conftest import DEVICE, DTYPES, REL_TOL
from helpers import rel_err


def rope_tables(max_pos, D, theta=500.0):
    inv = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    emb = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv)
    emb = torch.cat([emb, emb], dim=-1)
    return emb.cos().to(DEVICE), emb.sin().to(DEVICE)


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 2), KVH=st.integers(1, 3), G=st.sampled_from([1, 2, 3, 4]), T=st.integers(1, 70),
       D=st.sampled_from([8, 16]), dtype=st.sampled_from(DTYPES), chunk=st.sampled_from([None, 16]), data=st.data())
def test_matches_reference(B, KVH, G, T, D, dtype, chunk, data):
    pos = data.draw(st.integers(0, T - 1))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 99)))
    kc = torch.randn(B, KVH, T, D, generator=g).to(DEVICE, dtype)
    vc = torch.randn(B, KVH, T, D, generator=g).to(DEVICE, dtype)
    valid = (torch.rand(B, KVH, T, generator=g) < 0.8).to(DEVICE, torch.uint8)
    qkv = torch.randn(B, KVH * (G + 2) * D, generator=g).to(DEVICE, dtype)
    cos, sin = rope_tables(T + 4, D)
    p = torch.tensor([pos], device=DEVICE)
    a = [kc.clone(), vc.clone(), valid.clone()]
    b = [kc.clone(), vc.clone(), valid.clone()]
    out = gqa_decode_attention(qkv, *a, p, cos, sin, chunk=chunk)
    ref = gqa_decode_attention_ref(qkv, *b, p, cos, sin)
    assert torch.equal(a[2], b[2]) and torch.equal(a[1], b[1])
    tol = 4 * REL_TOL[dtype] if dtype != torch.float32 else 1e-5  # the rotated key is rounded once either way
    assert rel_err(a[0], b[0]) <= tol
    assert rel_err(out, ref) <= 2 * tol


def test_bad_inputs():
    kc = torch.zeros(1, 2, 8, 8, device=DEVICE)
    cos, sin = rope_tables(8, 8)
    valid = torch.zeros(1, 2, 8, dtype=torch.uint8, device=DEVICE)
    pos = torch.tensor([3], device=DEVICE)
    with pytest.raises(ValueError, match="qkv has shape"):
        gqa_decode_attention(torch.zeros(1, 2 * 8, device=DEVICE), kc, kc.clone(), valid, pos, cos, sin)
    with pytest.raises(ValueError, match="cos and sin"):
        gqa_decode_attention(torch.zeros(1, 2 * 3 * 8, device=DEVICE), kc, kc.clone(), valid, pos, cos[:, :4], sin)


def compact(qkv, keep, KVH, G, D, always=False):
    """Maps and compacted units for the kept heads ``keep`` [H] bool, written with loops (independent of
    models.plan): per group with a kept head (every group when ``always``: the key/value rule that caches every
    group), its kept queries, then its key and value."""
    units, q_unit, kv_unit, out_slot = [], [-1] * (KVH * G), [-1] * KVH, [-1] * (KVH * G)
    dense = qkv.view(qkv.shape[0], KVH, G + 2, D)
    rank = 0
    for g in range(KVH):
        kept = [j for j in range(G) if keep[g * G + j]]
        if not kept and not always:
            continue
        for j in kept:
            q_unit[g * G + j] = len(units)
            out_slot[g * G + j] = rank
            rank += 1
            units.append(dense[:, g, j])
        kv_unit[g] = len(units)
        units += [dense[:, g, G], dense[:, g, G + 1]]
    i32 = lambda v: torch.tensor(v, dtype=torch.int32, device=DEVICE)
    packed = torch.stack(units, 1).reshape(qkv.shape[0], -1) if units else qkv[:, :0]
    return packed.contiguous(), i32(q_unit), i32(kv_unit), i32(out_slot)


@pytest.mark.parametrize("always", [False, True])
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("KVH,G,keep", [
    (2, 3, [1, 0, 1, 0, 0, 0]),  # group 1 dead
    (3, 2, [0, 1, 1, 1, 0, 0]),
    (4, 1, [1, 0, 0, 1]),  # multi-head attention
    (1, 4, [0, 0, 1, 0]),
])
def test_sparse_heads_equal_dense_on_kept_heads(backend, KVH, G, keep, always):
    torch.manual_seed(0)
    B, T, D, pos = 2, 40, 16, 23
    kc = torch.randn(B, KVH, T, D, device=DEVICE)
    vc = torch.randn(B, KVH, T, D, device=DEVICE)
    valid = (torch.rand(B, KVH, T, device=DEVICE) < 0.8).to(torch.uint8)
    qkv = torch.randn(B, KVH * (G + 2) * D, device=DEVICE)
    cos, sin = rope_tables(T, D)
    p = torch.tensor([pos], device=DEVICE)
    fn = gqa_decode_attention if backend == "triton" else gqa_decode_attention_ref
    dense = [kc.clone(), vc.clone(), valid.clone()]
    want = gqa_decode_attention_ref(qkv, *dense, p, cos, sin).view(B, KVH * G, D)
    packed, q_unit, kv_unit, out_slot = compact(qkv, keep, KVH, G, D, always)
    sparse = [kc.clone(), vc.clone(), valid.clone()]
    got = fn(packed, *sparse, p, cos, sin, None, q_unit, kv_unit, out_slot).view(B, KVH * G, D)
    kept = torch.tensor(keep, dtype=torch.bool)
    assert rel_err(got[:, : int(kept.sum())], want[:, kept]) <= 1e-5
    live = torch.tensor([always or any(keep[g * G:(g + 1) * G]) for g in range(KVH)], device=DEVICE)
    assert torch.equal(sparse[2][:, :, pos], live.to(torch.uint8).expand(B, KVH))
    for c in (0, 1):  # live groups cache the new key/value; dead groups leave the cache as it was
        assert rel_err(sparse[c][:, live, pos], dense[c][:, live, pos]) <= 1e-6
        assert torch.equal(sparse[c][:, ~live, pos], [kc, vc][c][:, ~live, pos])
    others = torch.arange(T, device=DEVICE) != pos
    assert torch.equal(sparse[2][:, :, others], valid[:, :, others])


def test_bad_maps():
    kc = torch.zeros(1, 2, 8, 8, device=DEVICE)
    cos, sin = rope_tables(8, 8)
    valid = torch.zeros(1, 2, 8, dtype=torch.uint8, device=DEVICE)
    pos = torch.tensor([3], device=DEVICE)
    qkv = torch.zeros(1, 2 * 4 * 8, device=DEVICE)
    i32 = lambda n: torch.zeros(n, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="give all three or none"):
        gqa_decode_attention(qkv, kc, kc.clone(), valid, pos, cos, sin, None, i32(4))
    with pytest.raises(TypeError, match=r"kv_unit must be an int32 tensor of shape \(2,\)"):
        gqa_decode_attention(qkv, kc, kc.clone(), valid, pos, cos, sin, None, i32(4), i32(3), i32(4))
    with pytest.raises(TypeError, match="out_slot must be an int32"):
        gqa_decode_attention(qkv, kc, kc.clone(), valid, pos, cos, sin, None, i32(4), i32(2), i32(4).long())
