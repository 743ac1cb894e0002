"""Perplexity and multiple-choice accuracy of a model in a mode, through the decoder's sparse semantics.

Every number goes through :func:`models.sparse_forward.sparse_logits`, which the tests prove equal to
prefilling densely and then decoding token by token with the mode's plans (batch 1 per sequence):

- perplexity: WikiText-2 test, sliding windows of ``context`` tokens advancing by ``stride``; each window
  scores its last ``stride`` tokens (all of them in the first window); the tokens before them are the
  window's dense prefill, the scored ones are decoded sparsely (with ``sparse_prefix`` the whole window
  after its first token is decoded);
- accuracy: per choice, the summed log-likelihood of the continuation tokens given the context
  (lm-evaluation-harness's ``acc``; ``acc_norm`` divides by the choice's length in characters). The
  context is the dense prefill and the continuation is decoded; with ``sparse_prefix`` the context is
  decoded too (from its second token), which is the paper's setting where every position is sparse.
  The first continuation token is predicted by the last context position, so with a dense context a
  one-token continuation (RTE's " True") is scored densely: that is what decoding does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from models.decoder import token_nll
from models.sparse_forward import sparse_logits

from .tasks import Example, with_shots


@dataclass
class Perplexity:
    ppl: float
    nll: float
    tokens: int  # scored tokens
    windows: int


def perplexity(model, mode, ids: list[int], *, context: int, stride: int, batch: int = 4,
               sparse_prefix: bool = False, progress=None) -> Perplexity:
    """Sliding-window perplexity of ``ids`` (see the module docstring). ``mode`` must be bound to ``model``."""
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be in [1, context={context}], got {stride}")
    if context > model.cfg.max_positions:
        raise ValueError(f"context {context} exceeds the model's {model.cfg.max_positions} positions")
    if len(ids) < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {len(ids)}")
    windows = []  # (begin, end, first scored position within the window)
    prev_end = 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        scored = end - prev_end
        first = max(1, (end - begin) - scored)
        windows.append((begin, end, first))
        prev_end = end
        if end == len(ids):
            break
    total, count = 0.0, 0
    device = model.device
    for i in range(0, len(windows), batch):
        group = windows[i: i + batch]
        P = max(e - b for b, e, _ in group)
        tok = torch.zeros(len(group), P, dtype=torch.long)
        for r, (b, e, _) in enumerate(group):
            tok[r, : e - b] = torch.tensor(ids[b:e])
        tok = tok.to(device)
        starts = torch.tensor([1 if sparse_prefix else f for _, _, f in group])
        nll = token_nll(sparse_logits(model, tok, mode, starts), tok)  # nll[:, t] scores token t + 1
        for r, (b, e, f) in enumerate(group):
            total += float(nll[r, f - 1: e - b - 1].sum())
            count += e - b - f
        if progress is not None:
            progress.update(len(group))
    return Perplexity(math.exp(total / count), total / count, count, len(windows))


@dataclass
class Accuracy:
    acc: float
    acc_norm: float
    n: int


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of a (context, continuation) request as lm-evaluation-harness's Hugging Face model makes
    them (0.4.x ``TemplateLM``): trailing spaces of the context move to the continuation, the pair is
    encoded whole with the tokenizer's default special tokens (a begin token where it adds one) and the
    continuation is what follows the context's own tokens; an empty context becomes the prefix token."""
    if context == "":
        cont = tokenizer.encode(continuation, special=False)
        return ([tokenizer.prefix_id], cont) if cont[:1] != [tokenizer.prefix_id] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation, special=True)
    ctx = tokenizer.encode(context, special=True)
    return ctx, whole[len(ctx):]


def _requests(ex: Example, tokenizer, max_len: int):
    out = []
    for context, continuation in ex.choices:
        ctx, cont = encode_pair(tokenizer, context, continuation)
        if not cont:
            raise ValueError(f"{ex.task} example {ex.index}: continuation {continuation!r} has no tokens")
        if len(cont) >= max_len:
            raise ValueError(f"{ex.task} example {ex.index}: continuation of {len(cont)} tokens does not fit "
                             f"the model's {max_len} positions")
        out.append((ctx, cont))
    return out


