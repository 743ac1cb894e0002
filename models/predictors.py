"""Sparsity predictors: two-layer MLPs ``Linear -> ReLU -> Linear`` that score heads and neurons.

- :class:`ShadowLLMPredictor`: one MLP that scores every head and neuron of the sparse layers at once, from layer 0's
  attention output (E; ``input_site="attn0"``, the paper's input and the default) or from the residual stream entering
  the first sparse layer (``"residual"``: the token's embedding plus layer 0's attention and MLP outputs). Output
  layout: ``[heads of L_s layers (L_s * H), neurons of L_s layers (L_s * F)]``, layer-major.
- :class:`DejaVuPredictor`: per sparse layer, MLPs on that layer's own activations. With ``neuron_input="mlp"``
  (the default) two: one on the layer's input scoring its H heads, one on its MLP's input (the normalised residual
  stream after attention, what fc1 / gate and up read) scoring its F neurons, as DejaVu predicts each block from
  the block's own input. With ``neuron_input="layer"`` one MLP on the layer's input (or, with look-ahead, the
  previous layer's input) scores ``[H heads, F neurons]`` together.

  Why the default: at equal size (576 -> 128 -> 1536 per layer), SmolLM2's neurons predicted from the MLP input keep
  perplexity far closer to the oracle than from the layer input (notes/quality.md); the MLP input already holds
  this layer's attention output.

Files are safetensors with the weights and a JSON header naming the kind and the model shape, so a
predictor that does not fit a model is refused with the mismatch named.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .config import DecoderConfig

KINDS = ("shadowllm", "dejavu")
NEURON_INPUTS = ("mlp", "layer")  # what a DejaVu predictor scores neurons from (see DejaVuPredictor)
SHADOWLLM_INPUTS = ("attn0", "residual")  # what a ShadowLLM predictor reads (see ShadowLLMPredictor)


def _mlp(E: int, hidden: int, out: int, dtype, device) -> nn.Sequential:
    return nn.Sequential(nn.Linear(E, hidden, dtype=dtype, device=device), nn.ReLU(),
                         nn.Linear(hidden, out, dtype=dtype, device=device))


class _Predictor(nn.Module):
    kind = ""

    def __init__(self, cfg: DecoderConfig, hidden: int, first_sparse: int, dtype, device):
        super().__init__()
        if not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"predictor hidden size must be a positive int, got {hidden!r}")
        if not isinstance(first_sparse, int) or not 1 <= first_sparse < cfg.n_layers:
            raise ValueError(f"first_sparse must be in [1, {cfg.n_layers - 1}], got {first_sparse!r}")
        self.cfg, self.hidden, self.first_sparse = cfg, hidden, first_sparse
        self.n_sparse = cfg.n_layers - first_sparse
        self.meta: dict = {}

    def header(self) -> dict:
        c = self.cfg
        return {"kind": self.kind, "hidden": self.hidden, "first_sparse": self.first_sparse,
                "model": {"name": c.name, "hidden": c.hidden, "n_layers": c.n_layers, "n_heads": c.n_heads,
                          "ffn": c.ffn}, **self.meta}

    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parameters())

    def save(self, path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, str(path), metadata={"shadowbench": json.dumps(self.header())})
        return path


class ShadowLLMPredictor(_Predictor):
    """One MLP on one early activation scoring every sparse layer; with ``stages`` (residual input only), one MLP per
    stage: stage s reads the residual stream entering layer ``stages[s]`` and scores layers ``stages[s]`` up to the
    next stage's first layer. ``stages=(first_sparse,)`` (the default) is the paper's single predictor; more stages
    trade predictor launches for inputs closer to the layers they score (on SmolLM2 a second predictor at layer 15
    lowered s=0.5 perplexity by a quarter, notes/quality.md)."""

    kind = "shadowllm"

    def __init__(self, cfg: DecoderConfig, hidden: int = 2048, first_sparse: int = 1, dtype=torch.float16,
                 device="cpu", input_site: str = "attn0", stages=None):
        super().__init__(cfg, hidden, first_sparse, dtype, device)
        if input_site not in SHADOWLLM_INPUTS:
            raise ValueError(f"input_site must be one of {SHADOWLLM_INPUTS}, got {input_site!r}")
        self.input_site = input_site
        self.meta["input_site"] = input_site
        self.stages = check_stages(stages, first_sparse, cfg.n_layers, input_site)
        if len(self.stages) > 1:
            self.meta["stages"] = list(self.stages)
        ends = self.stages[1:] + (cfg.n_layers,)
        self.stage_layers = tuple(e - b for b, e in zip(self.stages, ends, strict=True))  # layers each stage scores
        self.n_out = self.n_sparse * (cfg.n_heads + cfg.ffn)
        outs = [n * (cfg.n_heads + cfg.ffn) for n in self.stage_layers]
        self.net = _mlp(cfg.hidden, hidden, outs[0], dtype, device)
        # later stages' nets (none for the single predictor, whose files hold ``net`` only)
        self.stage_nets = nn.ModuleList(_mlp(cfg.hidden, hidden, o, dtype, device) for o in outs[1:])

    def stage_of(self, layer: int) -> int | None:
        """The stage whose net reads the residual stream entering ``layer`` (None: no stage starts there)."""
        return self.stages.index(layer) if layer in self.stages else None

    def stage_net(self, stage: int | None) -> nn.Sequential:
        """A stage's net (None or 0: the first, ``net``)."""
        return self.net if not stage else self.stage_nets[stage - 1]

    def weights(self, stage: int | None = None):
        """``(w1, b1, w2, b2)`` of a stage's net (None or 0: the first)."""
        net = self.stage_net(stage)
        return net[0].weight, net[0].bias, net[2].weight, net[2].bias

    def split(self, scores: torch.Tensor, stage: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A stage's scores [..., n * (H + F)] -> heads [..., n, H], neurons [..., n, F] of its n layers (stage None:
        the whole single predictor)."""
        c = self.cfg
        n = self.stage_layers[stage or 0]  # (the single predictor's one stage scores every sparse layer)
        heads, neurons = scores.split([n * c.n_heads, n * c.ffn], dim=-1)
        return heads.unflatten(-1, (n, c.n_heads)), neurons.unflatten(-1, (n, c.ffn))

    def forward(self, x):
        """Scores of every sparse layer: ``x`` [..., E] (one stage) or [..., n_stages, E] (each stage's input) ->
        heads [..., L_s, H], neurons [..., L_s, F]."""
        if len(self.stages) == 1:
            return self.split(self.net(x))
        parts = [self.split(self.stage_net(s)(x[..., s, :]), s) for s in range(len(self.stages))]
        return torch.cat([h for h, _ in parts], dim=-2), torch.cat([n for _, n in parts], dim=-2)


def check_stages(stages, first_sparse: int, n_layers: int, input_site: str) -> tuple[int, ...]:
    """ShadowLLM's stage starts: ``(first_sparse,)`` for None; else increasing layers from ``first_sparse``, below
    ``n_layers``, and a residual-stream input (each stage reads the stream entering its first layer)."""
    if stages is None:
        return (first_sparse,)
    try:
        st = tuple(int(v) for v in stages)
    except (TypeError, ValueError):
        raise ValueError(f"stages must be layer indices, got {stages!r}") from None
    if not st or st[0] != first_sparse or any(st[i + 1] <= st[i] for i in range(len(st) - 1)) or st[-1] >= n_layers:
        raise ValueError(f"stages must be increasing layers starting at the first sparse layer {first_sparse} and "
                         f"below {n_layers}, got {list(st)}")
    if len(st) > 1 and input_site != "residual":
        raise ValueError(f"a staged ShadowLLM reads the residual stream entering each stage; input_site "
                         f"{input_site!r} has one site only")
    return st


class DejaVuPredictor(_Predictor):
    kind = "dejavu"

    def __init__(self, cfg: DecoderConfig, hidden: int = 1024, first_sparse: int = 1, dtype=torch.float16,
                 device="cpu", lookahead: bool = False, neuron_input: str = "mlp", ffn_hidden: int | None = None):
        super().__init__(cfg, hidden, first_sparse, dtype, device)
        if neuron_input not in NEURON_INPUTS:
            raise ValueError(f"neuron_input must be one of {NEURON_INPUTS}, got {neuron_input!r}")
        if ffn_hidden is not None and (not isinstance(ffn_hidden, int) or ffn_hidden < 1):
            raise ValueError(f"ffn_hidden must be a positive int, got {ffn_hidden!r}")
        if lookahead and neuron_input == "mlp":
            raise ValueError("lookahead predicts layer l + 1 from layer l's input; it needs neuron_input 'layer' (the "
                             "MLP input of layer l + 1 only exists inside that layer)")
        self.lookahead = bool(lookahead)
        self.neuron_input = neuron_input
        self.meta.update(lookahead=self.lookahead, neuron_input=neuron_input)
        if neuron_input == "mlp":
            self.ffn_hidden = ffn_hidden or hidden
            self.meta["ffn_hidden"] = self.ffn_hidden
            self.n_out = cfg.n_heads
            self.ffn_nets = nn.ModuleList(_mlp(cfg.hidden, self.ffn_hidden, cfg.ffn, dtype, device)
                                          for _ in range(self.n_sparse))
        else:
            if ffn_hidden is not None:
                raise ValueError("ffn_hidden sizes the MLP-input neuron predictor; neuron_input 'layer' has none")
            self.ffn_hidden = None
            self.n_out = cfg.n_heads + cfg.ffn
        self.nets = nn.ModuleList(_mlp(cfg.hidden, hidden, self.n_out, dtype, device) for _ in range(self.n_sparse))

    def weights(self, layer: int, site: str = "input"):
        """One net's ``(w1, b1, w2, b2)``: layer ``layer``'s net on its input (``site="input"``) or, with
        ``neuron_input="mlp"``, on its MLP input (``site="ffn_in"``)."""
        if site not in ("input", "ffn_in") or (site == "ffn_in" and self.neuron_input != "mlp"):
            raise ValueError(f"a {self.neuron_input}-input DejaVu predictor has no net on site {site!r}")
        net = (self.ffn_nets if site == "ffn_in" else self.nets)[layer - self.first_sparse]
        return net[0].weight, net[0].bias, net[2].weight, net[2].bias

    def split(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The input net's scores: [..., H + F] -> heads [..., H], neurons [..., F]; with ``neuron_input="mlp"``
        [..., H] -> heads, None (its neurons come from :meth:`forward_ffn`)."""
        if self.neuron_input == "mlp":
            return scores, None
        return scores.split([self.cfg.n_heads, self.cfg.ffn], dim=-1)

    def forward(self, x, layer: int):
        return self.split(self.nets[layer - self.first_sparse](x))

    def forward_ffn(self, a, layer: int):
        """Neuron scores [..., F] of layer ``layer`` from its MLP input ``a`` (``neuron_input="mlp"``)."""
        return self.ffn_nets[layer - self.first_sparse](a)

    def forward_all(self, x: torch.Tensor, a: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores of every sparse layer at once (training and evaluation): ``x`` [b, L_s, E] each sparse layer's input
        (look-ahead: the previous layer's) and, with ``neuron_input="mlp"``, ``a`` [b, L_s, E] its MLP input. Returns
        heads [b, L_s, H] and neurons [b, L_s, F], the same as :meth:`forward` / :meth:`forward_ffn` layer by layer."""
        out = _nets_forward(self.nets, x)
        if self.neuron_input == "layer":
            return out.split([self.cfg.n_heads, self.cfg.ffn], dim=-1)
        if a is None:
            raise ValueError("a DejaVu predictor with neuron_input 'mlp' scores neurons from the MLP inputs: pass a")
        return out, _nets_forward(self.ffn_nets, a)


def _nets_forward(nets: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    """Every net of ``nets`` on its own slice of ``x`` [b, n, E] at once (two batched matmuls): [b, n, out]."""
    w1 = torch.stack([m[0].weight for m in nets])  # [n, hidden, E]
    b1 = torch.stack([m[0].bias for m in nets])
    w2 = torch.stack([m[2].weight for m in nets])  # [n, out, hidden]
    b2 = torch.stack([m[2].bias for m in nets])
    h = torch.baddbmm(b1[:, None], x.transpose(0, 1), w1.transpose(1, 2)).relu()
    return torch.baddbmm(b2[:, None], h, w2.transpose(1, 2)).transpose(0, 1)


def random_predictor(kind: str, cfg: DecoderConfig, *, hidden: int | None = None, first_sparse: int = 1,
                     dtype=torch.float16, device="cpu", seed: int = 0, lookahead: bool = False,
                     neuron_input: str = "mlp", ffn_hidden: int | None = None,
                     input_site: str = "attn0", stages=None) -> _Predictor:
    """A randomly initialised predictor of the right shape (latency work; marked ``random`` in rows)."""
    if kind not in KINDS:
        raise ValueError(f"predictor kind must be one of {KINDS}, got {kind!r}")
    torch.manual_seed(seed)
    if kind == "shadowllm":
        pred = ShadowLLMPredictor(cfg, hidden or 2048, first_sparse, dtype, device, input_site=input_site,
                                  stages=stages)
    else:
        pred = DejaVuPredictor(cfg, hidden or 1024, first_sparse, dtype, device, lookahead=lookahead,
                               neuron_input=neuron_input, ffn_hidden=ffn_hidden)
    pred.meta["source"] = "random"
    return pred


def load_predictor(path, cfg: DecoderConfig, *, dtype=torch.float16, device="cpu") -> _Predictor:
    """Load a predictor file and check that it fits ``cfg``."""
    from .files import read_header, read_tensors

    path = Path(path)
    raw = read_header(path, "shadowbench", "predictor file")
    if raw is None:
        raise ValueError(f"{path} is not a shadowbench predictor file (no 'shadowbench' header)")
    try:
        head = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: its 'shadowbench' header is not valid JSON ({err})") from None
    kind = head.get("kind")
    if kind not in KINDS:
        raise ValueError(f"{path}: predictor kind {kind!r} is not one of {KINDS}")
    want = {"hidden": cfg.hidden, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "ffn": cfg.ffn}
    got = {k: head["model"].get(k) for k in want}
    if got != want:
        bad = ", ".join(f"{k} {got[k]} (model has {want[k]})" for k in want if got[k] != want[k])
        raise ValueError(f"{path}: predictor was made for a different model shape: {bad}")
    if kind == "shadowllm":
        pred = ShadowLLMPredictor(cfg, head["hidden"], head["first_sparse"], dtype, device,
                                  input_site=head.get("input_site", "attn0"),  # older files: layer 0's attention
                                  stages=head.get("stages"))
    else:
        # files written before the MLP-input variant hold one net per layer on the layer input
        pred = DejaVuPredictor(cfg, head["hidden"], head["first_sparse"], dtype, device,
                               lookahead=head.get("lookahead", False), neuron_input=head.get("neuron_input", "layer"),
                               ffn_hidden=head.get("ffn_hidden"))
    state = read_tensors(path, "predictor file")
    expected = {k: tuple(v.shape) for k, v in pred.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected != found:
        diff = sorted(set(expected.items()) ^ set(found.items()))[:4]
        raise ValueError(f"{path}: predictor tensors do not fit the model; first differences: {diff}")
    pred.load_state_dict(state)
    pred.meta.update({k: v for k, v in head.items() if k not in ("kind", "hidden", "first_sparse", "model")})
    pred.meta.setdefault("source", str(path))
    return pred.requires_grad_(False)
