"""``shadowbench train``'s unit of work: one predictor trained on one criterion, saved, and its rows recorded, or
found up to date and left alone.

A trained predictor is a case like any measurement: its settings (the criteria dataset's sha256, kind, criterion,
width, epochs, batch, learning rate, held-out fraction, normalisation, log) form its key. When the results file
holds that key's rows and the predictor file carries the same key in its header, nothing is trained or written
again; a changed setting retrains and writes new rows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .results import file_digest, predictor_rows, settings_key


@dataclass
class Trained:
    path: Path
    rows: list  # the rows of this predictor (written now, or found)
    fresh: bool  # trained now
    result: object = None  # models.train.TrainResult when fresh


def _header_key(path: Path) -> str | None:
    import json

    from models.files import read_header

    try:
        raw = read_header(path, "shadowbench", "predictor file")
        return json.loads(raw or "{}").get("case_key")
    except ValueError:
        return None


def train_case(kind: str, criterion: str, *, data, tensors: dict, meta: dict, cfg, out_dir, writer, hidden=None,
               epochs=100, batch=32, lr=1e-3, val_fraction=0.2, test_fraction=0.2, normalisation="global", log=False,
               device="cpu", progress=None, force=False, neuron_input="mlp", ffn_hidden=None) -> Trained:
    from models.train import train_predictor

    data = Path(data)
    settings = {"dataset_sha256": file_digest(data / "criteria.safetensors"), "kind": kind, "criterion": criterion,
                "hidden": hidden, "epochs": epochs, "batch": batch, "lr": lr, "val_fraction": val_fraction,
                "test_fraction": test_fraction,
                "normalisation": normalisation, "log": log if log == "log1p" else bool(log)}
    if kind == "dejavu":  # the neuron nets' input and width (ShadowLLM has one net)
        settings.update(neuron_input=neuron_input, ffn_hidden=ffn_hidden)
    key = settings_key(settings)
    path = Path(out_dir) / f"{kind}-{criterion}.safetensors"
    found = [r for r in writer.resume() if r.get("kind") == "predictor" and r.get("status") == "ok"
             and (r.get("extra") or {}).get("case_key") == key]
    if found and not force and path.is_file() and _header_key(path) == key:
        return Trained(path, found, False)
    sources = tensors.get("row_source")
    if sources is None and meta.get("examples"):  # sequence-level data: each example's task
        names = sorted({e[0] for e in meta["examples"]})
        import torch

        sources = torch.tensor([names.index(e[0]) for e in meta["examples"]])
    res = train_predictor(kind, cfg, tensors, criterion, hidden=hidden, epochs=epochs, batch_size=batch, lr=lr,
                          val_fraction=val_fraction, test_fraction=test_fraction, normalisation=normalisation,
                          log=log, device=device, progress=progress, sources=sources, neuron_input=neuron_input,
                          ffn_hidden=ffn_hidden)
    res.predictor.meta.update({"dataset": str(data), "dataset_model": meta["model"], "case_key": key})
    saved = res.predictor.save(path)
    rows = predictor_rows(res, model=meta["model"], kind=kind, criterion=criterion, device=device, path=saved,
                          dataset=str(data), epochs=epochs, settings=settings, case_key=key)
    writer.write(rows)
    return Trained(saved, rows, True, res)