def score_continuations(model, mode, pairs, *, batch: int = 8, sparse_prefix: bool = False, progress=None):
    """(log-likelihood, greedy) of each (context ids, continuation ids) pair: the summed log-probability
    of the continuation's tokens, and whether each of them is the argmax. Contexts are left-truncated to
    fit the model (as lm-eval does); similar lengths share a padded batch; with ``sparse_prefix`` the
    context is decoded sparsely too."""
    max_len = model.cfg.max_positions
    out = [None] * len(pairs)
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    for s in range(0, len(order), batch):
        idx = order[s: s + batch]
        group = [(pairs[i][0][-(max_len - len(pairs[i][1])):], pairs[i][1]) for i in idx]
        P = max(len(c) + len(t) for c, t in group)
        tok = torch.zeros(len(group), P, dtype=torch.long)
        for r, (c, t) in enumerate(group):
            tok[r, : len(c) + len(t)] = torch.tensor(c + t)
        tok = tok.to(model.device)
        starts = torch.tensor([1 if sparse_prefix else len(c) for c, _ in group])
        logits = sparse_logits(model, tok, mode, starts)
        nll = token_nll(logits, tok)  # nll[:, t] scores token t + 1
        for r, (i, (c, t)) in enumerate(zip(idx, group, strict=True)):
            span = slice(len(c) - 1, len(c) + len(t) - 1)
            greedy = bool((logits[r, span].argmax(dim=-1) == tok[r, len(c): len(c) + len(t)]).all())
            out[i] = (-float(nll[r, span].sum()), greedy)
        if progress is not None:
            progress.update(len(group))
    return out


def accuracy(model, mode, tokenizer, examples: list[Example], *, batch: int = 8, sparse_prefix: bool = False,
             progress=None) -> Accuracy:
    """lm-eval ``acc`` and ``acc_norm`` over ``examples`` (``mode`` bound to ``model``)."""
    if not examples:
        raise ValueError("no examples to evaluate")
    keys, pairs = [], []  # (example number, choice), (ctx ids, cont ids)
    for n, ex in enumerate(examples):
        for c, pair in enumerate(_requests(ex, tokenizer, model.cfg.max_positions)):
            keys.append((n, c))
            pairs.append(pair)
    scored = score_continuations(model, mode, pairs, batch=batch, sparse_prefix=sparse_prefix, progress=progress)
    loglik = {k: ll for k, (ll, _) in zip(keys, scored, strict=True)}
    correct = correct_norm = 0
    for n, ex in enumerate(examples):
        ll = [loglik[(n, c)] for c in range(len(ex.choices))]
        conts = [cont for _, cont in ex.choices]
        # acc_norm divides by the length of what the choices differ in: the continuation without lm-eval's
        # target delimiter, or the context for Winogrande's partial scoring (one shared continuation)
        lengths = [len(ctx) for ctx, _ in ex.choices] if len(set(conts)) == 1 else [len(t) - 1 for t in conts]
        norm = [v / max(1, n_chars) for v, n_chars in zip(ll, lengths, strict=True)]
        correct += int(max(range(len(ll)), key=ll.__getitem__) == ex.gold)
        correct_norm += int(max(range(len(norm)), key=norm.__getitem__) == ex.gold)
    return Accuracy(correct / len(examples), correct_norm / len(examples), len(examples))


# ------------------------------------------------------------------ sweeps (shadowbench quality)
QUALITY_MODES = ("dense", "static", "dejavu", "shadowllm", "oracle", "threshold")
# The oracle's criterion where none of the requested criteria is one of its own (models.modes.ORACLE_CRITERIA): the
# head output L2 norm and |activation| of a dense pass (models.modes.Oracle).
ORACLE_CRITERION = "l2norm"
# The threshold mode's: each input entry's magnitude against a calibrated per-layer threshold (models.threshold).
THRESHOLD_CRITERION = "magnitude"


@dataclass(frozen=True)
class QualityCase:
    mode: str
    criterion: str | None
    policy: str | None
    sparsity: float

    def key(self):
        return (self.mode, self.criterion, self.policy, self.sparsity)


def quality_cases(modes, criteria, sparsities, policies) -> list[QualityCase]:
    from models.modes import ORACLE_CRITERIA, mode_variants

    bad = [m for m in modes if m not in QUALITY_MODES]
    if bad:
        raise ValueError(f"unknown mode(s) {bad}; known: {', '.join(QUALITY_MODES)}")
    out = []
    for mode in modes:
        if mode == "dense":
            out.append(QualityCase("dense", None, None, 0.0))
            continue
        if mode == "oracle":  # the requested criteria it can rank by (l2norm, plainact), else l2norm
            crits = [c for c in criteria if c in ORACLE_CRITERIA] or [ORACLE_CRITERION]
        else:
            crits = [THRESHOLD_CRITERION] if mode == "threshold" else criteria
        for crit in crits:
            for s in sparsities:
                if s == 0.0:
                    continue
                out += [QualityCase(mode, crit, pol, s) for pol, _ in mode_variants(mode, policies=policies)]
    return out


