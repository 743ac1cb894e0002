"""The OPT decoder against transformers, and every mode's sparse decode against a masked reference."""

import json

import pytest
import torch
import torch.nn.functional as F

from models.config import DecoderConfig
from models.generate import Generator
from models.loading import load_model, parse_dtype, random_model
from models.modes import DejaVu, Dense, ShadowLLM, Static, make_mode
from models.opt import OPTDecoder
from models.plan import kept_units
from models.predictors import DejaVuPredictor, ShadowLLMPredictor, load_predictor, random_predictor

from helpers import (
    check_decode_against_masked_reference,
    constant_predictor,
    plan_masks_checked,
    random_importance,
    tiny_decoder,
)

V = 97
# The Triton backend on CPU tensors needs the interpreter; on a GPU machine test_gpu_models covers it.
ON_CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="Triton on CPU tensors needs the interpreter")


def tiny_cfg(pre_norm=True, **kw):
    base = dict(family="opt", vocab=V, hidden=32, ffn=64, n_layers=4, n_heads=4, n_kv_heads=4, max_positions=64,
                word_embed_dim=None if pre_norm else 16, pre_norm=pre_norm, final_norm=pre_norm)
    base.update(kw)
    return DecoderConfig(**base)


def tiny_model(pre_norm=True, dtype=torch.float32, seed=1, **kw):
    return OPTDecoder.random(tiny_cfg(pre_norm, **kw), dtype, "cpu", seed=seed, std=0.2)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


# ------------------------------------------------------------------ dense against transformers
@pytest.mark.parametrize("pre_norm", [True, False], ids=["pre-ln", "post-ln+proj(350m-style)"])
def test_dense_matches_transformers(pre_norm):
    model = tiny_model(pre_norm)
    hf = model.to_hf()
    tokens = torch.randint(0, V, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(tokens).logits
        assert rel(model.prefill(tokens, all_logits=True), ref) <= 1e-4
    gen = Generator(model, Dense(), batch=2, max_len=16, backend="torch")
    gen.prefill(tokens[:, :6])
    for t in range(6, 11):  # teacher-forced decode steps through the KV cache
        gen.tok.copy_(tokens[:, t])
        assert rel(gen.step(), ref[:, t]) <= 1e-4


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=ON_CPU_ONLY)])
@pytest.mark.parametrize("pre_norm", [True, False], ids=["pre-ln", "post-ln+proj"])
def test_dense_gemv_triton_decodes_like_transformers(pre_norm, backend):
    """set_dense_gemv("triton"): dense layers (every layer of dense mode, layer 0 of ShadowLLM) run the
    gather-rows GEMV over natural-layout weights (out_proj as stored, a copy of fc2); decode steps equal
    transformers'."""
    model = tiny_model(pre_norm)
    hf = model.to_hf()
    model.set_dense_gemv("triton")
    assert model.layers[0].fc2_w.shape == (model.cfg.hidden, model.cfg.ffn)
    tokens = torch.randint(0, V, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(tokens).logits
    import dataclasses

    from models.ops import get_ops

    ops = get_ops(backend, torch.device("cpu"))
    calls = []
    counted = dataclasses.replace(ops, gemv=lambda *a, **k: calls.append("gemv") or ops.gemv(*a, **k),
                                  norm_gemv=lambda *a, **k: calls.append("norm") or ops.norm_gemv(*a, **k))
    gen = Generator(model, Dense(), batch=2, max_len=16, backend=counted)
    gen.prefill(tokens[:, :6])
    for t in range(6, 11):
        gen.tok.copy_(tokens[:, t])
        assert rel(gen.step(), ref[:, t]) <= 1e-4
    # qkv, out_proj, fc1, fc2 of every layer, every step; pre-LN folds its norms into qkv and fc1, and the
    # final norm into the LM head (one more norm GEMV a step)
    L = model.cfg.n_layers
    want = {"gemv": 2 * L, "norm": 2 * L + 1} if pre_norm else {"gemv": 4 * L}
    assert {k: calls.count(k) for k in set(calls)} == {k: v * 5 for k, v in want.items()}
    model.set_dense_gemv("cublas")
    assert model.layers[0].fc2_w is None
    with pytest.raises(ValueError, match="dense_gemv must be one of"):
        model.set_dense_gemv("cutlass")


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=ON_CPU_ONLY)])
def test_norm_folds_follow_weight_changes(backend):
    """The fused norm GEMVs use per-weight sums computed once (``norm_folds``); changing a norm or a weight in
    place, or replacing it, must rebuild them before the next step, never decode with the old ones."""
    model = tiny_model()
    model.set_dense_gemv("triton")
    tokens = torch.randint(0, V, (1, 9), generator=torch.Generator().manual_seed(4))

    def decode_matches_transformers():
        hf = model.to_hf()
        with torch.no_grad():
            ref = hf(tokens).logits
        gen = Generator(model, Dense(), batch=1, max_len=16, backend=backend)
        gen.prefill(tokens[:, :6])
        for t in range(6, 9):
            gen.tok.copy_(tokens[:, t])
            assert rel(gen.step(), ref[:, t]) <= 1e-4

    decode_matches_transformers()
    first = model.norm_folds()
    assert model.norm_folds() is first  # cached while nothing changes
    with torch.no_grad():
        model.layers[1].ln2_w.mul_(1.5)
        model.layers[2].qkv_b.add_(0.3)
        model.layers[3].ln1_b = torch.nn.Parameter(model.layers[3].ln1_b + 0.2, requires_grad=False)
    decode_matches_transformers()
    assert model.norm_folds() is not first


