"""Continuous batching of recurrent states: one decode loop, requests joining and leaving at any step.

A recurrent model's cache for one sequence is a fixed set of tensors, so a batch is just those tensors
stacked along the first dimension, every row at its own position (``RecurrentCache.positions``). The engine
keeps them in preallocated *slots* (``[max_batch, ...]`` per state tensor): a row joins by copying its state
into the next free slot and leaves by moving the last row into its slot, so neither costs more than one
row's state, whatever the batch size. Each decode step feeds one token per row through the model.

Prompts are read (prefilled) in slices, at most ``prefill_chunk`` tokens of them between two decode steps
(one slice of a long prompt, or several short prompts), so prompts arriving never stall the completions
already streaming for more than that. Slices end at the prompt's split points (the multiples of
``prefill_chunk`` and the ends of chat messages), where the prompt-state cache
(:mod:`densessm.serving.prefix_cache`) keeps states: a prompt continued from a cached state runs exactly the
model calls a cold one runs, hence the same tokens.

Exactness: a prompt is read as ``model.generate`` reads it (one row, the same call for a prompt up to a
slice long), tokens are chosen per row from that row's logits, and the rows of a batch never interact, so
greedy output equals ``model.generate(do_sample=False)`` for the same prompt, alone or among many.

The engine's loop runs in one thread (``densessm serve``: the main thread, while uvicorn serves HTTP from
another); the HTTP side talks to it through :meth:`Engine.submit` and :meth:`Engine.cancel` and receives each
request's events through the callback it passed. A failing request ends with an error event and leaves the
batch; the engine goes on serving.
"""

from __future__ import annotations

import bisect
import copy
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import CompileConfig, PreTrainedModel, PreTrainedTokenizerBase

from densessm.cache import RecurrentCache
from densessm.compiled_decoding import CompiledDecoder
from densessm.errors import NonFiniteError
from densessm.loading import raise_nonfinite
from densessm.serving.metrics import ServerMetrics
from densessm.serving.prefix_cache import PrefixCache, State, split_points, state_bytes
from densessm.serving.sampling import Sampler, SamplingParams, TokenLogprob
from densessm.serving.text import TextStream

log = logging.getLogger("densessm.serve")


class QueueFull(Exception):
    """The waiting queue is at its bound: the client should retry later (HTTP 429)."""


class EngineClosed(Exception):
    """The engine is shutting down and takes no new request (HTTP 503)."""


@dataclass
class Delta:
    """New output of one completion: text safe to show, and the tokens (with log-probabilities) behind it."""

    choice: int
    text: str
    tokens: list[int]
    logprobs: list[TokenLogprob] | None


@dataclass
class Finished:
    """One completion ended: ``reason`` is ``stop`` (end-of-text token or stop sequence) or ``length``."""

    choice: int
    reason: str
    text: str  # the last text, held back until now
    completion_tokens: int


@dataclass
class Done:
    """Every completion of the request ended."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass
class Failed:
    """The request failed; ``status`` is the HTTP status that fits."""

    message: str
    status: int = 500


Event = Delta | Finished | Done | Failed


@dataclass
class EngineConfig:
    """Limits and sizes of the engine (the ``densessm serve`` flags)."""

    max_batch: int = 16
    max_queue: int = 64
    prefill_chunk: int = 256
    prefix_cache_bytes: int = 2**30
    max_model_len: int = 2048
    compile: bool = False

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "prefill_chunk", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.prefix_cache_bytes < 0:
            raise ValueError(f"prefix_cache_bytes must be >= 0, got {self.prefix_cache_bytes}")


@dataclass
class GenerationRequest:
    """One API request: its prompts (token ids), ``n`` completions of each, and where its events go.

    ``emit`` is called from the engine's thread with a list of events; it must not block. ``boundaries``
    optionally gives, per prompt, token counts after which a prefix is worth caching (the ends of earlier
    chat messages).
    """

    prompts: list[list[int]]
    params: SamplingParams
    emit: Callable[[list[Event]], None]
    n: int = 1
    boundaries: list[list[int]] | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    arrival: float = field(default_factory=time.monotonic)


class _Request:
    """Engine-side bookkeeping of a request."""

    def __init__(self, request: GenerationRequest):
        self.api = request
        self.open_choices = len(request.prompts) * request.n
        self.jobs_left = len(request.prompts)  # prompts not yet in the batch (or finished without it)
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.first_token_at: float | None = None
        self.done = False
        self.queued = True  # counts against --max-queue until every prompt is in the batch
        self.outbox: list[Event] = []

    def send(self) -> None:
        if self.outbox:
            events, self.outbox = self.outbox, []
            self.api.emit(events)


class _Choice:
    """One completion: a row of the batch once its prompt is read."""

    def __init__(self, request: _Request, index: int, prompt_len: int, sampler: Sampler, text: TextStream):
        self.request = request
        self.index = index
        self.prompt_len = prompt_len
        self.sampler = sampler
        self.text = text
        self.generated = 0
        self.pending = 0  # the last token chosen, not yet fed to the model
        self.finished = False
        self.last_token_at = 0.0

    @property
    def position(self) -> int:
        """Tokens the row's state has consumed."""
        return self.prompt_len + self.generated - 1


