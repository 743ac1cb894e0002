"""Predictor training (ShadowLLM table 3) and ranking quality (Spearman rho, figures 5 and 14).

Inputs come from a criteria dataset (:mod:`bench.collect`): ``attn0`` [N, E] for the ShadowLLM
predictor, ``inputs`` [N, L, E] for the DejaVu-style per-layer predictors (and ``ffn_inputs`` [N, L, E], the MLPs'
inputs, for their neuron nets under ``neuron_input="mlp"``); targets are one criterion's
per-example scores of the sparse layers (layers ``first_sparse..L-1``).

Target normalisation, explicit because global top-k compares scores across layers:

- ``global`` (default): one z-score per kind (all heads of all sparse layers together, all neurons
  together), with the training split's mean and standard deviation. An increasing affine map, so every
  ordering, within a layer and across layers, is the criterion's own: what global top-k needs.
- ``layer``: a z-score per layer and kind. Orderings within a layer are kept, across layers they are
  not: the per-layer ("local") scheme of the paper's figure 6, for local top-k.
- ``log`` (with either) first takes log(score + 1e-6 * mean) for heavy-tailed criteria, or with ``log="log1p"``
  log(1 + score), which compresses the large scores and leaves the near-zero ones near zero (both increasing, so
  orderings are kept too).

Training: AdamW (lr 1e-3), cosine schedule over all epochs, MSE on the normalised targets (every output once, or
heads and neurons weighted by ``head_share``: :func:`target_loss`), batch 32, up to
100 epochs; a held-out fraction of the examples (seeded) is the validation split; the weights of the epoch
with the lowest validation loss are kept. Evaluation on the validation split: Spearman rho between
predicted and true scores per example, averaged over examples, within each layer (``local``, then
averaged over layers) and over all sparse layers at once (``global``), for heads and for neurons.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch

from .config import DecoderConfig
from .predictors import DejaVuPredictor, ShadowLLMPredictor

NORMALISATIONS = ("global", "layer")


@dataclass
class Targets:
    heads: torch.Tensor  # [N, L_s, H]
    neurons: torch.Tensor  # [N, L_s, F]


@dataclass
class Normaliser:
    scheme: str
    log: bool | str  # False, True (log with a tiny offset) or "log1p"
    stats: dict = field(default_factory=dict)  # kind -> (mean, std) broadcastable to [L_s, U]
    eps: dict = field(default_factory=dict)  # kind -> the log's offset, fixed at fit time

    def _pre(self, t, kind):
        if not self.log:
            return t
        if self.log == "log1p":
            return torch.log1p(t.clamp(min=0))
        return torch.log(t.clamp(min=0) + self.eps[kind])

    def fit(self, t: Targets, rows=None, chunk: int = 4096) -> Normaliser:
        """Statistics of the rows ``rows`` (default all) of ``t``, read ``chunk`` rows at a time in float64 (the
        targets may be fp16 and larger than memory allows as fp32)."""
        for kind in ("heads", "neurons"):
            x = getattr(t, kind)
            idx = torch.arange(x.shape[0]) if rows is None else rows
            if self.log and self.log != "log1p":
                tot = sum(float(x[idx[i: i + chunk]].double().abs().sum()) for i in range(0, len(idx), chunk))
                self.eps[kind] = 1e-6 * max(tot / (len(idx) * x[0].numel()), 1e-30)
            dims = (0, 1, 2) if self.scheme == "global" else (0, 2)
            s1 = s2 = 0.0
            for i in range(0, len(idx), chunk):
                y = self._pre(x[idx[i: i + chunk]].double(), kind)
                s1 = s1 + y.sum(dim=dims, keepdim=True)[0]
                s2 = s2 + (y * y).sum(dim=dims, keepdim=True)[0]
            n = len(idx) * (x.shape[1] * x.shape[2] if self.scheme == "global" else x.shape[2])
            mean = s1 / n
            var = (s2 / n - mean * mean) * n / max(1, n - 1)
            self.stats[kind] = (mean.float(), var.clamp(min=0).sqrt().float().clamp(min=1e-12))
        return self

    def apply_kind(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        mean, std = self.stats[kind]
        return (self._pre(x.float(), kind) - mean.to(x.device)) / std.to(x.device)

    def apply(self, t: Targets) -> Targets:
        return Targets(*[self.apply_kind(getattr(t, k), k) for k in ("heads", "neurons")])

    def describe(self) -> dict:
        return {"normalisation": self.scheme, "log": self.log}


def targets_from(tensors: dict, criterion: str, first_sparse: int = 1) -> Targets:
    key = f"{criterion}.heads"
    if key not in tensors:
        found = sorted({k.split(".")[0] for k in tensors if k.endswith(".heads")})
        raise ValueError(f"criterion {criterion!r} is not in this dataset; it has {found}")
    heads, neurons = tensors[key], tensors[f"{criterion}.neurons"]
    if heads.dim() != 3:
        raise ValueError(f"criterion {criterion!r} is aggregate-only (one value per unit); predictors need "
                         "per-example scores")
    return Targets(heads[:, first_sparse:], neurons[:, first_sparse:])  # as stored (fp16 for per-token data)


def spearman(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Spearman rho along the last dimension (ties broken by position), [...]."""
    def ranks(x):
        return x.argsort(dim=-1).argsort(dim=-1).float()

    rp, rt = ranks(pred), ranks(true)
    rp = rp - rp.mean(dim=-1, keepdim=True)
    rt = rt - rt.mean(dim=-1, keepdim=True)
    return (rp * rt).sum(-1) / (rp.norm(dim=-1) * rt.norm(dim=-1)).clamp(min=1e-12)


