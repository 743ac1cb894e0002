"""Tensor-parallel decoding (models.tp): 2 and 3 gloo processes on the CPU against one process, every mode, both
families; the plan rules across ranks; the CLI under torchrun, and a failing rank stopping the group."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from models.config import DecoderConfig
from models.generate import Generator
from models.modes import make_mode
from models.ops import TORCH
from models.plan import PlanBuffers, select_mask
from models.sparse_forward import sparse_logits
from models.tp import TensorParallel, init_from_env, shard_decoder

from helpers import random_importance, teacher_forced, tiny_decoder

ROOT = Path(__file__).resolve().parents[1]
# Divisible by 2 and 3: OPT 6 heads, 192 neurons; Llama 12 heads in 6 key-value groups, 96 neurons.
SHAPES = {"opt": dict(hidden=48, ffn=192, n_heads=6, n_kv_heads=6),
          "llama": dict(hidden=96, ffn=96, n_heads=12, n_kv_heads=6)}
# (mode, policy, granularity): every decode mode and the quality-only ones
DECODE_CASES = [("dense", None, "token"), ("static", "global", "token"), ("static", "local", "token"),
                ("dejavu", "local", "token"), ("dejavu", "local", "prompt"), ("shadowllm", "global", "token"),
                ("shadowllm", "local", "token"), ("shadowllm", "global", "prompt")]
QUALITY_CASES = DECODE_CASES + [("oracle", "local", "token"), ("oracle", "global", "token"),
                                ("threshold", "local", "token")]


def _model(family):
    return tiny_decoder(family, n_layers=3, **SHAPES[family])


def _mode(name, policy, granularity, model, sparsity=0.5):
    from models.predictors import random_predictor

    full = model.full_cfg
    predictor = (random_predictor(name, full, dtype=torch.float32, hidden=16, first_sparse=1, seed=7)
                 if name in ("dejavu", "shadowllm") else None)
    importance = random_importance(full, seed=3) if name == "static" else None
    if name == "threshold":
        importance = {site: torch.full((full.n_layers,), 0.05) for site in ("qkv", "o", "fc1", "fc2")}
    return make_mode(name, sparsity=sparsity, policy=policy, granularity=granularity, predictor=predictor,
                     importance=importance)


def _outputs(model):
    """Every case's teacher-forced decode logits and its all-position quality logits (both families' runs share
    this, one process or a rank)."""
    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, model.cfg.vocab, (2, 10), generator=g)
    out = {}
    for name, policy, gran in DECODE_CASES:
        gen = Generator(model, _mode(name, policy, gran, model), batch=2, max_len=16, backend=TORCH)
        out[("decode", name, policy, gran)] = teacher_forced(gen, tokens, 4)
    for name, policy, gran in QUALITY_CASES:
        mode = _mode(name, policy, gran, model).bind(model, TORCH)
        out[("quality", name, policy, gran)] = sparse_logits(model, tokens, mode, 4).float()
    gen = Generator(model, _mode("shadowllm", "global", "token", model), max_len=20, backend=TORCH)
    out[("tokens",)] = gen.generate(tokens[:1, :5], 12).tokens
    return out


def _rank(rank, world, store, result):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        tp = TensorParallel(rank, world)
        out = {fam: _outputs(shard_decoder(_model(fam), tp)) for fam in SHAPES}
        if rank == 0:
            torch.save(out, result)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_give_the_tokens_and_logits_of_one_process(world, tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(r, world, tmp_path / "store", tmp_path / "out.pt")) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0] * world
    got = torch.load(tmp_path / "out.pt")
    for fam in SHAPES:
        want = _outputs(_model(fam))
        assert set(got[fam]) == set(want)
        for key, ref in want.items():
            if key == ("tokens",):
                assert torch.equal(got[fam][key], ref), (fam, world)
                assert len(set(ref[0].tolist())) > 3  # a real continuation, not one repeated token
                continue
            assert got[fam][key].shape == ref.shape
            err = (got[fam][key] - ref).abs().max() / ref.abs().max()
            # the threshold mode keeps an entry by comparing it with a cut: a rank sums the partial block outputs
            # in another order than one process, and an entry within that rounding (1e-7) of its cut can fall on
            # the other side (here: 3 ranks, Llama, 2.5e-3); the top-k modes agree to 1e-6 here
            tol = 1e-2 if key[1] == "threshold" else 1e-5
            assert err <= tol, (fam, world, key, float(err))


def test_shards_split_the_weights_and_add_biases_once():
    model = _model("opt")
    shards = [shard_decoder(model, TensorParallel(r, 3)) for r in range(3)]
    assert [s.cfg.n_heads for s in shards] == [2, 2, 2] and shards[0].cfg.head_dim == model.cfg.head_dim
    layer = [s.layers[1] for s in shards]
    assert torch.equal(torch.cat([x.qkv_w for x in layer]), model.layers[1].qkv_w)
    assert torch.equal(torch.cat([x.out_w for x in layer], dim=1), model.layers[1].out_w)
    assert torch.equal(torch.cat([x.fc2_wt for x in layer]), model.layers[1].fc2_wt)
    assert torch.equal(layer[0].fc2_b, model.layers[1].fc2_b) and not layer[1].fc2_b.any()
    assert torch.equal(layer[2].ln1_w, model.layers[1].ln1_w)
    with pytest.raises(ValueError, match="already a tensor-parallel shard"):
        shard_decoder(shards[0], TensorParallel(0, 3))


def test_config_shard_errors_name_the_value():
    cfg = DecoderConfig.from_spec("smollm2-135m")
    assert cfg.shard(3).full() == cfg
    with pytest.raises(ValueError, match="n_heads = 9 does not split over 2 ranks"):
        cfg.shard(2)
    with pytest.raises(ValueError, match="world size must be a positive int, got 0"):
        cfg.shard(0)
    with pytest.raises(ValueError, match="no Hugging Face config"):
        cfg.shard(3).hf_dict()


@pytest.mark.parametrize("policy", ["local", "global"])
@pytest.mark.parametrize("rule", ["exact", "shard"])
def test_rank_plans_unite_to_the_rule(policy, rule):
    """Each rank's plan is its shard's part of one selection: the one-process top-k (exact) or every shard's own
    top-k of 1/world of the budget (shard, the same count on every rank)."""
    L, H, F, world = 4, 12, 48, 3
    g = torch.Generator().manual_seed(0)
    heads, neurons = torch.randn(L - 1, H, generator=g), torch.randn(L - 1, F, generator=g)
    kw = dict(n_layers=L, first=1, n_heads=H, head_dim=4, ffn=F, sparsity=0.5, policy=policy, device="cpu",
              ops=TORCH, n_kv_heads=6)
    ranks = []
    for r in range(world):
        b = PlanBuffers(**kw, shard=(r, world), tp_plan=rule)
        b.fill(1, heads, neurons)
        ranks.append(b)
    one = PlanBuffers(**kw)
    one.fill(1, heads, neurons)
    for i in range(1, L):
        got = torch.cat([b.layer(i).head_slot >= 0 for b in ranks])
        want = (one.layer(i).head_slot >= 0) if rule == "exact" else None
        if rule == "shard":
            # each rank: 2 of its 4 heads and 8 of its 16 neurons per layer (local), 3 layers' worth (global)
            want = select_mask(heads, 2 if policy == "local" else 6, policy, shards=world)[i - 1]
            counts = {int(b.neuron_count[i - 1]) for b in ranks}
            assert policy == "global" or counts == {8}
        assert torch.equal(got, want)
        nm = torch.zeros(F, dtype=torch.bool)
        for r, b in enumerate(ranks):
            n = int(b.neuron_count[i - 1])
            nm[b.neurons[i - 1, :n].long() + r * (F // world)] = True
        ref = torch.zeros(F, dtype=torch.bool)
        if rule == "exact":
            ref[one.neurons[i - 1, : int(one.neuron_count[i - 1])].long()] = True
        else:
            ref = select_mask(neurons, 8 if policy == "local" else 24, policy, shards=world)[i - 1]
        assert torch.equal(nm, ref)


def test_tp_needs_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_from_env(1) is None
    with pytest.raises(ValueError, match="--tp 2 needs 2 processes; this one sees WORLD_SIZE=1"):
        init_from_env(2)
    with pytest.raises(ValueError, match="--tp must be a positive int, got 0"):
        init_from_env(0)
    with pytest.raises(ValueError, match="tp_plan must be one of"):
        TensorParallel(0, 2, plan="half")


def _torchrun(args, cwd, env_extra=None, timeout=240):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               **(env_extra or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_latency_under_torchrun_writes_rows_once_with_the_world_size(tmp_path):
    args = ["-m", "bench.cli", "latency", "--models", "tiny", "--modes", "dense,shadowllm", "--gen", "4", "--prompt",
            "4", "--granularity", "token", "--policy", "global", "--tp", "2", "--out", "lat.jsonl", "--no-progress"]
    run = _torchrun(args, tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "lat.jsonl").read_text().splitlines()]
    assert {r["extra"]["tp"] for r in rows} == {2} and {r["mode"] for r in rows} == {"dense", "shadowllm"}
    assert len([r for r in rows if r["metric"] == "token_ms"]) == 2  # one rank wrote
    again = _torchrun(args, tmp_path)
    assert again.returncode == 0 and "0 rows appended" in again.stdout
    assert len((tmp_path / "lat.jsonl").read_text().splitlines()) == len(rows)


FAILING_RANK = """
import sys
import models.tp as tp
import bench.cli as cli

