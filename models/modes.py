"""Modes: strategy objects that turn hidden states into sparsity plans. Layers never see a mode's name.

Every mode answers ``plan(layer)`` with a :class:`~models.plan.LayerPlan`; a mode that predicts also
gets ``observe(layer, site, x)`` calls (``site`` is ``"input"``, a layer's input, or ``"attn_out"``,
its attention block's output; ``x`` is [B, E] at the current or last prompt position) and refills its
plan buffers from them. When it observes is the *granularity*: ``"prompt"`` (during prefill, at the
last prompt position; decoding reuses the plan) or ``"token"`` (every decoded token).

Shared conventions:

- The first ``first_sparse`` layers (default 1) are dense in every mode, so modes compare at equal
  sparse-layer counts; ShadowLLM needs layer 0 dense because its predictor reads layer 0's output.
- ``sparsity`` s keeps round((1 - s) * n) heads and neurons in each sparse layer (local), or that
  many times the number of sparse layers over all of them together (global).
- With a batch of several sequences the kernels take one index set per step: ``batch_rule`` ``mean``
  (default) selects from the batch's mean scores, ``union`` unites every sequence's own selection.
- ``predictor_dtype`` ``fp8`` stores a predictor's second layer as float8 e4m3 with one scale per
  output (half the bytes a per-token prediction reads); the default keeps the model's dtype.
"""

from __future__ import annotations

from pathlib import Path

import torch

from shadow_kernels.fused_predictor import quantize_rows_fp8

from .nvtx import nvtx_range
from .ops import Ops, get_ops
from .plan import (
    NEURON_RULES,
    LayerPlan,
    PlanBuffers,
    check_batch_rule,
    check_kv_rule,
    check_policy,
    check_sparsity,
)
from .predictors import DejaVuPredictor, ShadowLLMPredictor, load_predictor, random_predictor

MODES = ("dense", "static", "dejavu", "shadowllm", "oracle", "threshold")
# Modes with no decode step, and why: they run in quality evaluation only (models.sparse_forward).
NO_DECODE = {"oracle": "it computes every head and neuron to choose (quality runs only)"}
DECODE_MODES = tuple(m for m in MODES if m not in NO_DECODE)
GRANULARITIES = ("prompt", "token")


def _check_granularity(g):
    if g not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {g!r}")
    return g


class Mode:
    name = "mode"
    # the sites (see observe) whose values the mode reads when predicting: a decoder materialises a layer's
    # input (the residual add it otherwise folds into the next GEMV) only for a mode that observes "input".
    # Every site unless a mode says less (ShadowLLM reads only layer 0's attention output).
    observed_sites: tuple[str, ...] = ("input", "attn_out")
    granularity: str | None = None  # None: the plan does not depend on the input
    policy: str | None = None
    sparsity = 0.0
    head_sparsity: float | None = None  # None: ``sparsity``
    neuron_sparsity: float | None = None
    kv_rule = "skip"
    first_sparse = 1
    no_decode: str | None = None  # why a decode step cannot run this mode (NO_DECODE), None where it can

    def bind(self, model, ops: Ops | None = None) -> Mode:
        """Allocate the plan buffers for ``model`` (once, before prefill or graph capture)."""
        self.model = model
        self.ops = ops or get_ops(None, model.device)
        self._dense = model.dense_plan()
        return self

    def observe(self, layer: int, site: str, x: torch.Tensor) -> None:  # noqa: B027 - optional hook
        pass

    def observes(self, site: str, layer: int) -> bool:
        """Whether the mode reads ``site`` of ``layer``: a decode step materialises a layer's input only there."""
        return site in self.observed_sites

    def plan(self, layer: int) -> LayerPlan:
        return self._dense

    def predictor_bytes(self) -> int:
        """Bytes of predictor weights read per prediction."""
        return 0

    def live_counts(self) -> dict | None:
        """Live heads and neurons per sparse layer of the current plan (None: dense)."""
        return None

    def step_weight_bytes(self) -> int | None:
        """Weight bytes one decode step reads under the current plan (reads the device): the model's count at the
        plan's live heads, key-value groups and neurons."""
        c = self.live_counts()
        if c is None:
            return self.model.step_weight_bytes()
        return self.model.step_weight_bytes(c["heads"], c["neurons"], self.first_sparse, c["kv_groups"])

    def set_budgets(self, head_sparsity: float | None = None, neuron_sparsity: float | None = None) -> Mode:
        """Separate head and neuron sparsities (each None: ``sparsity``); before ``bind``."""
        self.head_sparsity = None if head_sparsity is None else check_sparsity(head_sparsity)
        self.neuron_sparsity = None if neuron_sparsity is None else check_sparsity(neuron_sparsity)
        return self

    def set_kv_rule(self, rule: str) -> Mode:
        self.kv_rule = check_kv_rule(rule)
        return self

    def budgets(self) -> dict:
        """The sparsities a row records: heads and neurons each, and the key/value rule."""
        s = self.sparsity
        out = {"head_sparsity": s if self.head_sparsity is None else self.head_sparsity,
               "neuron_sparsity": s if self.neuron_sparsity is None else self.neuron_sparsity,
               "kv_rule": self.kv_rule}
        if getattr(self, "neuron_rule", "topk") != "topk":  # (absent: top-k, as rows before the rule)
            out["neuron_rule"] = self.neuron_rule
        return out

    def describe(self) -> dict:
        tp = getattr(getattr(self, "model", None), "tp", None)
        out = {"mode": self.name, "sparsity": self.sparsity, "policy": self.policy,
               "granularity": self.granularity, "first_sparse": self.first_sparse, **self.budgets()}
        if tp is not None:
            out.update(tp=tp.world, tp_plan=tp.plan)
        return out