class _Job:
    """One prompt being read, slice by slice."""

    def __init__(self, request: _Request, prompt_index: int, tokens: list[int], boundaries: list[int]):
        self.request = request
        self.prompt_index = prompt_index
        self.tokens = tokens
        self.boundaries = boundaries
        self.read = 0
        self.splits: list[int] = []  # where the slices end (see densessm.serving.prefix_cache)
        self.keys: dict[int, bytes] = {}
        self.cache: RecurrentCache | None = None
        self.keep: set[int] = set()  # split points whose state goes into the prefix cache
        self.started = False
        self.finished = False
        self.choices: list[_Choice] = []  # made when the prompt is read; rows still to join


class _Slots:
    """The batch's states, preallocated for ``capacity`` rows; rows ``0 .. len(rows)-1`` are in use."""

    def __init__(self, prototype: RecurrentCache, capacity: int, bucketed: bool):
        self.prototype = prototype
        self.capacity = capacity
        # rows beyond those in use are only computed in padded (bucketed) steps: zeros there, untouched memory
        # otherwise (a large model's batch of states is gigabytes, committed only as rows first join)
        alloc = torch.zeros if bucketed else torch.empty
        self.buffers: State = [
            {name: alloc((capacity, *t.shape[1:]), dtype=t.dtype, device=t.device) for name, t in layer.items()}
            for layer in prototype.layers
        ]
        self.positions = torch.zeros(capacity, dtype=torch.long, device=prototype.positions.device)
        self.rows: list[_Choice] = []
        self.bucketed = bucketed  # compiled steps: a few fixed batch sizes, views kept (static addresses)
        self._views: dict[int, RecurrentCache] = {}

    @property
    def free(self) -> int:
        return self.capacity - len(self.rows)

    def add(self, choice: _Choice, state: State, position: int) -> None:
        slot = len(self.rows)
        for buffers, layer in zip(self.buffers, state, strict=True):
            for name, tensor in layer.items():
                buffers[name][slot : slot + 1].copy_(tensor)
        self.positions[slot] = position
        self.rows.append(choice)

    def remove(self, slot: int) -> None:
        last = len(self.rows) - 1
        if slot != last:
            for buffers in self.buffers:
                for tensor in buffers.values():
                    tensor[slot].copy_(tensor[last])
            self.positions[slot] = self.positions[last]
            self.rows[slot] = self.rows[last]
        self.rows.pop()

    def width(self) -> int:
        """Rows a decode step computes: the rows in use, or the next bucket (a power of two) when bucketed."""
        rows = len(self.rows)
        if not self.bucketed:
            return rows
        return min(self.capacity, 1 << (rows - 1).bit_length())

    def view(self, width: int, steps: int) -> RecurrentCache:
        """A cache over the first ``width`` slots; the same object for a width when bucketed."""
        cache = self._views.get(width) if self.bucketed else None
        if cache is None:
            cache = make_cache(
                self.prototype,
                [{name: t[:width] for name, t in layer.items()} for layer in self.buffers],
                self.positions[:width],
                steps,
            )
            if self.bucketed:
                self._views[width] = cache
        cache.steps = steps
        return cache

    def absorb(self, cache: RecurrentCache, width: int) -> None:
        """Copy back the state tensors a step replaced instead of updating in place."""
        for buffers, layer in zip(self.buffers, cache.layers, strict=True):
            for name, tensor in layer.items():
                target = buffers[name][:width]
                if tensor.data_ptr() != target.data_ptr():
                    target.copy_(tensor)
                    layer[name] = target
        if cache.positions.data_ptr() != self.positions.data_ptr():
            self.positions[:width].copy_(cache.positions)
            cache.positions = self.positions[:width]


