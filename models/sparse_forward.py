"""The decode semantics of a mode, for all positions of a sequence at once (quality evaluation).

:func:`sparse_logits` returns the logits that the :class:`~models.generate.Generator` would produce if
it prefilled ``tokens[:, :sparse_from]`` densely and then decoded the remaining tokens one by one with
teacher forcing, at batch 1 (every sequence gets its own plans; the decode step averages a batch's
scores into one plan instead). It runs as one dense forward of the whole sequence with masks, so a
perplexity or accuracy run costs a prefill per sequence rather than a decode step per token:

- position t >= ``sparse_from`` of a sparse layer computes only the heads and neurons its plan keeps;
- a key-value group whose heads are all skipped at t leaves no key/value at t (later positions do not
  see t in that group), as the decode kernels do; with the mode's ``kv_rule`` ``always``, every group's key and
  value are computed and cached at every position and only the skipped heads' queries and outputs are dropped;
- the plan of position t comes from t's own predictor input (granularity ``token``: layer 0's attention
  output for ShadowLLM, the layer's input for DejaVu's heads, and its MLP input, or layer input, for its
  neurons) or, for granularity ``prompt``, from position
  ``sparse_from - 1``, the last prefilled one; ``static`` has one plan for all; ``oracle`` takes each
  position's plan from a dense pass over the same tokens first (head output L2 norms, |activations|).

Selection is the one of :class:`~models.plan.PlanBuffers` (top-k per layer, or over all sparse layers
for the global policy). The test suite checks that these logits equal those of the decode path.
"""

from __future__ import annotations

import torch

from shadow_kernels import fused_predictor_ref

from .modes import DejaVu, Dense, Mode, Oracle, ShadowLLM, Static, Threshold


