"""Choosing each next token of one completion: the OpenAI sampling parameters, applied to one row's logits.

Every completion (choice) has its own :class:`Sampler` with its own random generator, so what it samples
depends only on its seed and its own logits, never on which other requests share the decode batch. With
``temperature == 0`` and no bias or penalty the choice is the plain arg-max of the logits: the token
``model.generate(do_sample=False)`` picks.
"""

from __future__ import annotations

import secrets
from collections import Counter
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks of its completions, already checked (see :mod:`densessm.serving.protocol`)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's log-probability and the k most likely

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class TokenLogprob:
    """The log-probability of a chosen token under the model, and the ``k`` most likely alternatives."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


class Sampler:
    """The next-token rule of one completion: bias, penalties, temperature, nucleus, seeded draw.

    Log-probabilities are those of the model's own distribution (the raw logits), as OpenAI reports them,
    not of the distribution after temperature or penalties.
    """

    def __init__(self, params: SamplingParams, seed: int | None, device: torch.device):
        self.params = params
        self.counts: Counter[int] = Counter()  # tokens generated so far, for the penalties
        self.generator: torch.Generator | None = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(seed if seed is not None else secrets.randbits(32))  # 32 bits are kept
        self._bias: torch.Tensor | None = None

    def _biased(self, logits: torch.Tensor) -> torch.Tensor:
        params = self.params
        if params.logit_bias:
            if self._bias is None:
                self._bias = torch.zeros_like(logits)
                ids = torch.tensor(list(params.logit_bias), device=logits.device)
                self._bias[ids] = torch.tensor(list(params.logit_bias.values()), dtype=logits.dtype, device=ids.device)
            logits = logits + self._bias
        if self.counts and (params.presence_penalty or params.frequency_penalty):
            ids = torch.tensor(list(self.counts), device=logits.device)
            counts = torch.tensor(list(self.counts.values()), dtype=logits.dtype, device=logits.device)
            penalty = counts * params.frequency_penalty + params.presence_penalty
            logits = logits.index_add(0, ids, -penalty)
        return logits

    def __call__(self, logits: torch.Tensor) -> tuple[int, TokenLogprob | None]:
        """The next token for ``logits [vocab]`` (float32) and, when asked, its log-probabilities."""
        params = self.params
        scores = self._biased(logits)
        if params.greedy:
            token = int(scores.argmax())
        else:
            # shifted by the largest score first (the same distribution): a tiny temperature then sends the
            # others to -inf instead of every score to +-inf (a NaN distribution). One that is 0 in the scores'
            # precision gives the limit: the most likely tokens, equally
            shifted = scores - scores.max()
            if params.temperature >= torch.finfo(scores.dtype).tiny:
                probs = torch.softmax(shifted / params.temperature, dim=-1)
            else:
                probs = (shifted == 0).to(scores.dtype)
                probs /= probs.sum()
            if params.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                # keep the smallest set whose mass reaches top_p (the most likely token always stays)
                drop = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
                drop[0] = False  # also when top_p is below float32's smallest value (it reads as 0)
                sorted_probs[drop] = 0.0
                probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        self.counts[token] += 1
        if params.logprobs is None:
            return token, None
        logprobs = torch.log_softmax(logits, dim=-1)
        top: tuple[tuple[int, float], ...] = ()
        if params.logprobs:
            values, ids = logprobs.topk(params.logprobs)
            top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
        return token, TokenLogprob(token, float(logprobs[token]), top)


__all__ = ["Sampler", "SamplingParams", "TokenLogprob"]