def make_cache(prototype: RecurrentCache, layers: State, positions: torch.Tensor, steps: int) -> RecurrentCache:
    """A cache holding ``layers`` and ``positions``, of the same kind as ``prototype`` (one the model made, so
    whatever it records about its model comes along)."""
    cache = copy.copy(prototype)
    cache.layers = layers
    cache.positions = positions
    cache.steps = steps
    # the rows come from different requests: the prototype's digests (of one prompt, one row) describe none of
    # them. The engine feeds each row its own tokens, so it keeps no digest
    cache.token_digest = cache.embedding_digest = None
    cache.digest_steps = cache.embedding_digest_steps = 0
    return cache


def continuation_mode(model: PreTrainedModel) -> str | None:
    """The forward mode for a prompt slice that continues a carried state: the model's choice for DenseRetNet
    (chunkwise), and DenseMamba's configured mode (its default for a carried state is token by token)."""
    return None if model.config.model_type == "dense_retnet" else model.config.forward_mode


class Engine:
    """The scheduler and decode loop; see the module docstring."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        config: EngineConfig,
        metrics: ServerMetrics | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer  # decoding only, in the engine's thread
        self.config = config
        self.metrics = metrics
        self.device = model.device
        self.stop_ids = self._stop_ids(model, tokenizer)
        self.decodable = len(tokenizer)  # ids the tokenizer can write (a padded vocabulary may hold more)
        self._continuation = continuation_mode(model)
        self._decoder = (
            CompiledDecoder(model, CompileConfig(fullgraph=True, dynamic=False)) if config.compile else model
        )
        prototype = self._warm_up()
        self.state_size = state_bytes(prototype.layers)
        self.slots = _Slots(prototype, config.max_batch, bucketed=config.compile)
        self.prefix_cache = PrefixCache(config.prefix_cache_bytes, self.state_size)
        self._lock = threading.Condition()
        self._inbox: deque[_Request] = deque()
        self._cancelled: set[str] = set()
        self._queued = 0  # requests submitted whose prompts are not all in the batch yet
        self._jobs: deque[_Job] = deque()
        self._requests: dict[str, _Request] = {}
        self._closing = False
        self._running = False
        self._thread: threading.Thread | None = None
        self.steps = 0

    @staticmethod
    def _stop_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
        ids = model.generation_config.eos_token_id
        ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        return frozenset(ids)

    @torch.no_grad()
    def _warm_up(self) -> RecurrentCache:
        """Run one token: proves the model computes finite logits and gives the shape of its state."""
        token = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        # with its mask: token 0 is often the padding id, which made transformers warn of padding at every start
        out = self.model(input_ids=token, attention_mask=torch.ones_like(token), use_cache=True, return_dict=True)
        if not bool(torch.isfinite(out.logits).all()):
            raise_nonfinite(self.model, "the logits of a warm-up token")
        return out.cache

    # --- the HTTP side -------------------------------------------------------------------------------------

    def start(self) -> None:
        """Run :meth:`run` in a thread of its own (for a caller that keeps its own thread)."""
        self._thread = threading.Thread(target=self.run, name="densessm-engine", daemon=True)
        self._thread.start()

    def submit(self, request: GenerationRequest) -> None:
        """Queue a request (its prompts already checked against the limits); raises :class:`QueueFull` or
        :class:`EngineClosed`."""
        with self._lock:
            if self._closing:
                raise EngineClosed("the server is shutting down")
            # waiting: the submitted requests not yet in the batch, beyond the slots free for them (the engine
            # thread seats them at its next step; counting them all refused requests while slots were free)
            waiting = self._queued - self.slots.free
            if waiting >= self.config.max_queue:
                if self.metrics:
                    self.metrics.rejected.inc()
                raise QueueFull(
                    f"the server is busy: {waiting} requests are already waiting for a slot (--max-queue "
                    f"{self.config.max_queue}); retry later"
                )
            self._queued += 1
            self._inbox.append(_Request(request))
            self._lock.notify()
        if self.metrics:
            self.metrics.prompt_tokens.inc(sum(len(p) for p in request.prompts))

    def cancel(self, request_id: str) -> None:
        """Drop a request (its client went away): its rows leave the batch at the next step."""
        with self._lock:
            self._cancelled.add(request_id)
            self._lock.notify()

    def stop(self, timeout: float | None = None) -> None:
        """End :meth:`run` (waiting for the thread of :meth:`start`); requests still open end with a 503 event."""
        with self._lock:
            self._closing = True
            self._lock.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._running and not self._closing

    def stats(self) -> dict[str, int]:
        return {
            "running": len(self.slots.rows),
            "waiting": self._queued,
            "prefix_cache_entries": len(self.prefix_cache),
            "prefix_cache_bytes": self.prefix_cache.bytes,
        }

    # --- the decode loop -----------------------------------------------------------------------------------

    def run(self, on_start: Callable[[], None] | None = None) -> None:
        """The decode loop, in the calling thread, until :meth:`stop`; ``on_start`` is called once it runs.

        ``densessm serve`` runs it in the main thread, which also loaded the model, so that one OpenMP team does
        all the model's work: a second team (another thread's) makes GNU OpenMP stop spinning between
        parallel regions once it manages more threads than there are cores, and each of the hundreds of small
        operations of a decode step then waits for its threads to wake (measured: a 350M decode step 15% slower).
        """
        self._running = True
        try:
            if on_start is not None:
                on_start()
            self._loop()
        finally:
            self._running = False
        self._fail_all("the server is shutting down", status=503)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._closing or self._inbox or self._cancelled or self._jobs or self.slots.rows):
                    self._lock.wait()
                if self._closing:
                    break
            try:
                self.step()
            except Exception as err:  # a bug, not a request's fault: tell everyone open, keep serving
                log.exception("engine step failed")
                self._fail_all(f"internal error in the decode loop ({type(err).__name__}): {err}")

    @torch.no_grad()
    def step(self) -> None:
        """One round: take in new and cancelled requests, read prompt slices, run one decode step."""
        self._admit()
        if self._jobs:
            self._prefill()
        if self.slots.rows:
            self._decode()
        self._update_gauges()

    def _admit(self) -> None:
        with self._lock:
            new, self._inbox = list(self._inbox), deque()
            cancelled, self._cancelled = self._cancelled, set()
        for request in new:
            self._requests[request.api.id] = request
            for index, tokens in enumerate(request.api.prompts):
                hints = request.api.boundaries[index] if request.api.boundaries else []
                self._jobs.append(_Job(request, index, tokens, hints))
        for request_id in cancelled:
            request = self._requests.get(request_id)
            if request is not None and not request.done:
                if self.metrics:
                    self.metrics.cancelled.inc()
                self._drop(request)

    def _prefill(self) -> None:
        """Read prompt slices, ``prefill_chunk`` tokens in all, before the next decode step: a long prompt one
        slice per step, several short ones together. Prompts are read in arrival order; one whose completions
        wait for free rows holds up those behind it."""
        budget = self.config.prefill_chunk
        while self._jobs and budget > 0:
            job = self._jobs[0]
            if job.choices:  # read, waiting for rows
                self._join(job)
                if job.choices:
                    return
                continue
            try:
                if not job.started:
                    self._start(job)
                length = job.splits[bisect.bisect_right(job.splits, job.read)] - job.read
                if length > budget:
                    return  # the rest of this round's budget is too small for the slice: next round
                self._read_slice(job)
                budget -= length
            except NonFiniteError as err:
                self._fail(job.request, str(err))
                continue
            except Exception as err:
                log.exception("prompt reading failed")
                self._fail(job.request, f"internal error while reading the prompt ({type(err).__name__}): {err}")
                continue
            if job.read < len(job.tokens):
                return  # a long prompt: one slice per round, so running streams never wait for more

    def _start(self, job: _Job) -> None:
        job.started = True
        request = job.request
        if self.metrics and job.prompt_index == 0:
            self.metrics.queue_time.observe(time.monotonic() - request.api.arrival)
        tokens, block = job.tokens, self.config.prefill_chunk
        job.splits = split_points(len(tokens), block, job.boundaries)
        found = self.prefix_cache.lookup(tokens, job.splits)
        job.keys = found.keys
        # kept: the boundaries the caller named (ends of chat messages), the deepest prefix an earlier prompt
        # shared (a system prompt, a few-shot block), and the prompt but its last slice (a repeat, or a later
        # prompt that extends this one), or all of it when it ends on a block boundary
        job.keep = set(job.splits[:-1]) & set(job.boundaries)
        job.keep |= {max(found.seen, default=0), job.splits[-2] if len(job.splits) > 1 else 0}
        if len(tokens) % block == 0:
            job.keep.add(len(tokens))
        if found.state is not None:
            job.read = found.length
            job.cache = make_cache(
                self.slots.prototype, found.state, torch.tensor([found.length], device=self.device), found.length
            )
            request.cached_tokens += found.length
        if self.metrics and self.prefix_cache.enabled:
            if found.state is not None:
                self.metrics.cache_hits.inc()
                self.metrics.cache_hit_tokens.inc(found.length)
            else:
                self.metrics.cache_misses.inc()

    def _read_slice(self, job: _Job) -> None:
        end = job.splits[bisect.bisect_right(job.splits, job.read)]
        ids = torch.tensor([job.tokens[job.read : end]], device=self.device)
        out = self.model(
            input_ids=ids,
            cache=job.cache,
            use_cache=True,
            mode=self._continuation if job.read else None,
            logits_to_keep=1,
            return_dict=True,
        )
        job.cache, job.read = out.cache, end
        if end in job.keep and end in job.keys:
            index = job.splits.index(end)
            self.prefix_cache.put(job.keys[end], job.tokens[:end], job.splits[: index + 1], job.cache.layers)
        if end < len(job.tokens):
            return
        logits = out.logits[0, -1].float()
        if not bool(torch.isfinite(logits).all()):
            raise_nonfinite(self.model, "the logits after the prompt")
        self._first_tokens(job, logits)
        self._join(job)

    def _first_tokens(self, job: _Job, logits: torch.Tensor) -> None:
        request, api = job.request, job.request.api
        for k in range(api.n):
            index = job.prompt_index * api.n + k
            seed = None if api.params.seed is None else api.params.seed + index
            choice = _Choice(
                request,
                index,
                len(job.tokens),
                Sampler(api.params, seed, self.device),
                TextStream(self.tokenizer, api.params.stop),
            )
            self._advance(choice, *choice.sampler(logits))
            if not choice.finished:
                job.choices.append(choice)
        now = time.monotonic()
        if request.first_token_at is None:
            request.first_token_at = now
            if self.metrics:
                self.metrics.ttft.observe(now - api.arrival)
        request.send()

    def _join(self, job: _Job) -> None:
        """Put a read prompt's open completions into the batch, when there are rows for all of them."""
        if job.request.done or not job.choices:
            self._job_done(job)
            return
        if self.slots.free < len(job.choices):
            return
        for choice in job.choices:
            self.slots.add(choice, job.cache.layers, len(job.tokens))
        job.choices = []
        self._job_done(job)

    def _job_done(self, job: _Job) -> None:
        if job.finished:
            return
        job.finished = True
        if job in self._jobs:
            self._jobs.remove(job)
        job.cache = None
        job.request.jobs_left -= 1
        if job.request.jobs_left == 0:
            self._dequeue(job.request)

    def _dequeue(self, request: _Request) -> None:
        if request.queued:
            request.queued = False
            with self._lock:
                self._queued -= 1

    def _decode(self) -> None:
        rows = self.slots.rows
        width = self.slots.width()
        tokens = torch.zeros(width, 1, dtype=torch.long)
        tokens[: len(rows), 0] = torch.tensor([row.pending for row in rows])
        cache = self.slots.view(width, max(row.position for row in rows))
        try:
            out = self._decoder(input_ids=tokens.to(self.device), cache=cache, use_cache=True, return_dict=True)
            self.slots.absorb(cache, width)
            logits = out.logits[: len(rows), -1].float()
            finite = torch.isfinite(logits).all(-1).tolist()
        except Exception as err:
            log.exception("decode step failed")
            self._fail_all(f"internal error in a decode step ({type(err).__name__}): {err}")
            return
        self.steps += 1
        if self.metrics:
            self.metrics.batch_size.observe(len(rows))
        touched: dict[int, _Request] = {}
        for slot, row in enumerate(list(rows)):
            request = row.request
            if request.done:
                continue
            if not finite[slot]:
                try:
                    raise_nonfinite(self.model, "the logits of a decode step")
                except NonFiniteError as err:
                    self._fail(request, str(err))
                continue
            self._advance(row, *row.sampler(logits[slot]))
            touched[id(request)] = request
        for slot in range(len(rows) - 1, -1, -1):
            if rows[slot].finished or rows[slot].request.done:
                self.slots.remove(slot)
        for request in touched.values():
            request.send()

    def _advance(self, choice: _Choice, token: int, logprob: TokenLogprob | None) -> None:
        """Record a chosen token: text, events, and whether the completion ends here."""
        request, params = choice.request, choice.request.api.params
        if request.done:
            return
        if token >= self.decodable:  # it would be written as nothing: a tokenizer not the model's own
            choice.finished = True
            vocab = self.model.config.vocab_size
            self._fail(
                request,
                f"the model chose token id {token}, which the server's tokenizer cannot write ({self.decodable} "
                f"tokens, the model's vocabulary {vocab}): start the server with the model's own tokenizer",
            )
            return
        now = time.monotonic()
        if self.metrics:
            self.metrics.generation_tokens.inc()
            if choice.generated:
                self.metrics.tpot.observe(now - choice.last_token_at)
        choice.last_token_at = now
        choice.generated += 1
        request.completion_tokens += 1
        choice.pending = token
        reason = None
        if token in self.stop_ids:
            text, reason = "", "stop"
        else:
            text = choice.text.push(token)
            if choice.text.stopped:
                reason = "stop"
            elif (
                choice.generated >= params.max_tokens
                or choice.prompt_len + choice.generated >= self.config.max_model_len
            ):
                reason = "length"
        request.outbox.append(Delta(choice.index, text, [token], None if logprob is None else [logprob]))
        if reason is not None:
            choice.finished = True
            request.outbox.append(Finished(choice.index, reason, choice.text.flush(), choice.generated))
            request.open_choices -= 1
            if request.open_choices == 0:
                self._complete(request)

    def _complete(self, request: _Request) -> None:
        prompt_tokens = sum(len(p) for p in request.api.prompts)
        request.outbox.append(Done(prompt_tokens, request.completion_tokens, request.cached_tokens))
        request.done = True
        self._requests.pop(request.api.id, None)
        if self.metrics:
            self.metrics.e2e.observe(time.monotonic() - request.api.arrival)

    def _drop(self, request: _Request) -> None:
        """Take a request out of the queue and the batch (its rows leave at once)."""
        request.done = True
        self._requests.pop(request.api.id, None)
        for job in [j for j in self._jobs if j.request is request]:
            self._job_done(job)
        self._dequeue(request)
        for slot in range(len(self.slots.rows) - 1, -1, -1):
            if self.slots.rows[slot].request is request:
                self.slots.remove(slot)

    def _fail(self, request: _Request, message: str, status: int = 500) -> None:
        if request.done:
            return
        if self.metrics:
            self.metrics.failed.inc()
        request.outbox = [Failed(message, status)]
        self._drop(request)
        request.send()

    def _fail_all(self, message: str, status: int = 500) -> None:
        for request in list(self._requests.values()):
            self._fail(request, message, status)
        with self._lock:
            for request in self._inbox:
                request.api.emit([Failed(message, status)])
                self._queued -= 1
            self._inbox.clear()
        self._jobs.clear()
        self.slots.rows.clear()

    def _update_gauges(self) -> None:
        if self.metrics:
            self.metrics.running.set(len(self.slots.rows))
            self.metrics.waiting.set(self._queued)
            self.metrics.cache_entries.set(len(self.prefix_cache))
            self.metrics.cache_bytes.set(self.prefix_cache.bytes)


__all__ = [
    "Delta",
    "Done",
    "Engine",
    "EngineClosed",
    "EngineConfig",
    "Event",
    "Failed",
    "Finished",
    "GenerationRequest",
    "QueueFull",
    "continuation_mode",
    "make_cache",
]