def test_stale_norm_folds_in_a_graph_capture_are_an_error(monkeypatch):
    import models.opt

    model = tiny_model()
    model.norm_folds()
    monkeypatch.setattr(models.opt, "is_capturing", lambda device: True)
    model.norm_folds()  # current: fine
    with torch.no_grad():
        model.layers[0].fc1_w.mul_(2.0)
    with pytest.raises(RuntimeError, match="norm folds are stale during a CUDA graph capture"):
        model.norm_folds()


def test_loads_hf_checkpoint_folder(tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    cfg = tiny_cfg()
    torch.manual_seed(3)
    hf = OPTForCausalLM(OPTConfig(**cfg.hf_dict())).eval()
    hf.save_pretrained(tmp_path)
    model = load_model(str(tmp_path), dtype="float32")
    tokens = torch.randint(0, V, (1, 7))
    with torch.no_grad():
        assert rel(model.prefill(tokens, all_logits=True), hf(tokens).logits) <= 1e-4
    assert model.cfg == DecoderConfig.from_hf(json.loads((tmp_path / "config.json").read_text()), name=tmp_path.name)


def test_loads_bin_checkpoint_with_weights_only(tmp_path):
    model = tiny_model()
    torch.save({k: v.contiguous() for k, v in model.hf_state_dict().items()}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "opt", **model.cfg.hf_dict()}))
    loaded = load_model(str(tmp_path), dtype="float32")
    for (name, a), b in zip(model.named_parameters(), loaded.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_bad_checkpoints(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "opt", **tiny_cfg().hf_dict()}))
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        load_model(str(tmp_path))
    with pytest.raises(ValueError, match="unknown model|neither a folder"):
        load_model("no-such-model")
    with pytest.raises(ValueError, match="only the local cache"):
        load_model("facebook/opt-125m-not-cached-here")
    with pytest.raises(ValueError, match="dtype must be one of"):
        parse_dtype("int8")
    model = tiny_model()
    sd = model.hf_state_dict()
    sd["model.decoder.layers.0.fc1.weight"] = sd["model.decoder.layers.0.fc1.weight"][:, :5]
    with pytest.raises(ValueError, match="fc1.weight' has shape"):
        OPTDecoder.from_hf_state_dict(model.cfg, sd)


def test_registry_configs_build_on_meta():
    for name in ("opt-125m", "opt-350m", "opt-13b", "opt-66b"):
        cfg = DecoderConfig.from_spec(name)
        with torch.device("meta"):
            model = OPTDecoder(cfg, torch.float16, "meta")
        n = sum(p.numel() for p in model.parameters())
        # published parameter counts within 3% (names say the rounded size)
        want = {"opt-125m": 125e6, "opt-350m": 331e6, "opt-13b": 12.9e9, "opt-66b": 65.7e9}[name]
        assert abs(n - want) / want < 0.03, (name, n)
    assert DecoderConfig.from_spec("llama-2-7b").family == "llama"


