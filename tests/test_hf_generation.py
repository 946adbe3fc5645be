"""Generation conformance, on every registered family (``densessm.models.FAMILIES``): what transformers'
``GenerationTesterMixin`` checks, each result compared with a computation that does not go through the path
under test: the full forward's argmax or logits, a sampling loop written here, or the same call without a
cache (the model's parallel form over the whole sequence at every step).

The models are the tiny presets in float64 (exact comparisons, no near-ties), with every weight perturbed so
that greedy decoding does not fall into repeating one token: ``test_the_models_under_test_are_not_degenerate``
fails if a family ever does, so no check here can pass on a constant output.
"""

from __future__ import annotations

import re

import pytest
import torch
from transformers import (
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)
from transformers.generation.streamers import BaseStreamer
from transformers.generation.utils import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput

from densessm import RecurrentCache
from densessm.models import FAMILIES
from densessm.presets import load_preset
from densessm.tokenizer import load_tokenizer

NAMES = [family.name for family in FAMILIES]
LENGTH, NEW, CONSUMED = 8, 4, 5  # prompt tokens, new tokens, tokens a prompt cache consumed
# the recurrent state against the parallel form: DenseRetNet's parallel form also divides each q·k row by its clamped
# absolute sum, which the per-head RMSNorm after it undoes up to its epsilon (docs/modes.md); generate() keeps its
# scores and logits in float32
TOLERANCE = 1e-4

# decoding strategies, as generate() keywords (top_k=0: plain sampling, which the loop below reproduces)
STRATEGIES = {
    "greedy": dict(do_sample=False),
    "sample": dict(do_sample=True, top_k=0, temperature=0.8),
    "beam": dict(do_sample=False, num_beams=3),
    "beam_sample": dict(do_sample=True, num_beams=2, top_k=0),
    "sample_sequences": dict(do_sample=True, top_k=0, num_return_sequences=2),
    "beam_sequences": dict(do_sample=False, num_beams=3, num_return_sequences=2),
}


