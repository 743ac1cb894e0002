"""The decode semantics of a mode, for all positions of a sequence at once (quality evaluation).

:func:`sparse_logits` returns the logits that the :class:`~models.generate.Generator` would produce if
it prefilled ``tokens[:, :sparse_from]`` densely and then decoded the remaining tokens one by one with
teacher forcing, at batch 1 (every sequence gets its own plans; the decode step averages a batch's
scores into one plan instead). It runs as one dense forward of the whole sequence with masks, so a
perplexity or accuracy run costs a prefill per sequence rather than a decode step per token:

- position t >= ``sparse_from`` of a sparse layer computes only the heads and neurons its plan keeps;
- a key-value group whose heads are all skipped at t leaves no key/value at t (later positions do not
  see t in that group), as the decode kernels do;
- the plan of position t comes from t's own predictor input (granularity ``token``: layer 0's attention
  output for ShadowLLM, the layer's input for DejaVu) or, for granularity ``prompt``, from position
  ``sparse_from - 1``, the last prefilled one; ``static`` has one plan for all.

Selection is the one of :class:`~models.plan.PlanBuffers` (top-k per layer, or over all sparse layers
for the global policy). The test suite checks that these logits equal those of the decode path.
"""

from __future__ import annotations

import torch

from shadow_kernels import fused_predictor_ref, topk_mask

from .modes import DejaVu, Dense, Mode, ShadowLLM, Static


def _select(scores: torch.Tensor, k: int, policy: str) -> torch.Tensor:
    """Boolean masks [..., n, U] from scores [..., n, U]: ``k`` per layer (local) or over all n layers."""
    if policy == "local":
        return topk_mask(scores, k, dim=-1, validate=False)
    flat = scores.flatten(-2)
    return topk_mask(flat, k, dim=-1, validate=False).view(scores.shape)


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
                    nm = torch.zeros(cfg.ffn, dtype=torch.bool, device=hm.device)
                    nm[plan.neurons[: int(plan.neuron_count)].long()] = True
                    self._store(i, hm[None, None], nm[None, None])
        elif not isinstance(mode, (Dense, DejaVu, ShadowLLM)):
            raise TypeError(f"no per-position semantics for mode {type(mode).__name__}")

    # ---------------------------------------------------------------- masks
    def _store(self, layer, hm, nm):
        """Masks of the sparse positions, [B or 1, P or 1, units]; dense positions are added here."""
        B = self.start.shape[0]
        dense_rows = (torch.arange(self.P, device=hm.device)[None, :] < self.start[:, None])[:, :, None]
        self.head_masks[layer] = hm.expand(B, self.P, -1) | dense_rows
        self.neuron_masks[layer] = nm.expand(B, self.P, -1) | dense_rows

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
        if not isinstance(mode, DejaVu):
            return
        target = i + 1 if mode.lookahead else i
        if not mode.buffers.is_sparse(target):
            return
        heads, neurons = mode.predictor.split(self._scores(self._sources(x), target))
        b = mode.buffers
        self._store(target, _select(heads, b.k_heads, "local"), _select(neurons, b.k_neurons, "local"))

    def _on_attn_out(self, i, o):
        mode = self.mode
        if not isinstance(mode, ShadowLLM) or i != 0:
            return
        heads, neurons = mode.predictor.split(self._scores(self._sources(o), None))  # [B, P', L_s, U]
        b = mode.buffers
        hm, nm = _select(heads, b.k_heads, b.policy), _select(neurons, b.k_neurons, b.policy)
        for j in range(b.n_sparse):
            self._store(b.first + j, hm[:, :, j], nm[:, :, j])

    def hooks(self) -> dict:
        def kv_live(i):
            hm = self.head_masks.get(i)
            if hm is None:
                return None
            B, P, H = hm.shape
            return hm.view(B, P, self.kvh, H // self.kvh).any(dim=3).transpose(1, 2)

        def heads(i, h):  # [B, H, P, D]
            hm = self.head_masks.get(i)
            return h if hm is None else h * hm.transpose(1, 2)[..., None].to(h.dtype)

        def neurons(i, f):  # [B, P, F]
            nm = self.neuron_masks.get(i)
            return f if nm is None else f * nm.to(f.dtype)

        return {"input": self._on_input, "attn_out": self._on_attn_out, "kv_live": kv_live, "heads": heads,
                "neurons": neurons}


@torch.no_grad()
def sparse_logits(model, tokens: torch.Tensor, mode: Mode, sparse_from) -> torch.Tensor:
    """Logits [B, P, V] of every position of ``tokens`` [B, P] under ``mode`` (bound to ``model``), with
    positions before ``sparse_from`` (an int, or one per sequence) prefilled densely (see the module
    docstring). Right padding is harmless: positions only see earlier ones."""
    plans = PositionPlans(model, mode, sparse_from, tokens.shape[1], tokens.shape[0])
    return model.prefill(tokens, all_logits=True, hooks=plans.hooks())

