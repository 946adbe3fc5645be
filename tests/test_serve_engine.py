"""The serving engine in process: continuous batching is exact, rows join and leave at any step, prompts are
read in slices between decode steps, the prompt-state cache changes nothing, failures stay with their request."""

from __future__ import annotations

import queue

import pytest
import torch
from conftest import tiny_config, tiny_mamba_config
from transformers import SequenceBiasLogitsProcessor

from densessm import DenseMambaForCausalLM, DenseRetNetForCausalLM
from densessm.serving.engine import (
    Delta,
    Done,
    Engine,
    EngineClosed,
    EngineConfig,
    Failed,
    Finished,
    GenerationRequest,
    QueueFull,
)
from densessm.serving.sampling import SamplingParams

EOS = 2  # the word tokenizer's </s>
NO_EOS = {EOS: -100.0}  # keeps a random model from ending early, where a test needs the full length


def make_model(family: str):
    torch.manual_seed(0)
    if family == "retnet":
        return DenseRetNetForCausalLM(tiny_config()).eval()
    return DenseMambaForCausalLM(tiny_mamba_config(eos_token_id=EOS)).eval()


def random_prompts(count: int, longest: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, longest + 1, (count,), generator=g).tolist()
    return [torch.randint(3, 97, (n,), generator=g).tolist() for n in lengths]


class Collector:
    """A request's events, as the HTTP layer would receive them."""

    def __init__(self):
        self.events: queue.Queue = queue.Queue()

    def __call__(self, events):
        for event in events:
            self.events.put(event)

    def drain(self) -> list:
        out = []
        while not self.events.empty():
            out.append(self.events.get())
        return out


def submit(
    engine: Engine, prompt: list[int], n: int = 1, boundaries: list[int] | None = None, **params
) -> tuple[GenerationRequest, Collector]:
    params.setdefault("max_tokens", 8)
    params.setdefault("temperature", 0.0)
    sink = Collector()
    hints = None if boundaries is None else [boundaries]
    request = GenerationRequest([prompt], SamplingParams(**params), emit=sink, n=n, boundaries=hints)
    engine.submit(request)
    return request, sink


def wait(sink: Collector, timeout: float = 60.0) -> dict:
    """Tokens per choice, finish reasons, log-probabilities and the final Done (or Failed) of a request."""
    result = {"tokens": {}, "text": {}, "reasons": {}, "logprobs": {}, "end": None}
    while result["end"] is None:
        event = sink.events.get(timeout=timeout)
        if isinstance(event, Delta):
            result["tokens"].setdefault(event.choice, []).extend(event.tokens)
            result["text"][event.choice] = result["text"].get(event.choice, "") + event.text
            result["logprobs"].setdefault(event.choice, []).extend(event.logprobs or [])
        elif isinstance(event, Finished):
            result["reasons"][event.choice] = event.reason
            result["text"][event.choice] = result["text"].get(event.choice, "") + event.text
        else:
            result["end"] = event
    return result


def reference(model, prompt: list[int], max_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


@pytest.fixture
def engines(word_tokenizer):
    made = []

    def build(model, **config) -> Engine:
        engine = Engine(model, word_tokenizer, EngineConfig(**config))
        made.append(engine)
        return engine

    yield build
    for engine in made:
        engine.stop()


@pytest.mark.parametrize("family", ["retnet", "mamba"])
def test_greedy_equals_generate_among_many_concurrent_requests(engines, family):
    """16 requests at once through a 4-row batch, prompts read in 8-token slices: each gets what
    model.generate gives it alone."""
    model = make_model(family)
    engine = engines(model, max_batch=4, prefill_chunk=8)
    engine.start()
    prompts = random_prompts(16, 30)
    sinks = [submit(engine, p, max_tokens=10)[1] for p in prompts]
    for prompt, sink in zip(prompts, sinks, strict=True):
        result = wait(sink)
        assert isinstance(result["end"], Done)
        assert result["tokens"][0] == reference(model, prompt, 10)


def test_rows_join_and_leave_at_any_step(engines):
    """Driven step by step: a second request joins while the first decodes, the first leaves, and the
    freed slot takes a third; every output equals generate's."""
    model = make_model("retnet")
    engine = engines(model, max_batch=2, prefill_chunk=64)
    prompts = random_prompts(3, 12, seed=5)
    _, first = submit(engine, prompts[0], max_tokens=5, logit_bias=NO_EOS)
    engine.step()  # its prompt is read (token 1) and it decodes (token 2)
    engine.step()
    _, second = submit(engine, prompts[1], max_tokens=9, logit_bias=NO_EOS)
    engine.step()
    assert len(engine.slots.rows) == 2
    _, third = submit(engine, prompts[2], max_tokens=3, logit_bias=NO_EOS)
    engine.step()  # the third's prompt is read but the batch is full; the first ends: its slot is free
    assert len(engine.slots.rows) == 1
    results = [wait(first, timeout=0.1)]
    engine.step()  # the third joins the freed slot
    assert len(engine.slots.rows) == 2
    while engine.slots.rows or engine._jobs:
        engine.step()
    results += [wait(second, timeout=0.1), wait(third, timeout=0.1)]
    for prompt, result, count in zip(prompts, results, (5, 9, 3), strict=True):
        assert result["tokens"][0] == reference_no_eos(model, prompt, count)


def reference_no_eos(model, prompt: list[int], max_tokens: int) -> list[int]:
    """generate() with the end-of-text token banned as ``logit_bias={EOS: -100}`` bans it."""
    bias = SequenceBiasLogitsProcessor({(EOS,): -100.0})
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=0,
            logits_processor=[bias],
        )
    return out[0, len(prompt) :].tolist()