class Dense(Mode):
    name = "dense"


def check_first_sparse(first_sparse) -> int:
    if not isinstance(first_sparse, int) or first_sparse < 0:
        raise ValueError(f"first_sparse must be a non-negative int, got {first_sparse!r}")
    return first_sparse


class _Sparse(Mode):
    batch_rule = "mean"
    neuron_rule = "topk"  # the predictor modes may keep each layer's neurons above a threshold (models.plan)

    def __init__(self, sparsity: float, policy: str = "local", first_sparse: int = 1):
        self.sparsity = check_sparsity(sparsity)
        self.policy = check_policy(policy)
        self.first_sparse = check_first_sparse(first_sparse)

    def bind(self, model, ops=None):
        super().bind(model, ops)
        cfg = model.full_cfg  # scores cover the whole model; a tensor-parallel rank plans its shard (models.tp)
        if self.first_sparse >= cfg.n_layers:
            raise ValueError(f"first_sparse {self.first_sparse} leaves no sparse layer in a {cfg.n_layers}-layer model")
        tp = model.tp
        self.buffers = PlanBuffers(n_layers=cfg.n_layers, first=self.first_sparse, n_heads=cfg.n_heads,
                                   head_dim=cfg.head_dim, ffn=cfg.ffn, sparsity=self.sparsity, policy=self.policy,
                                   device=model.device, ops=self.ops,
                                   n_kv_heads=None if model.plan_kv_heads is None else cfg.n_kv_heads,
                                   batch_rule=self.batch_rule, head_sparsity=self.head_sparsity,
                                   neuron_sparsity=self.neuron_sparsity,
                                   shard=(0, 1) if tp is None else (tp.rank, tp.world),
                                   tp_plan="exact" if tp is None else tp.plan, kv_rule=self.kv_rule,
                                   neuron_rule=self.neuron_rule)
        if getattr(self, "neuron_thresholds", None) is not None:  # calibrated before this bind (a new plan's buffers)
            self.buffers.set_neuron_thresholds(self.neuron_thresholds)
        self._plans = [self.buffers.layer(i) if self.buffers.is_sparse(i) else self._dense
                       for i in range(cfg.n_layers)]
        return self

    def plan(self, layer):
        return self._plans[layer]

    def live_counts(self):
        return self.buffers.counts()


STATIC_NORMALISATIONS = ("layer", "none")


def layer_zscore(x: torch.Tensor) -> torch.Tensor:
    """A z-score per layer (row) of [L, U] scores: the order within a layer is kept, and layers whose scores differ
    in scale by orders of magnitude compete on equal terms under a global budget."""
    return (x - x.mean(dim=1, keepdim=True)) / x.std(dim=1, keepdim=True).clamp(min=1e-12)