class PositionPlans:
    """Prefill hooks that make a dense prefill run ``mode`` from position ``sparse_from`` on."""

    def __init__(self, model, mode: Mode, sparse_from, positions: int, batch: int):
        """``sparse_from``: one int for all sequences, or an int tensor [batch], each in [1, positions]."""
        if isinstance(sparse_from, torch.Tensor):
            start = sparse_from.to(device=model.device, dtype=torch.long).reshape(-1)
            if start.numel() != batch:
                raise ValueError(f"sparse_from has {start.numel()} entries for {batch} sequences")
        elif isinstance(sparse_from, int) and not isinstance(sparse_from, bool):
            start = torch.full((batch,), sparse_from, dtype=torch.long, device=model.device)
        else:
            raise TypeError(f"sparse_from must be an int or an int tensor, got {type(sparse_from).__name__}")
        if start.numel() and (int(start.min()) < 1 or int(start.max()) > positions):
            raise ValueError(f"sparse_from must be an int in [1, {positions}] (position 0 is always prefilled), "
                             f"got {sparse_from!r}")
        if not hasattr(mode, "model") or mode.model is not model:
            raise ValueError("bind the mode to this model first (mode.bind(model))")
        self.model, self.mode, self.start, self.P = model, mode, start, positions
        cfg = model.cfg
        self.kvh = model.plan_kv_heads or cfg.n_heads
        self.head_masks: dict[int, torch.Tensor] = {}  # layer -> [B, P, H] bool
        self.neuron_masks: dict[int, torch.Tensor] = {}
        if isinstance(mode, Static):
            for i in range(cfg.n_layers):
                if mode.buffers.is_sparse(i):
                    plan = mode.plan(i)
                    hm = plan.head_slot >= 0
                    nm = torch.zeros(cfg.ffn, dtype=torch.bool, device=hm.device)  # this rank's neurons
                    if plan.neurons is None:  # a neuron budget of 0: every neuron (the dense path)
                        nm[:] = True
                    else:
                        nm[plan.neurons[: int(plan.neuron_count)].long()] = True
                    self._store(i, hm[None, None], nm[None, None])
        elif not isinstance(mode, (Dense, DejaVu, ShadowLLM, Oracle, Threshold)):
            raise TypeError(f"no per-position semantics for mode {type(mode).__name__}")

    # ---------------------------------------------------------------- masks
    def _store_selected(self, layer, hm, nm):
        """:meth:`_store` from masks over the whole model's units (this rank's shard kept)."""
        b = self.mode.buffers
        self._store(layer, None if hm is None else b.local(hm, "heads"), None if nm is None else b.local(nm, "neurons"))

    def _store(self, layer, hm, nm):
        """Masks of the sparse positions, [B or 1, P or 1, units of this rank]; dense positions are added here.
        A None mask leaves that kind's masks of ``layer`` as they are."""
        B = self.start.shape[0]
        for m, masks in ((hm, self.head_masks), (nm, self.neuron_masks)):
            if m is not None:
                dense_rows = (torch.arange(self.P, device=m.device)[None, :] < self.start[:, None])[:, :, None]
                masks[layer] = m.expand(B, self.P, -1) | dense_rows

    def _sources(self, x):
        """The predictor inputs the plans come from: every position (token) or the last prefilled one."""
        if self.mode.granularity == "prompt":  # [B, 1, E], broadcast to all positions
            return x[torch.arange(x.shape[0], device=x.device), self.start - 1][:, None]
        return x

    def _scores(self, x, layer):
        w1, b1, w2, b2, w2_scale = self.mode.predictor_weights(layer)
        B, P, E = x.shape
        return fused_predictor_ref(x.reshape(B * P, E), w1, b1, w2, b2, w2_scale=w2_scale).view(B, P, -1)

    def _on_input(self, i, x):
        mode = self.mode
        if isinstance(mode, ShadowLLM) and mode.observes("input", i):
            self._shadowllm(x, i, "input")
            return
        if not isinstance(mode, DejaVu):
            return
        target = i + 1 if mode.lookahead else i
        if not mode.buffers.is_sparse(target):
            return
        heads, neurons = mode.predictor.split(self._scores(self._sources(x), target))
        b = mode.buffers
        nm = None if neurons is None else b.select(neurons[..., None, :], "neurons", layer=target)[..., 0, :]
        self._store_selected(target, b.select(heads, "heads"), nm)

    def _on_ffn_in(self, i, a):
        """DejaVu's MLP-input neuron predictor: layer i's neurons from its MLP input (after this position's sparse
        attention, as the decode step sees it)."""
        mode = self.mode
        if not isinstance(mode, DejaVu) or mode.neuron_input != "mlp" or not mode.buffers.is_sparse(i):
            return
        neurons = self._scores(self._sources(a), (i, "ffn_in"))
        self._store_selected(i, None, mode.buffers.select(neurons[..., None, :], "neurons", layer=i)[..., 0, :])

    def _on_attn_out(self, i, o):
        if isinstance(self.mode, ShadowLLM) and self.mode.observes("attn_out", i):
            self._shadowllm(o, i, "attn_out")

    def _shadowllm(self, x, layer, site):
        """The masks of the layers that ShadowLLM's net reading (``layer``, ``site``) scores (every sparse layer for
        the single predictor, a stage's layers for a staged one), from its input ``x`` [B, P, E]."""
        mode = self.mode
        stage = mode._stage_at(layer, site)
        heads, neurons = mode.predictor.split(self._scores(self._sources(x), stage), stage)  # [B, P', n, U]
        b = mode.buffers
        first = b.first if stage is None else layer
        hm, nm = b.select(heads, "heads"), b.select(neurons, "neurons", layer=first)
        for j in range(heads.shape[2]):
            self._store_selected(first + j, hm[:, :, j], nm[:, :, j])

    def set_oracle(self, heads: dict, neurons: dict) -> None:
        """The oracle's plans from a dense pass's scores: ``heads[i]`` [B, P, H] head output L2 norms and
        ``neurons[i]`` [B, P, F] |activations| of every sparse layer i (the whole model's units). Ties go to the
        lowest index (layer-major when global): the oracle's scores hold exact ties (every ReLU neuron that is zero
        in the dense pass), and which of them a position keeps matters once the earlier layers are sparse."""
        b = self.mode.buffers
        layers = [b.first + j for j in range(b.n_sparse)]
        hs = torch.stack([heads[i] for i in layers], 2)  # [B, P, L_s, H]
        ns = torch.stack([neurons[i] for i in layers], 2)
        hm, nm = b.select(hs, "heads", stable=True), b.select(ns, "neurons", stable=True, layer=b.first)
        for j, i in enumerate(layers):
            self._store_selected(i, hm[:, :, j], nm[:, :, j])

    def _threshold_hooks(self) -> dict:
        """Input sparsity: entries below the layer's threshold dropped at the sparse positions of sparse layers."""
        mode = self.mode
        P = self.P

        def drop(site, i, t, pos_dim):
            if i < mode.first_sparse:
                return t
            keep = t.abs() > mode.thresholds[site][i]  # an exact zero (a ReLU) is always dropped
            sparse_pos = torch.arange(P, device=t.device)[None, :] >= self.start[:, None]  # [B, P]
            shape = [t.shape[0]] + [1] * (t.dim() - 1)
            shape[pos_dim] = P
            return t * (keep | ~sparse_pos.view(shape)).to(t.dtype)

        return {"qkv_in": lambda i, a: drop("qkv", i, a, 1), "heads": lambda i, h: drop("o", i, h, 2),
                "fc1_in": lambda i, a: drop("fc1", i, a, 1), "neurons": lambda i, f: drop("fc2", i, f, 1)}

    def hooks(self) -> dict:
        if isinstance(self.mode, Threshold):
            return self._threshold_hooks()

        def kv_live(i):
            hm = self.head_masks.get(i)
            if hm is None or self.mode.kv_rule == "always":
                return None
            B, P, H = hm.shape
            return hm.view(B, P, self.kvh, H // self.kvh).any(dim=3).transpose(1, 2)

        def heads(i, h):  # [B, H, P, D]
            hm = self.head_masks.get(i)
            return h if hm is None else h * hm.transpose(1, 2)[..., None].to(h.dtype)

        def neurons(i, f):  # [B, P, F]
            nm = self.neuron_masks.get(i)
            return f if nm is None else f * nm.to(f.dtype)

        return {"input": self._on_input, "attn_out": self._on_attn_out, "ffn_in": self._on_ffn_in, "kv_live": kv_live,
                "heads": heads, "neurons": neurons}


@torch.no_grad()
def sparse_logits(model, tokens: torch.Tensor, mode: Mode, sparse_from) -> torch.Tensor:
    """Logits [B, P, V] of every position of ``tokens`` [B, P] under ``mode`` (bound to ``model``), with
    positions before ``sparse_from`` (an int, or one per sequence) prefilled densely (see the module
    docstring). Right padding is harmless: positions only see earlier ones."""
    plans = PositionPlans(model, mode, sparse_from, tokens.shape[1], tokens.shape[0])
    if isinstance(mode, Oracle):
        heads, neurons = oracle_scores(model, tokens, mode.criterion)
        if model.tp is not None:  # each rank scored its own shard; every rank selects from all of them
            heads = {i: model.tp.all_gather(t, dim=-1) for i, t in heads.items()}
            neurons = {i: model.tp.all_gather(t, dim=-1) for i, t in neurons.items()}
        plans.set_oracle(heads, neurons)
    return model.prefill(tokens, all_logits=True, hooks=plans.hooks())


def oracle_scores(model, tokens: torch.Tensor, criterion: str = "l2norm") -> tuple[dict, dict]:
    """Per layer, every head's score [B, P, H] and every neuron's [B, P, F] at every position, from a dense prefill
    of ``tokens`` (fp32): ``l2norm``, the L2 norm of the head's attention output and |activation|; ``plainact``,
    |A * dL/dA| (summed over a head's output), with L the summed next-token loss of ``tokens``, from one backward
    pass (:func:`models.criteria.token_rows`)."""
    if criterion == "plainact":
        if model.tp is not None:
            raise ValueError("the plainact oracle runs on one rank (its backward pass is not tensor-parallel)")
        from .criteria import token_rows

        B, P = tokens.shape
        rows = token_rows(model, tokens, torch.full((B,), P), ("plainact",), with_inputs=False)
        hs = rows["plainact.heads"].view(B, P, *rows["plainact.heads"].shape[1:])  # [B, P, L, H]
        ns = rows["plainact.neurons"].view(B, P, *rows["plainact.neurons"].shape[1:])
        return ({i: hs[:, :, i] for i in range(hs.shape[2])}, {i: ns[:, :, i] for i in range(ns.shape[2])})
    if criterion != "l2norm":
        raise ValueError(f"the oracle's criterion must be l2norm or plainact, got {criterion!r}")
    return _oracle_norms(model, tokens)


@torch.no_grad()
def _oracle_norms(model, tokens: torch.Tensor) -> tuple[dict, dict]:
    """Per layer, the L2 norm of every head's attention output [B, P, H] and |activation| of every neuron
    [B, P, F] at every position, from a dense prefill of ``tokens`` (fp32)."""
    heads, neurons = {}, {}

    def on_heads(i, h):  # [B, H, P, D]
        heads[i] = h.float().norm(dim=-1).transpose(1, 2)
        return h

    def on_neurons(i, f):  # [B, P, F]
        neurons[i] = f.float().abs()
        return f

    model.prefill(tokens, all_logits=True, hooks={"heads": on_heads, "neurons": on_neurons})
    return heads, neurons


@torch.no_grad()
def neuron_calibration_scores(model, mode: Mode, windows: list[list[int]], *, per_window: int = 1 << 16,
                              seed: int = 0) -> list[torch.Tensor]:
    """Each sparse layer's neuron scores [n] (fp32, on the CPU) as ``mode`` (a predictor mode or the oracle, bound
    to ``model``, with ``neuron_rule`` ``threshold``) scores them when it selects, in dense passes over ``windows``
    (token id lists, e.g. WikiText-2 validation, never the evaluation text): the predictor's, or the oracle's dense
    |activation|. Up to ``per_window`` scores of each layer are sampled per window. They do not depend on the
    sparsity, so one set serves every sparsity of a mode (:func:`calibrate_neuron_thresholds`)."""
    b = getattr(mode, "buffers", None)
    if b is None or getattr(b, "neuron_rule", "topk") != "threshold":
        raise ValueError("neuron calibration is for a bound predictor mode or oracle with neuron_rule 'threshold'")
    if not windows or any(len(w) < 1 for w in windows):
        raise ValueError("calibration needs at least one window of text")
    seen: dict[int, list] = {j: [] for j in range(b.n_sparse)}
    gen = torch.Generator().manual_seed(seed)
    select = b.select

    def record(scores, kind, *, stable=False, layer=None):
        if kind != "neurons":
            return select(scores, kind, stable=stable, layer=layer)
        for j in range(scores.shape[-2]):
            v = scores[..., j, :].float().flatten().cpu()
            if v.numel() > per_window:
                v = v[torch.randperm(v.numel(), generator=gen)[:per_window]]
            seen[layer - b.first + j].append(v)
        return torch.ones_like(scores, dtype=torch.bool)  # every position of the pass is dense anyway

    b.select = record
    try:
        for ids in windows:
            tokens = torch.tensor([ids], device=model.device)
            sparse_logits(model, tokens, mode, tokens.shape[1])  # all positions dense: the dense pass's inputs
    finally:
        del b.select  # the buffers' own method again
    missing = [b.first + j for j, v in seen.items() if not v]
    if missing:
        raise ValueError(f"the mode scored no neurons of layers {missing} (a neuron budget of 0 needs no thresholds)")
    return [torch.cat(seen[j]) for j in range(b.n_sparse)]


@torch.no_grad()
def calibrate_neuron_thresholds(model, mode: Mode, windows: list[list[int]] | None = None, *,
                                per_window: int = 1 << 16, seed: int = 0, scores: list | None = None
                                ) -> torch.Tensor:
    """The per-layer thresholds of ``neuron_rule`` ``threshold`` for ``mode`` (a predictor mode or the oracle, bound
    to ``model``): each sparse layer's threshold is the ``neuron_sparsity`` quantile of its neuron scores on
    calibration text (:func:`neuron_calibration_scores` over ``windows``, or ``scores`` made by it for the same
    model and scorer), so that on that text a share ``1 - neuron_sparsity`` of the layer's neurons passes on
    average while the count varies per token. Sets them on the mode's plan buffers and returns them
    [n sparse layers]."""
    if scores is None:
        if windows is None:
            raise ValueError("calibrate_neuron_thresholds needs windows of text or their scores")
        scores = neuron_calibration_scores(model, mode, windows, per_window=per_window, seed=seed)
    b = mode.buffers
    if getattr(b, "neuron_rule", "topk") != "threshold":
        raise ValueError("calibrate_neuron_thresholds is for a bound predictor mode or oracle with neuron_rule "
                         "'threshold'")
    if len(scores) != b.n_sparse:
        raise ValueError(f"scores must hold {b.n_sparse} layers (one per sparse layer), got {len(scores)}")
    t = torch.tensor([float(torch.quantile(v, b.neuron_sparsity)) for v in scores])
    b.set_neuron_thresholds(t)
    mode.neuron_thresholds = t  # kept by the mode: a later bind (a Generator's) sets them on its new buffers
    return t
