"""The seven multiple-choice tasks and WikiText-2, read from local files (``../shared/data`` layout).

Each task becomes a list of :class:`Example`: for every choice a (context, continuation) pair, and the
gold index. Prompt formats, choice strings and preprocessing follow lm-evaluation-harness's task
definitions (``piqa``, ``copa`` of SuperGLUE, ``openbookqa``, ``winogrande`` with partial scoring,
``sglue_rte``, ``hellaswag``, ``arc_easy``); the continuation carries lm-eval's target delimiter " " (for
COPA, whose choices already begin with a space, that makes two, as lm-eval scores them).

Splits: ``predictor`` (examples for criteria collection and predictor training) and ``eval`` (accuracy),
never overlapping:

========== ======================================= =============================================
task       predictor                               eval
========== ======================================= =============================================
piqa       valid.jsonl, even record numbers        valid.jsonl, odd record numbers
copa       train.jsonl + dev.jsonl (official train) test.jsonl (official validation)
openbookqa Main/train.tsv                          Main/test.tsv
winogrande train_m.jsonl                           dev.jsonl (v1.1.beta dev)
rte        train.jsonl                             val.jsonl
hellaswag  val_full, even task numbers             val_full, odd task numbers
arc_easy   ARC-Easy-Dev.jsonl (validation)         llm-foundry-icl arc_easy.jsonl (test)
========== ======================================= =============================================

PIQA and HellaSwag have no training split here, hence the even/odd split of their validation sets.
Known deviation: the HellaSwag file is llama.cpp's text export, where ``ctx_b`` is not capitalised as
lm-eval does, so contexts can differ from lm-eval's in one letter.
"""

from __future__ import annotations

import bz2
import json
import os
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