class Static(_Sparse):
    """One fixed plan from aggregated importance scores: ``heads`` [L, H] and ``neurons`` [L, F]
    (a dict, or a safetensors/torch file with those keys; rows of dense layers are ignored).

    ``normalise``: under the global policy the scores are z-scored per layer first (``layer``, the default there):
    raw criteria differ by orders of magnitude between layers, and one budget over raw scores left whole layers with
    no head at all on SmolLM2. ``none`` selects on the raw scores."""

    name = "static"

    def __init__(self, importance, sparsity: float, policy: str = "local", first_sparse: int = 1,
                 normalise: str | None = None):
        super().__init__(sparsity, policy, first_sparse)
        normalise = normalise or ("layer" if self.policy == "global" else "none")
        if normalise not in STATIC_NORMALISATIONS:
            raise ValueError(f"normalise must be one of {STATIC_NORMALISATIONS}, got {normalise!r}")
        self.normalise = normalise
        self.source = str(importance) if isinstance(importance, (str, Path)) else "tensors"
        self.importance = load_importance(importance) if isinstance(importance, (str, Path)) else importance

    def bind(self, model, ops=None):
        super().bind(model, ops)
        cfg = model.full_cfg
        imp = self.importance
        if not isinstance(imp, dict) or "heads" not in imp or "neurons" not in imp:
            raise ValueError("static importance must hold 'heads' [L, H] and 'neurons' [L, F] tensors")
        for key, want in (("heads", (cfg.n_layers, cfg.n_heads)), ("neurons", (cfg.n_layers, cfg.ffn))):
            if tuple(imp[key].shape) != want:
                raise ValueError(f"static importance {key!r} has shape {tuple(imp[key].shape)}; the model needs {want}")
        dev = model.device
        heads = imp["heads"].to(dev, torch.float32)[self.first_sparse:].contiguous()
        neurons = imp["neurons"].to(dev, torch.float32)[self.first_sparse:].contiguous()
        for key, t in (("heads", heads), ("neurons", neurons)):
            if not torch.isfinite(t).all():
                raise ValueError(f"static importance {key!r} holds NaN or infinite values")
        if self.normalise == "layer":
            heads, neurons = layer_zscore(heads), layer_zscore(neurons)
        self.buffers.fill(self.first_sparse, heads, neurons)
        return self

    def describe(self):
        return {**super().describe(), "importance": self.source, "normalise": self.normalise}


ORACLE_CRITERIA = ("l2norm", "plainact")


class Oracle(_Sparse):
    """The contextual ceiling for quality runs: every position keeps the heads whose attention output has the
    largest L2 norm and the neurons with the largest |activation| in a dense pass of the model over the same
    tokens (``criterion`` ``l2norm``), per layer (``local``) or over all sparse layers (``global``; the scores then
    compete across layers as they are, unnormalised). ``criterion`` ``plainact`` ranks them by |A * dL/dA| instead:
    the gradient of the summed next-token loss of those tokens, from one backward pass (it reads the labels of the
    text it scores, as ShadowLLM's training targets do). It needs every head and neuron computed to choose, so it
    has no decode step and no latency: :mod:`models.sparse_forward` runs it (two passes, dense then masked). With
    ``neuron_rule`` ``threshold`` a layer keeps the neurons whose score passes its calibrated threshold instead (a
    count that varies per token): the ceiling of the predictors under that rule."""

    name = "oracle"
    granularity = "token"
    no_decode = NO_DECODE["oracle"]

    def __init__(self, sparsity: float, policy: str = "local", first_sparse: int = 1, criterion: str = "l2norm"):
        super().__init__(sparsity, policy, first_sparse)
        if criterion not in ORACLE_CRITERIA:
            raise ValueError(f"the oracle's criterion must be one of {ORACLE_CRITERIA}, got {criterion!r}")
        self.criterion = criterion