def _model(name: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    family = next(family for family in FAMILIES if family.name == name)
    model = family.causal_lm(load_preset(f"dense_{name}_tiny", chunk_size=3, **overrides)).to(torch.float64).eval()
    with torch.no_grad():
        for param in model.parameters():  # opens the gates that start closed, and breaks repeating fixed points
            param.add_(torch.randn_like(param) * 0.2)
    model.generation_config.eos_token_id = None  # every row generates all its tokens unless a test sets one
    model.generation_config.pad_token_id = 0
    return model


def _prompt(model, rows: int = 2, length: int = LENGTH, padded: bool = False):
    tokens = torch.randint(3, model.config.vocab_size, (rows, length))
    mask = torch.ones_like(tokens)
    if padded:  # left padding: row 0 has three pads, the last row one
        tokens[0, :3], mask[0, :3] = 0, 0
        tokens[-1, :1], mask[-1, :1] = 0, 0
    return tokens, mask


def _embed(model, tokens: torch.Tensor) -> torch.Tensor:
    return model.get_input_embeddings()(tokens).detach()


def _grown(mask: torch.Tensor, width: int) -> torch.Tensor:
    """The attention mask of a sequence grown to ``width`` by generated tokens (always real)."""
    return torch.cat([mask, mask.new_ones(mask.shape[0], width - mask.shape[1])], 1)


def _full_logits(model, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens, attention_mask=mask, use_cache=False, mode="parallel").logits


def _assert_greedy(model, sequences: torch.Tensor, start: int, mask: torch.Tensor | None = None) -> None:
    """Every token from ``start`` on is the argmax of the full forward over the tokens before it."""
    mask = None if mask is None else _grown(mask, sequences.shape[1] - 1)
    logits = _full_logits(model, sequences[:, :-1], mask)
    assert torch.equal(sequences[:, start:], logits[:, start - 1 :].argmax(-1))


def _generate(model, seed: int = 5, **kwargs):
    if "max_length" not in kwargs:
        kwargs.setdefault("max_new_tokens", NEW)
    torch.manual_seed(seed)
    return model.generate(**kwargs)


@pytest.mark.parametrize("name", NAMES)
def test_the_models_under_test_are_not_degenerate(name):
    model = _model(name)
    tokens, _ = _prompt(model)
    out = _generate(model, input_ids=tokens, do_sample=False)
    for row in out[:, LENGTH:].tolist():
        assert len(set(row)) >= NEW - 1, row  # greedy decoding does not repeat one token
    assert not torch.equal(out[0, LENGTH:], out[1, LENGTH:])


# ---- decoding strategies -------------------------------------------------------------------------------------


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
@pytest.mark.parametrize("name", NAMES)
def test_greedy_is_the_full_forward_s_argmax(name, padded):
    model = _model(name)
    tokens, mask = _prompt(model, padded=padded)
    out = _generate(model, input_ids=tokens, attention_mask=mask, do_sample=False)
    assert out.shape == (2, LENGTH + NEW)
    _assert_greedy(model, out, LENGTH, mask)


@pytest.mark.parametrize("name", NAMES)
def test_sampling_draws_from_the_full_forward_s_distribution(name):
    """Seeded sampling gives the tokens that a loop drawing from softmax(full logits / temperature) gives."""
    model = _model(name)
    tokens, _ = _prompt(model)
    out = _generate(model, input_ids=tokens, **STRATEGIES["sample"])
    torch.manual_seed(5)
    sequence = tokens
    for _ in range(NEW):
        probs = torch.softmax(_full_logits(model, sequence)[:, -1] / 0.8, -1)
        sequence = torch.cat([sequence, torch.multinomial(probs, 1)], 1)
    assert torch.equal(out, sequence)
    greedy = _generate(model, input_ids=tokens, do_sample=False)
    assert not torch.equal(out, greedy)  # it did sample


@pytest.mark.parametrize("strategy", ["beam", "beam_sample", "sample_sequences", "beam_sequences"])
@pytest.mark.parametrize("name", NAMES)
def test_each_strategy_equals_the_same_call_without_a_cache(name, strategy):
    """Beams and several sequences per prompt through the recurrent state give what generate() computes
    without one (the whole sequence through the parallel form at every step)."""
    model = _model(name)
    tokens, mask = _prompt(model, padded=True)
    kwargs = dict(input_ids=tokens, attention_mask=mask, **STRATEGIES[strategy])
    out = _generate(model, **kwargs)
    assert torch.equal(out, _generate(model, use_cache=False, **kwargs))
    returned = STRATEGIES[strategy].get("num_return_sequences", 1)
    assert out.shape == (2 * returned, LENGTH + NEW)
    assert torch.equal(out[:, :LENGTH], tokens.repeat_interleave(returned, 0))
    if returned > 1:
        assert not torch.equal(out[0], out[1])  # distinct sequences of one prompt


@pytest.mark.parametrize("name", NAMES)
def test_beam_scores_are_the_full_forward_s_log_probabilities(name):
    model = _model(name)
    tokens, _ = _prompt(model)
    out = _generate(
        model,
        input_ids=tokens,
        num_beams=3,
        num_return_sequences=3,
        length_penalty=0.0,  # the score is then the plain sum of the new tokens' log-probabilities
        output_scores=True,
        return_dict_in_generate=True,
    )
    assert isinstance(out, GenerateBeamDecoderOnlyOutput)
    log_probs = torch.log_softmax(_full_logits(model, out.sequences[:, :-1])[:, LENGTH - 1 :], -1)
    expected = log_probs.gather(-1, out.sequences[:, LENGTH:, None]).squeeze(-1).sum(-1)
    torch.testing.assert_close(out.sequences_scores, expected.float(), atol=TOLERANCE, rtol=TOLERANCE)
    assert torch.all(expected.view(2, 3)[:, :-1] >= expected.view(2, 3)[:, 1:])  # best first


# ---- outputs ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_scores_and_logits_are_the_processed_and_raw_full_forward_logits(name):
    model = _model(name)
    tokens, mask = _prompt(model, padded=True)
    out = _generate(
        model,
        input_ids=tokens,
        attention_mask=mask,
        do_sample=False,
        repetition_penalty=1.5,
        output_scores=True,
        output_logits=True,
        return_dict_in_generate=True,
    )
    assert isinstance(out, GenerateDecoderOnlyOutput) and len(out.scores) == len(out.logits) == NEW
    penalty = RepetitionPenaltyLogitsProcessor(1.5, prompt_ignore_length=(mask == 0).sum(-1))  # pads: no penalty
    full = _full_logits(model, out.sequences[:, :-1], _grown(mask, LENGTH + NEW - 1))
    for step in range(NEW):
        before = out.sequences[:, : LENGTH + step]
        raw = full[:, LENGTH + step - 1]
        torch.testing.assert_close(out.logits[step], raw.float(), atol=TOLERANCE, rtol=TOLERANCE)
        expected = penalty(before, raw.float())
        torch.testing.assert_close(out.scores[step], expected, atol=TOLERANCE, rtol=TOLERANCE)
        assert torch.equal(out.scores[step].argmax(-1), out.sequences[:, LENGTH + step])
    assert not torch.equal(out.scores[-1], out.logits[-1])  # the penalty did act


@pytest.mark.parametrize("name", NAMES)
def test_return_dict_in_generate_holds_the_cache_of_all_but_the_last_token(name):
    model = _model(name)
    tokens, mask = _prompt(model, padded=True)
    plain = _generate(model, input_ids=tokens, attention_mask=mask, do_sample=False)
    out = _generate(model, input_ids=tokens, attention_mask=mask, do_sample=False, return_dict_in_generate=True)
    assert isinstance(out, GenerateDecoderOnlyOutput) and torch.equal(out.sequences, plain)
    assert out.scores is None and out.logits is None  # not asked for
    cache = out.cache
    assert isinstance(cache, RecurrentCache) and cache.get_seq_length() == LENGTH + NEW - 1
    whole_mask = _grown(mask, LENGTH + NEW)
    with torch.no_grad():
        last = model(out.sequences[:, -1:], attention_mask=whole_mask, cache=cache).logits[:, -1]
    expected = _full_logits(model, out.sequences, whole_mask)[:, -1]
    torch.testing.assert_close(last, expected, atol=TOLERANCE, rtol=TOLERANCE)


# ---- inputs_embeds, and continuing from a cache -----------------------------------------------------------------


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("name", NAMES)
def test_inputs_embeds_alone_and_with_input_ids(name, strategy):
    model = _model(name)
    tokens, mask = _prompt(model, padded=True)
    kwargs = dict(attention_mask=mask, **STRATEGIES[strategy])
    reference = _generate(model, input_ids=tokens, use_cache=False, **kwargs)
    embeds = _embed(model, tokens)
    assert torch.equal(_generate(model, inputs_embeds=embeds, **kwargs), reference[:, LENGTH:])
    assert torch.equal(_generate(model, input_ids=tokens, inputs_embeds=embeds, **kwargs), reference)


@pytest.mark.parametrize("name", NAMES)
def test_generation_reads_the_embeddings_it_is_given(name):
    """Embeddings that are no token's (a soft prompt) steer generation: the tokens are the full forward's argmax
    over those embeddings followed by the generated tokens' own."""
    model = _model(name)
    tokens, _ = _prompt(model)
    soft = _embed(model, tokens) + 0.5 * torch.randn(2, LENGTH, model.config.hidden_size, dtype=torch.float64)
    out = _generate(model, inputs_embeds=soft, do_sample=False)
    with torch.no_grad():
        logits = model(inputs_embeds=torch.cat([soft, _embed(model, out[:, :-1])], 1), use_cache=False).logits
    assert torch.equal(out, logits[:, LENGTH - 1 :].argmax(-1))
    assert not torch.equal(out, _generate(model, input_ids=tokens, do_sample=False)[:, LENGTH:])


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("name", NAMES)
def test_a_prompt_cache_continues_as_generating_from_scratch(name, strategy, padded):
    """A cache of the prompt's first tokens continues it in every form transformers' caches take: the whole
    sequence (ids or embeddings), or only the new tokens with an attention mask over the whole sequence."""
    model = _model(name)
    tokens, mask = _prompt(model, padded=padded)
    kwargs = dict(attention_mask=mask, **STRATEGIES[strategy])
    reference = _generate(model, input_ids=tokens, use_cache=False, **kwargs)
    forms = {
        "whole ids": (dict(input_ids=tokens), reference),
        "new ids": (dict(input_ids=tokens[:, CONSUMED:]), reference[:, CONSUMED:]),
        "whole embeddings": (dict(inputs_embeds=_embed(model, tokens)), reference[:, LENGTH:]),
        "new embeddings": (dict(inputs_embeds=_embed(model, tokens[:, CONSUMED:])), reference[:, LENGTH:]),
        "ids and embeddings": (dict(input_ids=tokens, inputs_embeds=_embed(model, tokens)), reference),
    }
    for form, (inputs, expected) in forms.items():
        with torch.no_grad():
            cache = model(tokens[:, :CONSUMED], attention_mask=mask[:, :CONSUMED], use_cache=True).cache
        out = _generate(model, cache=cache, **inputs, **kwargs)
        assert torch.equal(out, expected), form
        assert cache.get_seq_length() == LENGTH + NEW - 1, form  # generate() advanced the cache it was given


@pytest.mark.parametrize("name", NAMES)
def test_a_cache_of_another_prompt_is_refused(name):
    model = _model(name)
    tokens, _ = _prompt(model)
    other = tokens.clone()
    other[1, 2] += 1
    with torch.no_grad():
        cache = model(other[:, :CONSUMED], use_cache=True).cache
    for inputs in (dict(input_ids=tokens), dict(input_ids=tokens, inputs_embeds=_embed(model, tokens))):
        with pytest.raises(ValueError, match=f"input_ids does not begin with the {CONSUMED} tokens this cache"):
            model.generate(cache=cache, max_new_tokens=2, **inputs)
    assert cache.get_seq_length() == CONSUMED  # refused before any step


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ("new ids without a mask", "the cache already holds 5 tokens and input_ids has 3: pass the whole sequence"),
        ("a mask of neither length", "attention_mask has 6 columns, input_ids has 3 and the cache holds 5 tokens"),
        ("a mask too short", "the cache already holds 5 tokens and attention_mask has 4 columns"),
        ("position_ids", "generate() takes no position_ids for this model"),
        ("use_cache off", "generate() was given a cache and use_cache=False"),
        ("prefill chunks", "prefill_chunk_size is not taken by this model: pass mode='chunkwise'"),
    ],
)
def test_continuations_it_cannot_read_are_refused_with_the_fix(inputs, message):
    model = _model("retnet")
    tokens, _ = _prompt(model)
    with torch.no_grad():
        cache = model(tokens[:, :CONSUMED], use_cache=True).cache
    new = tokens[:, CONSUMED:]
    kwargs = {
        "new ids without a mask": dict(input_ids=new),
        "a mask of neither length": dict(input_ids=new, attention_mask=torch.ones(2, 6, dtype=torch.long)),
        "a mask too short": dict(input_ids=new, attention_mask=torch.ones(2, 4, dtype=torch.long)),
        "position_ids": dict(input_ids=tokens, position_ids=torch.arange(LENGTH)[None]),
        "use_cache off": dict(input_ids=tokens, use_cache=False),
        "prefill chunks": dict(input_ids=tokens, prefill_chunk_size=2),
    }[inputs]
    with pytest.raises(ValueError, match=re.escape(message)):
        model.generate(cache=cache, max_new_tokens=2, **kwargs)
    assert cache.get_seq_length() == CONSUMED


