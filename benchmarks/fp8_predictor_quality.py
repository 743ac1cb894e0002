"""How much ranking quality a predictor loses when its second layer is stored in fp8 (quantize_rows_fp8).

On a criteria dataset and trained predictors (``shadowbench collect`` / ``train``), with the validation
split that ``train`` held out (same fraction and seed): Spearman rho against the criterion, local and
global, for the stored weights and for the fp8 second layer; and the share of units that both select at
s=0.5 (per layer top half). One JSON row per predictor and metric.

    python benchmarks/fp8_predictor_quality.py --data runs/criteria/smollm2 --predictors runs/predictors/smollm2 \\
        --out results/quality/smollm2-fp8-predictor.jsonl
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.collect import load_dataset
from bench.results import RowWriter, git_commit, make_row
from models.config import DecoderConfig
from models.predictors import load_predictor
from models.train import Targets, _split, rank_quality, targets_from
from shadow_kernels.fused_predictor import fused_predictor_ref, quantize_rows_fp8


def scores(pred, kind, x, fp8: bool) -> Targets:
    def run(inp, layer):
        w1, b1, w2, b2 = pred.weights(layer)
        if fp8:
            q, s = quantize_rows_fp8(w2)
            return fused_predictor_ref(inp, w1, b1, q, b2, w2_scale=s)
        return fused_predictor_ref(inp, w1, b1, w2, b2)

    if kind == "shadowllm":
        h, n = pred.split(run(x, None))
        return Targets(h, n)
    outs = [pred.split(run(x[:, j], pred.first_sparse + j)) for j in range(pred.n_sparse)]
    return Targets(torch.stack([h for h, _ in outs], 1), torch.stack([n for _, n in outs], 1))


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of the per-layer top half that two score tensors [N, L, U] select in common."""
    k = a.shape[-1] // 2
    top = lambda t: torch.zeros_like(t, dtype=torch.bool).scatter_(-1, t.topk(k, dim=-1).indices, True)
    return float((top(a) & top(b)).sum() / (a.shape[0] * a.shape[1] * k))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--predictors", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="smollm2")
    args = ap.parse_args()
    tensors, meta = load_dataset(args.data)
    cfg = DecoderConfig(**meta["config"])
    writer = RowWriter(args.out)
    for path in sorted(Path(args.predictors).glob("*.safetensors")):
        pred = load_predictor(path, cfg, dtype=torch.float32, device="cpu")
        kind, crit = pred.kind, pred.meta["criterion"]
        tg = targets_from(tensors, crit, pred.first_sparse)
        _, va = _split(tg.heads.shape[0], pred.meta["n_val"] / (pred.meta["n_val"] + pred.meta["n_train"]), 0)
        if kind == "shadowllm":
            x = tensors["attn0"].float()[va]
        else:
            x = tensors["inputs"].float()[va][:, pred.first_sparse:]
        true = Targets(tg.heads[va], tg.neurons[va])
        full, fp8 = scores(pred, kind, x, False), scores(pred, kind, x, True)
        rows = []
        common = dict(kind="predictor", model=args.model, mode=kind, criterion=crit, device="cpu", dtype="float32",
                      git_commit=git_commit(), path=str(path), n_val=len(va),
                      normalisation=pred.meta.get("normalisation"))
        for dtype, t in (("model", full), ("fp8", fp8)):
            for unit, d in rank_quality(t, true).items():
                for scope, v in d.items():
                    rows.append(make_row(**common, metric=f"spearman_{scope}_{unit}", value=v, unit="rho",
                                         predictor_dtype=dtype))
        for unit in ("heads", "neurons"):
            rows.append(make_row(**common, metric=f"top_half_agreement_{unit}", value=agreement(
                getattr(full, unit), getattr(fp8, unit)), unit="fraction", predictor_dtype="fp8"))
        writer.write(rows)
        print(kind, crit, {r["metric"] + "/" + r["extra"]["predictor_dtype"]: round(r["value"], 4) for r in rows})


if __name__ == "__main__":
    main()