TASKS = ("piqa", "copa", "openbookqa", "winogrande", "rte", "hellaswag", "arc_easy")
SPLITS = ("predictor", "eval")
# the checkout's sibling ../shared/data, or SHADOWBENCH_DATA
DEFAULT_DATA_DIR = Path(os.environ.get("SHADOWBENCH_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
FEWSHOT_DELIMITER = "\n\n"


@dataclass(frozen=True)
class Example:
    task: str
    index: int  # record number in its source file (0-based), or in the concatenation of two files
    choices: tuple[tuple[str, str], ...]  # (context, continuation) per choice
    gold: int

    def fewshot_text(self) -> str:
        context, continuation = self.choices[self.gold]
        return context + continuation


class DataError(ValueError):
    """A data file is missing or malformed (the message names the file and line)."""


def data_dir(path=None) -> Path:
    d = Path(path) if path is not None else DEFAULT_DATA_DIR
    if not d.is_dir():
        raise DataError(f"data directory {str(d)!r} does not exist (pass --data-dir; see ../shared/data/README.md)")
    return d


def _need(path: Path) -> Path:
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} is missing")
    return path


def _jsonl(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(_need(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    if not rows:
        raise DataError(f"data file {str(path)!r} holds no records")
    return rows


def _field(row: dict, key: str, path: Path, n: int, kind=str):
    if key not in row or not isinstance(row[key], kind):
        raise DataError(f"{path}:{n}: record has no {kind.__name__} field {key!r}")
    return row[key]


def _labels(path: Path, n_rows: int) -> list[int]:
    lines = [ln.strip() for ln in _need(path).read_text().splitlines() if ln.strip()]
    if len(lines) != n_rows:
        raise DataError(f"{path} has {len(lines)} labels for {n_rows} records")
    out = []
    for n, ln in enumerate(lines, 1):
        if not ln.lstrip("-").isdigit():
            raise DataError(f"{path}:{n}: label {ln!r} is not an integer")
        out.append(int(ln))
    return out


def _gold(value, n_choices: int, where: str) -> int:
    if not isinstance(value, int) or not 0 <= value < n_choices:
        raise DataError(f"{where}: gold label {value!r} is not in 0..{n_choices - 1}")
    return value


def _even_odd(items: list, split: str) -> list:
    return items[0::2] if split == "predictor" else items[1::2]


# ------------------------------------------------------------------ per task
def _piqa(d: Path, split: str) -> list[Example]:
    path = d / "piqa" / "valid.jsonl"
    rows = _jsonl(path)
    labels = _labels(d / "piqa" / "valid-labels.lst", len(rows))
    out = []
    for i, (row, lab) in enumerate(zip(rows, labels, strict=True)):
        ctx = f"Question: {_field(row, 'goal', path, i + 1)}\nAnswer:"
        sols = [_field(row, k, path, i + 1) for k in ("sol1", "sol2")]
        out.append(Example("piqa", i, tuple((ctx, " " + s) for s in sols), _gold(lab, 2, f"{path}:{i + 1}")))
    return _even_odd(out, split)


def _copa(d: Path, split: str) -> list[Example]:
    files = ["train.jsonl", "dev.jsonl"] if split == "predictor" else ["test.jsonl"]
    out = []
    for name in files:
        path = d / "copa" / name
        for n, row in enumerate(_jsonl(path), 1):
            premise = _field(row, "premise", path, n).strip()
            question = _field(row, "question", path, n)
            if question not in ("cause", "effect"):
                raise DataError(f"{path}:{n}: question {question!r} is neither 'cause' nor 'effect'")
            ctx = premise[:-1] + " " + {"cause": "because", "effect": "therefore"}[question]
            choices = []
            for k in ("choice1", "choice2"):
                c = _field(row, k, path, n)
                # lm-eval's COPA choices start with a space and it adds its target delimiter " " in front:
                # the continuation it scores has two spaces, and so does ours (tests/test_lmeval.py)
                choices.append((ctx, "  " + c[0].lower() + c[1:]))
            out.append(Example("copa", len(out), tuple(choices), _gold(row.get("label"), 2, f"{path}:{n}")))
    return out


_OBQA_CHOICE = re.compile(r"\(([A-D])\)\s*")


def _openbookqa(d: Path, split: str) -> list[Example]:
    path = d / "openbookqa" / "Main" / ("train.tsv" if split == "predictor" else "test.tsv")
    lines = _need(path).read_text(encoding="utf-8").splitlines()
    if not lines or not lines[0].startswith("ID\t"):
        raise DataError(f"{path}:1: expected a header starting with 'ID'")
    out = []
    for n, line in enumerate(lines[1:], 2):
        cols = line.split("\t")
        if len(cols) != 5:
            raise DataError(f"{path}:{n}: expected 5 tab-separated columns, got {len(cols)}")
        _, stem, choices, _, key = cols
        parts = _OBQA_CHOICE.split(choices.strip())  # ['', 'A', text, 'B', text, ...]
        labels, texts = parts[1::2], [t.strip() for t in parts[2::2]]
        if labels != ["A", "B", "C", "D"] or key.strip() not in labels:
            msg = f"{path}:{n}: choices {choices!r} / answer {key!r} are not four (A)-(D) options"
            if split == "eval":
                raise DataError(msg)
            warnings.warn(msg + "; record skipped (predictor split)", stacklevel=2)  # train.tsv line 3334
            continue
        out.append(Example("openbookqa", len(out), tuple((stem, " " + t) for t in texts),
                           labels.index(key.strip())))
    return out


def _winogrande(d: Path, split: str) -> list[Example]:
    name = "train_m" if split == "predictor" else "dev"
    path = d / "winogrande" / f"{name}.jsonl"
    rows = _jsonl(path)
    labels = _labels(d / "winogrande" / f"{name}-labels.lst", len(rows))
    out = []
    for i, (row, lab) in enumerate(zip(rows, labels, strict=True)):
        sentence = _field(row, "sentence", path, i + 1)
        if sentence.count("_") != 1:
            raise DataError(f"{path}:{i + 1}: sentence needs exactly one '_' blank")
        cut = sentence.index("_")
        target = " " + sentence[cut + 1:].strip()  # partial scoring: the text after the blank
        opts = [_field(row, k, path, i + 1) for k in ("option1", "option2")]
        out.append(Example("winogrande", i, tuple((sentence[:cut] + o, target) for o in opts),
                           _gold(lab - 1, 2, f"{path}:{i + 1}")))
    return out


def _rte(d: Path, split: str) -> list[Example]:
    path = d / "rte" / ("train.jsonl" if split == "predictor" else "val.jsonl")
    out = []
    for n, row in enumerate(_jsonl(path), 1):
        premise, hypothesis = _field(row, "premise", path, n), _field(row, "hypothesis", path, n)
        ctx = f"{premise}\nQuestion: {hypothesis} True or False?\nAnswer:"
        label = _field(row, "label", path, n)
        if label not in ("entailment", "not_entailment"):
            raise DataError(f"{path}:{n}: label {label!r} is neither 'entailment' nor 'not_entailment'")
        out.append(Example("rte", n - 1, ((ctx, " True"), (ctx, " False")), 0 if label == "entailment" else 1))
    return out


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(d: Path, split: str) -> list[Example]:
    path = d / "hellaswag" / "hellaswag_val_full.txt.bz2"
    lines = bz2.decompress(_need(path).read_bytes()).decode("utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise DataError(f"{path}: {len(lines)} lines is not a whole number of 6-line tasks")
    out = []
    for t in range(len(lines) // 6):
        ctx, gold, *endings = lines[6 * t: 6 * t + 6]
        if not gold.strip().isdigit():
            raise DataError(f"{path}:{6 * t + 2}: gold index {gold!r} is not an integer")
        ctx = _hellaswag_clean(ctx)
        out.append(Example("hellaswag", t, tuple((ctx, " " + _hellaswag_clean(e)) for e in endings),
                           _gold(int(gold), 4, f"{path}:{6 * t + 2}")))
    return _even_odd(out, split)


def _arc_easy(d: Path, split: str) -> list[Example]:
    out = []
    if split == "predictor":
        path = d / "arc_easy" / "ARC-Easy-Dev.jsonl"
        for n, row in enumerate(_jsonl(path), 1):
            q = _field(row, "question", path, n, dict)
            choices = _field(q, "choices", path, n, list)
            labels = [c.get("label") for c in choices]
            key = _field(row, "answerKey", path, n)
            if key not in labels:
                raise DataError(f"{path}:{n}: answerKey {key!r} is not one of the labels {labels}")
            ctx = f"Question: {_field(q, 'stem', path, n)}\nAnswer:"
            out.append(Example("arc_easy", n - 1, tuple((ctx, " " + c["text"]) for c in choices), labels.index(key)))
        return out
    path = d / "llm-foundry-icl" / "world_knowledge" / "arc_easy.jsonl"
    for n, row in enumerate(_jsonl(path), 1):
        query = _field(row, "query", path, n)
        choices = _field(row, "choices", path, n, list)
        ctx = query + "\nAnswer:"
        out.append(Example("arc_easy", n - 1, tuple((ctx, " " + c) for c in choices),
                           _gold(row.get("gold"), len(choices), f"{path}:{n}")))
    return out


_LOADERS = {"piqa": _piqa, "copa": _copa, "openbookqa": _openbookqa, "winogrande": _winogrande, "rte": _rte,
            "hellaswag": _hellaswag, "arc_easy": _arc_easy}


def check_tasks(names) -> list[str]:
    names = [names] if isinstance(names, str) else list(names)
    for n in names:
        if n not in TASKS:
            raise ValueError(f"unknown task {n!r}; known tasks: {', '.join(TASKS)}")
    if not names:
        raise ValueError(f"no task given; known tasks: {', '.join(TASKS)}")
    return names


def load_task(name: str, split: str, data_dir_path=None, limit: int | None = None) -> list[Example]:
    """Examples of one task and split (the first ``limit`` of them when given)."""
    (name,) = check_tasks([name])
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    examples = _LOADERS[name](data_dir(data_dir_path), split)
    if not examples:
        raise DataError(f"task {name!r} split {split!r} has no examples")
    return examples[:limit] if limit is not None else examples


def available_tasks(data_dir_path=None, splits=SPLITS, names=None) -> dict[str, str | None]:
    """For each task (``names``, default all): None when its ``splits`` load (the first example of each
    is read), else the reason they do not."""
    out = {}
    for name in TASKS if names is None else names:
        try:
            for split in splits:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    load_task(name, split, data_dir_path, limit=1)
            out[name] = None
        except DataError as e:
            out[name] = str(e)
    return out


def with_shots(example: Example, pool: list[Example], shots: int, seed: int = 1234) -> Example:
    """``example`` with ``shots`` solved examples from ``pool`` (never itself) before each context,
    joined by a blank line as lm-eval does; drawn with a generator seeded by (seed, task, index)."""
    if not isinstance(shots, int) or shots < 0:
        raise ValueError(f"shots must be a non-negative int, got {shots!r}")
    if shots == 0:
        return example
    candidates = [e for e in pool if not (e.task == example.task and e.index == example.index
                                          and e.choices == example.choices)]
    if len(candidates) < shots:
        raise ValueError(f"{shots} shots need {shots} other examples; the pool has {len(candidates)}")
    rng = random.Random(f"{seed}/{example.task}/{example.index}")
    prefix = "".join(e.fewshot_text() + FEWSHOT_DELIMITER for e in rng.sample(candidates, shots))
    return Example(example.task, example.index, tuple((prefix + c, t) for c, t in example.choices), example.gold)


# ------------------------------------------------------------------ WikiText-2
def wikitext2_text(data_dir_path=None) -> str:
    """The wikitext-2-raw-v1 test split as the usual ``"\\n\\n".join(rows)`` (rows recovered as the data
    README describes)."""
    path = _need(data_dir(data_dir_path) / "wikitext2" / "raw" / "test.txt")
    pieces = path.read_text(encoding="utf-8").split("\n")
    rows, i = [], 0
    while i < len(pieces):
        if pieces[i] == "":
            rows.append("")
            i += 1
        else:
            rows.append(pieces[i] + "\n")
            i += 2  # a non-empty row is followed by one empty piece
    if not any(rows):
        raise DataError(f"{path} holds no text")
    return "\n\n".join(rows)


_DETOKENIZE = [(" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" , ", ", "), (" . ", ". "), (" ; ", "; "),
               (" : ", ": "), (" 's", "'s"), (" n't", "n't"), ("( ", "("), (" )", ")")]


def wikitext2_valid_text(data_dir_path=None) -> str:
    """WikiText-2's validation split, the only validation text here (its tokenized form: ``<unk>`` kept, the
    word-level tokenization's spacing undone for the common cases). For predictor training data only: the test
    split stays for evaluation."""
    path = _need(data_dir(data_dir_path) / "wikitext2" / "tokenized" / "valid.txt")
    text = path.read_text(encoding="utf-8")
    for a, b in _DETOKENIZE:
        text = text.replace(a, b)
    if not text.strip():
        raise DataError(f"{path} holds no text")
    return text