class Threshold(Mode):
    """Training-free input sparsity (:mod:`models.threshold`): in every layer from ``first_sparse`` on, each
    projection drops the entries of its input whose magnitude is below that layer's calibrated threshold.

    Decoding, each projection of a sparse layer reads only the weight rows of the kept input entries: the
    thresholds become index lists on the device inside the step (capturable in a CUDA graph), and the gather-columns
    GEMV reads the projection's transposed weight (:class:`models.threshold.InputSparseLayer`). The transposed
    copies of Q/K/V, the output projection and fc1 (gate and up) are made when the first decode step asks for the
    plans, so the mode holds those weights twice in memory (fc2 / down is stored transposed already); quality runs
    need no copy. A batch keeps the union of its sequences' entries."""

    name = "threshold"
    granularity = "token"
    observed_sites = ()

    def __init__(self, sparsity: float, thresholds, first_sparse: int = 1):
        self.sparsity = check_sparsity(sparsity)
        self.thresholds_arg = thresholds
        self.first_sparse = check_first_sparse(first_sparse)

    def bind(self, model, ops=None):
        super().bind(model, ops)
        from .threshold import SITES, load_thresholds

        arg = self.thresholds_arg
        if arg is None:
            raise ValueError("mode 'threshold' needs a thresholds file (make it with `shadowbench calibrate`)")
        table = (load_thresholds(arg, self.sparsity, model.cfg.n_layers) if isinstance(arg, (str, Path))
                 else {k: torch.as_tensor(v, dtype=torch.float32) for k, v in arg.items()})
        if set(table) != set(SITES):
            raise ValueError(f"thresholds must hold {SITES}, got {sorted(table)}")
        self.source = str(arg) if isinstance(arg, (str, Path)) else "tensors"
        self.thresholds = {k: v.to(model.device) for k, v in table.items()}
        self._plans = None
        return self

    def plan(self, layer):
        if self._plans is None:  # the transposed weights, once, at the first decode step
            from .threshold import InputSparseLayer

            L = self.model.cfg.n_layers
            self._plans = [self._dense if i < self.first_sparse else LayerPlan(
                head_slot=self._dense.head_slot,
                input_sparse=InputSparseLayer(self.model.transposed_weights(i),
                                              {site: t[i] for site, t in self.thresholds.items()}))
                for i in range(L)]
        return self._plans[layer]

    def live_counts(self):
        """Inputs each projection of each sparse layer read in the last decode step (reads the device)."""
        if self._plans is None:
            return None
        return {"inputs": [p.input_sparse.live_inputs() for p in self._plans if p.input_sparse is not None]}

    def step_weight_bytes(self) -> int | None:
        """Weight bytes of the last decode step: the dense step's less the rows of the dropped inputs (None before
        the first step)."""
        if self._plans is None:
            return None
        total = self.model.step_weight_bytes()
        for p in self._plans:
            if p.input_sparse is None:
                continue
            for site, wt in p.input_sparse.weights_t.items():
                total -= (wt.shape[0] - int(p.input_sparse.counts[site])) * wt.shape[1] * wt.element_size()
        return total

    def budgets(self) -> dict:
        return {"head_sparsity": None, "neuron_sparsity": None, "kv_rule": "skip", "input_sparsity": self.sparsity}


