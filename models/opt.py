"""A compact OPT decoder of our own: static KV cache, one prefill function, one decode-step function.

Weights are stored the way the sparse kernels read them:

- ``qkv_w`` [3E, E] head-major: the rows of head h are ``q_h | k_h | v_h`` (3 * head_dim rows), so the
  Q/K/V rows of a set of heads are one gather and a dense projection yields the same slot layout;
- ``out_w`` = out_proj.weight as in the checkpoint [E_out, E_in]: a head's inputs are head_dim
  consecutive columns, so each output row holds a selected head's weights as one contiguous piece
  (:func:`shadow_kernels.gather_segments_gemv`; v8, until then out_proj was stored transposed);
- ``fc2_wt`` = fc2.weight transposed [F, E], so a selected neuron is one contiguous row;
- ``fc1_w`` [F, E] as in the checkpoint.

Prefill is dense (it is compute-bound; every head's keys and values enter the cache). The decode
step executes a :class:`~models.plan.LayerPlan` per layer from the mode it is given; the KV-cache
policy for skipped heads is in :mod:`shadow_kernels.decode_attention` (a skipped head has no entry for
that token; later tokens that compute the head attend only to positions where it was computed).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from shadow_kernels._common import is_capturing
from shadow_kernels.norm_gemv import fold_norm

from .config import DecoderConfig
from .decoder import DecoderBase, KVCache, StateReader, attend, check_hooks, param_factory
from .nvtx import nvtx_range
from .ops import TORCH, Ops, get_ops
from .plan import LayerPlan

POSITION_OFFSET = 2  # OPT's learned positions start at index 2 of the table


def _versions(*tensors) -> tuple:
    """Storage, in-place version and dtype of each tensor given (None skipped): a fold's cache key."""
    return tuple((t.data_ptr(), t._version, t.dtype) for t in tensors if t is not None)


class OPTLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig, dtype, device):
        super().__init__()
        E, Fd, A = cfg.hidden, cfg.ffn, cfg.attn_width
        p = param_factory(dtype, device)
        self.ln1_w, self.ln1_b = p(E), p(E)
        self.qkv_w, self.qkv_b = p(3 * A, E), p(3 * A)
        self.out_w, self.out_b = p(E, A), p(E)
        self.ln2_w, self.ln2_b = p(E), p(E)
        self.fc1_w, self.fc1_b = p(Fd, E), p(Fd)
        self.fc2_wt, self.fc2_b = p(Fd, E), p(E)
        self.fc2_w = None  # a natural-layout copy for OPTDecoder.set_dense_gemv("triton")

    def fold_key(self) -> tuple:
        """What the layer's norm folds depend on: every tensor's storage and in-place version."""
        return _versions(self.ln1_w, self.ln1_b, self.qkv_w, self.qkv_b, self.ln2_w, self.ln2_b, self.fc1_w,
                         self.fc1_b)