def rank_quality(pred: Targets, true: Targets) -> dict:
    """Mean Spearman rho: ``{kind: {"local": .., "global": ..}}``."""
    out = {}
    for kind in ("heads", "neurons"):
        p, t = getattr(pred, kind), getattr(true, kind)
        out[kind] = {"local": float(spearman(p, t).mean()),
                     "global": float(spearman(p.flatten(1), t.flatten(1)).mean())}
    return out


def _check_input_site(kind, shadowllm_input):
    from .predictors import SHADOWLLM_INPUTS

    if shadowllm_input not in SHADOWLLM_INPUTS:
        raise ValueError(f"shadowllm_input must be one of {SHADOWLLM_INPUTS}, got {shadowllm_input!r}")
    if kind != "shadowllm" and shadowllm_input != "attn0":
        raise ValueError("shadowllm_input chooses a ShadowLLM predictor's input; a DejaVu predictor reads each layer's")


class _InputScale:
    """Standardisation of a ShadowLLM predictor's input (the residual stream has channels far louder than others)
    while it trains, folded into its first layer afterwards: ``w1 / sd`` and ``b1 - (w1 / sd) @ mean``, so the saved
    predictor reads the raw input and the kernels need nothing new."""

    def __init__(self, x: torch.Tensor):
        x = x.double()
        self.mean, self.std = x.mean(0).float(), x.std(0).clamp(min=1e-6).float()
        self.folded = False

    def __call__(self, x):
        return x if self.folded else (x - self.mean.to(x.device)) / self.std.to(x.device)

    def fold(self, pred) -> None:
        """Into the first layer of each stage's net (statistics [E], or [n_stages, E] for a staged predictor)."""
        mean, std = (self.mean, self.std) if self.mean.dim() == 2 else (self.mean[None], self.std[None])
        with torch.no_grad():
            for stage in range(mean.shape[0]):
                lin = pred.stage_net(stage)[0]
                w = lin.weight / std[stage].to(lin.weight.device)
                lin.bias.sub_(w @ mean[stage].to(w.device))
                lin.weight.copy_(w)
        self.folded = True


def check_head_share(head_share):
    if head_share is not None and (isinstance(head_share, bool) or not isinstance(head_share, (int, float))
                                   or not 0 < head_share < 1):
        raise ValueError(f"head_share must be None or a number in (0, 1), got {head_share!r}")


def target_loss(head_share: float | None = None):
    """The training loss on normalised targets, ``loss(h, n, yh, yn)`` over heads [b, L_s, H] and neurons
    [b, L_s, F]. ``head_share`` None: one MSE over all outputs, so every head and neuron counts once (on SmolLM2 the
    heads are 9 of every 1545 outputs of a layer). A number: the heads' mean squared error weighs ``head_share`` and
    the neurons' ``1 - head_share``, so a ShadowLLM predictor's shared hidden layer is not shaped by the neurons alone
    (the oracle loses more to skipped heads than to skipped neurons)."""
    check_head_share(head_share)

    def loss(h, n, yh, yn):
        if head_share is None:
            sq = (h - yh).pow(2).sum() + (n - yn).pow(2).sum()
            return sq / (yh.shape[0] * (yh.shape[1] * yh.shape[2] + yn.shape[1] * yn.shape[2]))
        return head_share * (h - yh).pow(2).mean() + (1 - head_share) * (n - yn).pow(2).mean()

    return loss


