"""generate() that users can trust: padded batches, per-row stopping, streaming, saved and branched states."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import tiny_config
from transformers import TextIteratorStreamer

from densessm import DenseRetNetForCausalLM, RecurrentCache


def _model(**overrides):
    return DenseRetNetForCausalLM(tiny_config(chunk_size=4, **overrides)).eval()


def _left_pad(rows, width, pad=0):
    tokens = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for i, row in enumerate(rows):
        tokens[i, width - len(row) :], mask[i, width - len(row) :] = row, 1
    return tokens, mask


@pytest.mark.parametrize("mode", [None, "recurrent", "chunkwise"])
def test_left_padded_batch_equals_each_row_alone(mode):
    model = _model()
    rows = [torch.randint(3, 97, (n,)) for n in (9, 4, 6)]
    tokens, mask = _left_pad(rows, 9)
    extra = {} if mode is None else {"mode": mode}
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True)
    batch = model.generate(tokens, attention_mask=mask, pad_token_id=0, **kwargs, **extra)
    for i, row in enumerate(rows):
        alone = model.generate(row[None], pad_token_id=0, **kwargs, **extra)
        assert torch.equal(batch.sequences[i, 9:], alone.sequences[0, len(row) :])
        for step_batch, step_alone in zip(batch.scores, alone.scores, strict=True):
            torch.testing.assert_close(step_batch[i], step_alone[0], atol=1e-4, rtol=1e-4)


def test_seeded_sampling_ignores_padding_width():
    model = _model()
    rows = [torch.randint(3, 97, (n,)) for n in (5, 2)]
    kwargs = dict(max_new_tokens=10, do_sample=True, top_p=0.95, temperature=0.8, pad_token_id=0)
    outs = []
    for width in (5, 9):
        tokens, mask = _left_pad(rows, width)
        torch.manual_seed(7)
        outs.append(model.generate(tokens, attention_mask=mask, **kwargs)[:, width:])
    assert torch.equal(outs[0], outs[1])


def test_each_row_stops_at_its_own_eos():
    model = _model()
    rows = [torch.randint(3, 97, (n,)) for n in (6, 3)]
    tokens, mask = _left_pad(rows, 6)
    free = model.generate(tokens, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    eos = int(free[0, 6 + 1])  # the second token row 0 generates
    out = model.generate(
        tokens, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0
    )
    for i in range(2):
        new = out[i, 6:].tolist()
        if eos in new:
            cut = new.index(eos) + 1
            assert all(t == 0 for t in new[cut:]) and new[:cut] == free[i, 6 : 6 + cut].tolist()
    assert eos in out[0, 6:].tolist()


def test_repetition_penalty_changes_greedy_choice():
    model = _model()
    prompt = torch.randint(3, 97, (1, 5))
    plain = model.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    penalised = model.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False, repetition_penalty=5.0)
    assert penalised.shape == plain.shape
    assert len(set(penalised[0, 5:].tolist())) >= len(set(plain[0, 5:].tolist()))


def test_streaming_yields_the_generated_text(word_tokenizer):
    model = _model()
    prompt = word_tokenizer("w1 w2 w3", return_tensors="pt").input_ids
    streamer = TextIteratorStreamer(word_tokenizer, skip_prompt=True)
    result = {}
    thread = threading.Thread(
        target=lambda: result.setdefault(
            "ids", model.generate(prompt, max_new_tokens=6, do_sample=False, streamer=streamer)
        )
    )
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    assert streamed.split() == word_tokenizer.decode(result["ids"][0, prompt.shape[1] :]).split()


def test_saved_state_continues_identically(tmp_path):
    model = _model()
    prefix = torch.randint(3, 97, (2, 12))
    with torch.no_grad():
        cache = model(prefix, use_cache=True).cache
    cache.save(tmp_path / "prompt.safetensors")
    restored = RecurrentCache.load(tmp_path / "prompt.safetensors")
    suffix = torch.randint(3, 97, (2, 3))
    full = torch.cat([prefix, suffix], dim=1)
    reference = model.generate(full, max_new_tokens=8, do_sample=False)
    resumed = model.generate(full, cache=restored, max_new_tokens=8, do_sample=False)
    assert torch.equal(resumed, reference)


def test_branching_from_one_prefix():
    model = _model()
    prefix = torch.randint(3, 97, (1, 10))
    with torch.no_grad():
        shared = model(prefix[:, :-1], use_cache=True).cache  # the prompt's state, but for its last token
    for seed in (1, 2, 3):
        branch = shared.clone()
        torch.manual_seed(seed)
        from_branch = model.generate(prefix, cache=branch, max_new_tokens=6, do_sample=True)
        torch.manual_seed(seed)
        from_scratch = model.generate(prefix, max_new_tokens=6, do_sample=True)
        assert torch.equal(from_branch, from_scratch)
    assert shared.get_seq_length() == 9  # branches never touched the shared prefix state
    with pytest.raises(ValueError, match="at least one token the state has not consumed"):
        model.generate(prefix[:, :-1], cache=shared.clone(), max_new_tokens=2)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_beams=2, do_sample=False),
        dict(num_beams=3, num_return_sequences=2, do_sample=False),
        dict(num_return_sequences=2, do_sample=True),
    ],
)
def test_beams_and_several_sequences_continue_a_prompt_cache(kwargs):
    """A cache of the prompts (one row each) continues every beam or returned sequence of them, as generating
    from the whole prompts does: generate() repeats its rows as it repeats the prompts'."""
    model = _model()
    prompts = torch.randint(3, 97, (2, 8))
    with torch.no_grad():
        cache = model(prompts[:, :-1], use_cache=True).cache
    torch.manual_seed(5)
    reference = model.generate(prompts, max_new_tokens=5, **kwargs)
    torch.manual_seed(5)
    assert torch.equal(model.generate(prompts, cache=cache, max_new_tokens=5, **kwargs), reference)
    assert cache.batch_size == 2 * max(kwargs.get("num_beams", 1), kwargs.get("num_return_sequences", 1))