# ---- left padding, min_new_tokens, stopping ---------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
@pytest.mark.parametrize("name", NAMES)
def test_left_padded_rows_generate_what_they_generate_alone(name, strategy):
    model = _model(name)
    tokens, mask = _prompt(model, padded=True)
    batch = _generate(model, input_ids=tokens, attention_mask=mask, **STRATEGIES[strategy])
    for row in range(2):
        real = tokens[row, mask[row].bool()][None]
        alone = _generate(model, input_ids=real, **STRATEGIES[strategy])
        assert torch.equal(batch[row, LENGTH:], alone[0, real.shape[1] :])


def _free_run(model, tokens, new: int = 6) -> torch.Tensor:
    return _generate(model, input_ids=tokens, do_sample=False, max_new_tokens=new)


@pytest.mark.parametrize("name", NAMES)
def test_min_new_tokens_holds_back_eos(name):
    model = _model(name)
    tokens, _ = _prompt(model, rows=1)
    eos = int(_free_run(model, tokens)[0, LENGTH])  # what greedy decoding picks first
    assert _generate(model, input_ids=tokens, do_sample=False, eos_token_id=eos).shape[1] == LENGTH + 1
    out = _generate(model, input_ids=tokens, do_sample=False, eos_token_id=eos, min_new_tokens=3, max_new_tokens=3)
    logits = _full_logits(model, out[:, :-1])[:, LENGTH - 1 :]
    logits[..., eos] = -float("inf")  # what min_new_tokens does to the first three steps
    assert torch.equal(out[:, LENGTH:], logits.argmax(-1))


