"""Pruning criteria for every attention head and FFN neuron of every layer (ShadowLLM section 3, appendix A.2).

One forward and one backward per batch of examples (two backwards with ``grasp``): the prefill hooks put
a zero *probe* on each activation, so the gradient of the summed loss with respect to a probe is
dL/dA for every example at once (examples do not interact, so the gradient of the batch's summed loss
restricted to example b is the gradient of example b's loss).

The loss ``L`` of an example is the summed negative log-likelihood of its target continuation given
its context. Activations ``A`` cover the example's positions (context and continuation, no padding):

- heads: ``A`` is the head's attention output before the output projection, [T, D];
- neurons: the activation after the non-linearity (ReLU; silu(gate) * up) [T] for ``l2norm``,
  ``grasp`` and ``nwot``, and for the gradient criteria the neuron's weights ``theta`` (its fc1 row, or
  its gate_proj and up_proj rows together, biases left out) with the per-example gradient
  dL/dtheta = sum_t dL/dpre[t] * a[t] (``neuron_site="weight"``, the paper's definitions), or the
  activation as for heads (``neuron_site="activation"``).

Per example (``A`` below stands for theta at the weight site, ``G`` for its gradient):

=========  =====================================================================================
l2norm     ||A||_2 (activations, both sites)
gradnorm   ||G||_2
plainact   ||A * G||_1
fisher     mean((A * G)^2)
snip       |sum(A * G)|: the first-order change of the loss when the unit is removed (connection
           sensitivity of a gate multiplying the unit)
grasp      ||-(H G) * A||_1, H the Hessian of the loss over all probed activations (activation site)
nwot       log(mean((1 - c)^2) + 1e-6) with c = 1[A > 0] the binary code of the activation
           (NASWOT's equation 3 as the paper writes it)
=========  =====================================================================================

Aggregate-only (``AGGREGATE``; one value per unit for a batch of examples, averaged over batches; not
per example, so they feed the static mode only):

- ``jacov``: with J_b the unit's gradient vector for example b (heads: dL/dA summed over positions [D];
  neurons: dL/dtheta at the weight site, dL/dA by position (padded) otherwise), R the correlation
  matrix of the J_b over the batch and lambda its eigenvalues: -sum(log(lambda + 1e-5) + 1 / (lambda + 1e-5)).
- ``epenas``: examples grouped by class (their first target token, as the paper does); for each class
  with at least two examples the mean of log(|R_ij| + 1e-5) over its correlation matrix; the score is
  minus the mean over those classes (0 when the batch has none).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from .decoder import token_nll

PER_EXAMPLE = ("l2norm", "gradnorm", "plainact", "fisher", "grasp", "snip", "nwot")
AGGREGATE = ("jacov", "epenas")
CRITERIA = PER_EXAMPLE + AGGREGATE
NEURON_SITES = ("weight", "activation")
_GRADIENT = ("gradnorm", "plainact", "fisher", "snip", "jacov", "epenas", "grasp")


def check_criteria(names) -> list[str]:
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise ValueError(f"no criterion given; known: {', '.join(CRITERIA)}")
    for n in names:
        if n not in CRITERIA:
            raise ValueError(f"unknown criterion {n!r}; known: {', '.join(CRITERIA)}")
    return list(dict.fromkeys(names))


@dataclass
class Batch:
    """Token sequences (context then target) right-padded to one length."""

    tokens: torch.Tensor  # long [B, P]
    lengths: torch.Tensor  # long [B]: context + target tokens
    context_lengths: torch.Tensor  # long [B]

    @classmethod
    def from_pairs(cls, pairs: list[tuple[list[int], list[int]]], device="cpu", pad: int = 0) -> Batch:
        """From (context ids, target ids) pairs; each needs at least one context and one target token."""
        if not pairs:
            raise ValueError("a batch needs at least one example")
        for i, (c, t) in enumerate(pairs):
            if len(c) < 1 or len(t) < 1:
                raise ValueError(f"example {i} has {len(c)} context and {len(t)} target tokens; both must be >= 1")
        P = max(len(c) + len(t) for c, t in pairs)
        tokens = torch.full((len(pairs), P), pad, dtype=torch.long)
        for i, (c, t) in enumerate(pairs):
            tokens[i, : len(c) + len(t)] = torch.tensor(list(c) + list(t))
        lengths = torch.tensor([len(c) + len(t) for c, t in pairs])
        ctx = torch.tensor([len(c) for c, _ in pairs])
        return cls(tokens.to(device), lengths.to(device), ctx.to(device))

    def position_mask(self) -> torch.Tensor:
        return torch.arange(self.tokens.shape[1], device=self.tokens.device)[None, :] < self.lengths[:, None]

    def target_loss(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-example summed NLL [B] of the target tokens (position t predicts token t + 1)."""
        P = self.tokens.shape[1]
        nll = token_nll(logits, self.tokens)  # [B, P - 1]
        t = torch.arange(1, P, device=logits.device)[None, :]
        target = (t >= self.context_lengths[:, None]) & (t < self.lengths[:, None])
        return (nll * target).sum(dim=1)