class OPTDecoder(DecoderBase):
    """OPT with our weight layout. Build with :meth:`random`, :func:`models.loading.load_model` or
    :meth:`from_hf_state_dict`."""

    FAMILY = "opt"

    def __init__(self, cfg: DecoderConfig, dtype=torch.float16, device="cpu"):
        super().__init__()
        self._init_common(cfg, device)
        p = param_factory(dtype, device)
        self.embed_tokens = p(cfg.vocab, cfg.embed_dim)
        self.embed_positions = p(cfg.max_positions + POSITION_OFFSET, cfg.hidden)
        self.project_in = p(cfg.hidden, cfg.embed_dim) if cfg.word_embed_dim else None
        self.project_out = p(cfg.embed_dim, cfg.hidden) if cfg.word_embed_dim else None
        self.final_ln_w = p(cfg.hidden) if cfg.final_norm else None
        self.final_ln_b = p(cfg.hidden) if cfg.final_norm else None
        self.lm_head = self.embed_tokens if cfg.tie_embeddings else p(cfg.vocab, cfg.embed_dim)
        self.layers = nn.ModuleList(OPTLayer(cfg, dtype, device) for _ in range(cfg.n_layers))
        self.scale = 1.0 / math.sqrt(cfg.head_dim)

    # ---------------------------------------------------------------- construction
    NORM_WEIGHTS = ("ln1_w", "ln2_w", "final_ln_w")
    # head-major Q/K/V rows and out_proj's columns by heads; fc1 rows and the transposed fc2's rows by neurons
    TP_SPLIT = {"qkv_w": 0, "qkv_b": 0, "out_w": 1, "fc1_w": 0, "fc1_b": 0, "fc2_wt": 0}
    TP_ONCE = ("out_b", "fc2_b")

    def load_hf_state_dict(self, sd: dict) -> None:
        cfg = self.cfg
        E, H, D = cfg.hidden, cfg.n_heads, cfg.head_dim
        reader = StateReader(sd, ("model.", "decoder."), f"OPT with {cfg.n_layers} layers")
        take, put = reader.take, reader.put

        put(self.embed_tokens, take("embed_tokens.weight", (cfg.vocab, cfg.embed_dim)))
        put(self.embed_positions, take("embed_positions.weight", (cfg.max_positions + POSITION_OFFSET, E)))
        if self.project_in is not None:
            put(self.project_in, take("project_in.weight", (E, cfg.embed_dim)))
            put(self.project_out, take("project_out.weight", (cfg.embed_dim, E)))
        if self.final_ln_w is not None:
            put(self.final_ln_w, take("final_layer_norm.weight", (E,)))
            put(self.final_ln_b, take("final_layer_norm.bias", (E,)))
        if not cfg.tie_embeddings:
            if "lm_head.weight" not in sd:
                raise ValueError("config says tie_word_embeddings=False but the checkpoint has no lm_head.weight")
            put(self.lm_head, sd["lm_head.weight"])
        for i, layer in enumerate(self.layers):
            a = f"layers.{i}."
            w = [take(f"{a}self_attn.{n}_proj.weight", (E, E)) for n in "qkv"]
            b = [take(f"{a}self_attn.{n}_proj.bias", (E,)) for n in "qkv"]
            put(layer.qkv_w, torch.stack([t.reshape(H, D, E) for t in w], dim=1).reshape(3 * E, E))
            put(layer.qkv_b, torch.stack([t.reshape(H, D) for t in b], dim=1).reshape(3 * E))
            put(layer.out_w, take(f"{a}self_attn.out_proj.weight", (E, E)))
            put(layer.out_b, take(f"{a}self_attn.out_proj.bias", (E,)))
            put(layer.ln1_w, take(f"{a}self_attn_layer_norm.weight", (E,)))
            put(layer.ln1_b, take(f"{a}self_attn_layer_norm.bias", (E,)))
            put(layer.ln2_w, take(f"{a}final_layer_norm.weight", (E,)))
            put(layer.ln2_b, take(f"{a}final_layer_norm.bias", (E,)))
            put(layer.fc1_w, take(f"{a}fc1.weight", (cfg.ffn, E)))
            put(layer.fc1_b, take(f"{a}fc1.bias", (cfg.ffn,)))
            put(layer.fc2_wt, take(f"{a}fc2.weight", (E, cfg.ffn)).T)
            put(layer.fc2_b, take(f"{a}fc2.bias", (E,)))

    def hf_state_dict(self) -> dict:
        """Our weights under Hugging Face names (views where the layouts agree, copies for q/k/v)."""
        cfg = self.cfg
        E, H, D = cfg.hidden, cfg.n_heads, cfg.head_dim
        sd = {"model.decoder.embed_tokens.weight": self.embed_tokens,
              "model.decoder.embed_positions.weight": self.embed_positions,
              "lm_head.weight": self.lm_head}
        if self.project_in is not None:
            sd["model.decoder.project_in.weight"] = self.project_in
            sd["model.decoder.project_out.weight"] = self.project_out
        if self.final_ln_w is not None:
            sd["model.decoder.final_layer_norm.weight"] = self.final_ln_w
            sd["model.decoder.final_layer_norm.bias"] = self.final_ln_b
        for i, layer in enumerate(self.layers):
            a = f"model.decoder.layers.{i}."
            w = layer.qkv_w.detach().view(H, 3, D, E)
            b = layer.qkv_b.detach().view(H, 3, D)
            for j, n in enumerate("qkv"):
                sd[f"{a}self_attn.{n}_proj.weight"] = w[:, j].reshape(E, E)
                sd[f"{a}self_attn.{n}_proj.bias"] = b[:, j].reshape(E)
            sd[f"{a}self_attn.out_proj.weight"] = layer.out_w
            sd[f"{a}self_attn.out_proj.bias"] = layer.out_b
            sd[f"{a}self_attn_layer_norm.weight"] = layer.ln1_w
            sd[f"{a}self_attn_layer_norm.bias"] = layer.ln1_b
            sd[f"{a}final_layer_norm.weight"] = layer.ln2_w
            sd[f"{a}final_layer_norm.bias"] = layer.ln2_b
            sd[f"{a}fc1.weight"] = layer.fc1_w
            sd[f"{a}fc1.bias"] = layer.fc1_b
            sd[f"{a}fc2.weight"] = layer.fc2_wt.detach().T
            sd[f"{a}fc2.bias"] = layer.fc2_b
        return {k: v.detach() for k, v in sd.items()}

    def _hf_model(self):
        from transformers import OPTConfig, OPTForCausalLM

        return OPTForCausalLM, OPTConfig  # to_hf shares all storage except q/k/v

    # ---------------------------------------------------------------- bytes
    def step_weight_bytes(self, heads: list[int] | None = None, neurons: list[int] | None = None,
                          first_sparse: int | None = None, kv_groups=None) -> int:
        """Bytes of weights one decode step reads: embeddings of one token, every layer at the given
        live heads / neurons per sparse layer (dense when None), the final norm and the LM head.
        (``kv_groups`` is for grouped-query models; in OPT every head is its own group.)"""
        cfg = self.cfg
        E, D = cfg.hidden, cfg.head_dim
        el = self.dtype.itemsize
        total = cfg.embed_dim + E + cfg.vocab * cfg.embed_dim  # token row, position row, lm_head
        if self.project_in is not None:
            total += 2 * E * cfg.embed_dim
        total += 2 * E if self.final_ln_w is not None else 0
        for i in range(cfg.n_layers):
            j = None if first_sparse is None or i < first_sparse else i - first_sparse
            h = cfg.n_heads if heads is None or j is None else heads[j]
            f = cfg.ffn if neurons is None or j is None else neurons[j]
            total += 4 * E  # layer norms
            total += h * 3 * D * (E + 1) + h * D * E + E  # qkv rows + bias, out_proj rows + bias
            total += f * (E + 1) + f * E + E  # fc1 rows + bias, fc2 rows + bias
        return total * el

    # ---------------------------------------------------------------- dense GEMVs
    DENSE_GEMVS = ("cublas", "triton")
    dense_gemv = "cublas"

    def set_dense_gemv(self, engine: str) -> None:
        """What a decode step runs a dense layer's four projections with: ``cublas`` (default; fc2 as
        ``h @ W.T`` on the transposed weight) or ``triton`` (the gather-rows kernel over every row, launched
        with programmatic dependent launch like the rest of the step; in a pre-norm model the LM head too, with
        the final norm folded in). ``triton`` keeps a copy of fc2 in its
        natural layout, so it is read as whole rows: E * F more weights per layer in memory (a dense step
        reads either layout, never both). The copy is taken when this is called: call it after loading
        weights."""
        if engine not in self.DENSE_GEMVS:
            raise ValueError(f"dense_gemv must be one of {self.DENSE_GEMVS}, got {engine!r}")
        for layer in self.layers:
            layer.fc2_w = layer.fc2_wt.detach().T.contiguous() if engine == "triton" else None
        self.dense_gemv = engine

    # ---------------------------------------------------------------- norm folds
    def norm_folds(self) -> list:
        """Per layer ``(ln1 into qkv, ln2 into fc1)`` :class:`~shadow_kernels.NormFold` s for the decode step's
        fused norm GEMVs (pre-LN models). Built on first use and rebuilt whenever a weight they depend on has
        been replaced or changed in place; a CUDA graph capture must find them current (the generation loop's
        eager warm-up steps build them)."""
        key = tuple(layer.fold_key() for layer in self.layers) + _versions(self.final_ln_w, self.final_ln_b,
                                                                           self.lm_head)
        if getattr(self, "_folds_key", None) != key:
            if is_capturing(self.device):
                raise RuntimeError("the norm folds are stale during a CUDA graph capture: run one eager decode step "
                                   "(or call norm_folds()) after changing the weights, before capturing")
            eps = self.cfg.norm_eps
            self._folds = [(fold_norm(layer.qkv_w, layer.ln1_w, layer.ln1_b, layer.qkv_b, eps=eps),
                            fold_norm(layer.fc1_w, layer.ln2_w, layer.ln2_b, layer.fc1_b, eps=eps))
                           for layer in self.layers]
            self._final_fold = (fold_norm(self.lm_head, self.final_ln_w, self.final_ln_b, eps=eps)
                                if self.final_ln_w is not None and self.project_out is None else None)
            self._folds_key = key
        return self._folds

    def transposed_weights(self, i: int) -> dict:
        """Layer ``i``'s projections with rows = inputs, by input site (``models.threshold.SITES``): what the
        threshold mode's input-sparse GEMVs read (copies, except fc2, stored that way)."""
        layer = self.layers[i]
        return {"qkv": layer.qkv_w.detach().T.contiguous(), "o": layer.out_w.detach().T.contiguous(),
                "fc1": layer.fc1_w.detach().T.contiguous(), "fc2": layer.fc2_wt.detach()}

    def _input_sparse_layer(self, i, layer, x, o, sparse, cache, pos, ops):
        """One layer of the threshold mode's decode step: each projection reads the weight rows of its input entries
        above the layer's threshold (models.threshold.InputSparseLayer); every head and neuron is computed. Returns
        ``(x, o)`` as the loop of :meth:`decode_step` carries them (pre-LN: ``o`` not yet added)."""
        eps = self.cfg.norm_eps
        if self.cfg.pre_norm:
            x, a = ops.add_norm(x, o, layer.ln1_w, layer.ln1_b, eps)
        else:
            a = x
        qkv = sparse.project(ops, "qkv", a, layer.qkv_b)
        heads = ops.attention(qkv, cache.k[i], cache.v[i], cache.valid[i], pos, self._dense_slots, self.scale)
        o = self.reduce(sparse.project(ops, "o", heads, layer.out_b))
        if self.cfg.pre_norm:
            x, a = ops.add_norm(x, o, layer.ln2_w, layer.ln2_b, eps)
        else:
            _, x = ops.add_norm(x, o, layer.ln1_w, layer.ln1_b, eps)
            a = x
        f = torch.relu_(sparse.project(ops, "fc1", a, layer.fc1_b))
        o = self.reduce(sparse.project(ops, "fc2", f, layer.fc2_b))
        if self.cfg.pre_norm:
            return x, o
        _, x = ops.add_norm(x, o, layer.ln2_w, layer.ln2_b, eps)
        return x, None

    # ---------------------------------------------------------------- running
    def _ln(self, x, w, b):
        return F.layer_norm(x, (x.shape[-1],), w, b, self.cfg.norm_eps)

    def _embed(self, tokens, positions):
        x = F.embedding(tokens, self.embed_tokens)
        if self.project_in is not None:
            x = F.linear(x, self.project_in)
        return x + F.embedding(positions + POSITION_OFFSET, self.embed_positions)

    def _logits(self, x):
        if self.final_ln_w is not None:
            x = self._ln(x, self.final_ln_w, self.final_ln_b)
        if self.project_out is not None:
            x = F.linear(x, self.project_out)
        return F.linear(x, self.lm_head)

    def prefill(self, tokens, cache: KVCache | None = None, mode=None, *, all_logits=False, hooks=None):
        """Dense forward of whole prompts ``tokens`` [B, P] from position 0.

        Fills ``cache`` (every head valid), lets ``mode`` observe the last position of each layer's
        input and attention output (``mode.observe(layer, site, x)``) when given, and returns the
        logits of the last position [B, V] or of every position [B, P, V]. ``hooks``: see
        :class:`~models.decoder.DecoderBase`.
        """
        B, P = self._check_prompt(tokens, cache)
        cfg = self.cfg
        H, D = cfg.n_heads, cfg.head_dim
        hooks = check_hooks(hooks)
        hook = lambda site, i, t: hooks[site](i, t) if site in hooks else t
        with nvtx_range("prefill"):
            x = self._embed(tokens, torch.arange(P, device=tokens.device)[None, :])
            for i, layer in enumerate(self.layers):
                if mode is not None:
                    mode.observe(i, "input", x[:, -1])
                hook("input", i, x)
                res = x
                a = hook("qkv_in", i, self._ln(x, layer.ln1_w, layer.ln1_b) if cfg.pre_norm else x)
                qkv = F.linear(a, layer.qkv_w, layer.qkv_b).view(B, P, H, 3, D).permute(3, 0, 2, 1, 4)
                q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
                if cache is not None:
                    cache.k[i, :, :, :P].copy_(k)
                    cache.v[i, :, :, :P].copy_(v)
                    cache.valid[i, :, :, :P] = 1
                kv_live = hooks["kv_live"](i) if "kv_live" in hooks else None
                heads = hook("heads", i, attend(q, k, v, kv_live, 1.0))  # [B, H, P, D]
                o = self.reduce(F.linear(heads.transpose(1, 2).reshape(B, P, H * D), layer.out_w, layer.out_b))
                if mode is not None:
                    mode.observe(i, "attn_out", o[:, -1])
                hook("attn_out", i, o)
                x = res + o
                if not cfg.pre_norm:
                    x = self._ln(x, layer.ln1_w, layer.ln1_b)
                res = x
                a = self._ln(x, layer.ln2_w, layer.ln2_b) if cfg.pre_norm else x
                if mode is not None:
                    mode.observe(i, "ffn_in", a[:, -1])
                hook("ffn_in", i, a)
                a = hook("fc1_in", i, a)
                f = hook("neurons", i, torch.relu(hook("ffn_pre", i, F.linear(a, layer.fc1_w, layer.fc1_b))))
                x = res + self.reduce(torch.matmul(f, layer.fc2_wt) + layer.fc2_b)
                if not cfg.pre_norm:
                    x = self._ln(x, layer.ln2_w, layer.ln2_b)
            return self._logits(x if all_logits else x[:, -1])

    def decode_step(self, tokens, pos, cache: KVCache, mode, *, predict: bool, ops: Ops | None = None):
        """One token per sequence: ``tokens`` [B] at position ``pos`` (one-element device tensor).

        Every layer runs ``mode.plan(layer)``; when ``predict`` is set the mode first observes the
        layer's input and attention output, so a predictor can refill the plans inside this step.
        Shapes do not depend on data: the step can be captured in a CUDA graph. Returns logits [B, V].

        Pre-LN (every OPT but 350m): each residual add and the layer norm after it are folded into the GEMV
        that reads them (``ops.norm_gemv``, :mod:`shadow_kernels.norm_gemv`): qkv takes ``x + o`` of the block
        before and normalises it in its loop, and writes ``x + o`` back as the residual stream; so does fc1. A
        dense projection on cuBLAS (``dense_gemv="cublas"``) keeps the norm as its own kernel (``ops.add_norm``).
        The residual add is materialised before a layer whose input the mode observes (DejaVu), and the add and
        norm before an MLP whose input it observes (DejaVu's MLP-input neuron predictor; fc1's GEMV then reads that
        normalised input, without folding the norm in again). Post-LN: each residual add is fused with the norm after
        it (``ops.add_norm``).
        """
        cfg = self.cfg
        ops = ops or get_ops(None, self.device)
        eps = cfg.norm_eps
        layers = self.layers
        own = self.dense_gemv == "triton"
        dense = ops.gemv if own else TORCH.gemv  # a dense layer's qkv and out_proj: ours, or F.linear (cuBLAS)
        pre = cfg.pre_norm
        folds = self.norm_folds() if pre else None
        watch_input = predict and "input" in mode.observed_sites
        watch_ffn = predict and "ffn_in" in mode.observed_sites

        def norm_gemv(w, x, r, fold, rows, count, relu):
            """``(act(norm(x + r) @ w[rows].T + b), x + r)``: the fused kernel, or on cuBLAS the norm first."""
            if rows is None and not own:
                z, a = ops.add_norm(x, r, fold.weight, fold.bias, eps)
                y = F.linear(a, w, fold.lin_bias)
                return (torch.relu_(y) if relu else y), z
            return ops.norm_gemv(w, x, rows, fold, r, "relu" if relu else None, count, validate=False)

        def fc1_relu(layer, a, plan):
            """relu(fc1) of the normalised MLP input ``a``: the plan's neurons, or all of them."""
            if plan.neurons is not None:
                return ops.gather_rows(layer.fc1_w, a, plan.neurons, layer.fc1_b, "relu", count=plan.neuron_count,
                                       validate=False)
            if own:
                return ops.gemv(layer.fc1_w, a, layer.fc1_b, relu=True)
            return torch.relu_(F.linear(a, layer.fc1_w, layer.fc1_b))

        if ops.embed is not None and self.project_in is None:  # one launch
            x = ops.embed(tokens, self.embed_tokens, pos, self.embed_positions, POSITION_OFFSET)
        else:
            x = self._embed(tokens, pos.reshape(1).expand(tokens.shape[0]))
        o = None  # pre-LN: the block output not yet added to x (the next norm GEMV adds it)
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
                if pre:
                    qkv, x = norm_gemv(layer.qkv_w, x, o, folds[i][0], plan.qkv_rows, plan.qkv_count, False)
                elif plan.qkv_rows is None:
                    qkv = dense(layer.qkv_w, x, layer.qkv_b)
                else:
                    qkv = ops.gather_rows(layer.qkv_w, x, plan.qkv_rows, layer.qkv_b, count=plan.qkv_count,
                                          validate=False)
                heads = ops.attention(qkv, cache.k[i], cache.v[i], cache.valid[i], pos, plan.head_slot, self.scale)
                if plan.out_rows is None:
                    o = dense(layer.out_w, heads, layer.out_b)
                else:
                    o = ops.gather_segments(layer.out_w, heads, plan.out_rows, layer.out_b, count=plan.out_count,
                                            segment=cfg.head_dim, validate=False)
                o = self.reduce(o)
            if predict:
                mode.observe(i, "attn_out", o)
            a = None
            if watch_ffn and pre:
                x, a = ops.add_norm(x, o, layer.ln2_w, layer.ln2_b, eps)
                o = None
                mode.observe(i, "ffn_in", a)
            with nvtx_range(f"layer{i}.mlp"):
                if a is not None:  # normalised already (observed): fc1 reads it without folding the norm in again
                    f = fc1_relu(layer, a, plan)
                elif pre:
                    f, x = norm_gemv(layer.fc1_w, x, o, folds[i][1], plan.neurons, plan.neuron_count, True)
                else:
                    _, x = ops.add_norm(x, o, layer.ln1_w, layer.ln1_b, eps)
                    if watch_ffn:  # post-LN: the MLP's input is the normalised sum itself
                        mode.observe(i, "ffn_in", x)
                    f = fc1_relu(layer, x, plan)
                if plan.neurons is None and own:
                    o = ops.gemv(layer.fc2_w, f, layer.fc2_b)
                elif plan.neurons is None:
                    o = torch.addmm(layer.fc2_b, f, layer.fc2_wt)
                else:
                    o = ops.gather_cols(layer.fc2_wt, f, plan.neurons, layer.fc2_b, count=plan.neuron_count,
                                        validate=False)
                o = self.reduce(o)
            if not pre:
                _, x = ops.add_norm(x, o, layer.ln2_w, layer.ln2_b, eps)
                o = None
        if pre and own and self._final_fold is not None:
            # the final norm folded into the LM head's GEMV (our kernel, like the dense layers' GEMVs)
            return ops.norm_gemv(self.lm_head, x, None, self._final_fold, o, validate=False)[0]
        if pre and self.final_ln_w is not None:
            _, a = ops.add_norm(x, o, self.final_ln_w, self.final_ln_b, eps)
        else:
            a = x if o is None else x + o
        if self.project_out is not None:
            a = F.linear(a, self.project_out)
        return F.linear(a, self.lm_head)