def _predictor_input(t: dict, kind: str, residual: bool, first_sparse: int, stages=None) -> torch.Tensor:
    """What the predictor reads, from tensors with ``attn0`` [N, E] and ``inputs`` [N, L, E] (a dataset, or rows
    computed from the model): ShadowLLM's one input [N, E] (a staged one's [N, n_stages, E], the residual stream
    entering each stage), or DejaVu's layer inputs [N, L_s, E]."""
    if kind == "shadowllm":
        if stages is not None and len(stages) > 1:
            return t["inputs"][:, list(stages)]
        return t["inputs"][:, first_sparse] if residual else t["attn0"]
    return t["inputs"][:, first_sparse:]


def _forward(pred, kind: str, scale):
    """``forward(x, a)`` -> (heads [b, L_s, H], neurons [b, L_s, F]): ShadowLLM on its (standardised) input, DejaVu's
    nets on the layer inputs ``x`` and MLP inputs ``a``."""
    if kind == "shadowllm":
        return lambda x, a=None: pred(x if scale is None else scale(x))
    return pred.forward_all


def _check_train_stages(kind, stages, first_sparse, cfg, shadowllm_input):
    """``stages`` of a predictor to train: ShadowLLM's only (checked as the predictor checks them), None for one."""
    if stages is None:
        return None
    if kind != "shadowllm":
        raise ValueError("stages split a ShadowLLM predictor; a DejaVu predictor has a net per layer already")
    from .predictors import check_stages

    st = check_stages(stages, first_sparse, cfg.n_layers, shadowllm_input)
    return st if len(st) > 1 else None


def _new_predictor(kind, cfg, hidden, first_sparse, device, seed, neuron_input, ffn_hidden, shadowllm_input,
                   stages=None):
    """A float32 predictor to train, initialised from ``seed``."""
    torch.manual_seed(seed)
    if kind == "shadowllm":
        pred = ShadowLLMPredictor(cfg, hidden or 2048, first_sparse, torch.float32, device, input_site=shadowllm_input,
                                  stages=stages)
    else:
        pred = DejaVuPredictor(cfg, hidden or 1024, first_sparse, torch.float32, device, neuron_input=neuron_input,
                               ffn_hidden=ffn_hidden)
    return pred.requires_grad_(True)


class _BestEpoch:
    """The epoch of lowest validation loss: its weights kept, the history written, the progress bar advanced."""

    def __init__(self, progress=None):
        self.history, self.loss, self.state, self.epoch, self.progress = [], float("inf"), None, 0, progress

    def record(self, pred, train_loss: float, val: float) -> None:
        self.history.append({"epoch": len(self.history) + 1, "train_loss": train_loss, "val_loss": val})
        if val < self.loss:
            self.loss, self.epoch, self.state = val, len(self.history), copy.deepcopy(pred.state_dict())
        if self.progress is not None:
            self.progress.update(1)
            self.progress.set_postfix(val=f"{val:.4f}")

    def restore(self, pred, scale=None) -> None:
        """The best epoch's weights, the input scaling folded in, frozen for evaluation."""
        pred.load_state_dict(self.state)
        if scale is not None:
            scale.fold(pred)
        pred.requires_grad_(False).eval()


@dataclass
class TrainResult:
    predictor: object
    history: list[dict]
    quality: dict  # rank_quality on the test split (never the split that chose the epoch)
    best_epoch: int
    n_train: int
    n_val: int
    normaliser: Normaliser
    n_test: int = 0
    baselines: dict = field(default_factory=dict)  # name -> rank_quality of a baseline on the test split


