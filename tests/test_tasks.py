"""Task loaders on the local data files, prompt formats, splits and bad input."""

import bz2
import shutil

import pytest

from bench.tasks import (
    DEFAULT_DATA_DIR,
    SPLITS,
    TASKS,
    DataError,
    available_tasks,
    load_task,
    wikitext2_text,
    with_shots,
)

HAVE_DATA = DEFAULT_DATA_DIR.is_dir()
needs_data = pytest.mark.skipif(not HAVE_DATA, reason=f"no data directory at {DEFAULT_DATA_DIR}")

COUNTS = {  # predictor, eval (see bench/tasks.py; OBQA's train.tsv line 3334 has five options and is skipped)
    "piqa": (919, 919), "copa": (400, 100), "openbookqa": (4956, 500), "winogrande": (2558, 1267),
    "rte": (2490, 277), "hellaswag": (5021, 5021), "arc_easy": (570, 2376)}


@needs_data
@pytest.mark.filterwarnings("ignore:.*record skipped")
def test_every_task_loads_with_lm_eval_formats():
    assert all(v is None for v in available_tasks().values())
    for task in TASKS:
        for split, n in zip(SPLITS, COUNTS[task], strict=True):
            ex = load_task(task, split)
            assert len(ex) == n, (task, split)
            assert all(0 <= e.gold < len(e.choices) for e in ex)
            assert all(cont.startswith(" ") for e in ex for _, cont in e.choices)
    piqa = load_task("piqa", "eval")[0]
    assert piqa.choices[0][0].startswith("Question: ") and piqa.choices[0][0].endswith("\nAnswer:")
    copa = load_task("copa", "eval")[0]  # "The man turned on the faucet." + effect
    assert copa.choices[0][0] == "The man turned on the faucet therefore"
    assert copa.choices[copa.gold][1] == "  water flowed from the spout."  # lm-eval's two spaces
    wino = load_task("winogrande", "eval")[0]  # partial scoring: two contexts, one continuation
    assert wino.choices[0][1] == wino.choices[1][1] and wino.choices[0][0] != wino.choices[1][0]
    rte = load_task("rte", "eval")[0]
    assert [c for _, c in rte.choices] == [" True", " False"] and rte.choices[0][0].endswith("True or False?\nAnswer:")


@needs_data
def test_even_odd_splits_do_not_overlap():
    for task in ("piqa", "hellaswag"):
        a = {e.index for e in load_task(task, "predictor")}
        b = {e.index for e in load_task(task, "eval")}
        assert not a & b and all(i % 2 == 0 for i in a) and all(i % 2 == 1 for i in b)


@needs_data
def test_shots_come_from_the_pool_and_never_the_example():
    pool = load_task("copa", "predictor")
    ex = pool[3]
    shot = with_shots(ex, pool, 3)
    prefix = shot.choices[0][0][: -len(ex.choices[0][0])]
    assert prefix.count("\n\n") == 3 and ex.fewshot_text() not in prefix
    assert with_shots(ex, pool, 3) == shot  # deterministic
    with pytest.raises(ValueError, match="shots must be a non-negative int"):
        with_shots(ex, pool, -1)


@needs_data
def test_wikitext_rows_are_recovered():
    text = wikitext2_text()
    assert text.startswith("\n\n = Robert Boulter = \n") and len(text) > 1_000_000


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'mmlu'; known tasks: piqa, copa"):
        load_task("mmlu", "eval", tmp_path)
    with pytest.raises(ValueError, match="split must be one of"):
        load_task("copa", "test", tmp_path)
    with pytest.raises(DataError, match="copa/test.jsonl' is missing"):
        load_task("copa", "eval", tmp_path)
    (tmp_path / "copa").mkdir()
    (tmp_path / "copa" / "test.jsonl").write_text('{"premise": "A.", "choice1": "b", "choice2": "c", '
                                                  '"question": "cause", "label": 0}\n{not json\n')
    with pytest.raises(DataError, match=r"test.jsonl:2: not valid JSON"):
        load_task("copa", "eval", tmp_path)
    (tmp_path / "copa" / "test.jsonl").write_text('{"premise": "A.", "choice1": "b", "choice2": "c", '
                                                  '"question": "why", "label": 0}\n')
    with pytest.raises(DataError, match=r"test.jsonl:1: question 'why'"):
        load_task("copa", "eval", tmp_path)
    (tmp_path / "copa" / "test.jsonl").write_text("\n")
    with pytest.raises(DataError, match="holds no records"):
        load_task("copa", "eval", tmp_path)
    (tmp_path / "hellaswag").mkdir()
    (tmp_path / "hellaswag" / "hellaswag_val_full.txt.bz2").write_bytes(bz2.compress(b"ctx\nx\na\nb\nc\nd\n"))
    with pytest.raises(DataError, match="gold index 'x' is not an integer"):
        load_task("hellaswag", "eval", tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_task("copa", "eval", tmp_path / "nowhere")


@needs_data
def test_missing_task_is_reported(tmp_path):
    shutil.copytree(DEFAULT_DATA_DIR / "copa", tmp_path / "copa")
    status = available_tasks(tmp_path)
    assert status["copa"] is None and "piqa/valid.jsonl' is missing" in status["piqa"]
