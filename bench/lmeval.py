"""Our decoder in any mode as an lm-evaluation-harness model (optional extra: ``pip install shadowbench[lmeval]``).

``ShadowbenchLM(model, tokenizer, mode)`` answers ``loglikelihood`` requests through the same per-position
sparse forward as ``shadowbench quality`` (so a sparse mode is evaluated with its decode semantics) and
tokenizes pairs as lm-eval's own Hugging Face model does (:func:`bench.quality.encode_pair`).
``loglikelihood_rolling`` scores whole strings in windows of the model's context; ``generate_until`` is
not offered (the harness's generation tasks are out of scope here).

Use it with lm-eval's Python API, e.g. ``lm_eval.evaluator.evaluate(lm=ShadowbenchLM(...), task_dict=...)``;
tasks can read local files (``dataset_path: json`` with ``data_files``), so nothing needs the network.
"""

from __future__ import annotations

from lm_eval.api.model import LM

from .quality import encode_pair, score_continuations


class ShadowbenchLM(LM):
    def __init__(self, model, tokenizer, mode, *, batch_size: int = 8, sparse_prefix: bool = False):
        super().__init__()
        self.model, self.tokenizer, self.mode = model, tokenizer, mode
        self.batch_size, self.sparse_prefix = batch_size, sparse_prefix
        if getattr(mode, "model", None) is not model:
            mode.bind(model)

    def _score(self, pairs):
        return score_continuations(self.model, self.mode, pairs, batch=self.batch_size,
                                   sparse_prefix=self.sparse_prefix)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return self._score([encode_pair(self.tokenizer, *req.args) for req in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        """Whole-string log-likelihood: chunks of up to ``window - 1`` target tokens, each after as much of
        the preceding text (from the prefix token on) as fits the window."""
        window = self.model.cfg.max_positions
        out = []
        for req in requests:
            full = [self.tokenizer.prefix_id] + self.tokenizer.encode(req.args[0], special=False)
            n = len(full) - 1
            pairs = []
            for a in range(0, n, window - 1):
                b = min(a + window - 1, n)
                pairs.append((full[max(0, b + 1 - window): a + 1], full[a + 1: b + 1]))
            out.append(sum(ll for ll, _ in self._score(pairs)))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("ShadowbenchLM scores log-likelihoods only; generation tasks are not supported")
