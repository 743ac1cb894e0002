"""Training-free input sparsity (as TEAL does): per layer and per projection, the entries of the projection's
input whose magnitude is below a threshold are dropped, so the weight columns they multiply need not be read.

The thresholds are calibrated offline, once per target sparsity: on held-out text (WikiText-2 *validation*), a
dense pass records |input| at four sites of every layer, and each site's threshold is the magnitude below which
that fraction of its entries falls:

- ``qkv``: the Q/K/V projection's input (after the norm);
- ``o``: out_proj's input, every head's output (the attention outputs concatenated);
- ``fc1``: fc1's input (Llama: gate and up), after the norm;
- ``fc2``: fc2's input (Llama: down), the neurons' activations.

At use (:class:`models.modes.Threshold`) an entry of a position is kept when its magnitude is above the layer's
threshold (an exact zero, as ReLU gives, is always dropped): no predictor, nothing trained. A file holds the
thresholds of several sparsities (``{sparsity}.{site}`` -> [L] fp32).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SITES = ("qkv", "o", "fc1", "fc2")
# entries of each site kept per layer for the quantile (a uniform subsample bounds the memory of long texts)
_SAMPLE = 1 << 20


def _hooks(record):
    return {"qkv_in": lambda i, a: record("qkv", i, a) or a,
            "heads": lambda i, h: record("o", i, h) or h,
            "fc1_in": lambda i, a: record("fc1", i, a) or a,
            "neurons": lambda i, f: record("fc2", i, f) or f}


@torch.no_grad()
def calibrate(model, windows: list[list[int]], sparsities, *, seed: int = 0) -> dict:
    """Thresholds ``{sparsity: {site: [L]}}`` from dense passes over ``windows`` (token id lists)."""
    bad = [s for s in sparsities if not 0.0 <= s < 1.0]
    if bad or not sparsities:
        raise ValueError(f"sparsities must be in [0, 1), got {list(sparsities)}")
    if not windows:
        raise ValueError("calibration needs at least one window of text")
    L = model.cfg.n_layers
    seen: dict = {(site, i): [] for site in SITES for i in range(L)}
    gen = torch.Generator().manual_seed(seed)

    def record(site, i, t):
        v = t.detach().abs().float().flatten().cpu()
        if v.numel() > _SAMPLE:
            v = v[torch.randint(0, v.numel(), (_SAMPLE,), generator=gen)]
        seen[(site, i)].append(v)

    for ids in windows:
        model.prefill(torch.tensor([ids], device=model.device), all_logits=True, hooks=_hooks(record))
    out = {}
    for s in sparsities:
        out[float(s)] = {}
        for site in SITES:
            vals = []
            for i in range(L):
                v = torch.cat(seen[(site, i)])
                if v.numel() > _SAMPLE:
                    v = v[torch.randint(0, v.numel(), (_SAMPLE,), generator=gen)]
                vals.append(float(torch.quantile(v, s)) if s > 0 else 0.0)
            out[float(s)][site] = torch.tensor(vals, dtype=torch.float32)
    return out


def save_thresholds(path, table: dict, meta: dict) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"{s:g}.{site}": t.contiguous() for s, sites in table.items() for site, t in sites.items()}
    save_file(tensors, str(path), metadata={"shadowbench": json.dumps({"kind": "thresholds", **meta})})
    return path


def load_thresholds(path, sparsity: float, n_layers: int) -> dict:
    """The thresholds of one calibrated sparsity: ``{site: [L]}``."""
    from .files import read_tensors

    tensors = read_tensors(path, "thresholds file")
    have = sorted({float(k.rsplit(".", 1)[0]) for k in tensors})
    key = f"{sparsity:g}"
    missing = [site for site in SITES if f"{key}.{site}" not in tensors]
    if missing:
        raise ValueError(f"{path} has no thresholds for sparsity {sparsity:g} (calibrated: {have}); run "
                         f"`shadowbench calibrate --sparsity {sparsity:g}`")
    out = {site: tensors[f"{key}.{site}"].float() for site in SITES}
    for site, t in out.items():
        if tuple(t.shape) != (n_layers,):
            raise ValueError(f"{path}: thresholds {key}.{site} have shape {tuple(t.shape)}; the model has {n_layers} "
                             "layers")
    return out


class InputSparseLayer:
    """One layer's decode-step state of the threshold mode: each projection's weight transposed (rows = inputs, the
    layout :func:`shadow_kernels.gather_cols_gemv` reads) and its input threshold.

    :meth:`project` keeps the input entries above the threshold (a batch keeps the union of its sequences' entries,
    as the kernels take one index list), turns them into an index list and a count on the device (no host read: the
    step stays capturable in a CUDA graph) and reads only those rows (``ops.threshold_cols``:
    :func:`shadow_kernels.threshold_cols_gemv`). The last counts stay in ``counts`` (device tensors) for the step's
    byte count."""

    def __init__(self, weights_t: dict, thresholds: dict):
        self.weights_t = weights_t  # site -> [inputs, outputs]
        # site -> 0-d tensor in the weight's dtype (the inputs' dtype), converted once rather than every step
        self.thresholds = {site: t.to(weights_t[site].dtype) for site, t in thresholds.items()}
        self.counts: dict = {}

    def project(self, ops, site: str, a: torch.Tensor, bias=None, swiglu: bool = False) -> torch.Tensor:
        """Projection ``site`` of ``a``; ``swiglu``: ``a`` is the gate-and-up output and the input is
        ``silu(gate) * up``, made where the inputs are selected."""
        y, self.counts[site] = ops.threshold_cols(self.weights_t[site], a, self.thresholds[site], bias, swiglu=swiglu,
                                                  validate=False)
        return y

    def project_rms(self, ops, site: str, x, residual, norm_weight, eps):
        """Llama's residual add and RMS norm, then projection ``site`` of the normalised input: ``(y, x + residual)``
        (one launch before the GEMV where the batch allows, :func:`shadow_kernels.add_rms_threshold_cols_gemv`)."""
        y, self.counts[site], s = ops.add_rms_threshold_cols(self.weights_t[site], x, residual, norm_weight, eps,
                                                             self.thresholds[site], validate=False)
        return y, s

    def live_inputs(self) -> dict:
        """Inputs each projection read in the last step (reads the device)."""
        return {site: int(c) for site, c in self.counts.items()}