def mode_of(case: QualityCase, *, criteria_dir, predictors_dir, granularity="token", predictor_dtype="model",
            head_sparsity=None, neuron_sparsity=None, kv_rule="skip", thresholds=None, neuron_rule="topk"):
    """The mode of a case (``models.modes.make_mode``) with its importance file (static) or trained predictor
    (dejavu, shadowllm), and that file's path."""
    from pathlib import Path

    from models.modes import NEURON_RULE_MODES, make_mode

    source = importance = predictor = None
    if case.mode == "static":
        path = Path(criteria_dir or ".") / f"importance-{case.criterion}.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"static mode needs {path} (make it with `shadowbench collect --criteria "
                                    f"{case.criterion}`)")
        source = importance = str(path)
    elif case.mode == "threshold":
        if thresholds is None or not Path(thresholds).is_file():
            raise FileNotFoundError(f"threshold mode needs the thresholds file {thresholds} (make it with "
                                    f"`shadowbench calibrate --sparsity {case.sparsity:g}`)")
        source = importance = str(thresholds)
    elif case.mode not in ("dense", "oracle"):
        path = Path(predictors_dir or ".") / f"{case.mode}-{case.criterion}.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"mode {case.mode} needs the predictor {path} (make it with `shadowbench train "
                                    f"--kind {case.mode} --criterion {case.criterion}`)")
        source = predictor = str(path)
    mode = make_mode(case.mode, sparsity=case.sparsity, policy=case.policy, granularity=granularity,
                     predictor=predictor, importance=importance, predictor_dtype=predictor_dtype,
                     head_sparsity=head_sparsity, neuron_sparsity=neuron_sparsity, kv_rule=kv_rule,
                     neuron_rule=neuron_rule if case.mode in NEURON_RULE_MODES else "topk",
                     oracle_criterion=case.criterion if case.mode == "oracle" else "l2norm")
    return mode, source


@dataclass
class QualityRun:
    """What ``run_quality`` did: the rows it wrote now, and the rows of every requested case (written now or found
    done in the file with the same settings)."""
    new: list
    rows: list