class _Probes:
    """Hooks that record activations and add zero probes whose gradients are dL/dA."""

    def __init__(self, need_grad: bool, neuron_site: str, with_inputs: bool):
        self.need_grad, self.site, self.with_inputs = need_grad, neuron_site, with_inputs
        self.heads, self.neurons, self.ffn_in, self.pre = {}, {}, {}, {}
        self.probes: dict[tuple[str, int], torch.Tensor] = {}
        self.inputs, self.attn0 = {}, None

    def _probe(self, key, t):
        if not self.need_grad:
            return t
        p = torch.zeros_like(t, requires_grad=True)
        self.probes[key] = p
        return t + p

    def hooks(self) -> dict:
        def heads(i, h):
            self.heads[i] = h.detach()
            return self._probe(("heads", i), h)

        def neurons(i, f):
            self.neurons[i] = f.detach()
            return self._probe(("neurons", i), f)

        def ffn_in(i, a):
            self.ffn_in[i] = a.detach()

        def ffn_pre(i, pre):
            if isinstance(pre, tuple):
                return tuple(self._probe((f"pre{j}", i), p) for j, p in enumerate(pre))
            return self._probe(("pre0", i), pre)

        def inp(i, x):
            if self.with_inputs:
                self.inputs[i] = x.detach()

        def attn_out(i, o):
            if i == 0:
                self.attn0 = o.detach()

        hooks = {"heads": heads, "neurons": neurons, "input": inp, "attn_out": attn_out}
        if self.with_inputs or (self.site == "weight" and self.need_grad):  # MLP inputs: predictor inputs too
            hooks["ffn_in"] = ffn_in
        if self.site == "weight" and self.need_grad:
            hooks["ffn_pre"] = ffn_pre
        return hooks


def merge_hooks(first: dict, then: dict) -> dict:
    """Hooks that run ``first``'s hook of a site and then ``then``'s on its result (an observe-only hook returns
    None: the value goes on unchanged)."""
    out = dict(first)
    for site, fn in then.items():
        if site in first:
            f0 = first[site]

            def both(i, t, f0=f0, fn=fn):
                r = f0(i, t)
                return fn(i, t if r is None else r)

            out[site] = both
        else:
            out[site] = fn
    return out


def length_batches(sequences: list, batch: int):
    """``(indices, tokens [B, P] right-padded, lengths [B])`` for ``sequences`` (``[(source, ids)]``) taken longest
    first, ``batch`` at a time, so a batch wastes little padding."""
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i][1]))
    for b0 in range(0, len(order), batch):
        idx = order[b0: b0 + batch]
        lengths = torch.tensor([len(sequences[i][1]) for i in idx])
        tokens = torch.zeros((len(idx), int(lengths.max())), dtype=torch.long)
        for r, i in enumerate(idx):
            tokens[r, : len(sequences[i][1])] = torch.tensor(sequences[i][1])
        yield idx, tokens, lengths


