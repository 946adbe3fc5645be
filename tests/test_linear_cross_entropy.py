"""The LM loss scored in chunks of positions (``skip_logits=True``) against every logit at once: the op in float64
against its reference, the models' losses and gradients against their own logits path, the Trainer's use of it."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.loss.loss_utils import ForCausalLMLoss

from densessm.inference import quantize_int8
from densessm.ops.linear_cross_entropy import chunk_rows, linear_cross_entropy, naive_linear_cross_entropy
from densessm.presets import load_preset
from densessm.train import DenseTrainer, DenseTrainingArguments

FAMILIES = ("dense_retnet_tiny", "dense_mamba_tiny", "dense_mamba2_tiny", "retnet_tiny", "mamba_tiny")


def problem(seed: int, batch: int, length: int, hidden: int, vocab: int, dtype=torch.float64, ignored: float = 0.2):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, length, hidden, generator=gen, dtype=dtype).requires_grad_()
    w = torch.randn(vocab, hidden, generator=gen, dtype=dtype).requires_grad_()
    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    labels[torch.rand(batch, length, generator=gen) < ignored] = -100
    return h, w, labels


@pytest.mark.parametrize("seed", range(6))
def test_the_chunked_loss_and_its_gradients_equal_every_logit_at_once_in_float64(seed):
    gen = torch.Generator().manual_seed(100 + seed)
    batch, length, hidden, vocab = (int(torch.randint(1, n, (), generator=gen)) for n in (4, 40, 24, 90))
    h, w, labels = problem(seed, batch, length + 1, hidden, vocab)
    chunk = int(torch.randint(1, 2 * batch * (length + 1), (), generator=gen))
    for kwargs in ({}, {"num_items_in_batch": 7}, {"num_items_in_batch": torch.tensor(11)}):
        got = linear_cross_entropy(h, w, labels, chunk_size=chunk, **kwargs)
        want = naive_linear_cross_entropy(h, w, labels, **kwargs)
        # a gradient that is not 1 reaches the loss: the backward scales what the forward computed
        got_grads = torch.autograd.grad(got * 2.5, (h, w))
        want_grads = torch.autograd.grad(want * 2.5, (h, w))
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        for a, b in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


def test_the_chunked_loss_equals_transformers_loss_at_fp32_with_an_ignore_index_and_given_targets():
    h, w, labels = problem(0, 2, 33, 16, 50, torch.float32)
    labels[labels == -100] = 7
    labels[0, :4] = 7
    want = ForCausalLMLoss(logits=h @ w.T, labels=labels, vocab_size=50, ignore_index=7)
    torch.testing.assert_close(linear_cross_entropy(h, w, labels, ignore_index=7, chunk_size=5), want)
    targets = torch.nn.functional.pad(labels, (0, 1), value=7)[:, 1:]
    got = linear_cross_entropy(h, w, shift_labels=targets, ignore_index=7, chunk_size=5)
    torch.testing.assert_close(got, want)


def test_bf16_weights_score_their_bf16_logits_in_fp32_and_autocast_runs_the_head_in_its_dtype():
    h, w, labels = problem(1, 2, 20, 16, 40, torch.float32)
    hb, wb = h.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    want = ForCausalLMLoss(logits=hb @ wb.T, labels=labels, vocab_size=40)
    got = linear_cross_entropy(hb, wb, labels, chunk_size=6)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    got.backward()
    assert hb.grad.dtype == wb.grad.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = linear_cross_entropy(h, w, labels, chunk_size=6)
        auto_want = ForCausalLMLoss(logits=torch.nn.functional.linear(h, w), labels=labels, vocab_size=40)
    torch.testing.assert_close(auto, auto_want, rtol=1e-6, atol=1e-6)
    auto.backward()
    assert h.grad.dtype == w.grad.dtype == torch.float32 and torch.isfinite(w.grad).all()


def test_without_gradients_nothing_is_kept_for_a_backward():
    h, w, labels = problem(2, 1, 10, 8, 30)
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, labels, chunk_size=3)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, naive_linear_cross_entropy(h, w, labels).detach())


def test_bad_arguments_are_named():
    h, w, labels = problem(3, 1, 10, 8, 30)
    with pytest.raises(ValueError, match="needs labels or shift_labels"):
        linear_cross_entropy(h, w)
    with pytest.raises(ValueError, match=r"shift_labels must have the hidden states' shape \(1, 10\), got \(1, 9\)"):
        linear_cross_entropy(h, w, shift_labels=labels[:, :9])
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1, got 0"):
        linear_cross_entropy(h, w, labels, chunk_size=0)
    assert chunk_rows(32000) == 1048 and chunk_rows(10**12) == 1


def model_of(preset: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(load_preset(preset))
    with torch.no_grad():  # the dense gates start closed: open them so the dense path reaches the loss
        for name, param in model.named_parameters():
            if "gate" in name:
                param.normal_(0.0, 0.5)
    return model.train()


@pytest.mark.parametrize("preset", FAMILIES)
def test_a_model_asked_for_its_loss_alone_gives_the_same_loss_and_gradients_without_logits(preset, one_thread):
    model = model_of(preset)
    model.eval()  # no dropout: both passes see the same function
    ids = torch.randint(3, model.config.vocab_size, (2, 24))
    labels = ids.clone()
    labels[1, :5] = -100
    full = model(input_ids=ids, labels=labels)
    want = torch.autograd.grad(full.loss, list(model.parameters()), allow_unused=True)
    alone = model(input_ids=ids, labels=labels, skip_logits=True)
    got = torch.autograd.grad(alone.loss, list(model.parameters()), allow_unused=True)
    assert alone.logits is None and full.logits.shape == (2, 24, model.config.vocab_size)
    torch.testing.assert_close(alone.loss, full.loss, rtol=1e-6, atol=1e-6)
    for (name, _), a, b in zip(model.named_parameters(), got, want, strict=True):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    kept = model(
        input_ids=ids, labels=labels[:, -6:], logits_to_keep=6, skip_logits=True, return_dict=False, use_cache=False
    )
    torch.testing.assert_close(kept[0], model(input_ids=ids, labels=labels[:, -6:], logits_to_keep=6).loss)
    assert len(kept) == 1  # the loss alone: no logits in the tuple either


def test_skip_logits_is_refused_without_labels_or_as_anything_but_a_bool():
    model = model_of("dense_retnet_tiny")
    ids = torch.randint(3, model.config.vocab_size, (1, 8))
    with pytest.raises(ValueError, match="skip_logits=True returns the loss alone: it needs labels"):
        model(input_ids=ids, skip_logits=True)
    with pytest.raises(ValueError, match="skip_logits must be True, False or None, got 'yes'"):
        model(input_ids=ids, labels=ids, skip_logits="yes")
    assert model(input_ids=ids, labels=ids, skip_logits=False).logits is not None


def test_the_trainer_asks_for_the_loss_alone_where_only_the_loss_is_used(tmp_path, one_thread):
    model = model_of("dense_retnet_tiny")
    ids = torch.randint(3, model.config.vocab_size, (2, 16))
    inputs = {"input_ids": ids, "labels": ids}
    trainer = DenseTrainer(model=model, args=DenseTrainingArguments(output_dir=str(tmp_path), report_to="none"))
    loss, outputs = trainer.compute_loss(model.train(), dict(inputs), return_outputs=True)
    assert outputs.logits is None and torch.isfinite(loss)
    model.eval()
    loss_alone, logits, _ = trainer.prediction_step(model, dict(inputs), prediction_loss_only=True)
    with_logits, logits_kept, _ = trainer.prediction_step(model, dict(inputs), prediction_loss_only=False)
    assert logits is None and logits_kept.shape == (2, 16, model.config.vocab_size)
    torch.testing.assert_close(loss_alone, with_logits)
    smoothing = DenseTrainingArguments(output_dir=str(tmp_path), report_to="none", label_smoothing_factor=0.1)
    smoothed = DenseTrainer(model=model, args=smoothing)  # the smoother reads the logits: they are kept
    _, outputs = smoothed.compute_loss(model.train(), dict(inputs), return_outputs=True)
    assert outputs.logits is not None


class _ScaledHead(torch.nn.Linear):
    def forward(self, x):
        return super().forward(x) * 0.5


def _zero3(model, monkeypatch):
    monkeypatch.setattr("densessm.models.recurrent.is_deepspeed_zero3_enabled", lambda: True)


def _hooked(model, monkeypatch):
    model.lm_head.register_forward_hook(lambda module, inputs, output: output * 0.5)


def _backward_hooked(model, monkeypatch):
    model.lm_head.register_full_backward_hook(lambda module, grad_in, grad_out: (grad_in[0] * 0.5,))


def _subclass(model, monkeypatch):
    head = _ScaledHead(model.config.hidden_size, model.config.vocab_size, bias=False)
    head.weight = model.lm_head.weight
    model.lm_head = head


def _replaced_forward(model, monkeypatch):  # as accelerate's offloading hooks do
    plain = model.lm_head.forward
    model.lm_head.forward = lambda x: plain(x) * 0.5


def _int8(model, monkeypatch):
    quantize_int8(model)
    assert type(model.lm_head).__name__ == "Int8Linear"


@pytest.mark.parametrize(
    "change",
    [_zero3, _hooked, _backward_hooked, _subclass, _replaced_forward, _int8],
    ids=["zero3", "hook", "backward-hook", "subclass", "forward", "int8"],
)
def test_a_head_that_is_no_plain_linear_gives_its_own_loss_when_asked_for_the_loss_alone(change, monkeypatch):
    """Reading the head's weight would bypass what the head computes (an int8 product, a hook, a subclass's
    forward) or, under ZeRO-3, read an empty shard: those heads are called, and their logits dropped."""
    model = model_of("dense_mamba_tiny").eval()
    change(model, monkeypatch)
    ids = torch.randint(3, model.config.vocab_size, (1, 12))
    monkeypatch.setattr("densessm.models.recurrent.linear_cross_entropy", None)  # never called
    grads = change is not _int8
    with torch.set_grad_enabled(grads):
        want = model(input_ids=ids, labels=ids).loss
        want_grads = torch.autograd.grad(want, model.get_input_embeddings().weight) if grads else None
        alone = model(input_ids=ids, labels=ids, skip_logits=True)
        alone_grads = torch.autograd.grad(alone.loss, model.get_input_embeddings().weight) if grads else None
    assert alone.logits is None
    torch.testing.assert_close(alone.loss, want)
    torch.testing.assert_close(alone_grads, want_grads)


def test_no_position_to_score_gives_the_reference_s_nan_and_zero_gradients():
    h, w, _ = problem(4, 1, 0, 8, 30)
    labels = torch.zeros(1, 0, dtype=torch.long)
    loss = linear_cross_entropy(h, w, labels)
    assert loss.isnan() and naive_linear_cross_entropy(h, w, labels).isnan()  # 0 / 0, as transformers' mean
    assert torch.equal(torch.autograd.grad(linear_cross_entropy(h, w, labels, num_items_in_batch=1), w)[0], w * 0)


@pytest.mark.parametrize("preset", FAMILIES)
def test_no_tensor_of_every_position_s_logits_is_ever_made(preset, monkeypatch):
    """What the chunks are for: no operator in the forward or the backward outputs more than one chunk of
    logits (the ``[tokens, vocab]`` tensors of the logits path: logits, log-softmax and their gradients). Run
    on every family, so that none falls back to the logits path unseen."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        rows = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple | list) else (out,):
                if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[-1] == vocab:
                    self.rows = max(self.rows, t.numel() // vocab)
            return out

    model = model_of(preset)
    vocab = model.config.vocab_size
    monkeypatch.setattr("densessm.ops.linear_cross_entropy.CHUNK_BYTES", 4 * vocab * 16)  # 16 positions a chunk
    ids = torch.randint(3, vocab, (2, 60))
    with Largest() as seen:
        model(input_ids=ids, labels=ids, skip_logits=True).loss.backward()
    # the largest: a chunk's logits, or the head's weight seen as [hidden, vocab]
    assert seen.rows == max(16, model.config.hidden_size)
    with Largest() as seen:
        model(input_ids=ids, labels=ids).loss.backward()
    assert seen.rows == 120  # the logits path does make them: the probe sees them


def test_no_position_scored_gives_the_logits_path_s_nan_loss_and_zero_gradients():
    """transformers' mean over no scored position is 0/0, with zero gradients; scaling the precomputed ones by
    1/0 made every gradient NaN (and an optimizer step then made every weight NaN)."""
    model = model_of("dense_retnet_tiny").eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 16))
    for labels in (torch.full_like(ids, -100), ids[:, :1]):
        inputs = ids if labels.shape == ids.shape else ids[:, :1]
        grads = {}
        for skip in (False, True):
            loss = model(input_ids=inputs, labels=labels, skip_logits=skip).loss
            assert loss.isnan()
            grads[skip] = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
        for a, b in zip(grads[False], grads[True], strict=True):
            assert (a is None and b is None) or (torch.equal(a, torch.zeros_like(a)) and torch.equal(b, a))


