"""Corpus perplexity and bits per byte, computed two ways.

- **sliding window** (what any causal LM can do): windows of ``window`` tokens whose starts are ``stride``
  apart; each window scores only the tokens no earlier window scored, so every token is scored once, with at
  least ``window - stride`` tokens of context. Smaller strides give more context and cost more forward passes
  (``window / stride`` times the tokens).
- **carried state** (what a recurrent model adds): consecutive windows that do not overlap, each starting from
  the recurrent state the previous one left, so every token is scored once with its whole document as context
  for the cost of a single pass. A Transformer would need a KV cache that grows with the document.

Both score the same tokens: every token of every document except its first, which has no context (the
tokenizer's own special tokens, if it adds any, count as document tokens). Perplexity is
``exp(total NLL / scored tokens)``; bits per byte is ``total NLL / ln 2 / UTF-8 bytes of the text``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from densessm.data import file_documents, find_data_files
from densessm.evaluation.loading import check_model_dir
from densessm.inference import int8_problem, quantize_int8
from densessm.loading import load_causal_lm, raise_nonfinite

METHODS = ("sliding", "carried")
IGNORE = -100


@dataclass
class PerplexityResult:
    """What one method measured on a set of documents."""

    method: str  # "sliding" or "carried"
    window: int  # tokens per forward call
    stride: int  # tokens between window starts (carried: the window itself)
    tokens: int  # tokens scored
    nll: float  # their total negative log-likelihood, in nats
    forward_tokens: int  # tokens read by the model (the cost)
    seconds: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)

    def bits_per_byte(self, num_bytes: int) -> float:
        return self.nll / math.log(2) / num_bytes

    def summary(self, num_bytes: int) -> dict:
        return asdict(self) | {"perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte(num_bytes)}


def read_documents(path: str | Path) -> list[str]:
    """The documents under ``path``, in the formats ``densessm`` trains on and read by the same readers, so a bad
    file is the same one-line error naming it (and its line or row): a ``.txt`` file is one document, a
    ``.jsonl``/``.json``/``.parquet`` record's ``text`` one each; ``.gz``/``.xz``/``.bz2`` are read."""
    return [text for files in find_data_files([path]).values() for name in files for text in file_documents(name)]


def _pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ``rows`` into ``[B, L]`` ids and an attention mask."""
    length = max(map(len, rows))
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids.to(device), mask.to(device)


def _nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Summed NLL (fp32 log-softmax) of the labels that are not IGNORE, and their count."""
    nll = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    return nll.item(), int((labels != IGNORE).sum())


def _check_finite(model: torch.nn.Module, logits: torch.Tensor, mask: torch.Tensor, what: str) -> None:
    """Stop with the parameter to blame when a real token's logits are NaN/inf: a perplexity computed from
    them would be NaN or, worse, a finite number that means nothing."""
    if not bool(torch.isfinite(logits[mask.bool()]).all()):
        raise_nonfinite(model, what)


def _check_documents(documents: list[list[int]], window: int) -> list[list[int]]:
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    usable = [doc for doc in documents if len(doc) >= 2]
    if not usable:
        raise ValueError("no document has two tokens or more: nothing to score")
    return usable