def load_importance(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"importance file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from .files import read_tensors

        return read_tensors(path, "importance file")
    from .files import read_pickled_state_dict

    return read_pickled_state_dict(path)


def _resolve_predictor(predictor, kind, model, mode=None, **random_kw):
    """The predictor a mode binds: a file loaded (or random weights made) for ``model``; a ``mode`` bound again to the
    same model keeps the one it has (a Pareto sweep scores and then times one mode)."""
    held = getattr(mode, "predictor", None)
    if held is not None and getattr(mode, "_predictor_for", None) == (id(model), model.dtype, model.device):
        return held
    pred = _load_predictor(predictor, kind, model, **random_kw)
    if mode is not None:
        mode._predictor_for = (id(model), model.dtype, model.device)
    return pred


def _load_predictor(predictor, kind, model, **random_kw):
    if predictor is None or predictor == "random":
        return random_predictor(kind, model.full_cfg, dtype=model.dtype, device=model.device, **random_kw)
    if isinstance(predictor, (str, Path)):
        pred = load_predictor(predictor, model.full_cfg, dtype=model.dtype, device=model.device)
    else:
        pred = predictor.to(device=model.device, dtype=model.dtype)
    if pred.kind != kind:
        raise ValueError(f"mode {kind!r} needs a {kind} predictor, got a {pred.kind} predictor")
    return pred


# Skipping dead hidden units is exact and halves the bytes of the second layer with random
# predictors, but on the H100 the gather-columns GEMV over ShadowLLM's [2048, 800k] transposed second
# layer (OPT-13B) ran at ~1.5 TB/s, so the step got 0.7% faster (notes/models.md): off by default.
SPARSE_HIDDEN_DEFAULT = False
# "model": the predictor in the model's dtype; "fp8": its second layer as float8 e4m3 with a scale per output
PREDICTOR_DTYPES = ("model", "fp8")


class _Predicting(_Sparse):
    """Shared by the predictor modes: runs the MLP, optionally reading only live hidden units.

    A batch shares one plan per step: ``batch_rule`` ``mean`` (default) selects from the batch's mean
    scores, ``union`` takes the union of every sequence's own selection (see ``models.plan.PlanBuffers``).
    """

    sparse_hidden: bool | None = None
    predictor_dtype: str = "model"

    def _set_batch_rule(self, rule: str) -> None:
        self.batch_rule = check_batch_rule(rule)

    def _set_predictor_dtype(self, dtype: str) -> None:
        if dtype not in PREDICTOR_DTYPES:
            raise ValueError(f"predictor_dtype must be one of {PREDICTOR_DTYPES}, got {dtype!r}")
        self.predictor_dtype = dtype

    def _setup_predictor(self, layers):
        """``layers``: the keys (:meth:`_net`) of the nets the mode runs."""
        self._nets = list(layers)
        arg = self.sparse_hidden_arg
        self.sparse_hidden = SPARSE_HIDDEN_DEFAULT if arg is None else bool(arg)
        if self.sparse_hidden and self.predictor_dtype == "fp8":
            raise ValueError("predictor_dtype 'fp8' quantises the second layer for the fused predictor; it does not "
                             "combine with sparse_hidden")
        self._w2t = {i: self._net(i)[2].T.contiguous() for i in layers} if self.sparse_hidden else {}
        # fp8: the second (large) layer stored as float8 e4m3 with one scale per output, built once here
        self._w2q = ({i: quantize_rows_fp8(self._net(i)[2]) for i in layers}
                     if self.predictor_dtype == "fp8" else {})
        self._live = {}

    def _net(self, key):
        """A net's weights by key: a layer (or None: ShadowLLM's one net), or ``(layer, site)``."""
        return self.predictor.weights(*key) if isinstance(key, tuple) else self.predictor.weights(key)

    def predictor_weights(self, layer):
        """``(w1, b1, w2, b2, w2_scale)`` the mode predicts with (``layer``: a key of :meth:`_net`): w2 in fp8 with
        its scales under ``predictor_dtype="fp8"``, else the predictor's own w2 and ``None``."""
        w1, b1, w2, b2 = self._net(layer)
        q, scale = self._w2q.get(layer, (w2, None))
        return w1, b1, q, b2, scale

    def _scores(self, x, layer):
        w1, b1, w2, b2, w2_scale = self.predictor_weights(layer)
        if not self.sparse_hidden:
            return self.ops.predictor(x, w1, b1, w2, b2, w2_scale=w2_scale)
        scores, self._live[layer] = self.ops.predictor_sparse(x, w1, b1, self._w2t[layer], b2, return_live=True)
        return scores

    def predictor_bytes(self):
        """Bytes read by the last prediction: the nets the mode runs (all of w2 unless dead hidden units were
        skipped; fp8 w2 and its scales in place of w2)."""
        total = sum(t.nbytes for key in self._nets for t in self._net(key))
        for layer, (q, scale) in self._w2q.items():
            total += q.nbytes + scale.nbytes - self._net(layer)[2].nbytes
        for layer, live in self._live.items():
            w2 = self._net(layer)[2]
            total -= int(w2.nbytes * (1.0 - int(live) / w2.shape[1]))
        return total

    def describe(self):
        return {**super().describe(), "predictor": self.predictor.meta.get("source"),
                "sparse_hidden": self.sparse_hidden, "batch_rule": self.batch_rule,
                "predictor_dtype": self.predictor_dtype}


class DejaVu(_Predicting):
    """Per-layer predictors; local top-k. Heads are scored from the layer's input; neurons from the layer's MLP input
    (``neuron_input="mlp"``, the predictor's default: the mode then also observes site ``"ffn_in"``, and the decode
    step materialises the residual add and norm before the MLP) or with the heads from the layer's input
    (``"layer"``). Both come from the predictor file; ``neuron_input`` here sizes random predictors.

    With ``lookahead`` (``neuron_input="layer"`` only), layer l's input predicts layer l + 1 (DejaVu's asynchronous
    variant; here it runs in line, so it changes which input is used, not the timing)."""

    name = "dejavu"

    def __init__(self, sparsity: float, predictor=None, granularity: str = "token", first_sparse: int = 1,
                 lookahead: bool = False, hidden: int | None = None, sparse_hidden: bool | None = None,
                 batch_rule: str = "mean", predictor_dtype: str = "model", neuron_input: str | None = None):
        super().__init__(sparsity, "local", first_sparse)
        self._set_batch_rule(batch_rule)
        self._set_predictor_dtype(predictor_dtype)
        self.granularity = _check_granularity(granularity)
        self.predictor_arg, self.lookahead, self.hidden = predictor, bool(lookahead), hidden
        self.sparse_hidden_arg = sparse_hidden
        # random predictors: lookahead predicts from the layer input, so it implies neuron_input "layer"
        self.neuron_input_arg = neuron_input or ("layer" if lookahead else "mlp")

    def bind(self, model, ops=None):
        super().bind(model, ops)
        self.predictor: DejaVuPredictor = _resolve_predictor(
            self.predictor_arg, "dejavu", model, self, hidden=self.hidden, first_sparse=self.first_sparse,
            lookahead=self.lookahead, neuron_input=self.neuron_input_arg)
        if self.predictor.first_sparse != self.first_sparse:
            raise ValueError(f"predictor covers layers from {self.predictor.first_sparse}, the mode sparsifies "
                             f"from {self.first_sparse}")
        self.lookahead = self.predictor.lookahead
        self.neuron_input = self.predictor.neuron_input
        # with two nets per layer, a kind without a budget (dense) needs neither its net nor its site
        b = self.buffers
        head_net = not (self.neuron_input == "mlp" and b.dense_heads)
        ffn_net = self.neuron_input == "mlp" and not b.dense_neurons
        self.observed_sites = ("input",) * head_net + ("ffn_in",) * ffn_net
        layers = list(range(self.first_sparse, model.full_cfg.n_layers))
        self._setup_predictor(layers * head_net + [(i, "ffn_in") for i in layers] * ffn_net)
        return self

    observed_sites = ("input",)

    def observe(self, layer, site, x):
        if site not in self.observed_sites:
            return
        if site == "ffn_in":
            if not self.buffers.is_sparse(layer):
                return
            with nvtx_range("predictor"):
                self.buffers.fill_batch(layer, None, self._scores(x, (layer, "ffn_in"))[:, None])
            return
        target = layer + 1 if self.lookahead else layer
        if not self.buffers.is_sparse(target):
            return
        with nvtx_range("predictor"):
            scores = self._scores(x, target)  # [B, H + F] or [B, H] fp32
            heads, neurons = self.predictor.split(scores)  # [B, H], [B, F] or None
            self.buffers.fill_batch(target, heads[:, None], None if neurons is None else neurons[:, None])

    def describe(self):
        return {**super().describe(), "lookahead": self.lookahead, "neuron_input": self.neuron_input}


class ShadowLLM(_Predicting):
    """One predictor scoring every head and neuron of the sparse layers, from layer 0's attention output (site
    ``"attn_out"`` of layer 0) or, for a predictor with ``input_site="residual"``, from layer 1's input (the residual
    stream after layer 0; the decode step materialises that one residual add). A staged predictor
    (:class:`~models.predictors.ShadowLLMPredictor` ``stages``) runs one net per stage, each on the residual stream
    entering its first layer, filling that stage's plans (local top-k only). ``input_site`` and ``stages`` size random
    predictors; a file says its own."""

    name = "shadowllm"

    def __init__(self, sparsity: float, predictor=None, policy: str = "global", granularity: str = "token",
                 hidden: int | None = None, sparse_hidden: bool | None = None, batch_rule: str = "mean",
                 predictor_dtype: str = "model", input_site: str | None = None, stages=None):
        super().__init__(sparsity, policy, 1)
        self.input_site_arg = input_site or "attn0"
        self.stages_arg = stages
        self._set_batch_rule(batch_rule)
        self._set_predictor_dtype(predictor_dtype)
        self.granularity = _check_granularity(granularity)
        self.predictor_arg, self.hidden = predictor, hidden
        self.sparse_hidden_arg = sparse_hidden

    def bind(self, model, ops=None):
        super().bind(model, ops)
        self.predictor: ShadowLLMPredictor = _resolve_predictor(self.predictor_arg, "shadowllm", model, self,
                                                                hidden=self.hidden, first_sparse=1,
                                                                input_site=self.input_site_arg,
                                                                stages=self.stages_arg)
        if self.predictor.first_sparse != 1:
            raise ValueError(f"a ShadowLLM predictor must cover layers from 1, got {self.predictor.first_sparse}")
        self.input_site = self.predictor.input_site
        self.stages = self.predictor.stages
        if len(self.stages) > 1 and self.buffers.policy == "global":
            raise ValueError(f"a staged ShadowLLM predictor (stages {list(self.stages)}) scores its layers stage by "
                             "stage; global top-k needs every layer's scores at once: use policy 'local'")
        self.observed_sites = (self.source()[1],)
        self._setup_predictor([None] if len(self.stages) == 1 else list(range(len(self.stages))))
        return self

    observed_sites = ("attn_out",)
    stages = (1,)

    def source(self) -> tuple[int, str]:
        """The (layer, site) the (first) predictor reads."""
        return (1, "input") if self.input_site == "residual" else (0, "attn_out")

    def _stage_at(self, layer, site):
        """The key of the net that reads (layer, site) (None: the single predictor), or False where none does."""
        if len(self.stages) == 1:
            return None if (layer, site) == self.source() else False
        stage = self.predictor.stage_of(layer) if site == "input" else None
        return False if stage is None else stage

    def observes(self, site, layer):
        return self._stage_at(layer, site) is not False

    def observe(self, layer, site, x):
        stage = self._stage_at(layer, site)
        if stage is False:
            return
        with nvtx_range("predictor"):
            scores = self._scores(x, stage)  # [B, n * (H + F)] fp32, n the layers the net scores
            heads, neurons = self.predictor.split(scores, stage)  # [B, n, H], [B, n, F]
            self.buffers.fill_batch(layer if stage is not None else 1, heads, neurons)

    def describe(self):
        d = {**super().describe(), "input_site": self.input_site}
        if len(self.stages) > 1:
            d["stages"] = list(self.stages)
        return d



def mode_variants(name: str, *, policies=("global",), granularities=("token",), timing: bool = False) -> list:
    """The (policy, granularity) pairs a sweep runs for mode ``name``: the one place that says which settings apply
    to which mode. ``dense`` (and ``hf``, Hugging Face's own generate) take neither; ``static`` and ``oracle`` have
    no predictor, so no granularity; ``dejavu`` selects per layer; ``shadowllm`` takes every policy and granularity.
    ``timing``: a latency sweep, where static's step reads the same bytes under either policy and is timed once
    (global)."""
    if name in ("dense", "hf"):
        return [(None, None)]
    if name == "static":
        return [("global", None)] if timing else [(p, None) for p in policies]
    if name == "dejavu":
        return [("local", g) for g in granularities]
    if name == "shadowllm":
        return [(p, g) for p in policies for g in granularities]
    if name == "oracle":
        return [(p, None) for p in policies]
    if name == "threshold":
        return [("local", None)]
    raise ValueError(f"mode must be one of {MODES}, got {name!r}")


def random_importance(cfg, seed: int = 0) -> dict:
    """Static importance scores drawn at random for a model's shape (latency work without collected criteria)."""
    g = torch.Generator().manual_seed(seed)
    return {"heads": torch.rand(cfg.n_layers, cfg.n_heads, generator=g),
            "neurons": torch.rand(cfg.n_layers, cfg.ffn, generator=g)}


# the modes whose neurons a per-token rule may choose (models.plan.NEURON_RULES): they score every token's neurons
NEURON_RULE_MODES = ("oracle", "dejavu", "shadowllm")


def make_mode(name: str, *, sparsity: float = 0.5, policy: str | None = None, granularity: str = "token",
              predictor=None, importance=None, lookahead: bool = False, batch_rule: str = "mean",
              predictor_dtype: str = "model", head_sparsity: float | None = None,
              neuron_sparsity: float | None = None, kv_rule: str = "skip", neuron_input: str | None = None,
              shadowllm_input: str | None = None, shadowllm_stages=None, neuron_rule: str = "topk",
              oracle_criterion: str = "l2norm") -> Mode:
    """Build a mode by name: the one factory of the CLI, latency, quality, profile and tune.

    ``importance``: static's scores (a file or a dict with ``heads`` [L, H] and ``neurons`` [L, F]), or the
    threshold mode's calibrated thresholds (a file of ``shadowbench calibrate``, or ``{site: [L]}``); ``predictor``:
    a trained predictor file, or ``"random"`` (random weights of the trained shape, for latency work).
    ``head_sparsity`` / ``neuron_sparsity`` override ``sparsity`` for one kind of unit; ``kv_rule`` says what
    skipped heads leave in the cache (:data:`models.plan.KV_RULES`); ``neuron_input``: what a random DejaVu
    predictor scores neurons from (:data:`models.predictors.NEURON_INPUTS`; a file says its own);
    ``shadowllm_input``: what a random ShadowLLM predictor reads (:data:`models.predictors.SHADOWLLM_INPUTS`; a file
    says its own); ``shadowllm_stages``: a random ShadowLLM predictor's stage starts (a file says its own);
    ``oracle_criterion``: what the oracle ranks by (:data:`ORACLE_CRITERIA`).
    ``neuron_rule``: how the predictor modes and the oracle choose each layer's neurons
    (:data:`models.plan.NEURON_RULES`; ``threshold`` needs :func:`models.sparse_forward.calibrate_neuron_thresholds`
    after binding; the oracle's is then the ceiling of a per-token neuron count, as the predictors' top-k has the
    fixed-count oracle)."""
    if name not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {name!r}")
    if neuron_rule not in NEURON_RULES:
        raise ValueError(f"neuron_rule must be one of {NEURON_RULES}, got {neuron_rule!r}")
    if neuron_rule != "topk" and name not in NEURON_RULE_MODES:
        raise ValueError(f"neuron_rule {neuron_rule!r} chooses neurons from per-token scores: modes "
                         f"{', '.join(NEURON_RULE_MODES)}, got {name!r}")
    if name == "dense":
        mode = Dense()
    elif name == "static":
        if importance is None:
            raise ValueError("mode 'static' needs importance scores (a file with 'heads' and 'neurons')")
        mode = Static(importance, sparsity, policy or "global")
    elif name == "oracle":
        mode = Oracle(sparsity, policy or "local", criterion=oracle_criterion)
    elif name == "threshold":
        if policy not in (None, "local"):
            raise ValueError(f"mode 'threshold' has a threshold per layer (policy 'local'), got policy {policy!r}")
        return Threshold(sparsity, importance).set_kv_rule(kv_rule)
    elif name == "dejavu":
        if policy not in (None, "local"):
            raise ValueError(f"mode 'dejavu' selects per layer (policy 'local'), got policy {policy!r}")
        mode = DejaVu(sparsity, predictor, granularity, lookahead=lookahead, batch_rule=batch_rule,
                      predictor_dtype=predictor_dtype, neuron_input=neuron_input)
    else:
        mode = ShadowLLM(sparsity, predictor, policy or "global", granularity, batch_rule=batch_rule,
                         predictor_dtype=predictor_dtype, input_site=shadowllm_input, stages=shadowllm_stages)
    if name != "dense":
        mode.set_budgets(head_sparsity, neuron_sparsity)
    if neuron_rule != "topk":
        mode.neuron_rule = neuron_rule
    return mode.set_kv_rule(kv_rule)