def test_long_prompt_is_read_between_decode_steps(engines):
    """A 40-token prompt read in 8-token slices: the running stream gets a token at every step meanwhile."""
    engine = engines(make_model("retnet"), max_batch=4, prefill_chunk=8)
    _, running = submit(engine, [5, 6, 7], max_tokens=50, logit_bias=NO_EOS)
    engine.step()
    running.drain()
    _, late = submit(engine, random_prompts(1, 1, seed=2)[0] * 40, max_tokens=2)
    for _ in range(5):  # five slices of the late prompt
        engine.step()
        assert sum(isinstance(e, Delta) for e in running.drain()) == 1
    assert any(isinstance(e, Delta) for e in late.drain())  # its first token came with the last slice


def test_short_prompts_are_read_together_within_the_budget(engines):
    """prefill_chunk bounds the prompt tokens read between two decode steps: 3 + 3 fit in 8, 3 more wait."""
    model = make_model("retnet")
    engine = engines(model, max_batch=4, prefill_chunk=8)
    prompts = [[4, 5, 6], [7, 8, 9], [10, 11, 12]]
    sinks = [submit(engine, p, max_tokens=5, logit_bias=NO_EOS)[1] for p in prompts]
    engine.step()
    assert len(engine.slots.rows) == 2
    engine.step()
    assert len(engine.slots.rows) == 3
    while engine.slots.rows:
        engine.step()
    for prompt, sink in zip(prompts, sinks, strict=True):
        assert wait(sink, timeout=0.1)["tokens"][0] == reference_no_eos(model, prompt, 5)


def test_prefix_cache_hit_gives_the_tokens_and_logprobs_of_a_miss(engines):
    """Two prompts sharing a 20-token prefix: the second continues from the cached state after 16 tokens
    (block 8) and gets, bit for bit, the log-probabilities of an engine without a cache."""
    model = make_model("retnet")
    shared = random_prompts(1, 1, seed=3)[0] * 20
    first, second = shared + [11, 12, 13], shared + [21, 22]
    cached = engines(model, max_batch=2, prefill_chunk=8)
    cold = engines(model, max_batch=2, prefill_chunk=8, prefix_cache_bytes=0)
    cached.start()
    cold.start()
    wait(submit(cached, first)[1])
    hit = wait(submit(cached, second, logprobs=3)[1])
    miss = wait(submit(cold, second, logprobs=3)[1])
    assert hit["end"].cached_tokens == 16 and miss["end"].cached_tokens == 0
    assert hit["tokens"] == miss["tokens"]
    assert hit["logprobs"] == miss["logprobs"]  # exact floats: the same model calls
    assert hit["tokens"][0] == reference(model, second, 8)


def test_a_message_boundary_is_cached_exactly_where_it_ends(engines):
    """A 13-token system message named as a boundary: the next request with it continues from its end (not
    from the block boundary before it), with the log-probabilities of a cold read."""
    model = make_model("mamba")
    system = random_prompts(1, 1, seed=4)[0] * 13
    cached = engines(model, prefill_chunk=8)
    cold = engines(model, prefill_chunk=8, prefix_cache_bytes=0)
    cached.start()
    cold.start()
    wait(submit(cached, system + [30, 31], boundaries=[13])[1])
    hit = wait(submit(cached, system + [40, 41, 42], boundaries=[13], logprobs=2)[1])
    miss = wait(submit(cold, system + [40, 41, 42], boundaries=[13], logprobs=2)[1])
    assert hit["end"].cached_tokens == 13
    assert hit["logprobs"] == miss["logprobs"]
    assert hit["tokens"][0] == reference(model, system + [40, 41, 42], 8)