# ------------------------------------------------------------------ the masked reference
def masked_reference(model, tokens, P, head_masks, neuron_masks):
    """Logits of positions P.. when every token from P on computes only the masked heads/neurons.

    Written from the definitions, with masks instead of index lists: a skipped head contributes no
    output and leaves no key/value for later tokens; a skipped neuron contributes nothing.
    head_masks[t] / neuron_masks[t]: [L, H] / [L, F] bool for the token at position t.
    """
    cfg = model.cfg
    B, T = tokens.shape
    H, D = cfg.n_heads, cfg.head_dim
    keys = [[[None] * T for _ in range(H)] for _ in range(cfg.n_layers)]
    vals = [[[None] * T for _ in range(H)] for _ in range(cfg.n_layers)]
    out = []
    for t in range(T):
        x = model._embed(tokens[:, t], torch.tensor([t]).expand(B))
        for i, layer in enumerate(model.layers):
            hm = head_masks[t][i] if t >= P else torch.ones(H, dtype=torch.bool)
            nm = neuron_masks[t][i] if t >= P else torch.ones(cfg.ffn, dtype=torch.bool)
            res = x
            a = model._ln(x, layer.ln1_w, layer.ln1_b) if cfg.pre_norm else x
            qkv = F.linear(a, layer.qkv_w, layer.qkv_b).view(B, H, 3, D)
            heads = torch.zeros(B, H, D)
            for h in range(H):
                if not hm[h]:
                    continue
                keys[i][h][t], vals[i][h][t] = qkv[:, h, 1], qkv[:, h, 2]
                live = [s for s in range(t + 1) if keys[i][h][s] is not None]
                K = torch.stack([keys[i][h][s] for s in live], 1)
                Vv = torch.stack([vals[i][h][s] for s in live], 1)
                p = torch.softmax(torch.einsum("bd,bsd->bs", qkv[:, h, 0] * model.scale, K), -1)
                heads[:, h] = torch.einsum("bs,bsd->bd", p, Vv)
            x = res + heads.reshape(B, H * D) @ layer.out_w.T + layer.out_b
            if not cfg.pre_norm:
                x = model._ln(x, layer.ln1_w, layer.ln1_b)
            res = x
            a = model._ln(x, layer.ln2_w, layer.ln2_b) if cfg.pre_norm else x
            f = torch.relu(F.linear(a, layer.fc1_w, layer.fc1_b)) * nm
            x = res + f @ layer.fc2_wt + layer.fc2_b
            if not cfg.pre_norm:
                x = model._ln(x, layer.ln2_w, layer.ln2_b)
        if t >= P:
            out.append(model._logits(x))
    return torch.stack(out, 1)


def plan_masks(mode, model):
    """The current plan of a mode as masks [L, H], [L, F] (dense layers all True)."""
    D3 = 3 * model.cfg.head_dim

    def check(i, plan, hm):
        assert int(hm.sum()) * D3 == int(plan.qkv_count)
        # slots are 0..count-1, each used once, and name the heads in the Q/K/V rows
        slots = plan.head_slot[hm].sort().values.cpu()
        assert torch.equal(slots, torch.arange(int(hm.sum()), dtype=torch.int32))
        rows = plan.qkv_rows[: int(plan.qkv_count)].view(-1, D3)[:, 0] // D3
        assert torch.equal(rows.cpu().long(), torch.nonzero(hm).flatten())

    return plan_masks_checked(mode, model, check)