def test_a_float64_model_under_autocast_keeps_its_float64_loss():
    """CPU autocast leaves float64 alone, so the logits path stays float64: the chunks do too."""
    model = model_of("mamba_tiny").double().eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 20))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(input_ids=ids, labels=ids).loss
        got = model(input_ids=ids, labels=ids, skip_logits=True).loss
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-7, atol=1e-7)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # torch's forward-AD rules load through it
def test_a_second_order_gradient_is_refused_and_forward_mode_ad_is_exact():
    """The backward only scales gradients computed in the forward: differentiating it again gave nothing for the
    head, silently; create_graph is refused. Forward-mode AD takes the plain form."""
    model = model_of("dense_retnet_tiny").double().eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 10))
    loss = model(input_ids=ids, labels=ids, skip_logits=True).loss
    with pytest.raises(RuntimeError, match=r"is differentiable once: a second-order gradient \(create_graph=True\)"):
        torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
    embeds = model.get_input_embeddings()(ids).detach()
    tangent = torch.randn_like(embeds)
    import torch.autograd.forward_ad as fwad

    results = []
    for skip in (False, True):
        with fwad.dual_level():
            out = model(inputs_embeds=fwad.make_dual(embeds, tangent), labels=ids, skip_logits=skip).loss
            results.append(fwad.unpack_dual(out))
    torch.testing.assert_close(results[1].primal, results[0].primal.to(results[1].primal.dtype))
    torch.testing.assert_close(results[1].tangent, results[0].tangent.to(results[1].tangent.dtype))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.index_fill(1, torch.tensor([0]), 9999), "shift_labels 9999 is out of range: shift_labels are"),
        (lambda s: s.short().float(), "shift_labels must be integer token ids"),
        (lambda s: s[:, :-1], r"shift_labels must have shape \(1, 6\), got \(1, 5\)"),
    ],
)
def test_shift_labels_are_checked_before_the_backbone_as_labels_are(change, message):
    """Found after the backbone (a raw index error), they left a carried cache marked broken."""
    model = model_of("dense_mamba_tiny").eval()
    ids = torch.randint(3, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        cache = model(input_ids=ids[:, :6], use_cache=True).cache
        before = [t.clone() for t in cache.to_legacy()] if hasattr(cache, "to_legacy") else None
        shift = change(torch.nn.functional.pad(ids[:, 6:], (0, 1), value=-100)[:, 1:])
        for skip in (False, True):
            with pytest.raises(ValueError, match=message):
                model(input_ids=ids[:, 6:], labels=ids[:, 6:], shift_labels=shift, cache=cache, skip_logits=skip)
        assert not cache.broken
        model(input_ids=ids[:, 6:], use_cache=True, cache=cache)  # the cache goes on
    del before
    with pytest.raises(ValueError, match="shift_labels .* need labels too"):
        model(input_ids=ids, shift_labels=ids)


def test_the_op_names_bad_arguments_and_ignores_a_non_finite_ignored_position():
    h, w, labels = problem(5, 2, 9, 8, 30)
    for bad, message in (
        (labels.reshape(-1), r"labels must have the hidden states' shape \(2, 9\), got \(18,\)"),
        (labels.T, r"labels must have the hidden states' shape \(2, 9\), got \(9, 2\)"),
        (labels.float(), "labels must be integer token ids, got torch.float32"),
    ):
        with pytest.raises(ValueError, match=message):
            linear_cross_entropy(h, w, bad)
    with pytest.raises(ValueError, match=r"shift_labels must have the hidden states' shape"):
        linear_cross_entropy(h, w, shift_labels=labels[:, 1:])
    for chunk in (2.5, True, "4"):
        with pytest.raises(ValueError, match="chunk_size must be an int >= 1"):
            linear_cross_entropy(h, w, labels, chunk_size=chunk)
    with pytest.raises(ValueError, match="ignore_index must be an int, got True"):
        linear_cross_entropy(h, w, labels, ignore_index=True)
    with pytest.raises(ValueError, match=r"a head weight \[V, H\] are needed, got \(2, 9, 8\) and \(30,\)"):
        linear_cross_entropy(h, w[:, 0])
    with torch.no_grad():
        h[0, -1] = torch.inf  # the last position of a row has no target
    torch.testing.assert_close(  # transformers' loss runs in fp32
        linear_cross_entropy(h, w, labels.short(), chunk_size=4).float(),
        ForCausalLMLoss(logits=h @ w.T, labels=labels, vocab_size=30),
    )


def test_a_replaced_loss_function_is_what_the_loss_alone_computes(tmp_path):
    """The chunks compute transformers' causal LM loss: a model given another loss (``loss_function``, or a
    ``loss_type``) scores its logits with it, also when the Trainer asks for the loss alone."""
    model = model_of("dense_retnet_tiny").eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 14))
    model.loss_type = "ForMaskedLM"
    torch.testing.assert_close(
        model(input_ids=ids, labels=ids, skip_logits=True).loss, model(input_ids=ids, labels=ids).loss
    )
    del model.loss_type
    model.loss_function = lambda logits, labels, vocab_size, **kw: ForCausalLMLoss(logits, labels, vocab_size) * 2 + 1
    want = model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(model(input_ids=ids, labels=ids, skip_logits=True).loss, want)
    trainer = DenseTrainer(model=model, args=DenseTrainingArguments(output_dir=str(tmp_path), report_to="none"))
    torch.testing.assert_close(trainer.compute_loss(model.eval(), {"input_ids": ids, "labels": ids}), want)


