"""What every decoder shares: the KV cache, construction, byte counts and reading HF state dicts."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import DecoderConfig
from .plan import LayerPlan


@dataclass
class KVCache:
    k: torch.Tensor  # [L, B, KV heads, T, D]
    v: torch.Tensor
    valid: torch.Tensor  # uint8 [L, B, KV heads, T]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + self.valid.nbytes


class StateReader:
    """Takes tensors out of a Hugging Face state dict by name, with the shapes the config expects."""

    def __init__(self, sd: dict, prefixes: tuple[str, ...], what: str):
        self.sd = {}
        for key, value in sd.items():
            for prefix in prefixes:
                if key.startswith(prefix):
                    key = key[len(prefix):]
            self.sd[key] = value
        self.what = what

    def take(self, key: str, shape) -> torch.Tensor:
        if key not in self.sd:
            raise ValueError(f"checkpoint has no tensor {key!r} ({self.what} expected); keys start with "
                             f"{sorted(self.sd)[:3]}")
        t = self.sd[key]
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"checkpoint tensor {key!r} has shape {tuple(t.shape)}; this config expects "
                             f"{tuple(shape)}")
        return t

    @staticmethod
    def put(param: torch.Tensor, value: torch.Tensor) -> None:
        with torch.no_grad():
            param.copy_(value.to(device=param.device, dtype=param.dtype))


HOOK_SITES = ("input", "qkv_in", "kv_live", "heads", "attn_out", "ffn_in", "fc1_in", "ffn_pre", "neurons")


def check_hooks(hooks) -> dict:
    """Prefill hooks: a dict of callables by site (see ``DecoderBase.prefill``)."""
    hooks = hooks or {}
    bad = sorted(set(hooks) - set(HOOK_SITES))
    if bad:
        raise ValueError(f"unknown hook sites {bad}; known: {HOOK_SITES}")
    return hooks


def attend(q, k, v, kv_live, scale):
    """Causal attention over [B, H, P, D] queries and [B, KVH, P, D] keys/values (heads of a group share
    them). ``kv_live`` [B, KVH, P] bool, when given, hides positions where a group left no key/value."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    if kv_live is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    P = q.shape[2]
    causal = torch.ones(P, P, dtype=torch.bool, device=q.device).tril()
    live = kv_live.repeat_interleave(group, dim=1) if group > 1 else kv_live
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal & live[:, :, None, :], scale=scale)


def param_factory(dtype, device):
    """``p(*shape)``: an uninitialised frozen parameter (weights are loaded or randomised afterwards)."""
    return lambda *shape: nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