def _split(n: int, val_fraction: float, seed: int, groups: torch.Tensor | None = None, test_fraction: float = 0.0):
    """Train, validation (chooses the epoch) and test (rho is reported on it) row indices. With ``groups`` (the
    sequence of each row of a per-token dataset) whole groups go to one side, so no sequence is both trained on
    and held out."""
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= f < 1.0 or (name == "val_fraction" and f == 0.0):
            raise ValueError(f"{name} must be in {'(0, 1)' if name == 'val_fraction' else '[0, 1)'}, got {f}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be below 1, got {val_fraction + test_fraction}")
    gen = torch.Generator().manual_seed(seed)
    if groups is None:
        units, of_row = n, None
    else:
        ids, of_row = torch.unique(groups, return_inverse=True)
        units = len(ids)
    n_val = max(1, int(round(units * val_fraction)))
    n_test = int(round(units * test_fraction)) if test_fraction else 0
    if test_fraction and n_test == 0:
        n_test = 1
    if units - n_val - n_test < 1:
        what = "sequences" if groups is not None else "examples"
        raise ValueError(f"{units} {what} are too few to hold out {val_fraction:.0%} + {test_fraction:.0%} and still "
                         "train")
    perm = torch.randperm(units, generator=gen)
    parts = perm[n_val + n_test:], perm[:n_val], perm[n_val: n_val + n_test]
    if of_row is None:
        return parts
    side = torch.full((units,), 0, dtype=torch.long)
    side[parts[1]], side[parts[2]] = 1, 2
    rs = side[of_row]
    return tuple(torch.nonzero(rs == k).flatten() for k in range(3))


def _group_means(y_rows, labels, rows, n_labels, chunk=4096):
    """Mean of ``y_rows(idx)`` [b, L, U] over ``rows`` per label (and over all rows: the last entry)."""
    sums, counts = None, torch.zeros(n_labels + 1, dtype=torch.float64)
    for i in range(0, len(rows), chunk):
        idx = rows[i: i + chunk]
        y = y_rows(idx).double().cpu()
        if sums is None:
            sums = torch.zeros((n_labels + 1, *y.shape[1:]), dtype=torch.float64)
        lab = labels[idx]
        sums.index_add_(0, lab, y)
        sums[n_labels] += y.sum(0)
        counts.index_add_(0, lab, torch.ones(len(idx), dtype=torch.float64))
        counts[n_labels] += len(idx)
    means = sums / counts.clamp(min=1)[:, None, None]
    means[:n_labels][counts[:n_labels] == 0] = means[n_labels]  # an unseen label falls back to the overall mean
    return means.float()


def rank_quality_rows(predict, true_rows, rows, chunk: int = 2048) -> dict:
    """rank_quality over ``rows``, ``chunk`` rows at a time: ``predict(idx)`` and ``true_rows(idx)`` give
    (heads, neurons) of those rows."""
    acc = {k: {"local": 0.0, "global": 0.0} for k in ("heads", "neurons")}
    for i in range(0, len(rows), chunk):
        idx = rows[i: i + chunk]
        p, t = predict(idx), true_rows(idx)
        q = rank_quality(Targets(*[x.float() for x in p]), Targets(*[x.float().to(p[0].device) for x in t]))
        for k in acc:
            for scope in acc[k]:
                acc[k][scope] += q[k][scope] * len(idx)
    return {k: {scope: v / max(1, len(rows)) for scope, v in d.items()} for k, d in acc.items()}


