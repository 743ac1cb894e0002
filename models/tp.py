"""Tensor-parallel decoding on ``torch.distributed`` (NCCL on GPUs, gloo on CPUs), Megatron's layout.

Each of ``world`` ranks holds a contiguous share of every layer's heads (OPT: their Q/K/V rows; Llama: whole
key-value groups with their query heads) and neurons (fc1 / gate and up rows); the output projection and fc2
(down) take the matching columns, so each produces a partial sum of the block's output, and one all-reduce per
block (:meth:`models.decoder.DecoderBase.reduce`) makes the residual stream whole on every rank again. Their biases
are added once, by rank 0. Embeddings, norms and the LM head are replicated, so every rank computes the same logits
and picks the same next token; the KV cache holds the rank's own heads.

Sparse plans: the predictors (and static scores, thresholds) are replicated and read the replicated residual
stream, so every rank holds the same scores for all units without communicating, and makes the plan of its shard
from them by ``plan`` (:data:`models.plan.TP_PLANS`): ``exact`` selects as one process does and keeps its
shard's units (the same tokens as one process; a rank's share of the budget varies per token), ``shard`` gives
each rank its own top-k of 1/world of the budget (balanced work, another selection). The oracle scores each
rank's own heads and neurons in its dense pass and all-gathers them.

Launch: ``torchrun --nproc-per-node N -m bench.cli latency --tp N ...`` (also ``quality``): every rank runs the
command, rank 0 writes the rows. A rank that fails prints its error and exits non-zero; torchrun then stops the
others (a process group made here also times out after ``timeout_s``, so no rank waits for ever).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .plan import check_tp_plan

BACKENDS = ("gloo", "nccl")


@dataclass
class TensorParallel:
    """One rank's place in a tensor-parallel group."""

    rank: int
    world: int
    group: object = None  # a torch.distributed process group; None: the default one
    plan: str = "exact"  # models.plan.TP_PLANS

    def __post_init__(self):
        if isinstance(self.world, bool) or not isinstance(self.world, int) or self.world < 1:
            raise ValueError(f"world size must be a positive int, got {self.world!r}")
        if not isinstance(self.rank, int) or not 0 <= self.rank < self.world:
            raise ValueError(f"rank must be an int in [0, {self.world}), got {self.rank!r}")
        check_tp_plan(self.plan)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sums ``t`` over the group in place (capturable in a CUDA graph on NCCL); returns it."""
        dist.all_reduce(t, group=self.group)
        return t

    def all_gather(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's ``t`` concatenated along ``dim`` in rank order."""
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t, group=self.group)
        return torch.cat(parts, dim=dim)


def shard_decoder(model, tp: TensorParallel):
    """This rank's shard of ``model`` (a whole decoder): a decoder of the same class over ``cfg.shard(world)`` with
    the rank's slices of the weights (copies), ``tp`` attached. Its ``dense_gemv`` setting is carried over."""
    if model.tp is not None or model.cfg.tp_size != 1:
        raise ValueError("model is already a tensor-parallel shard")
    cfg = model.cfg.shard(tp.world)
    shard = type(model)(cfg, model.dtype, model.device)
    whole = dict(model.named_parameters())
    with torch.no_grad():
        for name, param in shard.named_parameters():
            param.copy_(_slice(type(model), name, whole[name], tp))
    shard.tp = tp
    if getattr(model, "dense_gemv", None) == "triton":
        shard.set_dense_gemv("triton")
    return shard


def random_shard(cfg, tp: TensorParallel, *, dtype=torch.float16, device="cpu", seed: int = 0):
    """A shard with random weights made directly at its size (latency work on models larger than one device: the
    whole model is never built). Every rank draws the same values, so replicated weights agree; the biases added
    once are zero on ranks other than 0, as in :func:`shard_decoder`."""
    from .loading import decoder_class

    cls = decoder_class(cfg)
    shard = cls.random(cfg.shard(tp.world), dtype, device, seed)
    if tp.rank:
        with torch.no_grad():
            for name, param in shard.named_parameters():
                if name.rsplit(".", 1)[-1] in cls.TP_ONCE:
                    param.zero_()
    shard.tp = tp
    return shard


def _slice(cls, name: str, t: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    leaf = name.rsplit(".", 1)[-1]
    if leaf in cls.TP_ONCE:
        return t if tp.rank == 0 else torch.zeros_like(t)
    dim = cls.TP_SPLIT.get(leaf)
    if dim is None:  # replicated
        return t
    size = t.shape[dim] // tp.world
    return t.narrow(dim, tp.rank * size, size)


def init_from_env(tp_size: int, *, plan: str = "exact", backend: str | None = None,
                  timeout_s: float = 600.0) -> TensorParallel | None:
    """The group that ``torchrun --nproc-per-node tp_size`` started (RANK, WORLD_SIZE, MASTER_ADDR in the
    environment): initialises the default process group (NCCL where CUDA is available, else gloo) and, on NCCL,
    selects this rank's GPU (LOCAL_RANK). ``tp_size`` 1 outside torchrun: None (one process)."""
    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
        raise ValueError(f"--tp must be a positive int, got {tp_size!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != tp_size:
        raise ValueError(f"--tp {tp_size} needs {tp_size} processes; this one sees WORLD_SIZE={world}: launch with "
                         f"`torchrun --nproc-per-node {tp_size} -m bench.cli ...`")
    if tp_size == 1:
        return None
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return TensorParallel(dist.get_rank(), dist.get_world_size(), None, plan)
