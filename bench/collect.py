"""Criteria datasets: pruning criteria and predictor inputs for task prompts (``shadowbench collect``).

For each task's *predictor* split (never its eval split, see :mod:`bench.tasks`) and each shot count,
every example's context (with that many solved examples before it) is the prompt and its gold
continuation the target. One forward and backward per batch (:func:`models.criteria.compute`) gives, per
example, every per-example criterion of every head and neuron, layer 0's attention output at the last
context position (the ShadowLLM predictor's input) and each layer's input and MLP input there (DejaVu's heads and
neurons).

Written to ``OUT/``:

- ``criteria.safetensors``: ``{criterion}.heads`` [N, L, H] and ``{criterion}.neurons`` [N, L, F]
  (fp32; aggregate-only criteria [L, H] / [L, F]), ``attn0`` [N, E] (fp32), ``inputs`` [N, L, E] and
  ``ffn_inputs`` [N, L, E] (fp16);
- ``meta.json``: model, criteria, shots, neuron site, per-task counts, tasks missing here and why, the
  split rule, the examples (task, index, shots) in row order, the commit;
- ``importance-{criterion}.safetensors``: the mean over examples (the aggregate for jacov/epenas), the
  ``static`` mode's input.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path

import torch

from models.criteria import AGGREGATE, Batch, check_criteria, compute

from .quality import encode_pair
from .results import git_commit
from .tasks import DataError, check_tasks, load_task, with_shots


def _examples(tasks, shots, per_task, data_dir, seed):
    """(task, index, shots, context, continuation) of the gold choices; ``per_task`` examples per task
    and shot count, drawn without replacement with a seeded generator."""
    out, counts, missing = [], {}, {}
    for task in tasks:
        try:
            pool = load_task(task, "predictor", data_dir)
        except DataError as e:
            missing[task] = str(e)
            continue
        rng = random.Random(f"{seed}/{task}")
        chosen = rng.sample(pool, min(per_task, len(pool))) if per_task else pool
        for k in shots:
            for ex in chosen:
                shot = with_shots(ex, pool, k, seed)
                ctx, cont = shot.choices[shot.gold]
                out.append((task, ex.index, k, ctx, cont))
        counts[task] = len(chosen) * len(shots)
    if not out:
        raise DataError(f"no task data found for {tasks}: " + "; ".join(missing.values()))
    return out, counts, missing


def collect(model, tokenizer, *, tasks, shots=(0,), criteria=("plainact", "l2norm"), per_task=50,
            batch_size=8, neuron_site="weight", data_dir=None, out_dir="runs/criteria", seed=0,
            model_name=None, progress=True) -> Path:
    tasks = check_tasks(tasks)
    criteria = check_criteria(criteria)
    shots = [int(s) for s in shots]
    examples, counts, missing = _examples(tasks, shots, per_task, data_dir, seed)
    max_len = model.cfg.max_positions
    pairs = []
    for task, index, _, ctx, cont in examples:
        c_ids, t_ids = encode_pair(tokenizer, ctx, cont)  # as accuracy() and lm-eval tokenize
        if not t_ids or len(t_ids) >= max_len:
            raise ValueError(f"{task} example {index}: a target of {len(t_ids)} tokens does not fit "
                             f"{max_len} positions")
        pairs.append((c_ids[-(max_len - len(t_ids)):], t_ids))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    per_example = [c for c in criteria if c not in AGGREGATE]
    store = {f"{c}.{k}": [] for c in per_example for k in ("heads", "neurons")}
    agg = {f"{c}.{k}": 0.0 for c in criteria if c in AGGREGATE for k in ("heads", "neurons")}
    n_agg = 0
    attn0, inputs, ffn_inputs, losses = [], [], [], []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(pairs), desc="collect", unit="ex")
    t0 = time.time()
    for i in range(0, len(pairs), batch_size):
        batch = Batch.from_pairs(pairs[i: i + batch_size], device=model.device)
        res = compute(model, batch, criteria, neuron_site=neuron_site)
        for c in per_example:
            for k in ("heads", "neurons"):
                store[f"{c}.{k}"].append(res[c][k].float().cpu())
        if agg and batch.tokens.shape[0] >= 2:  # a correlation needs two examples
            for key in agg:
                c, k = key.split(".")
                agg[key] = agg[key] + res[c][k][0].float().cpu()
            n_agg += 1
        attn0.append(res["attn0"].float().cpu())
        inputs.append(res["inputs"].half().cpu())
        ffn_inputs.append(res["ffn_inputs"].half().cpu())
        losses.append(res["loss"].float().cpu())
        if bar is not None:
            bar.update(batch.tokens.shape[0])
    if bar is not None:
        bar.close()
    tensors = {k: torch.cat(v) for k, v in store.items()}
    if agg:
        if n_agg == 0:
            raise ValueError(f"{', '.join(c for c in criteria if c in AGGREGATE)} need batches of at least 2 examples")
        tensors.update({k: v / n_agg for k, v in agg.items()})
    tensors.update(attn0=torch.cat(attn0), inputs=torch.cat(inputs), ffn_inputs=torch.cat(ffn_inputs),
                   loss=torch.cat(losses))
    from safetensors.torch import save_file

    save_file(tensors, str(out_dir / "criteria.safetensors"))
    for c in criteria:
        imp = {k: (tensors[f"{c}.{k}"] if c in AGGREGATE else tensors[f"{c}.{k}"].mean(0)).contiguous()
               for k in ("heads", "neurons")}
        save_file(imp, str(out_dir / f"importance-{c}.safetensors"))
    cfg = model.cfg
    meta = {
        "model": model_name or cfg.name, "config": dataclasses.asdict(cfg),
        "family": cfg.family, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.n_kv_heads, "ffn": cfg.ffn, "hidden": cfg.hidden, "dtype": str(model.dtype),
        "tokenizer": getattr(tokenizer, "name", None), "criteria": criteria,
        "aggregate_only": [c for c in criteria if c in AGGREGATE], "aggregate_batches": n_agg,
        "shots": shots, "neuron_site": neuron_site, "per_task": per_task, "seed": seed,
        "tasks": counts, "missing_tasks": missing, "n_examples": len(pairs),
        "split": "predictor splits of bench.tasks (PIQA/HellaSwag: even records of validation)",
        "predictor_input_position": "last context token",
        "examples": [[t, i, k] for t, i, k, _, _ in examples],
        "commit": git_commit(), "seconds": round(time.time() - t0, 1),
    }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1))
    return out_dir


def load_dataset(path) -> tuple[dict, dict]:
    """The tensors and metadata of a criteria directory written by :func:`collect`."""
    from models.files import read_json, read_tensors

    path = Path(path)
    if not (path / "criteria.safetensors").is_file() or not (path / "meta.json").is_file():
        raise ValueError(f"{str(path)!r} is not a criteria directory (needs criteria.safetensors and meta.json; "
                         "make one with `shadowbench collect`)")
    meta = read_json(path / "meta.json", "criteria metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict) or "model" not in meta:
        raise ValueError(f"{path / 'meta.json'} lacks 'config' and 'model' (not written by `shadowbench collect`)")
    return read_tensors(path / "criteria.safetensors", "criteria file"), meta


# ---------------------------------------------------------------- per-token targets (shadowbench collect --per-token)
TOKEN_CRITERIA = ("l2norm", "plainact")


def token_sequences(tokenizer, *, tasks, shots=(0,), per_task=40, wikitext_tokens=32768, context=512, data_dir=None,
                    seed=0) -> tuple[list, list, dict]:
    """The sequences whose every position is a training row: WikiText-2 *validation* text in windows of
    ``context`` tokens (the first ``wikitext_tokens``), and each task's predictor-split examples with ``shots``
    solved examples before them, context and gold continuation (cut to ``context`` tokens from the left). Returns
    ``(sources, [(source index, ids)], missing tasks)``."""
    from .tasks import wikitext2_valid_text

    sources, seqs = [], []
    if wikitext_tokens:
        ids = tokenizer.encode(wikitext2_valid_text(data_dir), special=False)[:wikitext_tokens]
        sources.append("wikitext2-valid")
        seqs += [(0, ids[i: i + context]) for i in range(0, len(ids) - 1, context) if len(ids[i: i + context]) > 1]
    missing = {}
    if tasks:
        examples, _, missing = _examples(tasks, shots, per_task, data_dir, seed)
        for task, _, _, ctx, cont in examples:
            if task not in sources:
                sources.append(task)
            c_ids, t_ids = encode_pair(tokenizer, ctx, cont)
            seqs.append((sources.index(task), (c_ids + t_ids)[-context:]))
    if not seqs:
        raise ValueError("no sequences: give --wikitext-tokens > 0 or tasks with data here")
    return sources, seqs, missing


def collect_tokens(model, tokenizer, *, tasks=(), shots=(0,), per_task=40, wikitext_tokens=32768, context=512,
                   criteria=TOKEN_CRITERIA, batch_size=4, data_dir=None, out_dir="runs/criteria-tokens", seed=0,
                   model_name=None, with_inputs=True, progress=True, under_oracle: float | None = None) -> Path:
    """Per-token importance targets: every position of every sequence of :func:`token_sequences` is one row.

    One forward and backward per batch (the loss: every next-token NLL of the batch) gives, per position,
    ``l2norm`` (a head's output L2 norm, a neuron's |activation|) and ``plainact`` (``|A * dL/dA|`` summed over a
    head's output, or of one neuron's activation; the gradient of the whole sequence's loss), with the predictor
    inputs of that position: layer 0's attention output (``attn0``), each layer's input (``inputs``) and its MLP's
    normalised input (``ffn_inputs``). Written
    like :func:`collect`'s datasets (fp16), so ``shadowbench train`` takes it, plus ``row_group`` (the sequence of
    each row: splits keep a sequence on one side) and ``row_source`` (index into ``meta["sources"]``).

    ``under_oracle`` s: the rows come from the *sparse* trajectory a sparse model actually follows. Every position
    after the first runs the oracle at sparsity s (local top-k, :mod:`models.sparse_forward`), so each layer's input
    and MLP input are those of a model already sparse in the layers before; the targets are what every head and
    neuron of the layer would give on that input, before the plan drops some (l2norm only). A predictor trained on
    the dense trajectory sees inputs at inference that drift from its training data, more with every sparse layer."""
    from models.criteria import length_batches, token_rows

    bad = [c for c in criteria if c not in TOKEN_CRITERIA]
    if bad:
        raise ValueError(f"per-token criteria are {TOKEN_CRITERIA}; got {bad}")
    if context < 2 or context > model.cfg.max_positions:
        raise ValueError(f"context must be in [2, {model.cfg.max_positions}], got {context}")
    oracle = None
    if under_oracle is not None:
        from models.modes import Oracle

        if list(criteria) != ["l2norm"]:
            raise ValueError(f"under_oracle collects l2norm only (a gradient through a dropped unit is zero); got "
                             f"criteria {list(criteria)}")
        oracle = Oracle(under_oracle, "local").bind(model)
    sources, seqs, missing = token_sequences(tokenizer, tasks=tasks, shots=shots, per_task=per_task,
                                             wikitext_tokens=wikitext_tokens, context=context, data_dir=data_dir,
                                             seed=seed)
    store = {f"{c}.{k}": [] for c in criteria for k in ("heads", "neurons")}
    attn0, inputs, ffn_inputs, group, source, position = [], [], [], [], [], []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(ids) for _, ids in seqs), desc="collect tokens", unit="tok")
    t0 = time.time()
    for idx, tokens, lengths in length_batches(seqs, batch_size):
        P = tokens.shape[1]
        tokens = tokens.to(model.device)
        extra = None
        if oracle is not None:  # record each activation, then apply the oracle's plan of its position
            from models.sparse_forward import PositionPlans, oracle_scores

            plans = PositionPlans(model, oracle, 1, P, len(idx))
            plans.set_oracle(*oracle_scores(model, tokens))
            extra = plans.hooks()
        rows = token_rows(model, tokens, lengths, criteria, with_inputs=with_inputs, extra_hooks=extra)
        for c in criteria:
            for k in ("heads", "neurons"):
                store[f"{c}.{k}"].append(rows[f"{c}.{k}"].half().cpu())
        attn0.append(rows["attn0"].half().cpu())
        if with_inputs:
            inputs.append(rows["inputs"].half().cpu())
            ffn_inputs.append(rows["ffn_inputs"].half().cpu())
        for i in idx:
            n = len(seqs[i][1])
            group.append(torch.full((n,), i, dtype=torch.int32))
            source.append(torch.full((n,), seqs[i][0], dtype=torch.int32))
            position.append(torch.arange(n, dtype=torch.int32))
        if bar is not None:
            bar.update(int(lengths.sum()))
    if bar is not None:
        bar.close()
    tensors = {k: torch.cat(v) for k, v in store.items()}
    tensors.update(attn0=torch.cat(attn0), row_group=torch.cat(group), row_source=torch.cat(source),
                   row_position=torch.cat(position))
    if with_inputs:
        tensors["inputs"] = torch.cat(inputs)
        tensors["ffn_inputs"] = torch.cat(ffn_inputs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file(tensors, str(out_dir / "criteria.safetensors"))
    for c in criteria:  # the per-unit means over every position: static mode's importance from the same data
        imp = {k: tensors[f"{c}.{k}"].float().mean(0).contiguous() for k in ("heads", "neurons")}
        save_file(imp, str(out_dir / f"importance-{c}.safetensors"))
    cfg = model.cfg
    meta = {
        "model": model_name or cfg.name, "config": dataclasses.asdict(cfg), "family": cfg.family,
        "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads, "ffn": cfg.ffn,
        "hidden": cfg.hidden, "dtype": str(model.dtype), "tokenizer": getattr(tokenizer, "name", None),
        "criteria": list(criteria), "aggregate_only": [], "granularity": "token", "rows": len(tensors["attn0"]),
        "sequences": len(seqs), "sources": sources, "context": context, "wikitext_tokens": wikitext_tokens,
        "tasks": list(tasks), "shots": [int(s) for s in shots], "per_task": per_task, "missing_tasks": missing,
        "seed": seed, "neuron_site": "activation",
        "split": "WikiText-2 validation; the tasks' predictor splits (never eval, never WikiText-2 test)",
        "predictor_input_position": "every position (its own)", "commit": git_commit(),
        "trajectory": "dense" if under_oracle is None else {"mode": "oracle", "sparsity": under_oracle,
                                                             "policy": "local", "kv_rule": "skip"},
        "seconds": round(time.time() - t0, 1),
    }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1))
    return out_dir