def train_predictor(kind: str, cfg: DecoderConfig, tensors: dict, criterion: str, *, hidden: int | None = None,
                    epochs: int = 100, batch_size: int = 32, lr: float = 1e-3, weight_decay: float = 0.01,
                    val_fraction: float = 0.2, test_fraction: float = 0.2, normalisation: str = "global",
                    log: bool = False, first_sparse: int = 1, seed: int = 0, device="cpu", progress=None,
                    sources: torch.Tensor | None = None, neuron_input: str = "mlp",
                    ffn_hidden: int | None = None, shadowllm_input: str = "attn0",
                    head_share: float | None = None, stages=None) -> TrainResult:
    """Train a ``shadowllm`` or ``dejavu`` predictor on one criterion of a criteria dataset.

    Three splits: the epoch with the lowest loss on ``val_fraction`` of the data is kept, and Spearman rho is
    reported on a separate ``test_fraction`` (0: on the validation split, as a selection-biased figure), beside two
    baselines on the same rows: the per-unit mean of the training targets (what ``static`` uses) and the per-source
    mean (the task of a prompt, or WikiText-2; ``sources``, default the dataset's ``row_source``). Per-token datasets
    (``row_group``) are split by sequence. Targets stay in their stored dtype and are normalised a batch at a time, so
    fp16 datasets larger than fp32 memory train. ``neuron_input`` and ``ffn_hidden``: a DejaVu predictor's neuron nets
    (:class:`~models.predictors.DejaVuPredictor`). ``shadowllm_input``: a ShadowLLM predictor's input, ``attn0`` (layer
    0's attention output) or ``residual`` (the first sparse layer's input, standardised while training and folded
    into the first layer after). ``head_share``: the heads' weight in the loss (:func:`target_loss`). ``stages``:
    a staged ShadowLLM predictor's stage starts (:class:`~models.predictors.ShadowLLMPredictor`; residual input)."""
    if kind not in ("shadowllm", "dejavu"):
        raise ValueError(f"kind must be 'shadowllm' or 'dejavu', got {kind!r}")
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")
    if log not in (False, True, "log1p"):
        raise ValueError(f"log must be False, True or 'log1p', got {log!r}")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if hidden is not None and (not isinstance(hidden, int) or hidden < 1):
        raise ValueError(f"hidden must be a positive int or None, got {hidden!r}")
    tg = targets_from(tensors, criterion, first_sparse)
    N = tg.heads.shape[0]
    L_s = cfg.n_layers - first_sparse
    if tg.heads.shape[1:] != (L_s, cfg.n_heads) or tg.neurons.shape[1:] != (L_s, cfg.ffn):
        raise ValueError(f"dataset scores {tuple(tg.heads.shape)} / {tuple(tg.neurons.shape)} do not fit the model "
                         f"({L_s} sparse layers, {cfg.n_heads} heads, {cfg.ffn} neurons)")
    mlp_in = kind == "dejavu" and neuron_input == "mlp"
    if mlp_in and "ffn_inputs" not in tensors:
        raise ValueError("a DejaVu predictor with neuron_input 'mlp' reads the MLPs' inputs, and this dataset has no "
                         "'ffn_inputs' (collect it again, or train with neuron_input 'layer')")
    _check_input_site(kind, shadowllm_input)
    criterion_loss = target_loss(head_share)
    residual = kind == "shadowllm" and shadowllm_input == "residual"
    stages = _check_train_stages(kind, stages, first_sparse, cfg, shadowllm_input)
    x_all = _predictor_input(tensors, kind, residual, first_sparse, stages)
    a_all = tensors["ffn_inputs"][:, first_sparse:] if mlp_in else None  # [N, L_s, E]
    if torch.device(device).type == "cuda":  # batches gathered on the GPU when the data fits beside the predictor
        need = sum(t.numel() * t.element_size() for t in (x_all, a_all, tg.heads, tg.neurons) if t is not None)
        if need < 0.5 * torch.cuda.get_device_properties(device).total_memory:
            x_all, tg = x_all.to(device), Targets(tg.heads.to(device), tg.neurons.to(device))
            a_all = None if a_all is None else a_all.to(device)
    groups = tensors.get("row_group")
    tr, va, te = _split(N, val_fraction, seed, groups, test_fraction)
    norm = Normaliser(normalisation, log).fit(tg, tr)
    pred = _new_predictor(kind, cfg, hidden, first_sparse, device, seed, neuron_input, ffn_hidden, shadowllm_input,
                          stages)
    scale = _InputScale(x_all[tr.to(x_all.device)].float()) if residual else None
    forward = _forward(pred, kind, scale)

    def inputs_of(idx):
        """The predictor's inputs of rows ``idx``: (x, MLP inputs or None)."""
        x = x_all[idx.to(x_all.device)].to(device).float()
        return x, (None if a_all is None else a_all[idx.to(a_all.device)].to(device).float())

    def batch_of(idx):
        x, a = inputs_of(idx)
        idx = idx.to(tg.heads.device)
        yh = norm.apply_kind(tg.heads[idx].to(device), "heads")
        yn = norm.apply_kind(tg.neurons[idx].to(device), "neurons")
        return x, a, yh, yn

    def loss_of(idx):
        x, a, yh, yn = batch_of(idx)
        h, n = forward(x, a)
        return criterion_loss(h, n, yh, yn)

    def mean_loss(rows, chunk=1024):
        with torch.no_grad():
            return sum(float(loss_of(rows[i: i + chunk])) * len(rows[i: i + chunk])
                       for i in range(0, len(rows), chunk)) / len(rows)

    opt = torch.optim.AdamW(pred.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(tr) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed + 1)
    tracker = _BestEpoch(progress)
    for _ in range(epochs):
        pred.train()
        order = tr[torch.randperm(len(tr), generator=gen)]
        total = 0.0
        for i in range(0, len(order), batch_size):
            idx = order[i: i + batch_size]
            loss = loss_of(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * idx.numel()
        tracker.record(pred, total / len(tr), mean_loss(va))
    tracker.restore(pred, scale)
    history, best, best_epoch = tracker.history, tracker.loss, tracker.epoch
    report = te if len(te) else va
    if len(report) > 8192:  # rho over 8192 held-out rows: plenty for three decimals, and ranks of every unit are cheap
        report = report[torch.randperm(len(report), generator=torch.Generator().manual_seed(seed + 2))[:8192]]

    def predict(idx):
        with torch.no_grad():
            return forward(*inputs_of(idx))

    def truth(idx):
        idx = idx.to(tg.heads.device)
        return tg.heads[idx], tg.neurons[idx]

    quality = rank_quality_rows(predict, truth, report)
    # baselines on the same rows: per-unit and per-source means of the training targets (normalised; rho only
    # sees their order, which the increasing normalisation keeps)
    src = sources if sources is not None else tensors.get("row_source")
    baselines = {}
    if len(tr):
        labels = (src.long() if src is not None else torch.zeros(N, dtype=torch.long))
        n_lab = int(labels.max()) + 1
        dev_t = tg.heads.device
        mh = _group_means(lambda idx: norm.apply_kind(tg.heads[idx.to(dev_t)], "heads"), labels, tr, n_lab)
        mn = _group_means(lambda idx: norm.apply_kind(tg.neurons[idx.to(dev_t)], "neurons"), labels, tr, n_lab)
        baselines["unit_mean"] = rank_quality_rows(
            lambda idx: (mh[n_lab].expand(len(idx), -1, -1), mn[n_lab].expand(len(idx), -1, -1)), truth, report)
        if src is not None:
            baselines["source_mean"] = rank_quality_rows(lambda idx: (mh[labels[idx]], mn[labels[idx]]), truth, report)
    pred.meta.update({"source": "trained", "criterion": criterion, **norm.describe(), "head_share": head_share,
                      "best_epoch": best_epoch,
                      "epochs": epochs, "n_train": len(tr), "n_val": len(va), "n_test": len(te), "val_loss": best,
                      "spearman": quality, "rho_split": "test" if len(te) else "validation",
                      "spearman_baselines": baselines})
    return TrainResult(pred, history, quality, best_epoch, len(tr), len(va), norm, len(te), baselines)


# ------------------------------------------------------------- rows streamed from the model (no dataset file)
def _lr_lambda(total: int):
    """Cosine decay over ``total`` optimiser steps, flat at 0 after them."""
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(1, total)))