MODE_CASES = {
    "static-local": lambda cfg: Static(random_importance(cfg), 0.5, "local"),
    "static-global": lambda cfg: Static(random_importance(cfg), 0.6, "global"),
    # a global budget narrower than one layer (k_total < H and < F) once broke the plan fill
    "static-global-narrow": lambda cfg: Static(random_importance(cfg), 1 - 0.9 / (cfg.n_layers - 1), "global"),
    "dejavu-token": lambda cfg: DejaVu(0.5, "random", "token", hidden=16),
    "dejavu-layer-input-token": lambda cfg: DejaVu(0.5, "random", "token", hidden=16, neuron_input="layer"),
    "dejavu-lookahead": lambda cfg: DejaVu(0.5, "random", "token", lookahead=True, hidden=16),
    "shadowllm-global-token": lambda cfg: ShadowLLM(0.5, "random", "global", "token", hidden=16),
    "shadowllm-local-prompt": lambda cfg: ShadowLLM(0.5, "random", "local", "prompt", hidden=16),
    "shadowllm-residual-token": lambda cfg: ShadowLLM(0.5, "random", "local", "token", hidden=16,
                                                      input_site="residual"),
    "dejavu-prompt": lambda cfg: DejaVu(0.7, "random", "prompt", hidden=16),
    "shadowllm-sparse-hidden": lambda cfg: ShadowLLM(0.5, "random", "global", "token", hidden=16, sparse_hidden=True),
    "dejavu-sparse-hidden": lambda cfg: DejaVu(0.5, "random", "token", hidden=16, sparse_hidden=True),
    "shadowllm-union-global": lambda cfg: ShadowLLM(0.5, "random", "global", "token", hidden=16, batch_rule="union"),
    "shadowllm-union-local": lambda cfg: ShadowLLM(0.6, "random", "local", "token", hidden=16, batch_rule="union"),
    "dejavu-union": lambda cfg: DejaVu(0.5, "random", "token", hidden=16, batch_rule="union"),
}


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=ON_CPU_ONLY)])
@pytest.mark.parametrize("case", list(MODE_CASES))
def test_sparse_decode_matches_masked_reference(case, backend):
    """Each step's plan (recorded) replayed through the masked reference gives the same logits."""
    model = tiny_model()
    check_decode_against_masked_reference(model, MODE_CASES[case](model.cfg), backend, plan_masks, masked_reference)


def test_token_granularity_replans_and_prompt_granularity_does_not():
    model = tiny_model()
    for granularity, changes in (("token", True), ("prompt", False)):
        mode = ShadowLLM(0.5, "random", "local", granularity, hidden=16)
        gen = Generator(model, mode, batch=1, max_len=40, backend="torch")
        gen.prefill(torch.randint(0, V, (1, 4)))
        seen = set()
        for _ in range(30):
            gen.step()
            seen.add(tuple(plan_masks(mode, model)[1].flatten().tolist()))
        assert (len(seen) > 1) == changes, granularity


def test_shadowllm_output_layout_and_global_budget():
    model = tiny_model()
    cfg = model.cfg
    Ls, H, Fd = cfg.n_layers - 1, cfg.n_heads, cfg.ffn
    hs = torch.randn(Ls, H)
    ns = torch.randn(Ls, Fd)
    flat = [torch.cat([hs.flatten(), ns.flatten()])]
    pred = constant_predictor(ShadowLLMPredictor(cfg, 8, dtype=torch.float32), flat)
    mode = ShadowLLM(0.5, pred, "global", "prompt")
    Generator(model, mode, batch=1, max_len=8, backend="torch").prefill(torch.randint(0, V, (1, 3)))
    hm, nm = plan_masks(mode, model)
    k = kept_units(H, 0.5) * Ls
    want = torch.zeros(Ls * H, dtype=torch.bool)
    want[hs.flatten().topk(k).indices] = True
    assert torch.equal(hm[1:].flatten(), want)
    want = torch.zeros(Ls * Fd, dtype=torch.bool)
    want[ns.flatten().topk(kept_units(Fd, 0.5) * Ls).indices] = True
    assert torch.equal(nm[1:].flatten(), want)


