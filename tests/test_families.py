"""What every registered family must do, checked on each (``densessm.models.FAMILIES``): a family added to the
registry is tested here without a line of its own.

Each runs on its ``dense_<name>_tiny`` preset with the dense gates opened (some families start them closed),
so the dense hidden connection takes part in every check.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from densessm import RecurrentCache
from densessm.inference import fuse_projections
from densessm.models import FAMILIES
from densessm.presets import load_preset

NAMES = [family.name for family in FAMILIES]
MODES = ("parallel", "chunkwise", "recurrent", "auto")


def _family(name: str):
    return next(family for family in FAMILIES if family.name == name)


def _model(name: str, dtype: torch.dtype = torch.float32, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    config = load_preset(f"dense_{name}_tiny", chunk_size=3, **overrides)
    model = _family(name).causal_lm(config).to(dtype).eval()
    with torch.no_grad():
        for module in model.modules():  # open gates that start closed, so the dense read-out counts
            if getattr(module, "zero_init", False):
                torch.nn.init.normal_(module.weight, std=0.5)
    return model


def _tokens(model, *shape: int) -> torch.Tensor:
    return torch.randint(3, model.config.vocab_size, shape)


@pytest.mark.parametrize("name", NAMES)
def test_the_registry_is_what_the_auto_classes_build(name, tmp_path):
    family = _family(name)
    config = load_preset(f"dense_{name}_tiny")
    assert isinstance(config, family.config)
    assert type(AutoModel.from_config(config)) is family.model
    assert type(AutoModelForCausalLM.from_config(config)) is family.causal_lm
    assert type(AutoModelForSequenceClassification.from_config(config)) is family.sequence_classification
    model = _model(name)
    model.save_pretrained(tmp_path)
    tokens = _tokens(model, 2, 6)
    with torch.no_grad():
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        assert torch.equal(reloaded(tokens).logits, model(tokens).logits)


# DenseRetNet's parallel form also divides each q·k row by its clamped absolute sum, as the reference does; the
# per-head RMSNorm after it undoes that scale except for its epsilon (docs/modes.md)
PARALLEL_TOLERANCE = {"retnet": 1e-4}


@pytest.mark.parametrize("name", NAMES)
def test_every_mode_computes_the_same_function_forward_and_backward(name):
    model = _model(name, torch.float64).train()
    tokens = _tokens(model, 2, 7)
    results = {}
    for mode in MODES:
        model.zero_grad()
        out = model(tokens, labels=tokens, mode=mode)
        out.loss.backward()
        results[mode] = (out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})

    def agree(mode: str, reference: str, tolerance: float) -> None:
        (logits, grads), (ref_logits, ref_grads) = results[mode], results[reference]
        torch.testing.assert_close(logits, ref_logits, atol=tolerance, rtol=tolerance, msg=mode)
        for param, grad in ref_grads.items():
            scale = grad.abs().max().clamp_min(1e-12)
            assert (grads[param] - grad).abs().max() <= tolerance * scale, (mode, param)

    agree("chunkwise", "recurrent", 1e-9)
    agree("parallel", "recurrent", PARALLEL_TOLERANCE.get(name, 1e-9))
    agree("auto", "parallel", 0.0)  # seven tokens without a state: auto is the parallel form


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", NAMES)
def test_a_padded_batch_gives_each_row_what_it_gives_alone(name, mode):
    model = _model(name)
    rows = [_tokens(model, 1, n)[0] for n in (7, 4, 1)]
    width = max(len(row) for row in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for i, row in enumerate(rows):
        tokens[i, width - len(row) :], mask[i, width - len(row) :] = row, 1
    with torch.no_grad():
        batch = model(tokens, attention_mask=mask, mode=mode).logits
        for i, row in enumerate(rows):
            alone = model(row[None], mode=mode).logits[0]
            torch.testing.assert_close(batch[i, width - len(row) :], alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_a_carried_state_continues_exactly_and_survives_a_file(name, tmp_path):
    model = _model(name)
    tokens = _tokens(model, 2, 9)
    with torch.no_grad():
        full = model(tokens).logits
        cache = model(tokens[:, :5], use_cache=True).cache
        cache.save(tmp_path / "state.safetensors")
        first = model(tokens[:, 5:], cache=cache).logits
        second = model(tokens[:, 5:], cache=RecurrentCache.load(tmp_path / "state.safetensors")).logits
    torch.testing.assert_close(first, full[:, 5:], atol=1e-5, rtol=1e-4)
    assert torch.equal(first, second)


@pytest.mark.parametrize("name", NAMES)
def test_greedy_generation_is_the_full_forward_s_argmax(name):
    model = _model(name)
    prompt = _tokens(model, 2, 5)
    model.generation_config.eos_token_id = None  # every row generates all its tokens
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        logits = model(out[:, :-1]).logits
    assert torch.equal(out[:, prompt.shape[1] :], logits[:, prompt.shape[1] - 1 :].argmax(-1))


@pytest.mark.parametrize("name", NAMES)
def test_gradient_checkpointing_gives_the_same_gradients(name):
    model = _model(name).train()
    tokens = _tokens(model, 2, 6)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.zero_grad()
        model(tokens, labels=tokens).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for param, grad in grads[0].items():
        assert torch.equal(grads[1][param], grad), param


@pytest.mark.parametrize("name", NAMES)
def test_inference_fusion_changes_nothing_computed(name):
    model = _model(name)
    tokens = _tokens(model, 2, 6)
    with torch.no_grad():
        reference = model(tokens).logits
        fuse_projections(model)
        torch.testing.assert_close(model(tokens).logits, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_sequence_classification_scores_the_last_real_token(name):
    config = load_preset(f"dense_{name}_tiny", num_labels=3, pad_token_id=0)
    torch.manual_seed(0)
    model = _family(name).sequence_classification(config).eval()
    row = torch.randint(3, config.vocab_size, (1, 5))
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), row], dim=1)
    with torch.no_grad():
        alone = model(row).logits
        left = model(padded, attention_mask=(padded != 0).long()).logits
    assert alone.shape == (1, 3)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_sequence_classification_takes_narrow_integer_class_ids(name):
    """int8 class ids were taken for multi-label targets (transformers infers the problem from the dtype) and
    failed on their shape: they give the loss long ids give."""
    config = load_preset(f"dense_{name}_tiny", num_labels=3, pad_token_id=0)
    torch.manual_seed(0)
    model = _family(name).sequence_classification(config).eval()
    tokens = torch.randint(3, config.vocab_size, (2, 5))
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        expected = model(tokens, labels=labels).loss
        for dtype in (torch.int8, torch.int16, torch.uint8):
            torch.testing.assert_close(model(tokens, labels=labels.to(dtype)).loss, expected)


@pytest.mark.parametrize("name", NAMES)
def test_sequence_classification_names_a_class_id_outside_the_classes(name):
    """torch's IndexError from inside the loss named no label; -100 stays the ignored id."""
    config = load_preset(f"dense_{name}_tiny", num_labels=3, pad_token_id=0)
    model = _family(name).sequence_classification(config).eval()
    tokens = torch.randint(3, config.vocab_size, (2, 5))
    with torch.no_grad():
        for labels, found in ((torch.tensor([1, 3]), 3), (torch.tensor([-1, 0]), -1)):
            with pytest.raises(
                ValueError, match=rf"labels must be class ids in \[0, 3\) \(or -100: ignored\), found {found}$"
            ):
                model(tokens, labels=labels)
        assert torch.isfinite(model(tokens, labels=torch.tensor([-100, 2])).loss)