def sliding_spans(length: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first)`` per window of a ``length``-token document: it reads tokens ``[begin, end)`` and
    scores ``[first, end)``; together the windows score tokens ``1 … length-1`` once each."""
    spans, begin, first = [], 0, 1
    while first < length:
        end = min(begin + window, length)
        spans.append((begin, end, first))
        begin, first = begin + stride, end
    return spans


@torch.no_grad()
def score_sliding(
    model: torch.nn.Module,
    documents: list[list[int]],
    window: int,
    stride: int,
    batch_size: int = 8,
    pad_id: int = 0,
    progress: bool = False,
) -> PerplexityResult:
    """Sliding-window NLL of token-id ``documents`` (see the module docstring)."""
    documents = _check_documents(documents, window)
    if not 1 <= stride < window:
        raise ValueError(f"stride must be in [1, window) so that every token is scored once, got {stride}")
    spans = [(doc, *span) for doc in documents for span in sliding_spans(len(doc), window, stride)]
    device = next(model.parameters()).device
    nll, tokens, read = 0.0, 0, 0
    start = time.perf_counter()
    bar = tqdm(
        total=sum(end - begin for _, begin, end, _ in spans), desc="sliding windows", unit="tok", disable=not progress
    )
    for i in range(0, len(spans), batch_size):
        batch = spans[i : i + batch_size]
        ids, mask = _pad([doc[begin:end] for doc, begin, end, _ in batch], pad_id, device)
        labels = torch.full_like(ids, IGNORE)
        for row, (doc, begin, end, first) in enumerate(batch):
            # the logit at window position j predicts document token begin + j + 1
            labels[row, first - begin - 1 : end - begin - 1] = torch.tensor(doc[first:end])
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        _check_finite(model, logits, mask, f"the logits of sliding-window batch {i // batch_size + 1}")
        batch_nll, batch_tokens = _nll(logits, labels)
        nll, tokens, read = nll + batch_nll, tokens + batch_tokens, read + int(mask.sum())
        bar.update(int(mask.sum()))
    bar.close()
    return PerplexityResult("sliding", window, stride, tokens, nll, read, time.perf_counter() - start)


@torch.no_grad()
def score_carried(
    model: torch.nn.Module,
    documents: list[list[int]],
    window: int,
    batch_size: int = 8,
    pad_id: int = 0,
    progress: bool = False,
) -> PerplexityResult:
    """NLL of token-id ``documents`` read in consecutive windows that carry the recurrent state.

    Documents are batched longest first, so the rows still running are always a prefix of the batch: a finished
    row is dropped from the state (``batch_select_indices``) rather than padded on; only the last window of a
    row is padded, and the model ignores padding exactly.
    """
    documents = _check_documents(documents, window)
    documents = sorted(documents, key=len, reverse=True)
    device = next(model.parameters()).device
    nll, tokens, read = 0.0, 0, 0
    start = time.perf_counter()
    bar = tqdm(total=sum(map(len, documents)), desc="carried state", unit="tok", disable=not progress)
    for i in range(0, len(documents), batch_size):
        rows = documents[i : i + batch_size]
        cache, last_logits = None, None
        for begin in range(0, len(rows[0]), window):
            active = sum(len(row) > begin for row in rows)
            if cache is not None and active < cache.batch_size:
                cache.batch_select_indices(torch.arange(active))
                last_logits = last_logits[:active]
            ids, mask = _pad([row[begin : begin + window] for row in rows[:active]], pad_id, device)
            out = model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
            cache, logits = out.cache, out.logits
            _check_finite(model, logits, mask, f"the logits of document batch {i // batch_size + 1} at token {begin}")
            labels = ids.masked_fill(mask == 0, IGNORE)
            if last_logits is None:  # the first window: its first token has no context
                logits, labels = logits[:, :-1], labels[:, 1:]
            else:  # the previous window's last logit predicts this window's first token
                logits = torch.cat([last_logits[:, None], logits[:, :-1]], dim=1)
            batch_nll, batch_tokens = _nll(logits, labels)
            nll, tokens, read = nll + batch_nll, tokens + batch_tokens, read + int(mask.sum())
            last_logits = out.logits[torch.arange(active, device=device), mask.sum(-1) - 1]
            bar.update(int(mask.sum()))
    bar.close()
    return PerplexityResult("carried", window, window, tokens, nll, read, time.perf_counter() - start)


def evaluate_perplexity(
    model_dir: str | Path,
    data: str | Path,
    window: int = 512,
    stride: int | None = None,
    methods: tuple[str, ...] = METHODS,
    batch_size: int = 8,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    quantize: str | None = None,
) -> dict:
    """Perplexity and bits per byte of the model in ``model_dir`` on the text at ``data``, by each of
    ``methods``; ``stride`` defaults to half the window. ``quantize="int8"`` scores it with int8 weights
    (:func:`~densessm.inference.quantize_int8`; float32 activations, CPU). Returns a report for
    :mod:`densessm.evaluation.report`."""
    if not methods or not set(methods) <= set(METHODS):
        raise ValueError(f"methods must be one or both of {', '.join(METHODS)}, got {methods!r}")
    if quantize is not None:
        if quantize != "int8":
            raise ValueError(f"quantize must be 'int8' or None, got {quantize!r}")
        dtype = torch.float32 if dtype is None else dtype
        problem = int8_problem(device, dtype)
        if problem is not None:
            raise ValueError(problem)
    stride = window // 2 if stride is None else stride
    config, tokenizer = check_model_dir(model_dir)  # a model that cannot run is named before the data is read
    texts = read_documents(data)
    model = load_causal_lm(model_dir, dtype=dtype, device=device, config=config)
    if quantize is not None:
        quantize_int8(model)
    ids = tokenizer(texts, verbose=False)["input_ids"]
    scored = [(text, doc) for text, doc in zip(texts, ids, strict=True) if len(doc) >= 2]
    documents = [doc for _, doc in scored]
    num_bytes = sum(len(text.encode("utf-8")) for text, _ in scored)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    results = []
    for method in methods:
        if method == "sliding":
            result = score_sliding(model, documents, window, stride, batch_size, pad_id, progress)
        else:
            result = score_carried(model, documents, window, batch_size, pad_id, progress)
        results.append(result.summary(num_bytes))
    return {
        "kind": "perplexity",
        "model": str(model_dir),
        "data": str(data),
        "documents": len(documents),
        "tokens": results[0]["tokens"],
        "bytes": num_bytes,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "device": str(device),
        "quantize": quantize,
        "batch_size": batch_size,
        "results": results,
    }