def token_rows(model, tokens: torch.Tensor, lengths: torch.Tensor, criteria=("l2norm",), *, with_inputs: bool = True,
               extra_hooks: dict | None = None) -> dict:
    """Per-position importance targets and predictor inputs of a batch of sequences, on the model's device.

    ``tokens`` [B, P] (right-padded), ``lengths`` [B]: each sequence's real length. One forward (and, for
    ``plainact``, one backward of the sum of every real next-token NLL) gives, for every real position in row-major
    order (n = ``lengths.sum()`` rows):

    - ``{c}.heads`` [n, L, H], ``{c}.neurons`` [n, L, F] (float32): ``l2norm`` (a head's output L2 norm, a neuron's
      |activation|), ``plainact`` (``|A * dL/dA|`` summed over a head's output, or of one neuron's activation);
    - ``attn0`` [n, E]: layer 0's attention output (the ShadowLLM predictor's input);
    - with ``with_inputs``, ``inputs`` and ``ffn_inputs`` [n, L, E]: each layer's input and its MLP's normalised
      input (DejaVu's).

    ``extra_hooks`` run after the recording hooks of the same site (an oracle's plans: rows of the sparse
    trajectory)."""
    for c in criteria:
        if c not in ("l2norm", "plainact"):
            raise ValueError(f"per-position criteria are l2norm and plainact; got {c!r}")
    need_grad = "plainact" in criteria
    L = model.cfg.n_layers
    P = tokens.shape[1]
    valid = (torch.arange(P, device=tokens.device)[None, :] < lengths.to(tokens.device)[:, None])  # [B, P]
    probes = _Probes(need_grad, "activation", with_inputs)
    hooks = probes.hooks() if extra_hooks is None else merge_hooks(probes.hooks(), extra_hooks)
    grads = {}
    with torch.enable_grad() if need_grad else torch.no_grad():
        logits = model.prefill(tokens, all_logits=need_grad, hooks=hooks)
        if need_grad:
            loss = (token_nll(logits, tokens) * valid[:, 1:]).sum()
            keys = list(probes.probes)
            grads = dict(zip(keys, torch.autograd.grad(loss, [probes.probes[k] for k in keys]), strict=True))
    del logits
    sel = valid.reshape(-1)
    out = {}
    with torch.no_grad():
        for c in criteria:
            hs, ns = [], []
            for i in range(L):
                h, f = probes.heads[i].float(), probes.neurons[i].float()  # [B, H, P, D], [B, P, F]
                if c == "l2norm":
                    hs.append(h.norm(dim=-1).transpose(1, 2))
                    ns.append(f.abs())
                else:
                    gh, gf = grads[("heads", i)].float(), grads[("neurons", i)].float()
                    hs.append((h * gh).abs().sum(-1).transpose(1, 2))
                    ns.append((f * gf).abs())
            out[f"{c}.heads"] = torch.stack(hs, 2).flatten(0, 1)[sel]
            out[f"{c}.neurons"] = torch.stack(ns, 2).flatten(0, 1)[sel]
        out["attn0"] = probes.attn0.flatten(0, 1)[sel]
        if with_inputs:
            out["inputs"] = torch.stack([probes.inputs[i] for i in range(L)], 2).flatten(0, 1)[sel]
            out["ffn_inputs"] = torch.stack([probes.ffn_in[i] for i in range(L)], 2).flatten(0, 1)[sel]
    return out


def _corr_score(J: torch.Tensor) -> torch.Tensor:
    """jacov of [..., B, d] gradient vectors: -sum(log(l + k) + 1 / (l + k)) over the eigenvalues l of
    their correlation matrix."""
    J = J - J.mean(dim=-1, keepdim=True)
    J = J / (J.norm(dim=-1, keepdim=True) + 1e-12)
    R = J @ J.transpose(-1, -2)
    lam = torch.linalg.eigvalsh(R.double()).clamp(min=0.0)
    k = 1e-5
    return -(torch.log(lam + k) + 1.0 / (lam + k)).sum(dim=-1).to(J.dtype)