def token_nll(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """-log p(tokens[:, t + 1] | ..) for every position t, [B, P - 1], in fp32 (fp64 stays fp64)."""
    logp = torch.log_softmax(logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    return -logp.gather(2, tokens[:, 1:, None])[..., 0]


class DecoderBase(nn.Module):
    """Subclasses define the weights in ``__init__`` (calling ``_init_common``), ``load_hf_state_dict``,
    ``hf_state_dict``, ``prefill`` and ``decode_step``.

    ``prefill(tokens, cache, mode, all_logits=, hooks=)`` takes hooks by site, each called with the layer
    index and full activations of all positions (used by the criteria and by the per-position sparse
    forward of :mod:`models.sparse_forward`):

    - ``input(i, x)``: the layer's input [B, P, E] (observe only);
    - ``qkv_in(i, a)`` -> a: the Q/K/V projection's input after its norm [B, P, E];
    - ``kv_live(i)`` -> [B, KVH, P] bool or None: positions whose key/value each group keeps;
    - ``heads(i, heads)`` -> heads: the heads' outputs [B, H, P, D] before the output projection;
    - ``attn_out(i, o)``: the attention block's output [B, P, E] (observe only);
    - ``ffn_in(i, a)``: the MLP's input after its norm [B, P, E] (observe only);
    - ``fc1_in(i, a)`` -> a: what fc1 (Llama: gate and up) reads, by default ``ffn_in``'s value;
    - ``ffn_pre(i, pre)`` -> pre: the neurons' pre-activations, fc1's [B, P, F] (OPT) or the pair
      (gate, up) (Llama);
    - ``neurons(i, f)`` -> f: the neurons' activations [B, P, F] (after ReLU; silu(gate) * up).
    """

    NORM_WEIGHTS: tuple[str, ...] = ()  # parameter-name suffixes that random weights set to 1
    plan_kv_heads: int | None = None  # grouped-query plan layout (models.plan) when set
    FAMILY = ""
    # Tensor parallelism (models.tp.shard_decoder sets it): this rank's place in the group. The output projection
    # and fc2 (down) each produce a partial sum of the block's output on every rank; ``reduce`` all-reduces it.
    tp = None
    # models.tp: the dimension along which each parameter (by its last name) is split over the ranks, and the
    # parameters (the output projection's and fc2's biases) that only rank 0 adds; the others are replicated.
    TP_SPLIT: dict[str, int] = {}
    TP_ONCE: tuple[str, ...] = ()

    @property
    def full_cfg(self) -> DecoderConfig:
        """The whole model's config: what modes, predictors and importance files are shaped by."""
        return self.cfg.full()

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over the tensor-parallel group of a block output's partial sums (``t`` itself on one rank)."""
        return t if self.tp is None else self.tp.all_reduce(t)

    def _init_common(self, cfg: DecoderConfig, device) -> None:
        if cfg.family != self.FAMILY:
            raise ValueError(f"{type(self).__name__} builds {self.FAMILY} models, got family {cfg.family!r}")
        self.cfg = cfg
        self.register_buffer("_dense_slots", torch.arange(cfg.n_heads, dtype=torch.int32, device=device),
                             persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.device

    def dense_plan(self) -> LayerPlan:
        return LayerPlan(head_slot=self._dense_slots)

    @classmethod
    def random(cls, cfg: DecoderConfig, dtype=torch.float16, device="cpu", seed: int = 0, std: float = 0.02):
        """Random weights made directly on ``device`` (latency work; outputs are meaningless)."""
        model = cls(cfg, dtype, device)
        gen = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for name, t in model.named_parameters():
                if name.endswith(cls.NORM_WEIGHTS):
                    t.fill_(1.0)
                else:
                    t.normal_(0.0, std, generator=gen)
        return model

    @classmethod
    def from_hf_state_dict(cls, cfg: DecoderConfig, sd: dict, dtype=torch.float16, device="cpu"):
        """From a Hugging Face state dict of this family."""
        model = cls(cfg, dtype, device)
        model.load_hf_state_dict(sd)
        return model

    def _hf_model(self):
        """A ``transformers`` model class and config class for this family."""
        raise NotImplementedError

    def _after_hf_load(self, hf) -> None:
        """Fix up what ``load_state_dict`` does not carry (buffers built on the meta device)."""

    def to_hf(self):
        """A ``transformers`` model on the same weights (shared storage where the layouts agree)."""
        model_cls, config_cls = self._hf_model()
        with torch.device("meta"):
            hf = model_cls(config_cls(**self.cfg.hf_dict()))
        hf.load_state_dict(self.hf_state_dict(), assign=True, strict=True)
        self._after_hf_load(hf)
        hf.tie_weights()
        return hf.eval()

    def _check_prompt(self, tokens, cache: KVCache | None) -> tuple[int, int]:
        """Prompts [B, P] of int32/int64 tokens that fit the positions and the cache; returns (B, P)."""
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"tokens must be an int32/int64 tensor, got {getattr(tokens, 'dtype', type(tokens))}")
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be 2-D [B, P], got shape {tuple(tokens.shape)}")
        B, P = tokens.shape
        if cache is not None and (cache.batch != B or cache.max_len < P):
            raise ValueError(f"cache holds batch {cache.batch} x {cache.max_len} positions; prompts are {B} x {P}")
        if self.cfg.max_positions < P:
            raise ValueError(f"prompt length {P} exceeds the model's {self.cfg.max_positions} positions")
        return B, P

    def weight_bytes(self) -> int:
        seen, total = set(), 0
        for t in self.parameters():
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.nbytes
        return total

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        cfg = self.cfg
        if max_len > cfg.max_positions:
            raise ValueError(f"max_len {max_len} exceeds the model's {cfg.max_positions} positions")
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        return KVCache(torch.zeros(shape, dtype=self.dtype, device=self.device),
                       torch.zeros(shape, dtype=self.dtype, device=self.device),
                       torch.zeros(shape[:-1], dtype=torch.uint8, device=self.device))