def test_prefix_cache_keeps_a_prefix_two_prompts_share(engines):
    """A system prompt seen by two requests is kept (at its last block boundary), so the third hits it."""
    engine = engines(make_model("mamba"), max_batch=2, prefill_chunk=4)
    system = list(range(10, 21))  # 11 tokens: boundaries at 4 and 8
    ends = []
    for tail in ([30, 31, 32, 33, 34, 35], [40, 41], [50]):
        request, sink = submit(engine, system + tail, max_tokens=2)
        while not any(isinstance(e, Done) for e in sink.events.queue):
            engine.step()
        ends.append(wait(sink, timeout=0.1)["end"].cached_tokens)
    assert ends == [0, 0, 8]


def test_n_completions_share_one_prompt_read(engines):
    model = make_model("retnet")
    engine = engines(model, max_batch=4)
    engine.start()
    prompt = [4, 5, 6, 7]
    greedy = wait(submit(engine, prompt, n=3, max_tokens=6)[1])
    assert [greedy["tokens"][i] for i in range(3)] == [reference(model, prompt, 6)] * 3
    sampled = wait(submit(engine, prompt, n=3, max_tokens=6, temperature=1.0, seed=7)[1])
    again = wait(submit(engine, prompt, n=3, max_tokens=6, temperature=1.0, seed=7)[1])
    assert sampled["tokens"] == again["tokens"]
    assert len({tuple(t) for t in sampled["tokens"].values()}) > 1  # choice i draws with seed + i


def test_seeded_sampling_does_not_depend_on_the_batch(engines):
    engine = engines(make_model("retnet"), max_batch=8, prefill_chunk=4)
    engine.start()
    params = dict(max_tokens=12, temperature=0.8, top_p=0.9, seed=123, logit_bias=NO_EOS)
    alone = wait(submit(engine, [9, 8, 7], **params)[1])["tokens"]
    crowd = [submit(engine, p, max_tokens=12, temperature=1.0)[1] for p in random_prompts(5, 9)]
    together = wait(submit(engine, [9, 8, 7], **params)[1])["tokens"]
    for sink in crowd:
        wait(sink)
    assert alone == together


def test_stop_sequence_ends_the_text_before_it(engines, word_tokenizer):
    model = make_model("retnet")
    engine = engines(model, max_batch=2)
    engine.start()
    prompt = [4, 5, 6]
    words = word_tokenizer.decode(reference_no_eos(model, prompt, 6)).split()
    stop = f" {words[2]} {words[3]}"  # spans two tokens
    result = wait(submit(engine, prompt, max_tokens=6, stop=(stop, "never"), logit_bias=NO_EOS)[1])
    assert result["text"][0] == f"{words[0]} {words[1]}"
    assert result["reasons"][0] == "stop"


def test_end_of_text_and_length_are_the_finish_reasons(engines):
    engine = engines(make_model("retnet"), max_batch=2)
    engine.start()
    ended = wait(submit(engine, [4, 5], max_tokens=5, logit_bias={EOS: 100.0})[1])
    assert ended["tokens"][0] == [EOS] and ended["reasons"][0] == "stop" and ended["text"][0] == ""
    full = wait(submit(engine, [4, 5], max_tokens=5, logit_bias=NO_EOS)[1])
    assert len(full["tokens"][0]) == 5 and full["reasons"][0] == "length"
    assert full["end"].completion_tokens == 5 and full["end"].prompt_tokens == 2


def test_cancel_frees_the_slot_for_the_next_request(engines):
    engine = engines(make_model("retnet"), max_batch=1)
    endless, _ = submit(engine, [4, 5], max_tokens=10_000, logit_bias=NO_EOS)
    engine.step()
    _, waiting = submit(engine, [6, 7], max_tokens=3)
    engine.step()
    engine.step()
    assert [row.request.api is endless for row in engine.slots.rows] == [True]
    engine.cancel(endless.id)
    engine.step()
    assert len(engine.slots.rows) == 1 and engine.slots.rows[0].request.api is not endless
    while not any(isinstance(e, Done) for e in waiting.events.queue):
        engine.step()
    assert engine.stats()["waiting"] == 0


def test_a_row_with_non_finite_logits_fails_alone(engines):
    model = make_model("retnet")
    engine = engines(model, max_batch=2)
    _, healthy = submit(engine, [4, 5, 6], max_tokens=6)
    _, broken = submit(engine, [7, 8], max_tokens=6)
    while len(engine.slots.rows) < 2:
        engine.step()
    slot = next(i for i, row in enumerate(engine.slots.rows) if row.request.api.prompts == [[7, 8]])
    for buffers in engine.slots.buffers:
        buffers["state"][slot].fill_(float("nan"))
    while engine.slots.rows:
        engine.step()
    failed = wait(broken, timeout=0.1)["end"]
    assert isinstance(failed, Failed) and "not finite" in failed.message
    assert wait(healthy, timeout=0.1)["tokens"][0] == reference(model, [4, 5, 6], 6)