def check_quality_args(*, limit=None, shots=0, ppl_tokens=4096, context=512, stride=256, batch=8, sparsities=(),
                       policies=("global",), granularity="token", modes=(), predictor_dtype="model",
                       head_sparsity=None, neuron_sparsity=None, kv_rule="skip", neuron_rule="topk") -> None:
    """Every value that would otherwise fail after the model is loaded, checked first (ValueError naming it)."""
    from models.modes import GRANULARITIES, PREDICTOR_DTYPES
    from models.plan import NEURON_RULES, POLICIES, check_kv_rule

    bad = [m for m in modes if m not in QUALITY_MODES]
    if bad:
        raise ValueError(f"unknown mode(s) {bad}; known: {', '.join(QUALITY_MODES)}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit (examples per task) must be a positive integer or None for all, got {limit!r}")
    if not isinstance(shots, int) or shots < 0:
        raise ValueError(f"shots must be an integer >= 0, got {shots!r}")
    for name, v in (("ppl_tokens", ppl_tokens), ("context", context), ("stride", stride), ("batch", batch)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if ppl_tokens < 2:
        raise ValueError(f"ppl_tokens must be at least 2 (one token predicts the next), got {ppl_tokens}")
    if stride > context:
        raise ValueError(f"stride ({stride}) must not exceed context ({context}): tokens between windows would "
                         "never be scored")
    bad = [s for s in sparsities if not (isinstance(s, (int, float)) and 0.0 <= s < 1.0)]
    if bad:
        raise ValueError(f"sparsity must be in [0, 1), got {bad}")
    bad = [p for p in policies if p not in POLICIES]
    if bad:
        raise ValueError(f"unknown policy {bad}; known: {', '.join(POLICIES)}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if predictor_dtype not in PREDICTOR_DTYPES:
        raise ValueError(f"predictor_dtype must be one of {PREDICTOR_DTYPES}, got {predictor_dtype!r}")
    for name, v in (("head_sparsity", head_sparsity), ("neuron_sparsity", neuron_sparsity)):
        if v is not None and not (isinstance(v, (int, float)) and 0.0 <= v < 1.0):
            raise ValueError(f"{name} must be in [0, 1) or None, got {v!r}")
    check_kv_rule(kv_rule)
    if neuron_rule not in NEURON_RULES:
        raise ValueError(f"neuron_rule must be one of {NEURON_RULES}, got {neuron_rule!r}")
    global_ruled = sorted({"oracle", "shadowllm"} & set(modes)) if "global" in policies else []
    if neuron_rule == "threshold" and global_ruled:
        raise ValueError(f"neuron rule 'threshold' keeps each layer's neurons above that layer's threshold, so "
                         f"{' and '.join(global_ruled)} need policy 'local'; got policies {list(policies)}")


def run_quality(model, tokenizer, *, model_name: str, modes, criteria, sparsities, policies=("global",),
                granularity="token", tasks=(), shots=0, limit=None, ppl=True, ppl_tokens=4096, context=512,
                stride=256, sparse_prefix=None, criteria_dir=None, predictors_dir=None, data_dir=None,
                out_path="runs/quality.jsonl", batch=8, progress=True, predictor_dtype="model", head_sparsity=None,
                neuron_sparsity=None, kv_rule="skip", thresholds=None, config_key=None, on_mode=None,
                neuron_rule="topk", calib_tokens=4096) -> QualityRun:
    """Perplexity and accuracy rows for every case; resumes ``out_path`` and records failed cases.

    A case is done when the file holds its rows with the same settings: the model, mode, criterion, policy,
    sparsity, evaluation and shots, and also the dtype, granularity, sparse context, example limit, perplexity
    tokens, window and stride, predictor dtype, and the sha256 of the predictor or importance file. A changed
    setting is a new case; the settings are recorded in each row (``extra.settings``).

    ``sparse_prefix``: None (default) decodes accuracy contexts sparsely (the paper's setting: every position
    sparse) and keeps perplexity windows' prefixes dense (a prefill, as in decoding); True or False sets both.
    ``on_mode(case, mode, source)``: called with each case's bound mode (the Pareto sweep times the same object).
    ``neuron_rule`` ``threshold``: the predictor modes keep each layer's neurons above a per-layer threshold,
    calibrated per case on the first ``calib_tokens`` tokens of WikiText-2 validation in windows of ``context``
    (:func:`models.sparse_forward.calibrate_neuron_thresholds`); rows record the rule and the calibration."""
    import traceback

    from .results import device_name, file_digest, git_commit, make_row, row_writer, settings_key
    from .tasks import load_task, wikitext2_text

    check_quality_args(limit=limit, shots=shots, ppl_tokens=ppl_tokens, context=context, stride=stride, batch=batch,
                       sparsities=sparsities, policies=policies, granularity=granularity, modes=modes,
                       predictor_dtype=predictor_dtype, head_sparsity=head_sparsity, neuron_sparsity=neuron_sparsity,
                       kv_rule=kv_rule, neuron_rule=neuron_rule)
    cases = quality_cases(modes, criteria, sparsities, policies)
    tp = model.tp  # a tensor-parallel rank (models.tp): rank 0 writes; a failure stops the group (no error rows)
    writer = row_writer(out_path, tp)
    have: dict[str, list] = {}
    for r in writer.resume():
        key = (r.get("extra") or {}).get("case_key")
        if r.get("kind") == "quality" and r.get("status") == "ok" and key:
            have.setdefault(key, []).append(r)
    dtype = str(model.dtype).replace("torch.", "")
    base = dict(kind="quality", model=model_name, batch=1, device=device_name(model.device), dtype=dtype,
                git_commit=git_commit(), granularity=granularity,
                predictor_dtype=predictor_dtype)
    if tp is not None:
        base.update(tp=tp.world, tp_plan=tp.plan)
    evals = []
    if ppl:
        ids = tokenizer.encode(wikitext2_text(data_dir), special=False)[:ppl_tokens]
        evals.append(("wikitext2", ids))
    for task in tasks:
        pool = load_task(task, "predictor", data_dir) if shots else None
        exs = load_task(task, "eval", data_dir, limit)
        evals.append((task, [with_shots(e, pool, shots) for e in exs] if shots else exs))
    bar = None
    if progress and (tp is None or tp.rank == 0):
        from tqdm import tqdm

        bar = tqdm(total=len(cases) * len(evals), desc="quality", unit="eval")
    new, rows = [], []
    calib = None  # the neuron-threshold calibration windows, made once
    calib_scores: dict = {}  # their neuron scores per scorer
    for case in cases:
        common = dict(base, mode=case.mode, criterion=case.criterion, policy=case.policy, sparsity=case.sparsity)
        try:
            mode, source = mode_of(case, criteria_dir=criteria_dir, predictors_dir=predictors_dir,
                                   granularity=granularity, predictor_dtype=predictor_dtype,
                                   head_sparsity=head_sparsity, neuron_sparsity=neuron_sparsity, kv_rule=kv_rule,
                                   thresholds=thresholds, neuron_rule=neuron_rule)
            common = dict(common, **mode.budgets())
            if config_key is not None:  # the Pareto sweep's join key (bench.pareto)
                common = dict(common, config_key=config_key(case, mode, source))
            digest = file_digest(source)
            mode.bind(model)
            if getattr(mode, "neuron_rule", "topk") == "threshold" and not mode.buffers.dense_neurons:
                if calib is None:
                    from .tasks import wikitext2_valid_text

                    ids = tokenizer.encode(wikitext2_valid_text(data_dir), special=False)[:calib_tokens]
                    calib = [ids[i: i + context] for i in range(0, len(ids), context) if len(ids[i: i + context]) > 1]
                from models.sparse_forward import calibrate_neuron_thresholds, neuron_calibration_scores

                # the scores hang on the scorer (mode, criterion, file), not the sparsity: a sweep scores once
                ck = (case.mode, case.criterion, source)
                if ck not in calib_scores:
                    calib_scores[ck] = neuron_calibration_scores(model, mode, calib)
                calibrate_neuron_thresholds(model, mode, scores=calib_scores[ck])
                common = dict(common, neuron_calibration=f"WikiText-2 validation, {sum(map(len, calib))} tokens, "
                                                         f"windows of {context}")
            if on_mode is not None:
                on_mode(case, mode, source)
            pred = getattr(mode, "predictor", None)
            meta = getattr(pred, "meta", None) or {}
            if "normalisation" in meta:  # how the predictor's targets were normalised when it was trained
                common = dict(common, predictor_normalisation=meta["normalisation"], predictor_log=meta.get("log"))
            if pred is not None:  # its widths and what it was trained on (a dataset file or rows streamed)
                common = dict(common, predictor_hidden=pred.hidden, predictor_ffn_hidden=getattr(pred, "ffn_hidden",
                                                                                                 None),
                              predictor_data=meta.get("dataset"), predictor_n_train=meta.get("n_train"))
            if getattr(mode, "neuron_input", None):  # DejaVu: what its neurons were scored from
                common = dict(common, neuron_input=mode.neuron_input)
            if getattr(mode, "input_site", None):  # ShadowLLM: what its one predictor reads
                common = dict(common, shadowllm_input=mode.input_site)
            if len(getattr(mode, "stages", ())) > 1:  # ShadowLLM in stages: the layers whose input each net reads
                common = dict(common, shadowllm_stages=",".join(map(str, mode.stages)))
        except Exception as err:  # noqa: BLE001 - recorded as a failed row; the sweep goes on
            if tp is not None:
                raise
            row = make_row(**common, metric="error", value=None, unit=None, status="error",
                           error=f"{type(err).__name__}: {err}")
            writer.write([row])
            new.append(row)
            rows.append(row)
            if bar is not None:
                bar.update(len(evals))
            continue
        for name, data in evals:
            sparse_ctx = (name != "wikitext2") if sparse_prefix is None else bool(sparse_prefix)
            settings = {"model": model_name, "mode": case.mode, "criterion": case.criterion, "policy": case.policy,
                        "sparsity": case.sparsity, "eval": name, "dtype": dtype, "granularity": granularity,
                        "sparse_prefix": sparse_ctx, "predictor_dtype": predictor_dtype,
                        "source_sha256": digest, **mode.budgets()}
            if tp is not None:
                settings.update(tp=tp.world, tp_plan=tp.plan)
            if name == "wikitext2":
                settings.update(ppl_tokens=ppl_tokens, context=context, stride=stride)
            else:
                settings.update(shots=shots, limit=limit)
            key = settings_key(settings)
            if key in have:
                rows += have[key]
                if bar is not None:
                    bar.update(1)
                continue
            stamp = dict(common, source=source, settings=settings, case_key=key, sparse_prefix=sparse_ctx)
            tally = getattr(getattr(mode, "buffers", None), "neuron_tally", None)
            if tally is not None:
                tally[:] = [0, 0]
            try:
                if name == "wikitext2":
                    r = perplexity(model, mode, data, context=context, stride=stride, sparse_prefix=sparse_ctx,
                                   batch=max(1, batch // 2))
                    out = [make_row(**stamp, metric="perplexity", value=r.ppl, unit="ppl", eval=name, tokens=r.tokens,
                                    windows=r.windows, context=context, stride=stride)]
                else:
                    r = accuracy(model, mode, tokenizer, data, batch=batch, sparse_prefix=sparse_ctx)
                    out = [make_row(**stamp, metric=m, value=v, unit="fraction", eval=name, examples=r.n, shots=shots)
                           for m, v in (("acc", r.acc), ("acc_norm", r.acc_norm))]
            except Exception as err:  # noqa: BLE001
                if tp is not None:
                    raise
                out = [make_row(**stamp, metric="error", value=None, unit=None, status="error", eval=name,
                                error=f"{type(err).__name__}: {err}", trace=traceback.format_exc(limit=3))]
            # the share the threshold rule kept on this text, every position
            if getattr(mode, "neuron_rule", "topk") == "threshold" and tally and tally[1]:
                for row in out:
                    row["extra"]["neuron_kept_share"] = float(tally[0]) / tally[1]
            writer.write(out)
            new += out
            rows += out
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return QualityRun(new, rows)


def quality_table(rows) -> str:
    """Perplexity and accuracy per case, one line each: dense first, the oracle (the ceiling) next. ``s`` is
    ``heads/neurons`` where the two budgets differ; ``kv:always`` marks that key/value rule; ``[folder]`` the
    predictor or importance folder where one mode's rows come from several."""
    from pathlib import PurePath

    cases: dict = {}
    keep = [r for r in rows if r.get("kind") == "quality" and r["status"] == "ok" and r["metric"] in ("perplexity",
                                                                                                       "acc")]
    folders: dict = {}  # rows of one mode from several predictor / importance folders: the folder joins the label
    for r in keep:
        src = r["extra"].get("source")
        if src:
            folders.setdefault((r["model"], r["mode"]), set()).add(PurePath(src).parent.name)
    for r in keep:
        e = r["extra"]
        hs, ns = e.get("head_sparsity", r["sparsity"]), e.get("neuron_sparsity", r["sparsity"])
        s_txt = f"{r['sparsity']:.2f}" if hs == ns else f"{hs:.2f}/{ns:.2f}"
        mode = r["mode"] + (f" {e['neuron_input']}-in" if e.get("neuron_input") else "")
        mode += " residual-in" if e.get("shadowllm_input") == "residual" else ""
        mode += f" stages:{e['shadowllm_stages']}" if e.get("shadowllm_stages") else ""
        mode += " neurons:threshold" if e.get("neuron_rule") == "threshold" else ""
        mode += " kv:always" if e.get("kv_rule") == "always" else ""
        if e.get("eval") != "wikitext2" and e.get("sparse_prefix") is False and r["mode"] != "dense":
            mode += " dense-ctx"
        if e.get("source") and len(folders[(r["model"], r["mode"])]) > 1:
            mode += f" [{PurePath(e['source']).parent.name}]"
        key = (r["model"], mode, r["criterion"] or "-", r["policy"] or "-", s_txt)
        cases.setdefault(key, {})[e["eval"]] = r["value"]
    evals = sorted({e for v in cases.values() for e in v}, key=lambda e: (e != "wikitext2", e))
    mw = max([26] + [len(k[1]) for k in cases])
    head = f"{'model':<14} {'mode':<{mw}} {'criterion':<9} {'policy':<7} {'s':>9} "
    head += " ".join(f"{e[:10]:>10}" for e in evals)
    lines = [head]
    order = {"dense": 0, "oracle": 1}
    for key in sorted(cases, key=lambda k: (k[0], order.get(k[1].split()[0], 2), k[1], k[2], k[3], k[4])):
        vals = cases[key]
        lines.append(f"{key[0][:14]:<14} {key[1]:<{mw}} {key[2]:<9} {key[3]:<7} {key[4]:>9} " + " ".join(
            f"{vals[e]:>10.4g}" if e in vals else f"{'-':>10}" for e in evals))
    return "\n".join(lines)