def train_streaming(kind: str, model, sequences: list, criterion: str = "l2norm", *, hidden: int | None = None,
                    epochs: int = 10, batch_size: int = 1024, lr: float = 1e-3, weight_decay: float = 0.01,
                    val_fraction: float = 0.1, test_fraction: float = 0.1, normalisation: str = "layer",
                    log: bool | str = "log1p", first_sparse: int = 1, seed: int = 0, pool_tokens: int = 32768,
                    model_batch: int = 16, eval_rows: int = 16384, neuron_input: str = "mlp",
                    ffn_hidden: int | None = None, tf32: bool = True, progress=None,
                    shadowllm_input: str = "attn0", head_share: float | None = None, stages=None) -> TrainResult:
    """Train a predictor on per-position targets computed from ``model`` as training goes, never stored.

    ``sequences``: ``[(source index, token ids)]`` (:func:`bench.collect.token_sequences`); every real position of
    every sequence is a row. The sequences are split into train / validation / test (seeded, a sequence on one
    side). Each epoch walks the training sequences in a new order, a pool of about ``pool_tokens`` positions at a
    time: one dense pass of the model over the pool (``model_batch`` sequences per forward,
    :func:`models.criteria.token_rows`) gives every row's targets and inputs on the device; the pool's rows are
    shuffled and trained on in batches of ``batch_size``. So the data can be far larger than memory (10^6 positions
    of SmolLM2 would make a ~160 GB fp16 file) and no two epochs see the same batches.

    The normaliser's statistics come from the first pool of training sequences (up to ``pool_tokens`` positions).
    The epoch of lowest loss on up to ``eval_rows`` validation positions is kept; Spearman rho and its baselines
    (per-unit and per-source means of the training targets, accumulated over the first epoch) are reported on up to
    ``eval_rows`` test positions. ``tf32``: the predictor's matmuls (not the model's) use TF32 on CUDA.
    ``shadowllm_input``: as in :func:`train_predictor` (the standardisation's statistics from the first pool).
    AdamW, cosine learning-rate decay over all steps, the loss of :func:`target_loss` (``head_share``)."""
    from .criteria import length_batches, token_rows

    if kind not in ("shadowllm", "dejavu"):
        raise ValueError(f"kind must be 'shadowllm' or 'dejavu', got {kind!r}")
    if criterion not in ("l2norm", "plainact"):
        raise ValueError(f"per-position criteria are l2norm and plainact; got {criterion!r}")
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")
    if log not in (False, True, "log1p"):
        raise ValueError(f"log must be False, True or 'log1p', got {log!r}")
    for name, v in (("epochs", epochs), ("batch_size", batch_size), ("pool_tokens", pool_tokens),
                    ("model_batch", model_batch), ("eval_rows", eval_rows)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not sequences:
        raise ValueError("no sequences to train on")
    short = [i for i, (_, ids) in enumerate(sequences) if len(ids) < 1]
    if short:
        raise ValueError(f"sequence {short[0]} is empty")
    _check_input_site(kind, shadowllm_input)
    criterion_loss = target_loss(head_share)
    residual = kind == "shadowllm" and shadowllm_input == "residual"
    cfg = model.cfg
    device = model.device
    stages = _check_train_stages(kind, stages, first_sparse, cfg, shadowllm_input)
    L_s = cfg.n_layers - first_sparse
    mlp_in = kind == "dejavu" and neuron_input == "mlp"
    tr, va, te = _split(len(sequences), val_fraction, seed, None, test_fraction)
    gen = torch.Generator().manual_seed(seed + 1)
    src_of = torch.tensor([s for s, _ in sequences], dtype=torch.long)
    n_src = int(src_of.max()) + 1

    def rows_of(seq_ids) -> dict:
        """Rows of the sequences ``seq_ids`` on the device: x, a (or None), raw heads and neurons, source."""
        parts = []
        chosen = [int(i) for i in seq_ids]
        for pos, tokens, lengths in length_batches([sequences[i] for i in chosen], model_batch):
            ids = [chosen[p] for p in pos]
            r = token_rows(model, tokens.to(device), lengths, (criterion,), with_inputs=kind == "dejavu" or residual)
            x = _predictor_input(r, kind, residual, first_sparse, stages)
            parts.append({"x": x.float(), "a": r["ffn_inputs"][:, first_sparse:].float() if mlp_in else None,
                          "heads": r[f"{criterion}.heads"][:, first_sparse:],
                          "neurons": r[f"{criterion}.neurons"][:, first_sparse:],
                          "src": src_of[ids].repeat_interleave(lengths).to(device)})
            del r
        return {k: (None if parts[0][k] is None else torch.cat([p[k] for p in parts])) for k in parts[0]}

    def pools(seq_ids):
        """``seq_ids`` in groups of about ``pool_tokens`` positions."""
        group, n = [], 0
        for i in seq_ids.tolist():
            group.append(i)
            n += len(sequences[i][1])
            if n >= pool_tokens:
                yield group
                group, n = [], 0
        if group:
            yield group

    def capped(seq_ids, n_rows, salt):
        """Rows of ``seq_ids`` (in a seeded order) until ``n_rows`` positions, then a seeded subset of that many."""
        order = seq_ids[torch.randperm(len(seq_ids), generator=torch.Generator().manual_seed(seed + salt))]
        take, n = [], 0
        for i in order.tolist():
            take.append(i)
            n += len(sequences[i][1])
            if n >= n_rows:
                break
        r = rows_of(take)
        keep = torch.randperm(len(r["src"]), generator=torch.Generator().manual_seed(seed + salt + 1))[:n_rows]
        keep = keep.to(device)
        return {k: (None if v is None else v[keep]) for k, v in r.items()}

    # statistics of the targets from one pool of training sequences
    first = next(pools(tr[torch.randperm(len(tr), generator=torch.Generator().manual_seed(seed + 5))]))
    fit_rows = rows_of(first)
    norm = Normaliser(normalisation, log).fit(Targets(fit_rows["heads"], fit_rows["neurons"]))
    scale = _InputScale(fit_rows["x"]) if residual else None
    n_fit = len(fit_rows["src"])
    del fit_rows
    val = capped(va, eval_rows, 10)
    val_y = (norm.apply_kind(val["heads"], "heads"), norm.apply_kind(val["neurons"], "neurons"))

    pred = _new_predictor(kind, cfg, hidden, first_sparse, device, seed, neuron_input, ffn_hidden, shadowllm_input,
                          stages)
    forward = _forward(pred, kind, scale)

    use_tf32 = tf32 and torch.device(device).type == "cuda"

    def val_loss(chunk=2048):
        tot = 0.0
        with torch.no_grad():
            for i in range(0, len(val["src"]), chunk):
                s = slice(i, i + chunk)
                h, n = forward(val["x"][s], None if val["a"] is None else val["a"][s])
                tot += float(criterion_loss(h, n, val_y[0][s], val_y[1][s])) * len(val["src"][s])
        return tot / len(val["src"])

    n_train = sum(len(sequences[i][1]) for i in tr.tolist())
    opt = torch.optim.AdamW(pred.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(epochs * math.ceil(n_train / batch_size)))
    # per-source sums of the normalised training targets (first epoch): the baselines' means
    sums = [torch.zeros((n_src + 1, L_s, u), dtype=torch.float64, device=device) for u in (cfg.n_heads, cfg.ffn)]
    counts = torch.zeros(n_src + 1, dtype=torch.float64, device=device)
    tracker = _BestEpoch(progress)
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    for epoch in range(epochs):
        pred.train()
        total, seen = 0.0, 0
        for group in pools(tr[torch.randperm(len(tr), generator=gen)]):
            r = rows_of(group)
            yh, yn = norm.apply_kind(r["heads"], "heads"), norm.apply_kind(r["neurons"], "neurons")
            del r["heads"], r["neurons"]
            if epoch == 0:
                for acc, y in zip(sums, (yh, yn), strict=True):
                    acc.index_add_(0, r["src"], y.double())
                    acc[n_src] += y.sum(0).double()
                counts.index_add_(0, r["src"], torch.ones_like(r["src"], dtype=torch.float64))
                counts[n_src] += len(r["src"])
            perm = torch.randperm(len(yh), generator=gen).to(device)
            torch.backends.cuda.matmul.allow_tf32 = use_tf32 or prev_tf32
            try:
                for i in range(0, len(perm), batch_size):
                    idx = perm[i: i + batch_size]
                    h, n = forward(r["x"][idx], None if r["a"] is None else r["a"][idx])
                    loss = criterion_loss(h, n, yh[idx], yn[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    total += float(loss.detach()) * len(idx)
                    seen += len(idx)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = prev_tf32
            del r, yh, yn
        pred.eval()
        tracker.record(pred, total / max(1, seen), val_loss())
    tracker.restore(pred, scale)
    history, best, best_epoch = tracker.history, tracker.loss, tracker.epoch
    val = val_y = None  # free the device memory before the test rows
    test = capped(te if len(te) else va, eval_rows, 20)
    n_report = len(test["src"])
    rows = torch.arange(n_report)

    def predict(idx):
        with torch.no_grad():
            return forward(test["x"][idx], None if test["a"] is None else test["a"][idx])

    def truth(idx):
        return test["heads"][idx], test["neurons"][idx]

    quality = rank_quality_rows(predict, truth, rows)
    means = [(acc / counts.clamp(min=1)[:, None, None]).float() for acc in sums]
    for m in means:  # a source without training rows falls back to the overall mean
        m[:n_src][counts[:n_src] == 0] = m[n_src]
    src_t = test["src"]
    baselines = {
        "unit_mean": rank_quality_rows(lambda idx: (means[0][n_src].expand(len(idx), -1, -1),
                                                    means[1][n_src].expand(len(idx), -1, -1)), truth, rows),
        "source_mean": rank_quality_rows(lambda idx: (means[0][src_t[idx]], means[1][src_t[idx]]), truth, rows),
    }
    n_val_rows = min(eval_rows, sum(len(sequences[i][1]) for i in va.tolist()))
    pred.meta.update({"source": "trained", "criterion": criterion, **norm.describe(), "head_share": head_share,
                      "best_epoch": best_epoch,
                      "epochs": epochs, "n_train": n_train, "n_val": n_val_rows, "n_test": n_report, "val_loss": best,
                      "spearman": quality, "rho_split": "test" if len(te) else "validation",
                      "spearman_baselines": baselines, "rows": "streamed from the model",
                      "normaliser_rows": n_fit, "sequences": {"train": len(tr), "val": len(va), "test": len(te)}})
    return TrainResult(pred, history, quality, best_epoch, n_train, n_val_rows, norm, n_report if len(te) else 0,
                       baselines)