def _epenas_score(J: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """epenas of [..., B, d] gradient vectors grouped by ``classes`` [B]."""
    J = J - J.mean(dim=-1, keepdim=True)
    J = J / (J.norm(dim=-1, keepdim=True) + 1e-12)
    total, used = torch.zeros(J.shape[:-2], device=J.device), 0
    for c in classes.unique():
        members = (classes == c).nonzero().flatten()
        if members.numel() < 2:
            continue
        Jc = J[..., members, :]
        R = Jc @ Jc.transpose(-1, -2)
        total = total + torch.log(R.abs() + 1e-5).mean(dim=(-1, -2))
        used += 1
    return -total / used if used else total


def compute(model, batch: Batch, criteria, *, neuron_site: str = "weight", with_inputs: bool = True) -> dict:
    """Criteria of one batch. Returns ``{name: {"heads": [B, L, H], "neurons": [B, L, F]}}`` (for the
    aggregate criteria [L, H] and [L, F], one value for the batch), ``"attn0"`` [B, E] (layer 0's
    attention output at each example's last context position), ``"inputs"`` [B, L, E] and ``"ffn_inputs"``
    [B, L, E] (each layer's input and its MLP's normalised input there; with ``with_inputs``) and ``"loss"`` [B]."""
    criteria = check_criteria(criteria)
    if neuron_site not in NEURON_SITES:
        raise ValueError(f"neuron_site must be one of {NEURON_SITES}, got {neuron_site!r}")
    cfg = model.cfg
    L = cfg.n_layers
    need_grad = any(c in _GRADIENT for c in criteria)
    grasp = "grasp" in criteria
    probes = _Probes(need_grad, neuron_site, with_inputs)
    sdpa = contextlib.nullcontext()
    if grasp:  # double backward through attention needs the math kernel
        from torch.nn.attention import SDPBackend, sdpa_kernel

        sdpa = sdpa_kernel(SDPBackend.MATH)
    with torch.enable_grad(), sdpa:
        logits = model.prefill(batch.tokens, all_logits=True, hooks=probes.hooks())
        loss = batch.target_loss(logits)
        grads, hv = {}, {}
        if need_grad:
            keys = list(probes.probes)
            g = torch.autograd.grad(loss.sum(), [probes.probes[k] for k in keys], create_graph=grasp)
            if grasp:
                act_keys = [k for k in keys if k[0] in ("heads", "neurons")]
                z = sum((g[keys.index(k)] * g[keys.index(k)].detach()).sum() for k in act_keys)
                h = torch.autograd.grad(z, [probes.probes[k] for k in act_keys])
                hv = {k: v.detach() for k, v in zip(act_keys, h, strict=True)}
            grads = {k: v.detach() for k, v in zip(keys, g, strict=True)}
    B = batch.tokens.shape[0]
    pmask = batch.position_mask()  # [B, P]
    last = batch.context_lengths - 1
    out = {"loss": loss.detach()}
    rows = torch.arange(B, device=last.device)
    out["attn0"] = probes.attn0[rows, last]
    if with_inputs:
        out["inputs"] = torch.stack([probes.inputs[i][rows, last] for i in range(L)], dim=1)
        out["ffn_inputs"] = torch.stack([probes.ffn_in[i][rows, last] for i in range(L)], dim=1)

    heads = {c: [] for c in criteria}
    neurons = {c: [] for c in criteria}
    classes = batch.tokens[rows, batch.context_lengths]  # first target token
    for i in range(L):
        hmask = pmask[:, None, :, None].to(_acc_dtype(model))  # [B, 1, P, 1]
        A = probes.heads[i].to(hmask.dtype) * hmask  # [B, H, P, D]
        G = grads[("heads", i)].to(hmask.dtype) * hmask if need_grad else None
        HV = hv[("heads", i)].to(hmask.dtype) * hmask if grasp else None
        n_el = hmask.sum(dim=(1, 2, 3))[:, None] * A.shape[-1]  # [B, 1] elements per head
        _unit_criteria(heads, criteria, A, G, HV, dims=(2, 3), n_el=n_el, classes=classes)

        nmask = pmask[:, :, None].to(_acc_dtype(model))  # [B, P, 1]
        act = probes.neurons[i].to(hmask.dtype) * nmask  # [B, P, F]
        n_pos = nmask.sum(dim=1)  # [B, 1]
        if neuron_site == "activation" or not need_grad:
            Gn = grads[("neurons", i)].to(hmask.dtype) * nmask if need_grad else None
            HVn = hv[("neurons", i)].to(hmask.dtype) * nmask if grasp else None
            _unit_criteria(neurons, criteria, act, Gn, HVn, dims=(1,), n_el=n_pos, classes=classes)
        else:
            HVn = hv[("neurons", i)].to(hmask.dtype) * nmask if grasp else None
            _weight_criteria(neurons, criteria, model.layers[i], probes.ffn_in[i].to(hmask.dtype) * nmask,
                             [grads[(k, i)].to(hmask.dtype) * nmask for k in ("pre0", "pre1") if (k, i) in grads],
                             act, HVn, n_pos, classes)
    for c in criteria:
        out[c] = {"heads": torch.stack(heads[c], dim=-2), "neurons": torch.stack(neurons[c], dim=-2)}
    return out


def _acc_dtype(model) -> torch.dtype:
    """Criteria accumulate in fp32, or in the model's dtype when that is wider."""
    return torch.promote_types(model.dtype, torch.float32)


def _unit_criteria(acc, criteria, A, G, HV, *, dims, n_el, classes):
    """Criteria of units whose activation is ``A`` with ``dims`` the dimensions to reduce: heads [B, H, P, D]
    (dims 2, 3) or neurons [B, P, F] (dim 1)."""
    for c in criteria:
        if c == "l2norm":
            v = A.pow(2).sum(dim=dims).sqrt()
        elif c == "gradnorm":
            v = G.pow(2).sum(dim=dims).sqrt()
        elif c == "plainact":
            v = (A * G).abs().sum(dim=dims)
        elif c == "fisher":
            v = (A * G).pow(2).sum(dim=dims) / n_el
        elif c == "snip":
            v = (A * G).sum(dim=dims).abs()
        elif c == "grasp":
            v = (-(HV * A)).abs().sum(dim=dims)
        elif c == "nwot":
            inactive = (A <= 0).to(A.dtype).sum(dim=dims) - _padding_count(A, dims, n_el)  # padding is zeroed
            v = torch.log(inactive / n_el + 1e-6)
        elif c in AGGREGATE:
            # heads: dL/dA summed over positions [B, H, D]; neurons: dL/dA by position [B, F, P]
            J = G.sum(dim=2) if A.dim() == 4 else G.transpose(1, 2)
            J = J.movedim(0, -2)  # [units, B, d]
            v = (_corr_score(J) if c == "jacov" else _epenas_score(J, classes))[None].expand(A.shape[0], -1)
        acc[c].append(v)


def _padding_count(A, dims, n_el):
    """Entries of A beyond the valid positions (zeroed, so they count as inactive for nwot)."""
    total = math.prod(A.shape[d] for d in dims)
    return total - n_el


def _weight_criteria(acc, criteria, layer, a, gpres, act, HV, n_pos, classes):
    """Neuron criteria on the neuron's weight rows (fc1, or gate_proj and up_proj): per example
    dL/dtheta[f] = sum_t dL/dpre[t, f] * a[t]."""
    thetas = [layer.fc1_w] if len(gpres) == 1 else [layer.gate_w, layer.up_w]
    B = a.shape[0]
    E = a.shape[-1]
    n_w = E * len(thetas)
    out = {c: [] for c in criteria if c not in ("l2norm", "nwot", "grasp")}
    for b in range(B):  # one example at a time bounds memory to one [F, E] gradient per weight
        gw = [torch.einsum("pf,pe->fe", g[b], a[b]) for g in gpres]
        tg = [t.to(gg.dtype) * gg for t, gg in zip(thetas, gw, strict=True)]
        for c in out:
            if c == "gradnorm":
                v = sum(gg.pow(2).sum(dim=1) for gg in gw).sqrt()
            elif c == "plainact":
                v = sum(x.abs().sum(dim=1) for x in tg)
            elif c == "fisher":
                v = sum(x.pow(2).sum(dim=1) for x in tg) / n_w
            elif c == "snip":
                v = sum(x.sum(dim=1) for x in tg).abs()
            else:  # jacov / epenas: the weight gradient rows
                v = torch.cat(gw, dim=1)
            out[c].append(v)
    for c in criteria:
        if c in ("l2norm", "nwot", "grasp"):
            _unit_criteria(acc, [c], act, None, HV, dims=(1,), n_el=n_pos, classes=classes)
        elif c in AGGREGATE:
            J = torch.stack(out[c], dim=1)  # [F, B, n_w]
            v = _corr_score(J) if c == "jacov" else _epenas_score(J, classes)
            acc[c].append(v[None].expand(B, -1))
        else:
            acc[c].append(torch.stack(out[c]))
