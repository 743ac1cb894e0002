"""The one table of model sizes (frozen). Shapes only; loading weights lives elsewhere.

Sources: the published Hugging Face configs of facebook/opt-*, meta-llama/Llama-2-*-hf and
HuggingFaceTB/SmolLM2-135M(-Instruct).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # "opt" or "llama"
    hidden: int  # E
    ffn: int  # F, neurons per layer (OPT: 4E; Llama: SwiGLU intermediate size)
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab: int
    max_positions: int
    hf_id: str | None = None  # None: no public checkpoint (random weights only)
    tie_embeddings: bool | None = None  # the LM head is the embedding table; None: the family's usual (OPT yes)
    rope_theta: float = 10000.0  # Llama
    synthetic: bool = False  # a tiny shape for tests and CPU smoke runs, not a published model

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads

    def layer_weight_params(self) -> int:
        """Weights one decoder layer reads per token (projections and FFN; norms and biases excluded)."""
        kv = 2 * self.n_kv_heads * self.head_dim * self.hidden
        attn = 2 * self.hidden * self.hidden + kv
        mlp = (3 if self.family == "llama" else 2) * self.hidden * self.ffn
        return attn + mlp


def _opt(name, hidden, layers, heads):
    return ModelSpec(name, "opt", hidden, 4 * hidden, layers, heads, heads, 50272, 2048, f"facebook/{name}")


MODELS = MappingProxyType({
    spec.name: spec
    for spec in (
        _opt("opt-125m", 768, 12, 12),
        _opt("opt-350m", 1024, 24, 16),
        _opt("opt-1.3b", 2048, 24, 32),
        _opt("opt-2.7b", 2560, 32, 32),
        _opt("opt-6.7b", 4096, 32, 32),
        _opt("opt-13b", 5120, 40, 40),
        _opt("opt-30b", 7168, 48, 56),
        _opt("opt-66b", 9216, 64, 72),
        _opt("opt-175b", 12288, 96, 96),  # for planning: no public checkpoint on the Hub
        ModelSpec("llama-2-7b", "llama", 4096, 11008, 32, 32, 32, 32000, 4096, "meta-llama/Llama-2-7b-hf"),
        ModelSpec("llama-2-13b", "llama", 5120, 13824, 40, 40, 40, 32000, 4096, "meta-llama/Llama-2-13b-hf"),
        ModelSpec("llama-2-70b", "llama", 8192, 28672, 80, 64, 8, 32000, 4096, "meta-llama/Llama-2-70b-hf"),
        ModelSpec("smollm2-135m", "llama", 576, 1536, 30, 9, 3, 49152, 8192, "HuggingFaceTB/SmolLM2-135M-Instruct",
                  tie_embeddings=True, rope_theta=100000.0),
        # Tiny shapes, random weights: CPU smoke runs of the kernel sweep, latency and profile (tiny, tiny-llama),
        # and of collect / train / quality with the byte tokenizer of models.tokenizer (tiny-random, 259 ids).
        ModelSpec("tiny", "opt", 64, 256, 3, 4, 4, 512, 512, synthetic=True),
        ModelSpec("tiny-llama", "llama", 64, 192, 3, 4, 2, 512, 512, tie_embeddings=True, synthetic=True),
        ModelSpec("tiny-random", "llama", 64, 128, 4, 4, 2, 259, 2048, tie_embeddings=True, synthetic=True),
    )
})


def published() -> list[str]:
    """Names of the real model sizes (the tiny synthetic shapes left out)."""
    return [name for name, spec in MODELS.items() if not spec.synthetic]


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}") from None