def test_staged_shadowllm_routes_each_stage_to_its_layers(tmp_path):
    """stages (1, 3): the first net (on layer 1's input) plans layers 1-2, the second (on layer 3's input) layer 3;
    the file keeps the stages; a global budget, layer 0's attention as input and bad stage lists are refused."""
    model = tiny_model()
    cfg = model.cfg
    H, Fd = cfg.n_heads, cfg.ffn
    pred = ShadowLLMPredictor(cfg, 8, dtype=torch.float32, input_site="residual", stages=(1, 3))
    assert pred.stage_layers == (2, 1) and pred.stage_of(3) == 1 and pred.stage_of(2) is None
    first = [torch.randn(2, H), torch.randn(2, Fd)]
    second = [torch.randn(1, H), torch.randn(1, Fd)]
    constant_predictor(pred, [torch.cat([first[0].flatten(), first[1].flatten()])])
    with torch.no_grad():  # the second stage's net: constant scores too
        net = pred.stage_nets[0]
        net[0].weight.zero_()
        net[0].bias.fill_(1.0)
        net[2].weight.zero_()
        net[2].bias.copy_(torch.cat([second[0].flatten(), second[1].flatten()]))
    path = pred.save(tmp_path / "staged.safetensors")
    loaded = load_predictor(path, cfg, dtype=torch.float32)
    assert loaded.stages == (1, 3) and loaded.meta["stages"] == [1, 3]
    mode = ShadowLLM(0.5, str(path), "local", "prompt")
    Generator(model, mode, batch=1, max_len=8, backend="torch").prefill(torch.randint(0, V, (1, 3)))
    assert mode.observes("input", 1) and mode.observes("input", 3) and not mode.observes("input", 2)
    hm, nm = plan_masks(mode, model)
    wanted = [(first[0][0], first[1][0]), (first[0][1], first[1][1]), (second[0][0], second[1][0])]
    for layer, (h, n) in enumerate(wanted, start=1):
        assert set(torch.nonzero(hm[layer]).flatten().tolist()) == set(h.topk(kept_units(H, 0.5)).indices.tolist())
        assert set(torch.nonzero(nm[layer]).flatten().tolist()) == set(n.topk(kept_units(Fd, 0.5)).indices.tolist())
    assert mode.predictor_bytes() == sum(p.nbytes for p in loaded.parameters())
    with pytest.raises(ValueError, match="global top-k needs every layer"):
        ShadowLLM(0.5, str(path), "global", "token").bind(model)
    with pytest.raises(ValueError, match="input_site 'attn0' has one site"):
        ShadowLLMPredictor(cfg, 8, input_site="attn0", stages=(1, 2))
    for bad in ((2, 3), (1, 1), (1, 4), ()):
        with pytest.raises(ValueError, match="stages must be increasing layers"):
            ShadowLLMPredictor(cfg, 8, input_site="residual", stages=bad)


def test_dejavu_layer_routing():
    model = tiny_model()
    cfg = model.cfg
    scores = [torch.randn(cfg.n_heads + cfg.ffn) for _ in range(cfg.n_layers - 1)]
    pred = constant_predictor(DejaVuPredictor(cfg, 8, dtype=torch.float32), scores)
    mode = DejaVu(0.5, pred, "prompt")
    Generator(model, mode, batch=1, max_len=8, backend="torch").prefill(torch.randint(0, V, (1, 3)))
    hm, nm = plan_masks(mode, model)
    for i, s in enumerate(scores, start=1):
        assert set(torch.nonzero(hm[i]).flatten().tolist()) == set(s[: cfg.n_heads].topk(2).indices.tolist())
        assert set(torch.nonzero(nm[i]).flatten().tolist()) == set(s[cfg.n_heads:].topk(32).indices.tolist())


def test_observed_activations_are_the_layer_inputs():
    """Predictors see layer l's input (the residual stream) and layer 0's attention block output."""
    model = tiny_model()
    hf = model.to_hf()
    tokens = torch.randint(0, V, (1, 6))
    seen = {}

    class Recorder(Dense):
        granularity = "token"

        def observe(self, layer, site, x):
            seen[(layer, site)] = x.clone()

    gen = Generator(model, Recorder(), batch=1, max_len=8, backend="torch")
    gen.prefill(tokens[:, :5])
    gen.tok.copy_(tokens[:, 5])
    gen.step()
    with torch.no_grad():
        out = hf(tokens, output_hidden_states=True)
        for i in range(model.cfg.n_layers):
            assert rel(seen[(i, "input")], out.hidden_states[i][:, 5]) <= 1e-5
        attn0 = hf.model.decoder.layers[0].self_attn(
            hf.model.decoder.layers[0].self_attn_layer_norm(out.hidden_states[0]),
            attention_mask=torch.full((1, 1, 6, 6), float("-inf")).triu(1))[0]
    assert rel(seen[(0, "attn_out")], attn0[:, 5]) <= 1e-5