def test_a_cache_continues_after_generate_with_the_sequence_it_returned():
    """After generate() the cache has consumed the padded prompt and all but the last new token (pads after a
    row's EOS included): the returned sequence plus more tokens continues it, as generating from scratch does."""
    model = _model()
    tokens, mask = _left_pad([torch.randint(3, 97, (n,)) for n in (4, 6)], 6)
    with torch.no_grad():
        cache = model(tokens[:, :-1], attention_mask=mask[:, :-1], use_cache=True).cache
    eos = int(model.generate(tokens, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)[0, 7])
    kwargs = dict(do_sample=False, pad_token_id=0)
    out = model.generate(tokens, attention_mask=mask, cache=cache, max_new_tokens=6, eos_token_id=eos, **kwargs)
    assert out[0, 8:].eq(0).all()  # row 0 stopped at its EOS and was padded since
    more = torch.cat([out, torch.randint(3, 97, (2, 2))], 1)
    more_mask = torch.cat([mask, torch.ones(2, more.shape[1] - 6, dtype=torch.long)], 1)
    reference = model.generate(more, attention_mask=more_mask, max_new_tokens=3, **kwargs)
    assert torch.equal(
        model.generate(more, attention_mask=more_mask, cache=cache, max_new_tokens=3, **kwargs), reference
    )


def test_cache_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no cache file"):
        RecurrentCache.load(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="corrupt or truncated cache file"):
        RecurrentCache.load(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="nothing to save"):
        RecurrentCache(2).save(tmp_path / "empty.safetensors")


def test_cache_of_another_model_is_refused():
    small, large = _model(num_hidden_layers=2, dense_block_layers=1), _model(num_hidden_layers=3)
    tokens = torch.randint(3, 97, (1, 4))
    with torch.no_grad():
        cache = small(tokens, use_cache=True).cache
    with pytest.raises(ValueError, match="state of 2 layers but the model has 3"):
        large(tokens, cache=cache)


def test_decode_updates_the_state_in_place():
    """The decode step reuses the cache's state memory (no state-sized allocation per token)."""
    model = _model()
    with torch.no_grad():
        cache = model(torch.randint(3, 97, (2, 5)), use_cache=True).cache
        before = [layer["state"].data_ptr() for layer in cache.layers]
        model(torch.randint(3, 97, (2, 1)), cache=cache)
    assert [layer["state"].data_ptr() for layer in cache.layers] == before


@pytest.mark.parametrize("family", ["retnet", "mamba"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepacked_weights_give_the_same_generation(family, dtype):
    from conftest import tiny_mamba_config

    from densessm import DenseMambaForCausalLM
    from densessm.inference import PrepackedLinear, prepack_for_cpu, prepacking_available

    if not prepacking_available():
        pytest.skip("this PyTorch build has no oneDNN linear kernels")
    torch.manual_seed(0)
    model = _model() if family == "retnet" else DenseMambaForCausalLM(tiny_mamba_config()).eval()
    model = model.to(dtype)
    prompt = torch.randint(3, 97, (2, 7))
    kwargs = dict(max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True)
    plain = model.generate(prompt, **kwargs)
    packed = prepack_for_cpu(model, min_weight=0).generate(prompt, **kwargs)
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert any(isinstance(m, PrepackedLinear) for m in model.modules())
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    for a, b in zip(plain.scores, packed.scores, strict=True):
        torch.testing.assert_close(a, b, atol=tolerance, rtol=tolerance)
    if dtype == torch.float32:
        assert torch.equal(plain.sequences, packed.sequences)


@pytest.mark.parametrize("family", ["retnet", "mamba"])
def test_generation_under_bf16_autocast(family):
    from conftest import tiny_mamba_config

    from densessm import DenseMambaForCausalLM

    # DenseMamba with m = 2: the decode step sums two shallow read-outs, whose operands autocast casts
    model = _model() if family == "retnet" else DenseMambaForCausalLM(tiny_mamba_config(dense_block_layers=2)).eval()
    prompt = torch.randint(3, 97, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert out.shape == (2, 15)