@pytest.mark.parametrize("name", NAMES)
def test_max_length_and_eos_stop_each_row(name):
    model = _model(name)
    tokens, _ = _prompt(model)
    free = _free_run(model, tokens)
    assert torch.equal(_generate(model, input_ids=tokens, do_sample=False, max_length=LENGTH + 3), free[:, :-3])
    eos = int(free[0, LENGTH + 1])  # row 0's second new token
    out = _generate(model, input_ids=tokens, do_sample=False, eos_token_id=eos, max_new_tokens=6)
    for row in range(2):
        new = free[row, LENGTH:].tolist()
        stop = new.index(eos) + 1 if eos in new else len(new)
        assert out[row, LENGTH : LENGTH + stop].tolist() == new[:stop]
        assert out[row, LENGTH + stop :].eq(0).all()  # padded once stopped
    assert out.shape[1] <= LENGTH + 6 and eos in out[0, LENGTH:].tolist()


class StopAtLength(StoppingCriteria):
    def __init__(self, length: int):
        self.length, self.calls = length, 0

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        self.calls += 1
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


@pytest.mark.parametrize("name", NAMES)
def test_a_custom_stopping_criterion_stops_generation(name):
    model = _model(name)
    tokens, _ = _prompt(model)
    criterion = StopAtLength(LENGTH + 2)
    out = _generate(
        model, input_ids=tokens, do_sample=False, max_new_tokens=6, stopping_criteria=StoppingCriteriaList([criterion])
    )
    assert torch.equal(out, _free_run(model, tokens)[:, : LENGTH + 2]) and criterion.calls == 2