def test_a_count_of_zero_with_positions_scored_gives_non_finite_gradients_as_the_logits_path():
    model = model_of("dense_retnet_tiny").eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 9))
    for skip in (False, True):
        loss = model(input_ids=ids, labels=ids, num_items_in_batch=0, skip_logits=skip).loss
        (grad,) = torch.autograd.grad(loss, [model.lm_head.weight])
        assert loss.isinf() and not torch.isfinite(grad).all()


def test_non_contiguous_shift_labels_are_taken_by_both_paths():
    model = model_of("dense_retnet_tiny").eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 10))
    shift = torch.randint(0, model.config.vocab_size, (6, 2)).T
    assert not shift.is_contiguous()
    with torch.no_grad():
        cache = model(input_ids=ids[:, :4], use_cache=True).cache
        losses = [
            model(input_ids=ids[:, 4:], labels=ids[:, 4:], shift_labels=shift, skip_logits=skip).loss
            for skip in (False, True)
        ]
        model(input_ids=ids[:, 4:], labels=ids[:, 4:], shift_labels=shift, cache=cache, use_cache=True)
    torch.testing.assert_close(losses[1], losses[0])
    assert not cache.broken


def test_torch_func_transforms_get_the_plain_form():
    model = model_of("dense_retnet_tiny").eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 8))

    def loss_of(weight, skip):
        call = dict(input_ids=ids, labels=ids, skip_logits=skip, use_cache=False)
        return torch.func.functional_call(model, {"lm_head.weight": weight}, (), call).loss

    weight = model.lm_head.weight.detach()
    torch.testing.assert_close(
        torch.func.grad(loss_of)(weight, True), torch.func.grad(loss_of)(weight, False), rtol=1e-5, atol=1e-7
    )
    h, w, labels = problem(6, 3, 7, 16, 40)
    labels = labels.unsqueeze(1)
    got = torch.func.vmap(lambda x, y: linear_cross_entropy(x, w, y, chunk_size=3))(h.unsqueeze(1), labels)
    want = torch.stack([naive_linear_cross_entropy(h[i : i + 1], w, labels[i]) for i in range(3)])
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="labels must be a tensor of token ids, got list"):
        linear_cross_entropy(h, w, labels.squeeze(1).tolist())
    with pytest.raises(ValueError, match=r"hidden states \[\.\.\., L, H\] and a head weight \[V, H\] are needed"):
        linear_cross_entropy(h[0, 0], w, torch.tensor(3))


def test_an_infinite_logit_at_a_scored_position_gives_the_reference_s_nan():
    h, w, labels = problem(9, 1, 6, 4, 5)
    labels[:] = 2
    with torch.no_grad():
        w[3] = 0.0
        w[3, 0] = float("inf")
        h[0, 1, 0] = 1.0  # a +inf logit in the second row, which is scored
    got = linear_cross_entropy(h, w, labels, chunk_size=4)
    want = naive_linear_cross_entropy(h, w, labels)
    assert want.isnan() and got.isnan()
