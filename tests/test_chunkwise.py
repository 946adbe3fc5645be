"""Chunkwise mode of DenseRetNet: exact against recurrent (forward and gradients), state hand-off, auto mode."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st

from densessm import DenseRetNetForCausalLM
from densessm.ops.retention import auto_parallel_max_length, default_chunk_size, retention
from densessm.presets import load_preset


@settings(max_examples=15, deadline=None)
@given(
    length=st.integers(1, 40),
    chunk=st.sampled_from([1, 7, 16, 64]),
    m=st.integers(0, 2),  # up to the 2 layers below the top of the 3-layer tiny model
    heads=st.sampled_from([1, 2]),
)
def test_chunkwise_equals_recurrent(length, chunk, m, heads):
    # float64: the fp32 recurrent form drifts by ~1e-5 over 32 steps on some draws (flaky at this bound)
    model = (
        DenseRetNetForCausalLM(tiny_config(dense_block_layers=m, num_attention_heads=heads, query_key_dim=8 * heads))
        .eval()
        .double()
    )
    tokens = torch.randint(0, 97, (2, length))
    with torch.no_grad():
        chunked = model(tokens, mode="chunkwise", chunk_size=chunk).logits
        recurrent = model(tokens, mode="recurrent").logits
    assert (chunked - recurrent).abs().max() <= 1e-10


@pytest.mark.parametrize("chunk", [1, 7, 16, 64, 100])
def test_chunkwise_gradients_equal_recurrent_and_parallel(chunk):
    model = DenseRetNetForCausalLM(tiny_config(dense_block_layers=2))
    tokens = torch.randint(0, 97, (2, 23))

    def grads(**kwargs):
        model.zero_grad()
        model(tokens, labels=tokens, **kwargs).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    chunked = grads(mode="chunkwise", chunk_size=chunk)
    for other in (grads(mode="recurrent"), grads(mode="parallel")):  # row normalisation inactive at init
        for name, grad in chunked.items():
            assert (grad - other[name]).abs().max() <= 1e-4 * other[name].abs().max().clamp_min(1e-12), name


def test_chunkwise_with_padding_equals_rows_alone():
    model = DenseRetNetForCausalLM(tiny_config()).eval()
    rows = [torch.randint(3, 97, (n,)) for n in (13, 5)]
    tokens = torch.zeros(2, 13, dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for i, row in enumerate(rows):
        tokens[i, 13 - len(row) :], mask[i, 13 - len(row) :] = row, 1
    with torch.no_grad():
        batched = model(tokens, attention_mask=mask, mode="chunkwise", chunk_size=4).logits
        for i, row in enumerate(rows):
            alone = model(row[None], mode="recurrent").logits[0]
            torch.testing.assert_close(batched[i, 13 - len(row) :], alone, atol=1e-5, rtol=1e-4)


def test_chunkwise_continues_from_a_state():
    model = DenseRetNetForCausalLM(tiny_config()).eval()
    tokens = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        full = model(tokens, mode="recurrent", use_cache=False).logits
        cache = model(tokens[:, :11], mode="recurrent", use_cache=True).cache
        rest = model(tokens[:, 11:], cache=cache, mode="chunkwise", chunk_size=8)
    torch.testing.assert_close(rest.logits, full[:, 11:], atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        whole = model(tokens, mode="recurrent", use_cache=True).cache
    for ours, ref in zip(rest.cache.layers, whole.layers, strict=True):
        torch.testing.assert_close(ours["state"], ref["state"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ours["scale"], ref["scale"])


def test_chunkwise_prefill_generation_equals_token_by_token():
    model = DenseRetNetForCausalLM(tiny_config(chunk_size=4)).eval()
    prompt = torch.randint(3, 97, (3, 19))
    kwargs = dict(max_new_tokens=10, do_sample=False, output_scores=True, return_dict_in_generate=True)
    chunked = model.generate(prompt, **kwargs)  # auto: chunkwise prefill, recurrent decode
    stepwise = model.generate(prompt, mode="recurrent", **kwargs)
    assert torch.equal(chunked.sequences, stepwise.sequences)
    for a, b in zip(chunked.scores, stepwise.scores, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_auto_mode_selection():
    model = DenseRetNetForCausalLM(tiny_config()).model
    limit = model.auto_parallel_max_length
    assert model.resolve_mode("auto", 1, carried=True, stateful=True) == "recurrent"
    assert model.resolve_mode("auto", 2, carried=True, stateful=True) == "chunkwise"
    assert model.resolve_mode("auto", limit, carried=False, stateful=False) == "parallel"
    assert model.resolve_mode("auto", limit + 1, carried=False, stateful=False) == "chunkwise"
    assert model.resolve_mode("recurrent", 100, carried=False, stateful=False) == "recurrent"
    with pytest.raises(ValueError, match="unknown mode 'fast'"):
        model.resolve_mode("fast", 3, carried=False, stateful=False)


@pytest.mark.parametrize(
    ("preset", "chunk", "parallel_up_to"),
    [("dense_retnet_tiny", 64, 102), ("dense_retnet_350m", 128, 1049), ("dense_retnet_1p3b", 128, 896)],
)
def test_chunk_size_and_auto_crossover_follow_the_head_sizes(preset, chunk, parallel_up_to):
    """The measured rules (docs/benchmarks/chunkwise.md): the chunk from ``sqrt(80·Dk·Dv/(Dk+Dv))``, the parallel
    form up to ``C + 3·Dk·Dv/(Dk+Dv)`` tokens; an explicit chunk_size moves the crossover with it."""
    config = load_preset(preset)
    heads = config.num_attention_heads
    key_dim, value_dim = config.query_key_dim // heads, config.value_dim // heads
    assert config.chunk_size is None and default_chunk_size(key_dim, value_dim) == chunk
    assert auto_parallel_max_length(chunk, key_dim, value_dim) == parallel_up_to
    if preset == "dense_retnet_tiny":
        assert DenseRetNetForCausalLM(config).model.auto_parallel_max_length == parallel_up_to
        config.chunk_size = 16
        assert DenseRetNetForCausalLM(config).model.auto_parallel_max_length == parallel_up_to - chunk + 16
    assert default_chunk_size(64, 256) == 64 and default_chunk_size(1, 1) == 64
    assert default_chunk_size(10**5, 10**5) == 1024


def test_an_unset_chunk_size_is_the_rule_and_exact(monkeypatch):
    import densessm.ops.retention as ops

    sizes = []
    original = ops.chunkwise_retention
    monkeypatch.setattr(ops, "chunkwise_retention", lambda *a, **k: sizes.append(a[4]) or original(*a, **k))
    torch.manual_seed(0)
    q, k = torch.randn(2, 1, 2, 20, 64).unbind(0)
    v = torch.randn(1, 2, 20, 512)
    log_decay = torch.log(torch.tensor([0.9, 0.5]))
    ruled, _ = retention(q, k, v, log_decay, "chunkwise")
    explicit, _ = retention(q, k, v, log_decay, "chunkwise", chunk_size=3)
    assert sizes == [default_chunk_size(64, 512), 3] and default_chunk_size(64, 512) == 64
    torch.testing.assert_close(ruled, explicit, atol=1e-5, rtol=1e-5)


def test_auto_is_the_default_and_dispatches(monkeypatch):
    import densessm.models.retnet.modeling_dense_retnet as modeling

    model = DenseRetNetForCausalLM(tiny_config()).eval()
    assert model.config.forward_mode == "auto"
    seen = []
    original = modeling.retention
    monkeypatch.setattr(modeling, "retention", lambda *a, **k: seen.append(a[4]) or original(*a, **k))
    tokens = torch.randint(0, 97, (1, 6))
    model(tokens, use_cache=False)
    model(tokens, use_cache=True)
    model(tokens[:, :1], use_cache=True)
    layers = model.config.num_hidden_layers
    assert seen == ["parallel"] * layers + ["chunkwise"] * layers + ["recurrent"] * layers


def test_bad_chunk_size():
    model = DenseRetNetForCausalLM(tiny_config()).eval()
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        model(torch.randint(0, 97, (1, 4)), mode="chunkwise", chunk_size=0)


@pytest.mark.parametrize("padded", [False, True])
def test_a_long_input_runs_the_stack_in_pieces_exactly(monkeypatch, padded):
    """Beyond ``stack_piece_tokens`` the whole stack runs piece by piece (each piece's passes stay in the cache):
    the same function as one piece, logits, kept state and gradients, with and without padding."""
    torch.manual_seed(0)
    model = DenseRetNetForCausalLM(tiny_config(dense_block_layers=2)).double()
    assert model.model.stack_piece_tokens == 2048  # a training block
    tokens = torch.randint(3, 97, (2, 23))
    mask = torch.ones_like(tokens)
    if padded:
        mask[0, :4] = 0
    runs = []
    original = type(model.model)._chunk_by_chunk
    for piece in (None, 5):
        monkeypatch.setattr(type(model.model), "stack_piece_tokens", piece)
        calls = []
        monkeypatch.setattr(
            type(model.model), "_chunk_by_chunk", lambda self, *a, calls=calls: calls.append(a[2]) or original(self, *a)
        )
        model.zero_grad()
        out = model(tokens, attention_mask=mask, labels=tokens, mode="chunkwise", chunk_size=3, use_cache=True)
        out.loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        runs.append((out.logits.detach(), out.cache.layers[-1]["state"].detach(), grads, calls))
    (logits, state, grads, calls), (piece_logits, piece_state, piece_grads, piece_calls) = runs
    assert calls == [] and piece_calls == [5]
    torch.testing.assert_close(piece_logits, logits, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(piece_state, state, atol=1e-10, rtol=1e-10)
    for a, b in zip(piece_grads, grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_pieces_of_a_long_input_do_the_matrix_work_of_one_pass(monkeypatch):
    """Each piece runs chunkwise with the model's own chunk size (the retention's default when the config names
    none): the pieces once ran as single chunks, quadratic in the piece (a 350M step at 8k did 3.4x the
    retention's products, where the bound here allows 1.005x)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = DenseRetNetForCausalLM(tiny_config(dense_block_layers=1, chunk_size=None))
    tokens = torch.randint(3, 97, (1, 384))  # the tiny heads' chunk is 64 tokens: 3 pieces of 2 chunks
    flops = []
    for piece in (None, 128):
        monkeypatch.setattr(type(model.model), "stack_piece_tokens", piece)
        counter = FlopCounterMode(display=False)
        with counter:
            model(tokens, labels=tokens, mode="chunkwise").loss.backward()
        flops.append(counter.get_total_flops())
    # the same work, plus the hand-over at the two piece boundaries (the state one piece leaves and the next
    # reads: a pass without pieces skips reading its empty first state and making the state no one reads)
    assert flops[0] < flops[1] <= 1.005 * flops[0]


@pytest.mark.parametrize("given_state", [False, True])
@pytest.mark.parametrize("length", [1, 9, 16, 21])
def test_the_op_without_its_final_state_gives_the_same_output_and_gradients(given_state, length):
    """Without ``output_state`` the last chunk's kᵀv is not made, and an empty entering state is not read (its
    products were zeros): the output and every gradient are the recurrent form's, in float64."""
    from densessm.ops.retention.chunkwise import chunkwise_retention

    gen = torch.Generator().manual_seed(length)
    q, k = (torch.randn(2, 2, length, 4, generator=gen, dtype=torch.float64, requires_grad=True) for _ in "qk")
    v = torch.randn(2, 2, length, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    log_decay = torch.tensor([-0.1, -0.5], dtype=torch.float64)
    mask = torch.ones(2, length, dtype=torch.bool)
    mask[1, : length // 3] = False
    state = None
    if given_state:
        state = (torch.randn(2, 2, 4, 6, generator=gen, dtype=torch.float64), torch.rand(2, 2, dtype=torch.float64))
    out, final = chunkwise_retention(q, k, v, log_decay, 8, mask=mask, state=state, output_state=False)
    assert final is None
    want, want_final = retention(q, k, v, log_decay, "recurrent", mask=mask, state=state, output_state=True)
    real = mask[:, None, :, None]
    torch.testing.assert_close(out * real, want * real, rtol=1e-10, atol=1e-10)
    weights = torch.randn(out.shape, generator=gen, dtype=torch.float64) * real
    got_grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    want_grads = torch.autograd.grad((want * weights).sum(), (q, k, v))
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        _, kept = chunkwise_retention(q, k, v, log_decay, 8, mask=mask, state=state, output_state=True)
    torch.testing.assert_close(kept[0], want_final[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(kept[1], want_final[1].to(kept[1].dtype), rtol=1e-10, atol=1e-10)