def test_predictor_files_roundtrip_and_shape_errors(tmp_path):
    model = tiny_model()
    pred = random_predictor("shadowllm", model.cfg, hidden=8, dtype=torch.float32)
    path = pred.save(tmp_path / "p.safetensors")
    back = load_predictor(path, model.cfg, dtype=torch.float32)
    for a, b in zip(pred.parameters(), back.parameters(), strict=True):
        assert torch.equal(a, b)
    other = tiny_cfg(ffn=48)
    with pytest.raises(ValueError, match="ffn 64 \\(model has 48\\)"):
        load_predictor(path, other)
    with pytest.raises(ValueError, match="does not exist"):
        load_predictor(tmp_path / "missing.safetensors", model.cfg)
    with pytest.raises(ValueError, match="needs a dejavu predictor"):
        Generator(model, DejaVu(0.5, str(path)), max_len=8, backend="torch")


def test_bad_mode_arguments():
    cfg = tiny_cfg()
    with pytest.raises(ValueError, match="mode must be one of"):
        make_mode("magic")
    for bad in (1.0, -0.1, "0.5", True):
        with pytest.raises(ValueError, match="sparsity must be a number in \\[0, 1\\)"):
            make_mode("shadowllm", sparsity=bad)
    with pytest.raises(ValueError, match="policy must be one of"):
        make_mode("shadowllm", policy="everywhere")
    with pytest.raises(ValueError, match="granularity must be one of"):
        make_mode("dejavu", granularity="sometimes")
    with pytest.raises(ValueError, match="per layer"):
        make_mode("dejavu", policy="global")
    with pytest.raises(ValueError, match="needs importance"):
        make_mode("static")
    bad = random_importance(cfg)
    bad["heads"] = bad["heads"][:, :3]
    with pytest.raises(ValueError, match="'heads' has shape"):
        Static(bad, 0.5).bind(tiny_model())


def test_generate_timing_and_lengths():
    model = random_model(tiny_cfg(), dtype="float32")
    gen = Generator(model, make_mode("shadowllm", sparsity=0.5, predictor="random"), max_len=12, backend="torch")
    out = gen.generate(torch.randint(0, V, (1, 4)), 8)
    assert out.tokens.shape == (1, 8) and len(out.token_ms) == 7 and all(t > 0 for t in out.token_ms)
    with pytest.raises(ValueError, match="cache positions"):
        gen.generate(torch.randint(0, V, (1, 6)), 8)


def test_step_weight_bytes():
    model = tiny_model(dtype=torch.float16)
    dense = model.step_weight_bytes()
    # every parameter once, except the position table (one row read); the token row is counted on top
    # of the tied LM head, which reads the whole table
    cfg = model.cfg
    assert dense == model.weight_bytes() - (cfg.max_positions + 2) * cfg.hidden * 2 + 2 * cfg.hidden * 2
    half = model.step_weight_bytes([2, 2, 2], [32, 32, 32], first_sparse=1)
    assert half < dense


@pytest.mark.parametrize("kind", ["shadowllm", "dejavu"])
def test_sparse_hidden_predictor_gives_the_same_plan(kind):
    model = tiny_model()
    prompt = torch.randint(0, V, (2, 6))
    masks = []
    for sparse in (False, True):
        mode = (ShadowLLM(0.5, "random", "global", "prompt", hidden=32, sparse_hidden=sparse) if kind == "shadowllm"
                else DejaVu(0.5, "random", "prompt", hidden=32, sparse_hidden=sparse))
        Generator(model, mode, batch=2, max_len=8, backend="torch").prefill(prompt)
        masks.append(plan_masks(mode, model))
        assert mode.describe()["sparse_hidden"] is sparse
    assert all(torch.equal(a, b) for a, b in zip(masks[0], masks[1], strict=True))
    assert mode.predictor_bytes() < mode.predictor.nbytes()  # dead hidden units were skipped


