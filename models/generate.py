"""Greedy generation with a static KV cache; the decode step is captured once in a CUDA graph.

The captured step reads the current token and position from fixed device buffers, runs the mode's
predictor when the granularity is per token, computes the logits, writes the greedy next token back
into the token buffer and advances the position, so decoding is a loop of graph replays with no host
work between them. Each replay is timed with a pair of CUDA events (wall clock on CPU).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .modes import DECODE_MODES, Mode
from .nvtx import nvtx_range
from .ops import get_ops


@dataclass
class Generation:
    tokens: torch.Tensor  # [B, gen_len] (the first comes from the prefill logits)
    prefill_ms: float
    token_ms: list[float] = field(default_factory=list)  # one per decode step (gen_len - 1)
    cuda_graph: bool = False


class Generator:
    def __init__(self, model, mode: Mode, *, batch: int = 1, max_len: int, cuda_graph: bool | None = None,
                 backend=None):
        if not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        self.model, self.mode, self.batch = model, mode, batch
        self.device = model.device
        self.ops = get_ops(backend, self.device)
        self.cuda_graph = (self.device.type == "cuda") if cuda_graph is None else bool(cuda_graph)
        if self.cuda_graph and self.device.type != "cuda":
            raise ValueError("cuda_graph=True needs the model on a CUDA device")
        if mode.no_decode:
            raise ValueError(f"mode {mode.name!r} has no decode step: {mode.no_decode}; decode modes: "
                             f"{', '.join(DECODE_MODES)}")
        if mode.kv_rule != "skip" and model.plan_kv_heads is None:
            raise ValueError(f"kv_rule {mode.kv_rule!r} decodes on grouped-query models (Llama); {model.FAMILY} "
                             "decoding writes the keys and values of computed heads only (kv_rule 'skip'); quality "
                             "evaluation runs either rule")
        mode.bind(model, self.ops)
        self.cache = model.new_cache(batch, max_len)
        self.tok = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.graph = None
        self.logits = None

    @property
    def predict_per_token(self) -> bool:
        return self.mode.granularity == "token"

    def _step(self) -> torch.Tensor:
        logits = self.model.decode_step(self.tok, self.pos, self.cache, self.mode, predict=self.predict_per_token,
                                        ops=self.ops)
        if self.ops.greedy is not None:  # one kernel pair for argmax, the token write and pos + 1
            self.ops.greedy(logits, self.tok, self.pos)
        else:
            self.tok.copy_(logits.argmax(dim=-1))
            self.pos.add_(1)
        return logits

    @torch.no_grad()
    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        """Run the prompt [B, P]; returns its last logits and sets up the first decode step."""
        if prompt.dim() != 2 or prompt.shape[0] != self.batch:
            raise ValueError(f"prompt must be [batch={self.batch}, P], got shape {tuple(prompt.shape)}")
        observer = self.mode if self.mode.granularity == "prompt" else None
        logits = self.model.prefill(prompt.to(self.device), self.cache, observer)
        self.tok.copy_(logits.argmax(dim=-1))
        self.pos.fill_(prompt.shape[1])
        return logits

    @torch.no_grad()
    def _capture(self) -> None:
        # Warm-up steps (compiling and autotuning every kernel of the step) advance the token and
        # position buffers; each starts from, and the capture leaves, the state after prefill.
        saved_tok, saved_pos = self.tok.clone(), self.pos.clone()

        def restore():
            self.tok.copy_(saved_tok)
            self.pos.copy_(saved_pos)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                restore()
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        restore()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self._step()
        self.graph = graph
        restore()

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """One decode step (a graph replay once captured); returns the logits buffer."""
        if self.cuda_graph:
            if self.graph is None:
                self._capture()
            self.graph.replay()
            return self.logits
        return self._step()

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, gen_len: int) -> Generation:
        P = prompt.shape[-1]
        if not isinstance(gen_len, int) or gen_len < 1:
            raise ValueError(f"gen_len must be a positive int, got {gen_len!r}")
        if P + gen_len - 1 > self.cache.max_len:
            raise ValueError(f"prompt {P} + gen_len {gen_len} needs {P + gen_len - 1} cache positions; the cache "
                             f"holds {self.cache.max_len}")
        cuda = self.device.type == "cuda"
        out = torch.empty((self.batch, gen_len), dtype=torch.long, device=self.device)
        if cuda:
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(2 * gen_len)]
            ev[0].record()
        t0 = time.perf_counter()
        self.prefill(prompt)
        if cuda:
            ev[1].record()
        prefill_ms = (time.perf_counter() - t0) * 1e3
        out[:, 0] = self.tok
        if self.cuda_graph and self.graph is None:
            self._capture()
        wall = []
        for i in range(1, gen_len):
            with nvtx_range("decode"):
                if cuda:
                    ev[2 * i].record()
                    self.step()
                    ev[2 * i + 1].record()
                else:
                    t = time.perf_counter()
                    self.step()
                    wall.append((time.perf_counter() - t) * 1e3)
            out[:, i] = self.tok
        if cuda:
            torch.cuda.synchronize()
            prefill_ms = ev[0].elapsed_time(ev[1])
            token_ms = [ev[2 * i].elapsed_time(ev[2 * i + 1]) for i in range(1, gen_len)]
        else:
            token_ms = wall
        return Generation(out, prefill_ms, token_ms, self.cuda_graph)