real = tp.init_from_env

def init_then_fail(*a, **k):
    group = real(*a, **k)
    if group.rank == 1:
        raise RuntimeError("injected failure on rank 1")
    return group

tp.init_from_env = init_then_fail
sys.exit(cli.main())
"""


def test_a_failing_rank_stops_the_group_with_its_error(tmp_path):
    (tmp_path / "fail.py").write_text(FAILING_RANK)
    run = _torchrun(["fail.py", "latency", "--models", "tiny", "--modes", "dense", "--gen", "4", "--prompt", "4",
                     "--tp", "2", "--out", "lat.jsonl", "--no-progress"], tmp_path)
    assert run.returncode != 0
    assert "rank 1 of 2 failed: RuntimeError: injected failure on rank 1" in run.stderr, \
        "\n".join(line for line in run.stderr.splitlines() if "failed" in line or "Error" in line)[-3000:]
    assert not (tmp_path / "lat.jsonl").exists() or not (tmp_path / "lat.jsonl").read_text().strip()


def test_hf_generate_is_left_out_of_tensor_parallel_latency():
    from bench import cli

    with pytest.raises(SystemExit, match="mode 'hf' .* runs in one process"):
        cli._latency(cli.build_parser().parse_args(["latency", "--models", "tiny", "--modes", "dense,hf", "--tp", "2"]))


def test_tp_flag_without_torchrun_is_one_line():
    with tempfile.TemporaryDirectory() as d:
        run = subprocess.run([sys.executable, "-m", "bench.cli", "latency", "--models", "tiny", "--tp", "2",
                              "--out", f"{d}/x.jsonl"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                             env={k: v for k, v in os.environ.items() if k != "WORLD_SIZE"})
    assert run.returncode != 0
    assert "--tp 2 needs 2 processes" in run.stderr and "Traceback" not in run.stderr