def test_union_plan_is_the_union_of_each_sequences_top_k():
    """batch_rule 'union': the plan of a batch is exactly the union of each sequence's own top-k, per layer
    (local) or over all sparse layers (global); 'mean' selects from the mean scores."""
    from models.ops import TORCH
    from models.plan import PlanBuffers

    gen = torch.Generator().manual_seed(4)
    L, H, D, F, B = 4, 6, 2, 20, 3
    heads, neurons = torch.randn(B, L - 1, H, generator=gen), torch.randn(B, L - 1, F, generator=gen)
    for policy in ("local", "global"):
        pb = PlanBuffers(n_layers=L, first=1, n_heads=H, head_dim=D, ffn=F, sparsity=0.5, policy=policy,
                         device="cpu", ops=TORCH, batch_rule="union")
        pb.fill_batch(1, heads, neurons)
        want = torch.zeros(L - 1, F, dtype=torch.bool)
        for b in range(B):
            if policy == "local":
                top = neurons[b].topk(F // 2, dim=1).indices
                want |= torch.zeros(L - 1, F, dtype=torch.bool).scatter_(1, top, True)
            else:
                flat = torch.zeros((L - 1) * F, dtype=torch.bool)
                want |= flat.scatter_(0, neurons[b].reshape(-1).topk((L - 1) * F // 2).indices, True).view(L - 1, F)
        got = torch.zeros(L - 1, F, dtype=torch.bool)
        for j in range(L - 1):
            got[j, pb.neurons[j, : int(pb.neuron_count[j])].long()] = True
        assert torch.equal(got, want)
        assert int(pb.neuron_count.sum()) > (L - 1) * F // 2  # three random sequences disagree somewhere
    mean = PlanBuffers(n_layers=L, first=1, n_heads=H, head_dim=D, ffn=F, sparsity=0.5, policy="local",
                       device="cpu", ops=TORCH)
    mean.fill_batch(1, heads, neurons)
    assert (mean.neuron_count == F // 2).all()
    with pytest.raises(ValueError, match="batch_rule must be one of"):
        ShadowLLM(0.5, "random", batch_rule="intersection")


@pytest.mark.parametrize("name", ["shadowllm", "dejavu"])
def test_fp8_predictor_mode_decodes_like_its_masked_reference(name):
    """predictor_dtype 'fp8' (second layer float8 + a scale per output): decoding with the plans it makes
    equals the masked reference, it reads fewer predictor bytes, and it refuses sparse_hidden."""
    model = tiny_model()
    make = ShadowLLM if name == "shadowllm" else DejaVu
    mode = make(0.5, "random", granularity="token", hidden=16, predictor_dtype="fp8")
    check_decode_against_masked_reference(model, mode, "torch", plan_masks, masked_reference)
    from models.ops import TORCH

    fp16 = make(0.5, "random", granularity="token", hidden=16).bind(model, TORCH)
    assert mode.predictor_bytes() < fp16.predictor_bytes()
    assert mode.describe()["predictor_dtype"] == "fp8"
    with pytest.raises(ValueError, match="does not combine with sparse_hidden"):
        make(0.5, "random", hidden=16, predictor_dtype="fp8", sparse_hidden=True).bind(model, TORCH)
    with pytest.raises(ValueError, match="predictor_dtype must be one of"):
        make(0.5, "random", predictor_dtype="int4")


def test_global_static_budget_keeps_every_layer_in_its_share_when_scales_differ_a_thousandfold():
    """Importance whose layers differ in scale by 1000x: on raw scores a global budget goes to the loud layers and
    leaves others empty; under the default per-layer normalisation every layer keeps close to its local share."""
    model = tiny_decoder("opt")
    cfg = model.cfg
    g = torch.Generator().manual_seed(3)
    scale = torch.logspace(0, 3, cfg.n_layers)[:, None]
    imp = {"heads": torch.rand(cfg.n_layers, cfg.n_heads, generator=g) * scale,
           "neurons": torch.rand(cfg.n_layers, cfg.ffn, generator=g) * scale}
    normalised = Static(imp, 0.5, "global").bind(model)
    counts = normalised.live_counts()
    share = cfg.ffn // 2
    assert all(abs(c - share) <= 0.25 * share for c in counts["neurons"]), counts
    assert all(c >= 1 for c in counts["heads"]), counts
    raw = Static(imp, 0.5, "global", normalise="none").bind(model).live_counts()
    assert min(raw["neurons"]) == 0  # what the normalisation prevents
    with pytest.raises(ValueError, match="normalise must be one of"):
        Static(imp, 0.5, "global", normalise="zscore")
