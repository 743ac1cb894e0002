"""Sparsity plans: which attention heads and FFN neurons each layer computes for the current token.

A layer reads a :class:`LayerPlan` and executes it; it never asks which mode made it. ``None`` index
lists mean "every unit" and take the dense path (cuBLAS), so a dense layer costs what a dense model
costs.

:class:`PlanBuffers` holds the plans of all sparse layers in fixed device buffers (fixed shapes and
addresses, so a decode step that refills them can be captured in a CUDA graph):

- ``head_slot`` int32 [L_s, H + 1]: slot of each head in the Q/K/V output, -1 when skipped (the
  extra column absorbs the padding of global top-k and is never read).
- ``qkv_rows`` int32 [L_s, S * 3D] and ``qkv_count`` [L_s]: rows of the head-major Q/K/V weight.
- ``out_rows`` int32 [L_s, S * D] and ``out_count``: rows of the transposed out_proj weight.
- ``neurons`` int32 [L_s, S_f] and ``neuron_count``: rows of fc1 = rows of the transposed fc2.

``S`` and ``S_f`` are the slots per layer: k for local top-k, all units for global top-k (a layer may
receive any share of the global budget; ``count`` says how many slots are live).

With grouped-query attention (``n_kv_heads`` given, Llama's group-major Q/K/V layout, see
:mod:`shadow_kernels.gqa_attention`) the Q/K/V rows are *units* of D rows: the query of each kept head
and the key and value of each group with a kept head, group by group; ``q_unit`` [L_s, H] and
``kv_unit`` [L_s, KVH] say where they are and ``head_slot`` is the output slot of each kept head (its
rank among the kept heads, so ``out_rows`` are those of OPT).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from shadow_kernels.head_plan import HeadPlanBuffers
from shadow_kernels.topk import LayerIndices, topk_mask

from .ops import Ops

POLICIES = ("local", "global")
# How a tensor-parallel rank (models.tp) turns the whole model's scores into the plan of its shard of heads and
# neurons. Every rank holds the same scores (the predictors are replicated and read the replicated residual
# stream), so neither rule communicates:
# - "exact": every rank selects as one process does (the same top-k over all units) and keeps the units of its
#   shard: the same tokens as one process, but a rank's share of the budget varies with the token, and the slowest
#   rank sets the step's time;
# - "shard": every rank selects the top-k of its own shard with 1/world of the budget: balanced work, a different
#   (more constrained) selection.
TP_PLANS = ("exact", "shard")
# What a token's skipped heads leave in the key/value cache: "skip" (nothing: later tokens that compute the head
# attend only to positions where it was computed) or "always" (keys and values of every head are computed and
# cached; only its query, attention and output are skipped). "always" decodes on grouped-query models (Llama: every
# group's key and value rows join the step's Q/K/V gather); OPT's decode step has "skip" only.
KV_RULES = ("skip", "always")
# how a predictor mode chooses each layer's neurons: the same count every token, or those above a calibrated
# per-layer threshold (the count varies per token)
NEURON_RULES = ("topk", "threshold")


@dataclass(frozen=True)
class LayerPlan:
    head_slot: torch.Tensor  # int32 [H]
    qkv_rows: torch.Tensor | None = None
    qkv_count: torch.Tensor | None = None
    out_rows: torch.Tensor | None = None
    out_count: torch.Tensor | None = None
    neurons: torch.Tensor | None = None
    neuron_count: torch.Tensor | None = None
    q_unit: torch.Tensor | None = None  # grouped-query attention only
    kv_unit: torch.Tensor | None = None
    # input sparsity (the threshold mode, models.threshold.InputSparseLayer): every head and neuron is computed, each
    # projection reading only the weight rows of its input entries above a threshold
    input_sparse: object | None = None


def check_sparsity(sparsity) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    return float(sparsity)


def check_policy(policy) -> str:
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    return policy


def check_kv_rule(rule) -> str:
    if rule not in KV_RULES:
        raise ValueError(f"kv_rule must be one of {KV_RULES}, got {rule!r}")
    return rule


def check_tp_plan(rule) -> str:
    if rule not in TP_PLANS:
        raise ValueError(f"tp_plan must be one of {TP_PLANS}, got {rule!r}")
    return rule


def select_mask(scores: torch.Tensor, k: int, policy: str, *, shards: int = 1, stable: bool = False) -> torch.Tensor:
    """Boolean masks [..., n, U] of the units that scores [..., n, U] keep: the ``k`` best of each layer (``local``)
    or over all n layers together (``global``). ``shards`` > 1 splits the U units into that many contiguous equal
    blocks, each with its own budget ``k`` (the ``shard`` rule of tensor-parallel plans). ``stable``: ties go to
    the lowest index (layer-major when global)."""
    if shards > 1:
        *lead, n, U = scores.shape
        blocks = scores.reshape(*lead, n, shards, U // shards).movedim(-2, -3)  # [..., shards, n, U / shards]
        return select_mask(blocks, k, policy, stable=stable).movedim(-3, -2).reshape(scores.shape)
    flat = scores if policy == "local" else scores.flatten(-2)
    if stable:
        order = torch.sort(flat, dim=-1, descending=True, stable=True).indices[..., :k]
        mask = torch.zeros(flat.shape, dtype=torch.bool, device=scores.device).scatter_(-1, order, True)
    else:
        mask = topk_mask(flat, k, dim=-1, validate=False)
    return mask.view(scores.shape)


def kept_units(n: int, sparsity: float) -> int:
    """Units a layer keeps at this sparsity: round((1 - s) * n), at least one."""
    return max(1, min(n, int(math.floor((1.0 - sparsity) * n + 0.5))))


BATCH_RULES = ("mean", "union")


def check_batch_rule(rule) -> str:
    if rule not in BATCH_RULES:
        raise ValueError(f"batch_rule must be one of {BATCH_RULES}, got {rule!r}")
    return rule


class PlanBuffers:
    """Plans of layers ``first .. n_layers - 1`` in static device buffers, refilled from scores.

    A batch of sequences shares one plan per step (the kernels take one index set). ``batch_rule``
    says how the sequences' scores make it (:meth:`fill_batch`): ``mean`` selects the top-k of the
    batch's mean scores (k units, as for one sequence); ``union`` selects each sequence's own top-k and
    computes their union (every sequence gets all its units; a step computes between k and B * k, so
    its speed falls as the batch's choices differ). With ``union`` every layer has slots for all of its
    units and a device-side count, as global top-k has.
    """

    def __init__(self, *, n_layers: int, first: int, n_heads: int, head_dim: int, ffn: int, sparsity: float,
                 policy: str, device, ops: Ops, n_kv_heads: int | None = None, batch_rule: str = "mean",
                 head_sparsity: float | None = None, neuron_sparsity: float | None = None,
                 shard: tuple[int, int] = (0, 1), tp_plan: str = "exact", kv_rule: str = "skip",
                 neuron_rule: str = "topk"):
        """``sparsity`` sets both budgets; ``head_sparsity`` / ``neuron_sparsity`` set one each instead (heads and
        neurons cost quality very differently: at s=0.5 on SmolLM2 the oracle loses 4% with neurons only, 40% with
        heads only).

        ``n_heads``, ``ffn`` and ``n_kv_heads`` are the whole model's, and scores cover all its units. ``shard`` =
        (rank, world) under tensor parallelism: the buffers then hold the plan of that rank's contiguous share of
        the heads, groups and neurons, made by ``tp_plan`` (:data:`TP_PLANS`).

        ``kv_rule`` ``always`` (grouped-query layout): every key-value group's key and value rows are computed and
        cached at every step, whatever heads are kept; only the skipped heads' queries, attention and outputs are
        left out. ``skip``: a group whose heads are all skipped leaves nothing. (Without the grouped-query layout,
        OPT, the rule changes nothing here: OPT's decode step has ``skip`` only.)

        ``neuron_rule`` ``threshold``: a layer keeps the neurons whose score passes that layer's threshold
        (:meth:`set_neuron_thresholds`, calibrated so that a share ``1 - neuron_sparsity`` is kept on average), so the
        count varies per token; ``topk`` (default) keeps the same count every token. Local, one rank."""
        self.first, self.n_layers = first, n_layers
        self.gqa = n_kv_heads is not None
        self.kv_always = check_kv_rule(kv_rule) == "always" and self.gqa
        if self.gqa and (n_kv_heads < 1 or n_heads % n_kv_heads):
            raise ValueError(f"n_heads {n_heads} must be a positive multiple of n_kv_heads {n_kv_heads}")
        rank, world = shard
        if not 0 <= rank < world:
            raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard!r}")
        kvh = n_kv_heads if self.gqa else n_heads
        if n_heads % world or ffn % world or kvh % world:
            raise ValueError(f"{n_heads} heads, {kvh} key-value groups and {ffn} neurons do not split over {world} "
                             "ranks")
        self.rank, self.world, self.tp_plan = rank, world, check_tp_plan(tp_plan)
        self.H_all, self.F_all = n_heads, ffn
        n_heads, ffn, self.KVH = n_heads // world, ffn // world, kvh // world  # this rank's units
        self.H, self.D, self.F = n_heads, head_dim, ffn
        self.sparsity, self.policy, self.ops = check_sparsity(sparsity), check_policy(policy), ops
        self.head_sparsity = self.sparsity if head_sparsity is None else check_sparsity(head_sparsity)
        self.neuron_sparsity = self.sparsity if neuron_sparsity is None else check_sparsity(neuron_sparsity)
        self.batch_rule = check_batch_rule(batch_rule)
        # a kind without a budget (sparsity 0) keeps every unit: its plan is the dense one (no index lists, the dense
        # path of the decode step), and it is never selected
        self.dense_heads, self.dense_neurons = self.head_sparsity == 0.0, self.neuron_sparsity == 0.0
        if neuron_rule not in NEURON_RULES:
            raise ValueError(f"neuron_rule must be one of {NEURON_RULES}, got {neuron_rule!r}")
        self.neuron_rule = neuron_rule
        self.neuron_thresholds: torch.Tensor | None = None  # [n sparse layers], fp32 (neuron_rule "threshold")
        # neurons the threshold rule kept and scored in masked-forward selections since the last reset: the share it
        # keeps on the evaluated text, which calibration on other text only aims at
        self.neuron_tally = [0, 0]
        if neuron_rule == "threshold" and (policy != "local" or world != 1):
            raise ValueError(f"neuron_rule 'threshold' keeps each layer's neurons above its own threshold: it needs "
                             f"policy 'local' and one rank, got policy {policy!r} over {world} rank(s)")
        n = n_layers - first
        self.n_sparse = n
        # the whole model's budgets, and what one selection keeps (a shard's under tp_plan "shard")
        self.k_heads = kept_units(self.H_all, self.head_sparsity)
        self.k_neurons = kept_units(self.F_all, self.neuron_sparsity)
        self.k_sel_heads = kept_units(n_heads, self.head_sparsity) if self.shards > 1 else self.k_heads
        self.k_sel_neurons = kept_units(ffn, self.neuron_sparsity) if self.shards > 1 else self.k_neurons
        if policy == "global":  # one budget over all sparse layers
            self.k_heads, self.k_neurons = self.k_heads * n, self.k_neurons * n
            self.k_sel_heads, self.k_sel_neurons = self.k_sel_heads * n, self.k_sel_neurons * n
        if batch_rule == "union":  # a union can hold every unit of a layer
            s_h, s_f = n_heads, ffn
        else:  # the width of the top-k index lists: k, or with a global budget min(units, k)
            s_h, s_f = min(n_heads, self.k_sel_heads), min(ffn, self.k_sel_neurons)
        if neuron_rule == "threshold":  # any count of a layer's neurons may pass its threshold
            s_f = ffn
        self.slots_heads, self.slots_neurons = s_h, s_f
        i32 = dict(dtype=torch.int32, device=device)
        self.head_slot = torch.full((n, n_heads + 1), -1, **i32)
        if self.gqa:
            units = self.KVH * (n_heads // self.KVH + 2)  # every group's queries, key and value
            # kept queries + keys/values of their groups (of every group under kv_rule "always")
            s_units = min(units, s_h + 2 * (self.KVH if self.kv_always else min(self.KVH, s_h)))
            self.qkv_rows = torch.zeros((n, s_units * head_dim), **i32)
            self.q_unit = torch.full((n, n_heads), -1, **i32)
            self.kv_unit = torch.full((n, self.KVH), -1, **i32)
        else:
            self.qkv_rows = torch.zeros((n, s_h * 3 * head_dim), **i32)
        self.qkv_count = torch.zeros((n,), **i32)
        self.out_rows = torch.zeros((n, s_h * head_dim), **i32)
        self.out_count = torch.zeros((n,), **i32)
        self.neurons = torch.zeros((n, s_f), **i32)
        self.neuron_count = torch.zeros((n,), **i32)
        self._all_heads = torch.arange(n_heads, **i32)

    @property
    def shards(self) -> int:
        """Blocks of units that select apart: the world size under tp_plan "shard", else 1."""
        return self.world if self.tp_plan == "shard" else 1

    def is_sparse(self, layer: int) -> bool:
        return self.first <= layer < self.n_layers

    def set_neuron_thresholds(self, thresholds: torch.Tensor) -> None:
        """The per-layer thresholds of ``neuron_rule`` ``threshold``: [n sparse layers] finite scores."""
        if self.neuron_rule != "threshold":
            raise ValueError(f"neuron thresholds are for neuron_rule 'threshold'; this plan's rule is "
                             f"{self.neuron_rule!r}")
        t = torch.as_tensor(thresholds, dtype=torch.float32)
        if tuple(t.shape) != (self.n_sparse,) or not bool(torch.isfinite(t).all()):
            raise ValueError(f"neuron thresholds must be {self.n_sparse} finite values (one per sparse layer), got "
                             f"shape {tuple(t.shape)}")
        self.neuron_thresholds = t.to(self.neurons.device)

    def _above_threshold(self, scores: torch.Tensor, layer: int | None) -> torch.Tensor:
        """Mask [..., n, F] of the neuron scores [..., n, F] of layers ``layer .. layer + n - 1`` that pass their
        layer's threshold (``neuron_rule`` ``threshold``)."""
        if layer is None:
            raise ValueError("neuron_rule 'threshold' selects per layer: pass the first layer of the scores")
        if self.neuron_thresholds is None:
            raise ValueError("neuron_rule 'threshold' has no thresholds yet: calibrate them first "
                             "(models.sparse_forward.calibrate_neuron_thresholds)")
        j = layer - self.first
        return scores > self.neuron_thresholds[j: j + scores.shape[-2], None].to(scores.dtype)

    def select(self, scores: torch.Tensor, kind: str, *, stable: bool = False, layer: int | None = None
               ) -> torch.Tensor:
        """Masks [..., n, U] of the whole model's units that scores [..., n, U] of layers ``layer ..`` keep under
        this plan's budgets (``kind``: ``heads`` or ``neurons``): what :mod:`models.sparse_forward` selects with."""
        if kind == "neurons" and self.neuron_rule == "threshold":
            if self.dense_neurons:  # no neuron budget: every neuron is kept, and no threshold was calibrated
                return torch.ones_like(scores, dtype=torch.bool)
            mask = self._above_threshold(scores, layer)
            self.neuron_tally[0] += mask.sum()  # a device tensor: read once per evaluation, not per selection
            self.neuron_tally[1] += mask.numel()
            return mask
        k = self.k_sel_heads if kind == "heads" else self.k_sel_neurons
        return select_mask(scores, k, self.policy, shards=self.shards, stable=stable)

    def local(self, mask: torch.Tensor, kind: str) -> torch.Tensor:
        """The columns of this rank's shard of a whole-model mask [..., U]."""
        if self.world == 1:
            return mask
        units = self.H if kind == "heads" else self.F
        return mask[..., self.rank * units:(self.rank + 1) * units]

    def _indices(self, scores: torch.Tensor, kind: str, out=None, layer: int | None = None):
        """This rank's index lists from the whole model's scores [n, U] of layers ``layer ..`` (into ``out``, plan
        buffers, where the selection can write them directly)."""
        heads = kind == "heads"
        if not heads and self.neuron_rule == "threshold":
            return self.ops.mask_to_indices(self._above_threshold(scores, layer).contiguous(), self.slots_neurons,
                                            validate=False)
        k = self.k_sel_heads if heads else self.k_sel_neurons
        if self.world == 1:
            return self.ops.topk(scores, k, self.policy, validate=False, out=out)
        if self.tp_plan == "shard":
            return self.ops.topk(self.local(scores, kind).contiguous(), k, self.policy, validate=False)
        U = scores.shape[1]
        full = self.ops.topk(scores, k, self.policy, validate=False)
        live = torch.arange(full.idx.shape[1], device=scores.device)[None, :] < full.count[:, None]
        mask = torch.zeros((scores.shape[0], U + 1), dtype=torch.bool, device=scores.device)
        mask.scatter_(1, torch.where(live, full.idx, U).long(), True)
        return self.ops.mask_to_indices(self.local(mask[:, :U], kind).contiguous(),
                                        self.slots_heads if heads else self.slots_neurons, validate=False)

    def fill(self, layer: int, head_scores: torch.Tensor | None, neuron_scores: torch.Tensor | None) -> None:
        """Select from scores of layers ``layer .. layer + n - 1``: heads [n, H], neurons [n, F] (the whole
        model's units). Either may be None: that kind's plan is left as it is (a predictor that scores heads and
        neurons from different activations fills them apart); so is a kind without a budget (it is dense).

        Global top-k needs the scores of every sparse layer in one call.
        """
        if head_scores is not None and not self.dense_heads:
            self._check_layers(head_scores.shape[0])
            self._write_heads(layer, self._indices(head_scores, "heads"))
        if neuron_scores is not None and not self.dense_neurons:
            self._check_layers(neuron_scores.shape[0])
            self._write_neurons(layer, self._indices(neuron_scores, "neurons", self._neuron_out(layer, neuron_scores),
                                                     layer))

    def fill_batch(self, layer: int, head_scores: torch.Tensor | None, neuron_scores: torch.Tensor | None) -> None:
        """:meth:`fill` from a batch's scores, heads [B, n, H] and neurons [B, n, F] (either may be None), by
        ``batch_rule``."""
        for kind, scores in (("heads", head_scores), ("neurons", neuron_scores)):
            if scores is None or (self.dense_heads if kind == "heads" else self.dense_neurons):
                continue
            self._check_layers(scores.shape[1])
            if scores.shape[0] == 1:  # one sequence: its own scores (no mean kernel in the decode step)
                idx = self._indices(scores[0], kind, self._neuron_out(layer, scores[0]) if kind == "neurons" else None,
                                    layer)
            elif self.batch_rule == "mean":
                idx = self._indices(scores.mean(dim=0), kind, layer=layer)
            else:
                idx = self.ops.mask_to_indices(self._union(scores, kind, layer),
                                               self.slots_heads if kind == "heads" else self.slots_neurons,
                                               validate=False)
            (self._write_heads if kind == "heads" else self._write_neurons)(layer, idx)

    def _union(self, scores: torch.Tensor, kind: str, layer: int) -> torch.Tensor:
        """[B, n, units] -> [n, units of this rank] bool: the union over the batch of each sequence's top-k (per
        layer, or over all layers of a sequence with the global policy)."""
        return self.local(self.select(scores, kind, layer=layer).any(dim=0), kind).contiguous()

    def _check_layers(self, n: int) -> None:
        if self.policy == "global" and n != self.n_sparse:
            raise ValueError(f"global top-k needs the scores of all {self.n_sparse} sparse layers, got {n}")

    def _write_heads(self, layer: int, heads) -> None:
        """The head plans of layers ``layer ..`` from their selection (one launch on the Triton backend:
        :func:`shadow_kernels.head_plan.head_plan`)."""
        n = heads.idx.shape[0]
        sl = slice(layer - self.first, layer - self.first + n)
        bufs = HeadPlanBuffers(head_slot=self.head_slot[sl], qkv_rows=self.qkv_rows[sl], qkv_count=self.qkv_count[sl],
                               out_rows=self.out_rows[sl], out_count=self.out_count[sl],
                               q_unit=self.q_unit[sl] if self.gqa else None,
                               kv_unit=self.kv_unit[sl] if self.gqa else None)
        self.ops.head_plan(heads.idx, heads.count, bufs, n_heads=self.H, head_dim=self.D,
                           n_kv_heads=self.KVH if self.gqa else None, kv_always=self.kv_always, validate=False)

    def _neuron_out(self, layer: int, scores: torch.Tensor):
        """The neuron buffers of layers ``layer ..`` (one per row of ``scores``), for the selection to write into;
        None where the selection's lists are not the plan's (a union's slots, a rank's share)."""
        if self.batch_rule != "mean" or self.world != 1:
            return None
        sl = slice(layer - self.first, layer - self.first + scores.shape[0])
        return LayerIndices(self.neurons[sl], self.neuron_count[sl])

    def _write_neurons(self, layer: int, neurons) -> None:
        n = neurons.idx.shape[0]
        sl = slice(layer - self.first, layer - self.first + n)
        if neurons.idx.data_ptr() == self.neurons[sl].data_ptr():  # the selection wrote them in place
            return
        self.neurons[sl].copy_(neurons.idx)
        self.neuron_count[sl].copy_(neurons.count)

    def layer(self, layer: int) -> LayerPlan:
        j = layer - self.first
        heads = {} if self.dense_heads else dict(
            qkv_rows=self.qkv_rows[j], qkv_count=self.qkv_count[j : j + 1],
            out_rows=self.out_rows[j], out_count=self.out_count[j : j + 1],
            q_unit=self.q_unit[j] if self.gqa else None, kv_unit=self.kv_unit[j] if self.gqa else None)
        neurons = {} if self.dense_neurons else dict(neurons=self.neurons[j], neuron_count=self.neuron_count[j : j + 1])
        return LayerPlan(head_slot=self._all_heads if self.dense_heads else self.head_slot[j, : self.H], **heads,
                         **neurons)

    def counts(self) -> dict:
        """Live heads, key-value groups and neurons per sparse layer (reads the device; not for use in a
        decode step)."""
        n = self.n_sparse
        heads = [self.H] * n if self.dense_heads else (self.out_count // self.D).tolist()
        groups = ([self.KVH] * n if self.dense_heads else (self.kv_unit >= 0).sum(dim=1).tolist()) if self.gqa \
            else heads
        neurons = [self.F] * n if self.dense_neurons else self.neuron_count.tolist()
        return {"heads": heads, "kv_groups": groups, "neurons": neurons}
