"""A compact Llama decoder (RMSNorm, rotary embeddings, SwiGLU, grouped-query attention) beside the OPT one.

Same interface as :class:`models.opt.OPTDecoder`: static KV cache, dense prefill, one decode-step function
that a CUDA graph can capture, HF checkpoints in and out, and every mode.

Sparsity: a neuron is one intermediate channel (a row of ``gate_proj`` and ``up_proj``, a column of
``down_proj``): the step computes ``silu(gate) * up`` for the selected rows only (one fused gather GEMV)
and reads the matching rows of ``down_wt``. A head is a query head; under grouped-query attention a
group's key and value are computed and cached when one of its query heads is kept, and a group whose
heads are all skipped leaves no key/value for the token (the token is invisible to that group's heads
later), see :mod:`shadow_kernels.gqa_attention`.

Weight layout, chosen for the sparse kernels to come:

- ``qkv_w`` [KVH * (G + 2) * D, E], group-major: for key-value group g, the query rows of its G heads,
  then its key rows, then its value rows; a dense projection yields [B, KVH, G + 2, D].
- ``o_w`` = o_proj.weight as in the checkpoint [E, H * D] (a head's weights are one contiguous piece of each
  row, read by :func:`shadow_kernels.gather_segments_gemv`), ``down_wt`` = down_proj.weight transposed (rows =
  inputs); ``gate_w`` and ``up_w`` [F, E] as in the checkpoint.
Keys are cached after the rotary embedding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from shadow_kernels.add_norm import rms_norm
from shadow_kernels.gqa_attention import apply_rope, dense_units
from shadow_kernels.norm_gemv import fold_norm

from .config import DecoderConfig
from .decoder import DecoderBase, KVCache, StateReader, attend, check_hooks, param_factory
from .nvtx import nvtx_range
from .ops import Ops, get_ops
from .plan import LayerPlan


class LlamaLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig, dtype, device):
        super().__init__()
        E, Fd, D = cfg.hidden, cfg.ffn, cfg.head_dim
        G = cfg.n_heads // cfg.n_kv_heads
        p = param_factory(dtype, device)
        self.ln1_w = p(E)
        self.qkv_w = p(cfg.n_kv_heads * (G + 2) * D, E)
        self.o_w = p(E, cfg.n_heads * D)
        self.ln2_w = p(E)
        self.gate_w, self.up_w = p(Fd, E), p(Fd, E)
        self.down_wt = p(Fd, E)


class LlamaDecoder(DecoderBase):
    FAMILY = "llama"
    NORM_WEIGHTS = ("ln1_w", "ln2_w", "norm_w")
    # group-major Q/K/V rows by key-value groups (each with its query heads), o_proj's columns by heads; gate, up
    # and the transposed down by neurons
    TP_SPLIT = {"qkv_w": 0, "o_w": 1, "gate_w": 0, "up_w": 0, "down_wt": 0}

    def __init__(self, cfg: DecoderConfig, dtype=torch.float16, device="cpu"):
        super().__init__()
        self._init_common(cfg, device)
        p = param_factory(dtype, device)
        self.embed_tokens = p(cfg.vocab, cfg.hidden)
        self.norm_w = p(cfg.hidden)
        self.lm_head = self.embed_tokens if cfg.tie_embeddings else p(cfg.vocab, cfg.hidden)
        self.layers = nn.ModuleList(LlamaLayer(cfg, dtype, device) for _ in range(cfg.n_layers))
        self.group = cfg.n_heads // cfg.n_kv_heads
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        D = cfg.head_dim
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float32, device=device) / D))
        self.register_buffer("rope_inv_freq", inv, persistent=False)
        freqs = torch.outer(torch.arange(cfg.max_positions, dtype=torch.float32, device=device), inv)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("rope_cos", emb.cos(), persistent=False)
        self.register_buffer("rope_sin", emb.sin(), persistent=False)
        q_unit, kv_unit, _ = dense_units(cfg.n_heads, cfg.n_kv_heads, device)
        self.register_buffer("_dense_q_unit", q_unit, persistent=False)
        self.register_buffer("_dense_kv_unit", kv_unit, persistent=False)

    @property
    def plan_kv_heads(self) -> int:
        """Plans use the grouped-query layout (see models.plan)."""
        return self.cfg.n_kv_heads

    DENSE_GEMVS = ("cublas", "triton")
    dense_gemv = "cublas"

    def set_dense_gemv(self, engine: str) -> None:
        """What a decode step runs a dense layer with: ``cublas`` (default: the add-and-norm kernel, then cuBLAS for
        qkv, o, gate, up and down, and PyTorch's silu and product) or ``triton``, the sparse path's own kernels over
        every row: the add and norm folded into the qkv GEMV and into the SwiGLU GEMV, o through the row GEMV, down
        through the gather-columns GEMV over every row of its transposed weight. No weight is copied."""
        if engine not in self.DENSE_GEMVS:
            raise ValueError(f"dense_gemv must be one of {self.DENSE_GEMVS}, got {engine!r}")
        self.dense_gemv = engine
        F_rank = self.layers[0].down_wt.shape[0]  # this rank's neurons
        self._all_neurons = torch.arange(F_rank, dtype=torch.int32, device=self.device)

    def load_hf_state_dict(self, sd: dict) -> None:
        cfg = self.cfg
        E, H, KVH, D, G = cfg.hidden, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, self.group
        reader = StateReader(sd, ("model.",), f"Llama with {cfg.n_layers} layers")
        take, put = reader.take, reader.put

        put(self.embed_tokens, take("embed_tokens.weight", (cfg.vocab, E)))
        put(self.norm_w, take("norm.weight", (E,)))
        if not cfg.tie_embeddings:
            put(self.lm_head, take("lm_head.weight", (cfg.vocab, E)))
        for i, layer in enumerate(self.layers):
            a = f"layers.{i}."
            q = take(f"{a}self_attn.q_proj.weight", (H * D, E)).reshape(KVH, G * D, E)
            k = take(f"{a}self_attn.k_proj.weight", (KVH * D, E)).reshape(KVH, D, E)
            v = take(f"{a}self_attn.v_proj.weight", (KVH * D, E)).reshape(KVH, D, E)
            put(layer.qkv_w, torch.cat([q, k, v], dim=1).reshape(-1, E))
            put(layer.o_w, take(f"{a}self_attn.o_proj.weight", (E, H * D)))
            put(layer.ln1_w, take(f"{a}input_layernorm.weight", (E,)))
            put(layer.ln2_w, take(f"{a}post_attention_layernorm.weight", (E,)))
            put(layer.gate_w, take(f"{a}mlp.gate_proj.weight", (cfg.ffn, E)))
            put(layer.up_w, take(f"{a}mlp.up_proj.weight", (cfg.ffn, E)))
            put(layer.down_wt, take(f"{a}mlp.down_proj.weight", (E, cfg.ffn)).T)

    def hf_state_dict(self) -> dict:
        cfg = self.cfg
        E, KVH, D, G = cfg.hidden, cfg.n_kv_heads, cfg.head_dim, self.group
        sd = {"model.embed_tokens.weight": self.embed_tokens, "model.norm.weight": self.norm_w,
              "lm_head.weight": self.lm_head}
        for i, layer in enumerate(self.layers):
            a = f"model.layers.{i}."
            w = layer.qkv_w.detach().view(KVH, G + 2, D, E)
            sd[f"{a}self_attn.q_proj.weight"] = w[:, :G].reshape(-1, E)
            sd[f"{a}self_attn.k_proj.weight"] = w[:, G].reshape(-1, E)
            sd[f"{a}self_attn.v_proj.weight"] = w[:, G + 1].reshape(-1, E)
            sd[f"{a}self_attn.o_proj.weight"] = layer.o_w
            sd[f"{a}input_layernorm.weight"] = layer.ln1_w
            sd[f"{a}post_attention_layernorm.weight"] = layer.ln2_w
            sd[f"{a}mlp.gate_proj.weight"] = layer.gate_w
            sd[f"{a}mlp.up_proj.weight"] = layer.up_w
            sd[f"{a}mlp.down_proj.weight"] = layer.down_wt.detach().T
        return {k: v.detach() for k, v in sd.items()}

    def _hf_model(self):
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM, LlamaConfig

    def _after_hf_load(self, hf) -> None:
        for name in ("inv_freq", "original_inv_freq"):  # built on the meta device with the model
            if hasattr(hf.model.rotary_emb, name):
                setattr(hf.model.rotary_emb, name, self.rope_inv_freq.clone())

    # ---------------------------------------------------------------- bytes
    def step_weight_bytes(self, heads=None, neurons=None, first_sparse=None, kv_groups=None) -> int:
        """Bytes of weights one decode step reads, with the live heads, key-value groups and neurons of
        each sparse layer (dense when None; a group's key and value rows count when it is live)."""
        cfg = self.cfg
        E, D = cfg.hidden, cfg.head_dim
        total = E + cfg.vocab * E + E  # token row, lm_head, final norm
        for i in range(cfg.n_layers):
            j = None if first_sparse is None or i < first_sparse else i - first_sparse
            h = cfg.n_heads if heads is None or j is None else heads[j]
            g = cfg.n_kv_heads if j is None else (kv_groups[j] if kv_groups is not None else
                                                  min(cfg.n_kv_heads, h) if heads is not None else cfg.n_kv_heads)
            f = cfg.ffn if neurons is None or j is None else neurons[j]
            total += 2 * E + (h + 2 * g) * D * E + h * D * E + 3 * f * E
        return total * self.dtype.itemsize

    def transposed_weights(self, i: int) -> dict:
        """Layer ``i``'s projections with rows = inputs, by input site (``models.threshold.SITES``); gate and up
        share their input, so ``fc1`` is the two side by side [E, 2F] (one input-sparse GEMV)."""
        layer = self.layers[i]
        return {"qkv": layer.qkv_w.detach().T.contiguous(), "o": layer.o_w.detach().T.contiguous(),
                "fc1": torch.cat([layer.gate_w.detach(), layer.up_w.detach()]).T.contiguous(),
                "fc2": layer.down_wt.detach()}

    def _input_sparse_layer(self, i, layer, x, o, sparse, cache, pos, ops):
        """One layer of the threshold mode's decode step (see OPTDecoder._input_sparse_layer); returns ``(x, o)``."""
        eps = self.cfg.norm_eps
        if o is None:  # nothing to add yet (a threshold layer 0)
            o = torch.zeros_like(x)
        qkv, x = sparse.project_rms(ops, "qkv", x, o, layer.ln1_w, eps)
        heads = ops.gqa_attention(qkv, cache.k[i], cache.v[i], cache.valid[i], pos, self.rope_cos, self.rope_sin,
                                  self.scale, self._dense_q_unit, self._dense_kv_unit, self._dense_slots)
        o = self.reduce(sparse.project(ops, "o", heads))
        gate_up, x = sparse.project_rms(ops, "fc1", x, o, layer.ln2_w, eps)
        o = self.reduce(sparse.project(ops, "fc2", gate_up, swiglu=True))
        return x, o

    # ---------------------------------------------------------------- running
    def _rms(self, x, w):
        return rms_norm(x, w, self.cfg.norm_eps)

    def _rope(self, x, positions):
        """x [..., P, D] with positions [P]."""
        cos = self.rope_cos.index_select(0, positions).to(x.dtype)
        sin = self.rope_sin.index_select(0, positions).to(x.dtype)
        return apply_rope(x, cos, sin)

    def _mlp(self, layer, a):
        return torch.matmul(F.silu(F.linear(a, layer.gate_w)) * F.linear(a, layer.up_w), layer.down_wt)

    def _split_qkv(self, layer, a):
        cfg = self.cfg
        qkv = F.linear(a, layer.qkv_w).unflatten(-1, (cfg.n_kv_heads, self.group + 2, cfg.head_dim))
        q = qkv[..., : self.group, :].flatten(-3, -2)  # [..., H, D], heads in order
        return q, qkv[..., self.group, :], qkv[..., self.group + 1, :]

    def prefill(self, tokens, cache: KVCache | None = None, mode=None, *, all_logits=False, hooks=None):
        """Dense forward of prompts ``tokens`` [B, P] from position 0 (see OPTDecoder.prefill)."""
        B, P = self._check_prompt(tokens, cache)
        hooks = check_hooks(hooks)
        hook = lambda site, i, t: hooks[site](i, t) if site in hooks else t
        positions = torch.arange(P, device=tokens.device)
        with nvtx_range("prefill"):
            x = F.embedding(tokens, self.embed_tokens)
            for i, layer in enumerate(self.layers):
                if mode is not None:
                    mode.observe(i, "input", x[:, -1])
                hook("input", i, x)
                q, k, v = self._split_qkv(layer, hook("qkv_in", i, self._rms(x, layer.ln1_w)))  # [B, P, H|KVH, D]
                q = self._rope(q.transpose(1, 2), positions)
                k = self._rope(k.transpose(1, 2), positions)
                v = v.transpose(1, 2)
                if cache is not None:
                    cache.k[i, :, :, :P].copy_(k)
                    cache.v[i, :, :, :P].copy_(v)
                    cache.valid[i, :, :, :P] = 1
                kv_live = hooks["kv_live"](i) if "kv_live" in hooks else None
                heads = hook("heads", i, attend(q, k, v, kv_live, self.scale))
                o = self.reduce(F.linear(heads.transpose(1, 2).reshape(B, P, -1), layer.o_w))
                if mode is not None:
                    mode.observe(i, "attn_out", o[:, -1])
                hook("attn_out", i, o)
                x = x + o
                a = self._rms(x, layer.ln2_w)
                if mode is not None:
                    mode.observe(i, "ffn_in", a[:, -1])
                hook("ffn_in", i, a)
                a = hook("fc1_in", i, a)
                gate, up = hook("ffn_pre", i, (F.linear(a, layer.gate_w), F.linear(a, layer.up_w)))
                f = hook("neurons", i, F.silu(gate) * up)
                x = x + self.reduce(torch.matmul(f, layer.down_wt))
            x = self._rms(x if all_logits else x[:, -1], self.norm_w)
            return F.linear(x, self.lm_head)

    def decode_step(self, tokens, pos, cache: KVCache, mode, *, predict: bool, ops: Ops | None = None):
        """One token per sequence at position ``pos`` (one-element device tensor), running ``mode``'s plans.

        Attention is one fused GQA + RoPE kernel pair per layer. In a sparse layer each residual add and the
        RMSNorm after it are folded into the GEMV that reads them (``ops.norm_gemv`` for qkv,
        ``ops.norm_swiglu`` for gate/up; :mod:`shadow_kernels.norm_gemv`), which also writes ``x + o`` back as
        the residual stream. A dense layer (cuBLAS) runs the add + norm as one kernel first (``ops.add_rms``).
        The residual add is materialised before a layer whose input the mode observes (DejaVu), and the add and
        norm before an MLP whose input it observes (DejaVu's MLP-input neuron predictor); the gate/up GEMV then
        reads that normalised input (``ops.swiglu``) instead of folding the norm in again.
        """
        ops = ops or get_ops(None, self.device)
        eps = self.cfg.norm_eps
        layers = self.layers
        watch_input = predict and "input" in mode.observed_sites
        watch_ffn = predict and "ffn_in" in mode.observed_sites
        x = F.embedding(tokens, self.embed_tokens)
        o = None  # the block output not yet added to x
        own = self.dense_gemv == "triton"  # dense layers on our kernels
        for i, layer in enumerate(layers):
            if watch_input and mode.observes("input", i):
                if o is not None:
                    x, o = x + o, None
                mode.observe(i, "input", x)
            plan: LayerPlan = mode.plan(i)
            if plan.input_sparse is not None:
                with nvtx_range(f"layer{i}.input_sparse"):
                    x, o = self._input_sparse_layer(i, layer, x, o, plan.input_sparse, cache, pos, ops)
                continue
            with nvtx_range(f"layer{i}.attn"):
                if plan.qkv_rows is None and own:
                    qkv, x = ops.norm_gemv(layer.qkv_w, x, None, fold_norm(layer.qkv_w, layer.ln1_w, kind="rms",
                                                                          eps=eps), o, None, None, validate=False)
                    heads = ops.gqa_attention(qkv, cache.k[i], cache.v[i], cache.valid[i], pos, self.rope_cos,
                                              self.rope_sin, self.scale, self._dense_q_unit, self._dense_kv_unit,
                                              plan.head_slot)
                    o = ops.gemv(layer.o_w, heads)
                elif plan.qkv_rows is None:
                    x, a = ops.add_rms(x, o, layer.ln1_w, eps)
                    qkv = F.linear(a, layer.qkv_w)
                    heads = ops.gqa_attention(qkv, cache.k[i], cache.v[i], cache.valid[i], pos, self.rope_cos,
                                              self.rope_sin, self.scale, self._dense_q_unit, self._dense_kv_unit,
                                              plan.head_slot)
                    o = F.linear(heads, layer.o_w)
                else:
                    qkv, x = ops.norm_gemv(layer.qkv_w, x, plan.qkv_rows, fold_norm(layer.qkv_w, layer.ln1_w,
                                                                                    kind="rms", eps=eps),
                                           o, None, plan.qkv_count, validate=False)
                    heads = ops.gqa_attention(qkv, cache.k[i], cache.v[i], cache.valid[i], pos, self.rope_cos,
                                              self.rope_sin, self.scale, plan.q_unit, plan.kv_unit, plan.head_slot)
                    o = ops.gather_segments(layer.o_w, heads[:, : plan.out_rows.shape[0]], plan.out_rows,
                                            count=plan.out_count, segment=self.cfg.head_dim, validate=False)
                o = self.reduce(o)
            if predict:
                mode.observe(i, "attn_out", o)
            a = None
            if watch_ffn:
                x, a = ops.add_rms(x, o, layer.ln2_w, eps)
                o = None
                mode.observe(i, "ffn_in", a)
            with nvtx_range(f"layer{i}.mlp"):
                if plan.neurons is None and own:
                    if a is None:
                        f, x = ops.norm_swiglu(layer.gate_w, layer.up_w, x, None,
                                               fold_norm(layer.gate_w, layer.ln2_w, kind="rms", eps=eps), o, None,
                                               validate=False)
                    else:  # normalised already (an observed MLP input)
                        f = ops.swiglu(layer.gate_w, layer.up_w, a, self._all_neurons, validate=False)
                    o = ops.gather_cols(layer.down_wt, f, self._all_neurons, validate=False)
                elif plan.neurons is None:
                    if a is None:
                        x, a = ops.add_rms(x, o, layer.ln2_w, eps)
                    o = self._mlp(layer, a)
                elif a is not None:  # normalised already: the gather GEMV reads it as it is
                    f = ops.swiglu(layer.gate_w, layer.up_w, a, plan.neurons, count=plan.neuron_count,
                                   validate=False)
                    o = ops.gather_cols(layer.down_wt, f, plan.neurons, count=plan.neuron_count, validate=False)
                else:
                    f, x = ops.norm_swiglu(layer.gate_w, layer.up_w, x, plan.neurons,
                                           fold_norm(layer.gate_w, layer.ln2_w, kind="rms", eps=eps), o,
                                           plan.neuron_count, validate=False)
                    o = ops.gather_cols(layer.down_wt, f, plan.neurons, count=plan.neuron_count, validate=False)
                o = self.reduce(o)
        _, a = ops.add_rms(x, o, self.norm_w, eps)
        return F.linear(a, self.lm_head)
