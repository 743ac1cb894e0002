"""The architecture of one decoder: everything the code needs to build it, from the registry or a HF config."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from .registry import ModelSpec, get_spec

FAMILIES = ("opt", "llama")
ACTIVATIONS = {"opt": "relu", "llama": "silu"}


@dataclass(frozen=True)
class DecoderConfig:
    family: str
    vocab: int
    hidden: int  # E
    ffn: int  # F
    n_layers: int
    n_heads: int
    n_kv_heads: int
    max_positions: int
    word_embed_dim: int | None = None  # OPT-350m embeds in 512 and projects to E (None: = E)
    pre_norm: bool = True  # OPT-350m is post-LN
    final_norm: bool = True
    norm_eps: float = 1e-5
    activation: str = "relu"
    tie_embeddings: bool = True
    rope_theta: float = 10000.0  # Llama
    name: str = "custom"
    # Tensor parallelism (models.tp): this config is one of ``tp_size`` shards of a model whose n_heads, n_kv_heads
    # and ffn are tp_size times the ones here (every rank holds a contiguous share of the heads, key-value groups
    # and neurons); hidden, vocab and layers are whole. 1: the whole model.
    tp_size: int = 1

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        for field in ("vocab", "hidden", "ffn", "n_layers", "n_heads", "n_kv_heads", "max_positions", "tp_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be a positive int, got {value!r}")
        if self.hidden % (self.n_heads * self.tp_size):
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of n_heads ({self.n_heads * self.tp_size})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.activation != ACTIVATIONS[self.family]:
            raise ValueError(f"activation {self.activation!r} is not supported for {self.family}; expected "
                             f"{ACTIVATIONS[self.family]!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden // (self.n_heads * self.tp_size)

    @property
    def attn_width(self) -> int:
        """Query rows of the Q/K/V projection and inputs of the output projection: n_heads * head_dim (= hidden
        unless sharded)."""
        return self.n_heads * self.head_dim

    def shard(self, world: int) -> DecoderConfig:
        """One rank's config of ``world``-way tensor parallelism (Megatron's layout: heads, key-value groups and
        neurons split into ``world`` contiguous equal shares)."""
        if self.tp_size != 1:
            raise ValueError(f"config is already one of {self.tp_size} shards")
        if isinstance(world, bool) or not isinstance(world, int) or world < 1:
            raise ValueError(f"tensor-parallel world size must be a positive int, got {world!r}")
        for field in ("n_heads", "n_kv_heads", "ffn"):
            if getattr(self, field) % world:
                raise ValueError(f"{self.name}: {field} = {getattr(self, field)} does not split over {world} ranks "
                                 f"(it must be a multiple of the world size)")
        return replace(self, n_heads=self.n_heads // world, n_kv_heads=self.n_kv_heads // world,
                       ffn=self.ffn // world, tp_size=world)

    def full(self) -> DecoderConfig:
        """The whole model's config of a shard (itself when not sharded)."""
        t = self.tp_size
        return replace(self, n_heads=self.n_heads * t, n_kv_heads=self.n_kv_heads * t, ffn=self.ffn * t, tp_size=1)

    @property
    def embed_dim(self) -> int:
        return self.word_embed_dim or self.hidden

    def to_dict(self) -> dict:
        return asdict(self)

    def with_(self, **changes) -> DecoderConfig:
        return replace(self, **changes)

    @classmethod
    def from_spec(cls, spec: ModelSpec | str) -> DecoderConfig:
        spec = get_spec(spec) if isinstance(spec, str) else spec
        if spec.family == "llama":
            return cls(family="llama", vocab=spec.vocab, hidden=spec.hidden, ffn=spec.ffn, n_layers=spec.n_layers,
                       n_heads=spec.n_heads, n_kv_heads=spec.n_kv_heads, max_positions=spec.max_positions,
                       activation="silu", tie_embeddings=bool(spec.tie_embeddings), rope_theta=spec.rope_theta,
                       norm_eps=1e-5, name=spec.name)
        extra = {"word_embed_dim": 512, "pre_norm": False, "final_norm": False} if spec.name == "opt-350m" else {}
        return cls(family=spec.family, vocab=spec.vocab, hidden=spec.hidden, ffn=spec.ffn, n_layers=spec.n_layers,
                   n_heads=spec.n_heads, n_kv_heads=spec.n_kv_heads, max_positions=spec.max_positions,
                   name=spec.name, **extra)

    @classmethod
    def from_hf(cls, hf, name: str = "custom") -> DecoderConfig:
        """From a ``transformers`` config object (or its dict)."""
        get = (lambda k, d=None: hf.get(k, d)) if isinstance(hf, dict) else (lambda k, d=None: getattr(hf, k, d))
        model_type = get("model_type")
        if model_type == "llama":
            return cls._from_hf_llama(get, name)
        if model_type != "opt":
            raise ValueError(f"checkpoint has model_type {model_type!r}; supported: 'opt', 'llama'")
        hidden = get("hidden_size")
        wdim = get("word_embed_proj_dim", hidden)
        pre_norm = bool(get("do_layer_norm_before", True))
        if not get("enable_bias", True):
            raise ValueError("OPT checkpoints without biases (enable_bias=False) are not supported")
        if not get("layer_norm_elementwise_affine", True):
            raise ValueError("OPT checkpoints without affine layer norms are not supported")
        act = get("activation_function", "relu")
        return cls(
            family="opt", vocab=get("vocab_size"), hidden=hidden, ffn=get("ffn_dim"),
            n_layers=get("num_hidden_layers"), n_heads=get("num_attention_heads"),
            n_kv_heads=get("num_attention_heads"), max_positions=get("max_position_embeddings"),
            word_embed_dim=None if wdim == hidden else wdim, pre_norm=pre_norm,
            final_norm=pre_norm and not get("_remove_final_layer_norm", False),
            activation=act, tie_embeddings=bool(get("tie_word_embeddings", True)), name=name,
        )

    @classmethod
    def _from_hf_llama(cls, get, name):
        rope = get("rope_parameters") or {}
        scaling = get("rope_scaling")
        kind = rope.get("rope_type", (scaling or {}).get("rope_type", (scaling or {}).get("type", "default")))
        if kind not in (None, "default"):
            raise ValueError(f"Llama rope type {kind!r} is not supported; supported: 'default' (plain RoPE)")
        hidden, heads = get("hidden_size"), get("num_attention_heads")
        if get("head_dim") not in (None, hidden // heads):
            raise ValueError(f"head_dim {get('head_dim')} != hidden_size / num_attention_heads is not supported")
        if get("attention_bias", False) or get("mlp_bias", False):
            raise ValueError("Llama checkpoints with attention or MLP biases are not supported")
        act = get("hidden_act", "silu")
        return cls(
            family="llama", vocab=get("vocab_size"), hidden=hidden, ffn=get("intermediate_size"),
            n_layers=get("num_hidden_layers"), n_heads=heads, n_kv_heads=get("num_key_value_heads") or heads,
            max_positions=get("max_position_embeddings"), norm_eps=float(get("rms_norm_eps", 1e-6)),
            activation=act, tie_embeddings=bool(get("tie_word_embeddings", False)),
            rope_theta=float(rope.get("rope_theta", get("rope_theta", 10000.0))), name=name,
        )

    def hf_dict(self) -> dict:
        """The ``transformers`` config keyword arguments of this architecture (OPTConfig or LlamaConfig)."""
        if self.tp_size != 1:
            raise ValueError(f"a tensor-parallel shard (1 of {self.tp_size}) has no Hugging Face config; use full()")
        if self.family == "llama":
            return dict(
                vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.ffn,
                num_hidden_layers=self.n_layers, num_attention_heads=self.n_heads,
                num_key_value_heads=self.n_kv_heads, max_position_embeddings=self.max_positions,
                rms_norm_eps=self.norm_eps, hidden_act=self.activation, tie_word_embeddings=self.tie_embeddings,
                rope_theta=self.rope_theta, attention_bias=False, mlp_bias=False,
            )
        return dict(
            vocab_size=self.vocab, hidden_size=self.hidden, ffn_dim=self.ffn, num_hidden_layers=self.n_layers,
            num_attention_heads=self.n_heads, max_position_embeddings=self.max_positions,
            word_embed_proj_dim=self.embed_dim, do_layer_norm_before=self.pre_norm,
            _remove_final_layer_norm=self.pre_norm and not self.final_norm, activation_function=self.activation,
            tie_word_embeddings=self.tie_embeddings, enable_bias=True, dropout=0.0, attention_dropout=0.0,
            pad_token_id=1, bos_token_id=2, eos_token_id=2,
        )
