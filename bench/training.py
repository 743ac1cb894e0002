"""``shadowbench train``'s unit of work: one predictor trained on one criterion, saved, and its rows recorded, or
found up to date and left alone.

A trained predictor is a case like any measurement: its settings (the criteria dataset's sha256, or for rows streamed
from the model the model and its sequences; kind, criterion, width, epochs, batch, learning rate, held-out fraction,
normalisation, log) form its key. When the results file
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


def _case(settings: dict, kind, criterion, *, neuron_input, ffn_hidden, shadowllm_input, head_share, out_dir, writer,
          force, stages=None):
    """The key of a training case (its settings and the predictor's variant), its file, and what the results already
    hold for it: ``(key, path, Trained or None)`` (None: train it)."""
    if kind == "dejavu":  # the neuron nets' input and width (ShadowLLM has one net)
        settings.update(neuron_input=neuron_input, ffn_hidden=ffn_hidden)
    if kind == "shadowllm" and shadowllm_input != "attn0":  # (absent: layer 0's attention output, as older rows)
        settings.update(shadowllm_input=shadowllm_input)
    if head_share is not None:  # (absent: one MSE over all outputs, as older rows)
        settings.update(head_share=head_share)
    if stages is not None and len(stages) > 1:  # (absent: one predictor, as older rows)
        settings.update(stages=list(stages))
    key = settings_key(settings)
    path = Path(out_dir) / f"{kind}-{criterion}.safetensors"
    found = [r for r in writer.resume() if r.get("kind") == "predictor" and r.get("status") == "ok"
             and (r.get("extra") or {}).get("case_key") == key]
    if found and not force and path.is_file() and _header_key(path) == key:
        return key, path, Trained(path, found, False)
    return key, path, None


def train_case(kind: str, criterion: str, *, data, tensors: dict, meta: dict, cfg, out_dir, writer, hidden=None,
               epochs=100, batch=32, lr=1e-3, val_fraction=0.2, test_fraction=0.2, normalisation="global", log=False,
               device="cpu", progress=None, force=False, neuron_input="mlp", ffn_hidden=None,
               shadowllm_input="attn0", head_share=None, stages=None) -> Trained:
    from models.train import train_predictor

    data = Path(data)
    settings = {"dataset_sha256": file_digest(data / "criteria.safetensors"), "kind": kind, "criterion": criterion,
                "hidden": hidden, "epochs": epochs, "batch": batch, "lr": lr, "val_fraction": val_fraction,
                "test_fraction": test_fraction,
                "normalisation": normalisation, "log": log if log == "log1p" else bool(log)}
    key, path, done = _case(settings, kind, criterion, neuron_input=neuron_input, ffn_hidden=ffn_hidden,
                            shadowllm_input=shadowllm_input, head_share=head_share, out_dir=out_dir, writer=writer,
                            force=force, stages=stages)
    if done is not None:
        return done
    sources = tensors.get("row_source")
    if sources is None and meta.get("examples"):  # sequence-level data: each example's task
        names = sorted({e[0] for e in meta["examples"]})
        import torch

        sources = torch.tensor([names.index(e[0]) for e in meta["examples"]])
    res = train_predictor(kind, cfg, tensors, criterion, hidden=hidden, epochs=epochs, batch_size=batch, lr=lr,
                          val_fraction=val_fraction, test_fraction=test_fraction, normalisation=normalisation,
                          log=log, device=device, progress=progress, sources=sources, neuron_input=neuron_input,
                          ffn_hidden=ffn_hidden, shadowllm_input=shadowllm_input, head_share=head_share,
                          stages=stages)
    res.predictor.meta.update({"dataset": str(data), "dataset_model": meta["model"], "case_key": key})
    saved = res.predictor.save(path)
    rows = predictor_rows(res, model=meta["model"], kind=kind, criterion=criterion, device=device, path=saved,
                          dataset=str(data), epochs=epochs, settings=settings, case_key=key)
    writer.write(rows)
    return Trained(saved, rows, True, res)


def stream_case(kind: str, criterion: str, *, model, sequences: list, sources: list, model_name: str, data: dict,
                out_dir, writer, hidden=None, epochs=10, batch=1024, lr=1e-3, val_fraction=0.1, test_fraction=0.1,
                normalisation="layer", log="log1p", pool_tokens=32768, model_batch=16, eval_rows=16384,
                neuron_input="mlp", ffn_hidden=None, progress=None, force=False, shadowllm_input="attn0",
                head_share=None, stages=None) -> Trained:
    """One predictor trained on rows streamed from ``model`` (:func:`models.train.train_streaming`), saved and its
    rows recorded; or found up to date (same model, sequences and settings) and left alone. ``data``: how the
    sequences were made (sources, token counts, shots, context), part of the key and of the rows."""
    import time

    from models.train import train_streaming

    settings = {"stream": data, "model": model_name, "model_dtype": str(model.dtype), "kind": kind,
                "criterion": criterion, "hidden": hidden, "epochs": epochs, "batch": batch, "lr": lr,
                "val_fraction": val_fraction, "test_fraction": test_fraction, "normalisation": normalisation,
                "log": log if log == "log1p" else bool(log), "pool_tokens": pool_tokens, "eval_rows": eval_rows}
    key, path, done = _case(settings, kind, criterion, neuron_input=neuron_input, ffn_hidden=ffn_hidden,
                            shadowllm_input=shadowllm_input, head_share=head_share, out_dir=out_dir, writer=writer,
                            force=force, stages=stages)
    if done is not None:
        return done
    t0 = time.time()
    res = train_streaming(kind, model, sequences, criterion, hidden=hidden, epochs=epochs, batch_size=batch, lr=lr,
                          val_fraction=val_fraction, test_fraction=test_fraction, normalisation=normalisation, log=log,
                          pool_tokens=pool_tokens, model_batch=model_batch, eval_rows=eval_rows,
                          neuron_input=neuron_input, ffn_hidden=ffn_hidden, progress=progress,
                          shadowllm_input=shadowllm_input, head_share=head_share, stages=stages)
    seconds = round(time.time() - t0, 1)
    res.predictor.meta.update({"dataset": "stream", "dataset_model": model_name, "case_key": key,
                               "stream": data, "sources": sources})
    saved = res.predictor.save(path)
    rows = predictor_rows(res, model=model_name, kind=kind, criterion=criterion, device=model.device, path=saved,
                          dataset="stream", epochs=epochs, settings=settings, case_key=key, seconds=seconds,
                          sources=sources)
    writer.write(rows)
    return Trained(saved, rows, True, res)