@pytest.mark.parametrize("name", NAMES)
def test_the_trainer_trains_and_evaluates_sequence_classification(name, tmp_path):
    """The Trainer passes num_items_in_batch, which the classifier refused as an unknown argument."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    config = load_preset(f"dense_{name}_tiny", num_labels=2, pad_token_id=0)
    torch.manual_seed(0)
    model = _family(name).sequence_classification(config)
    data = Dataset.from_dict({"input_ids": [[5, 6, 7, 8]] * 4, "labels": [0, 1, 0, 1]})
    args = TrainingArguments(
        str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[], use_cpu=True, save_strategy="no"
    )
    trainer = Trainer(model, args, train_dataset=data)
    assert math.isfinite(trainer.train().training_loss)
    assert math.isfinite(trainer.evaluate(data)["eval_loss"])


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_reentrant_checkpointing_gives_the_same_gradients_dense_connections_included(name, dense):
    """A reentrant checkpoint passes on the graph of the tensors a layer returns at its top level only: the k/v
    (or states) a layer hands up are returned flat, so the dense connections keep their gradients (in a list they
    came back without their graph, and the lower layers' projections silently got none through them)."""
    model = _model(name, torch.float64, **({} if dense else {"dense_block_layers": 0})).train()
    tokens = _tokens(model, 2, 6)
    grads = []
    for kwargs in (None, {"use_reentrant": True}):
        if kwargs:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.zero_grad()
        model(tokens, labels=tokens).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for param, grad in grads[0].items():
        torch.testing.assert_close(grads[1][param], grad, rtol=1e-12, atol=1e-14)  # the recomputation's own order