def test_queue_bound_and_shutdown(engines):
    engine = engines(make_model("retnet"), max_batch=1, max_queue=1)
    submit(engine, [4], max_tokens=3)  # for the free slot: not waiting (it was refused while the slot was free)
    submit(engine, [5], max_tokens=3)  # the one queue place
    with pytest.raises(QueueFull, match=r"1 requests are already waiting for a slot \(--max-queue 1\)"):
        submit(engine, [6], max_tokens=3)
    engine.start()
    engine.stop()
    with pytest.raises(EngineClosed):
        submit(engine, [7], max_tokens=3)


def test_stopping_ends_open_requests_with_503(engines):
    engine = engines(make_model("retnet"), max_batch=1)
    _, sink = submit(engine, [4, 5], max_tokens=10_000, logit_bias=NO_EOS)
    engine.start()
    sink.events.get(timeout=30)  # it is running
    engine.stop()
    events = []
    while not events or not isinstance(events[-1], Failed):
        events.append(sink.events.get(timeout=30))
    assert events[-1].status == 503


@pytest.mark.slow
def test_compiled_decode_steps_give_the_same_tokens(engines):
    """``--compile``: decode steps padded to power-of-two widths over fixed slot views (CUDA graphs on a GPU;
    here inductor on the CPU, tens of seconds per width) give generate's tokens."""
    model = make_model("retnet")
    engine = engines(model, max_batch=4, prefill_chunk=8, compile=True)
    engine.start()
    prompts = random_prompts(6, 12, seed=9)
    sinks = [submit(engine, p, max_tokens=6)[1] for p in prompts]
    answers = [wait(sink, timeout=600)["tokens"][0] for sink in sinks]
    engine.stop()  # before generate() uses the model in this thread: one compiled and one eager user at a time
    assert answers == [reference(model, prompt, 6) for prompt in prompts]
    assert set(engine.slots._views) <= {1, 2, 4}


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-45])
def test_a_tiny_temperature_draws_the_most_likely_token(temperature):
    """Dividing the logits by a subnormal temperature overflowed them all (a NaN distribution, an internal
    error): the largest is subtracted first, so the distribution is the most likely token's."""
    from densessm.serving.sampling import Sampler, SamplingParams

    logits = torch.tensor([0.5, 3.0, -1.0, 2.0])
    sampler = Sampler(SamplingParams(max_tokens=1, temperature=temperature), seed=1, device=torch.device("cpu"))
    assert [sampler(logits)[0] for _ in range(5)] == [1] * 5


def test_a_top_p_too_small_for_float32_keeps_the_most_likely_token():
    """top_p = 1e-300 reads as 0 in float32: the nucleus is then the most likely token alone, never empty."""
    from densessm.serving.sampling import Sampler, SamplingParams

    logits = torch.tensor([0.5, 3.0, -1.0, 2.0])
    sampler = Sampler(SamplingParams(max_tokens=1, temperature=1.0, top_p=1e-300), seed=1, device=torch.device("cpu"))
    assert [sampler(logits)[0] for _ in range(5)] == [1] * 5


@pytest.mark.parametrize("n", [1, 3])
def test_a_token_the_tokenizer_cannot_write_fails_the_request_naming_why(engines, n):
    """With a tokenizer smaller than the model's vocabulary (another model's), ids beyond it were written as
    nothing: an empty answer with a 200."""
    torch.manual_seed(0)
    model = DenseRetNetForCausalLM(tiny_config(vocab_size=4096)).eval()
    with torch.no_grad():
        model.lm_head.weight[:97] -= 100  # every id the 97-token tokenizer has is unlikely
    engine = engines(model, max_batch=4)
    engine.start()
    result = wait(submit(engine, [5, 17, 33], n=n, max_tokens=4)[1])
    assert isinstance(result["end"], Failed) and result["end"].status == 500
    assert "which the server's tokenizer cannot write (97 tokens, the model's vocabulary 4096)" in result["end"].message
    assert engine.stats()["running"] == 0  # its rows left the batch
    fine = wait(submit(engine, [5, 17, 33], max_tokens=2, logit_bias={5: 1000.0})[1])  # the engine goes on
    assert isinstance(fine["end"], Done) and fine["tokens"][0] == [5, 5]


def test_starting_does_not_warn_of_padding(word_tokenizer, monkeypatch):
    """The warm-up token (id 0, the padding id) went in without a mask: every start printed transformers' "We
    strongly recommend passing in an attention_mask since your input_ids may be padded"."""
    model = make_model("mamba")
    calls = []
    monkeypatch.setattr(model.base_model, "warn_if_padding_and_no_attention_mask", lambda ids, m: calls.append(m))
    Engine(model, word_tokenizer, EngineConfig(max_batch=2)).stop()
    assert calls and all(mask is not None for mask in calls)