@pytest.mark.parametrize("name", NAMES)
def test_stop_strings_stop_at_the_text(name):
    tokenizer = load_tokenizer()  # the bundled byte-level BPE
    model = _model(name, vocab_size=len(tokenizer))
    tokens, _ = _prompt(model, rows=1)
    free = _free_run(model, tokens)[0].tolist()
    stop = tokenizer.decode(free[LENGTH + 2 :][:1])  # the third new token's text
    # the first step after which the text ends with the stop string (a token's text may end with it earlier)
    steps = next(k for k in range(1, 7) if tokenizer.decode(free[: LENGTH + k]).endswith(stop))
    out = _generate(model, input_ids=tokens, do_sample=False, max_new_tokens=6, stop_strings=stop, tokenizer=tokenizer)
    assert out[0].tolist() == free[: LENGTH + steps] and steps < 6


# ---- streamers ---------------------------------------------------------------------------------------------------


class Recorder(BaseStreamer):
    def __init__(self):
        self.puts, self.ended = [], 0

    def put(self, value):
        self.puts.append(value.clone())

    def end(self):
        self.ended += 1


@pytest.mark.parametrize("strategy", ["greedy", "sample"])
@pytest.mark.parametrize("name", NAMES)
def test_a_streamer_gets_the_prompt_then_each_token_as_it_is_made(name, strategy):
    model = _model(name)
    tokens, _ = _prompt(model, rows=1)
    recorder = Recorder()
    out = _generate(model, input_ids=tokens, streamer=recorder, **STRATEGIES[strategy])
    assert torch.equal(recorder.puts[0], tokens) and recorder.ended == 1
    assert [p.numel() for p in recorder.puts[1:]] == [1] * NEW  # one token per step, not all at the end
    assert torch.cat([p.view(-1) for p in recorder.puts[1:]]).tolist() == out[0, LENGTH:].tolist()


@pytest.mark.parametrize("name", NAMES)
def test_a_text_streamer_yields_the_generated_text(name, word_tokenizer):
    model = _model(name, vocab_size=len(word_tokenizer))
    tokens, _ = _prompt(model, rows=1)
    streamer = TextIteratorStreamer(word_tokenizer, skip_prompt=True)
    out = _generate(model, input_ids=tokens, do_sample=False, streamer=streamer)
    text = "".join(streamer)  # generate() ran to its end: the queue holds everything, then the stop signal
    assert text.split() == word_tokenizer.decode(out[0, LENGTH:]).split() and len(text.split()) == NEW
