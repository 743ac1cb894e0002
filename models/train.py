"""Predictor training (ShadowLLM table 3) and ranking quality (Spearman rho, figures 5 and 14).

Inputs come from a criteria dataset (:mod:`bench.collect`): ``attn0`` [N, E] for the ShadowLLM
predictor, ``inputs`` [N, L, E] for the DejaVu-style per-layer predictors; targets are one criterion's
per-example scores of the sparse layers (layers ``first_sparse..L-1``).

Target normalisation, explicit because global top-k compares scores across layers:

- ``global`` (default): one z-score per kind (all heads of all sparse layers together, all neurons
  together), with the training split's mean and standard deviation. An increasing affine map, so every
  ordering, within a layer and across layers, is the criterion's own: what global top-k needs.
- ``layer``: a z-score per layer and kind. Orderings within a layer are kept, across layers they are
  not: the per-layer ("local") scheme of the paper's figure 6, for local top-k.
- ``log`` (with either) first takes log(score + 1e-6 * mean) for heavy-tailed criteria (increasing, so
  orderings are kept too).

Training: AdamW (lr 1e-3), cosine schedule over all epochs, MSE on the normalised targets, batch 32, up to
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
    log: bool
    stats: dict = field(default_factory=dict)  # kind -> (mean, std) broadcastable to [L_s, U]

    def _pre(self, t):
        if not self.log:
            return t
        return torch.log(t.clamp(min=0) + 1e-6 * t.abs().mean().clamp(min=1e-30))

    def fit(self, t: Targets) -> Normaliser:
        for kind in ("heads", "neurons"):
            x = self._pre(getattr(t, kind))
            dims = (0, 1, 2) if self.scheme == "global" else (0, 2)
            mean, std = x.mean(dim=dims, keepdim=True)[0], x.std(dim=dims, keepdim=True)[0]
            self.stats[kind] = (mean, std.clamp(min=1e-12))
        return self

    def apply(self, t: Targets) -> Targets:
        return Targets(*[(self._pre(getattr(t, k)) - self.stats[k][0]) / self.stats[k][1]
                         for k in ("heads", "neurons")])

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
    return Targets(heads[:, first_sparse:].float(), neurons[:, first_sparse:].float())


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


@dataclass
class TrainResult:
    predictor: object
    history: list[dict]
    quality: dict  # rank_quality on the validation split
    best_epoch: int
    n_train: int
    n_val: int
    normaliser: Normaliser


def _split(n: int, val_fraction: float, seed: int):
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_val = max(1, int(round(n * val_fraction)))
    if n - n_val < 1:
        raise ValueError(f"{n} examples are too few to hold out {val_fraction:.0%} and still train")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:], perm[:n_val]


def train_predictor(kind: str, cfg: DecoderConfig, tensors: dict, criterion: str, *, hidden: int | None = None,
                    epochs: int = 100, batch_size: int = 32, lr: float = 1e-3, weight_decay: float = 0.01,
                    val_fraction: float = 0.2, normalisation: str = "global", log: bool = False,
                    first_sparse: int = 1, seed: int = 0, device="cpu", progress=None) -> TrainResult:
    """Train a ``shadowllm`` or ``dejavu`` predictor on one criterion of a criteria dataset."""
    if kind not in ("shadowllm", "dejavu"):
        raise ValueError(f"kind must be 'shadowllm' or 'dejavu', got {kind!r}")
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    tg = targets_from(tensors, criterion, first_sparse)
    N = tg.heads.shape[0]
    L_s = cfg.n_layers - first_sparse
    if tg.heads.shape[1:] != (L_s, cfg.n_heads) or tg.neurons.shape[1:] != (L_s, cfg.ffn):
        raise ValueError(f"dataset scores {tuple(tg.heads.shape)} / {tuple(tg.neurons.shape)} do not fit the model "
                         f"({L_s} sparse layers, {cfg.n_heads} heads, {cfg.ffn} neurons)")
    if kind == "shadowllm":
        x = tensors["attn0"].float()  # [N, E]
    else:
        x = tensors["inputs"].float()[:, first_sparse:]  # [N, L_s, E]
    tr, va = _split(N, val_fraction, seed)
    norm = Normaliser(normalisation, log).fit(Targets(tg.heads[tr], tg.neurons[tr]))
    y = norm.apply(tg)
    torch.manual_seed(seed)
    if kind == "shadowllm":
        pred = ShadowLLMPredictor(cfg, hidden or 2048, first_sparse, torch.float32, device)
    else:
        pred = DejaVuPredictor(cfg, hidden or 1024, first_sparse, torch.float32, device)
    pred.requires_grad_(True)
    x, yh, yn = x.to(device), y.heads.to(device), y.neurons.to(device)

    def forward(xb):
        if kind == "shadowllm":
            return pred(xb)  # heads [b, L_s, H], neurons [b, L_s, F]
        outs = [pred(xb[:, j], first_sparse + j) for j in range(L_s)]
        return torch.stack([h for h, _ in outs], 1), torch.stack([n for _, n in outs], 1)

    def loss_of(idx):
        h, n = forward(x[idx])
        # every output counts once: heads and neurons together, as one MSE over all outputs
        sq = (h - yh[idx]).pow(2).sum() + (n - yn[idx]).pow(2).sum()
        return sq / (idx.numel() * (yh.shape[1] * yh.shape[2] + yn.shape[1] * yn.shape[2]))

    opt = torch.optim.AdamW(pred.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(tr) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed + 1)
    history, best, best_state, best_epoch = [], float("inf"), None, 0
    tr_d, va_d = tr.to(device), va.to(device)
    for epoch in range(epochs):
        pred.train()
        order = tr_d[torch.randperm(len(tr), generator=gen).to(device)]
        total = 0.0
        for i in range(0, len(order), batch_size):
            idx = order[i: i + batch_size]
            loss = loss_of(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * idx.numel()
        with torch.no_grad():
            val = float(loss_of(va_d))
        history.append({"epoch": epoch + 1, "train_loss": total / len(tr), "val_loss": val})
        if val < best:
            best, best_epoch = val, epoch + 1
            best_state = copy.deepcopy(pred.state_dict())
        if progress is not None:
            progress.update(1)
            progress.set_postfix(val=f"{val:.4f}")
    pred.load_state_dict(best_state)
    pred.requires_grad_(False).eval()
    with torch.no_grad():
        h, n = forward(x[va_d])
    quality = rank_quality(Targets(h.cpu(), n.cpu()), Targets(tg.heads[va], tg.neurons[va]))
    pred.meta.update({"source": "trained", "criterion": criterion, **norm.describe(), "best_epoch": best_epoch,
                      "epochs": epochs, "n_train": len(tr), "n_val": len(va), "val_loss": best,
                      "spearman": quality})
    return TrainResult(pred, history, quality, best_epoch, len(tr), len(va), norm)
