import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shadow_kernels.decode_attention import decode_attention, decode_attention_ref

from conftest import DEVICE, DTYPES, REL_TOL
from helpers import rel_err


def make_case(B, H, T, D, S, pos, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    kc = torch.randn(B, H, T, D, generator=g).to(DEVICE, dtype)
    vc = torch.randn(B, H, T, D, generator=g).to(DEVICE, dtype)
    valid = (torch.rand(B, H, T, generator=g) < 0.7).to(DEVICE, torch.uint8)
    heads = torch.randperm(H, generator=g)[:S]
    slot = torch.full((H,), -1, dtype=torch.int32)
    slot[heads] = torch.arange(S, dtype=torch.int32)
    qkv = torch.randn(B, S * 3 * D, generator=g).to(DEVICE, dtype)
    return qkv, kc, vc, valid, torch.tensor([pos], device=DEVICE), slot.to(DEVICE)


@settings(max_examples=30, deadline=None)
@given(B=st.integers(1, 3), H=st.integers(1, 6), T=st.integers(1, 80), D=st.sampled_from([8, 16, 24]),
       dtype=st.sampled_from(DTYPES), chunk=st.sampled_from([None, 0, 16, 32]), data=st.data())
def test_matches_reference(B, H, T, D, dtype, chunk, data):
    S = data.draw(st.integers(0, H))
    pos = data.draw(st.integers(0, T - 1))
    qkv, kc, vc, valid, pos_t, slot = make_case(B, H, T, D, S, pos, dtype, data.draw(st.integers(0, 99)))
    a = [kc.clone(), vc.clone(), valid.clone()]
    b = [kc.clone(), vc.clone(), valid.clone()]
    out = decode_attention(qkv, *a, pos_t, slot, chunk=chunk, preload=data.draw(st.booleans()))
    ref = decode_attention_ref(qkv, *b, pos_t, slot)
    for x, y in zip(a, b, strict=True):  # the same cache writes, bit for bit
        assert torch.equal(x, y)
    if S:
        assert rel_err(out, ref) <= REL_TOL[dtype] * 2
    # the new entries: valid exactly for the computed heads
    assert torch.equal(a[2][:, :, pos].cpu(), (slot >= 0).cpu().to(torch.uint8).expand(B, H))


@pytest.mark.parametrize("fn", [decode_attention, lambda *a: decode_attention(*a, chunk=16), decode_attention_ref],
                         ids=["triton", "triton-split", "torch"])
def test_replay_at_same_position_leaves_no_stale_entry(fn):
    qkv, kc, vc, valid, pos, slot = make_case(1, 4, 12, 8, 4, 7, torch.float32, 0)
    fn(qkv, kc, vc, valid, pos, slot)  # every head computed at position 7
    fewer = torch.tensor([0, -1, 1, -1], dtype=torch.int32, device=DEVICE)
    fn(qkv[:, : 2 * 3 * 8], kc, vc, valid, pos, fewer)
    assert valid[0, :, 7].tolist() == [1, 0, 1, 0]


def test_skipped_positions_are_invisible():
    """A head attends only to the positions where it was computed."""
    qkv, kc, vc, valid, pos, slot = make_case(1, 2, 10, 8, 2, 9, torch.float32, 1)
    valid.fill_(1)
    valid[0, 0, 3] = 0
    kc2 = kc.clone()
    kc2[0, 0, 3] = 1e4  # would dominate the softmax if it were read
    for chunk in (0, 16):
        out1 = decode_attention(qkv, kc.clone(), vc.clone(), valid.clone(), pos, slot, chunk=chunk)
        out2 = decode_attention(qkv, kc2.clone(), vc.clone(), valid.clone(), pos, slot, chunk=chunk)
        assert torch.allclose(out1, out2)


def test_bad_inputs():
    qkv, kc, vc, valid, pos, slot = make_case(1, 2, 10, 8, 2, 3, torch.float32, 0)
    with pytest.raises(ValueError, match="qkv has shape"):
        decode_attention(qkv[:, :-1], kc, vc, valid, pos, slot)
    with pytest.raises(ValueError, match="valid must be a uint8"):
        decode_attention(qkv, kc, vc, valid.bool(), pos, slot)
    with pytest.raises(TypeError, match="head_slot must be an int32"):
        decode_attention(qkv, kc, vc, valid, pos, slot.long())
    with pytest.raises(TypeError, match="pos must be"):
        decode_attention(qkv, kc, vc, valid, 3, slot)
    with pytest.raises(TypeError, match="must match the weight dtype"):
        decode_attention(qkv.half(), kc, vc, valid, pos, slot)


@pytest.mark.parametrize("chunk", [0, 16])
def test_head_with_no_earlier_entry_sees_only_itself(chunk):
    qkv, kc, vc, valid, pos, slot = make_case(1, 2, 40, 8, 2, 35, torch.float32, 2)
    valid.zero_()
    out = decode_attention(qkv, kc, vc, valid, pos, slot, chunk=chunk)
    parts = qkv.view(1, 2, 3, 8)
    for h in range(2):
        s = int(slot[h])
        assert torch.allclose(out.view(1, 2, 8)[0, s], parts[0, s, 2])


@pytest.mark.parametrize("setting", [{"one_launch_t": 1 << 30, "max_block_t": 256, "tile": 32768},
                                     {"one_launch_t": 1 << 30, "max_block_t": 128, "tile": 16384},
                                     {"one_launch_t": 100, "max_block_t": 64, "tile": 8192}],
                         ids=["one-launch-256", "one-launch-128", "split-above-100"])
@pytest.mark.parametrize("T,pos", [(200, 199), (200, 63), (90, 70)])
def test_default_forms_match_reference(monkeypatch, setting, T, pos):
    # The default (chunk=None) form follows _ATTN: one launch with tiles up to 128/256 positions (one tile
    # covers the whole cache here, or two), or the split past a threshold; each the reference's result.
    import sys

    da = sys.modules["shadow_kernels.decode_attention"]  # the package's attribute of that name is the function
    monkeypatch.setattr(da, "_ATTN", {**da._ATTN, **setting})
    launched = []
    for name in ("_decode_attention_kernel", "_decode_attention_split_kernel"):
        kernel = getattr(da, name)
        monkeypatch.setattr(da, name, _Spy(kernel, name, launched))
    qkv, kc, vc, valid, pos_t, slot = make_case(1, 3, T, 16, 2, pos, torch.float32, 7)
    a = [kc.clone(), vc.clone(), valid.clone()]
    b = [kc.clone(), vc.clone(), valid.clone()]
    out = decode_attention(qkv, *a, pos_t, slot)
    ref = decode_attention_ref(qkv, *b, pos_t, slot)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert rel_err(out, ref) <= REL_TOL[torch.float32] * 2
    one = setting["one_launch_t"] >= T
    assert [name for name, _ in launched] == ["_decode_attention_kernel" if one else "_decode_attention_split_kernel"]
    if one:  # tiles as long as the setting allows, up to the cache length's power of two (BLOCK_D 16 here)
        assert launched[0][1] == min(setting["max_block_t"], 1 << (T - 1).bit_length(), setting["tile"] // 16)


@pytest.mark.parametrize("preload_tile,one", [(16384, True), (1024, False)], ids=["fits-one-tile", "too-long"])
@pytest.mark.parametrize("T,pos", [(200, 199), (200, 0), (90, 70)])
def test_preload_forms_match_reference(monkeypatch, preload_tile, one, T, pos):
    # with preload the default form is one launch over one tile holding the whole cache (read before the PDL
    # wait) when it fits preload_tile elements, else the form without preload picks (here: the split past 64).
    import sys

    da = sys.modules["shadow_kernels.decode_attention"]
    monkeypatch.setattr(da, "_ATTN", {**da._ATTN, "one_launch_t": 64, "max_block_t": 64, "tile": 8192,
                                      "preload_tile": preload_tile})
    launched = []
    for name in ("_decode_attention_kernel", "_decode_attention_split_kernel"):
        monkeypatch.setattr(da, name, _Spy(getattr(da, name), name, launched))
    qkv, kc, vc, valid, pos_t, slot = make_case(1, 3, T, 16, 2, pos, torch.float32, 8)
    a = [kc.clone(), vc.clone(), valid.clone()]
    b = [kc.clone(), vc.clone(), valid.clone()]
    out = decode_attention(qkv, *a, pos_t, slot, preload=True)
    ref = decode_attention_ref(qkv, *b, pos_t, slot, preload=True)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert rel_err(out, ref) <= REL_TOL[torch.float32] * 2
    assert [name for name, _ in launched] == ["_decode_attention_kernel" if one else "_decode_attention_split_kernel"]
    if one:
        assert launched[0][1] == 1 << (T - 1).bit_length()
    with pytest.raises(TypeError, match="preload must be True or False"):
        decode_attention(qkv, *a, pos_t, slot, preload=1)


class _Spy:
    """A kernel whose launches are recorded (name, BLOCK_T) and then run."""

    def __init__(self, kernel, name, log):
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.name, kwargs.get("BLOCK_T")))
            return self.kernel[grid](*args, **kwargs)
        return launch
