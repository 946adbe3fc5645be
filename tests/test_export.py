"""``torch.export`` of every registered family (``densessm.models.FAMILIES``), and the cache as the transformers
``Cache`` and pytree node an exported program takes and returns.

An exported program is compared with the eager model on inputs of other shapes than the ones it was traced
with (batch and length free, left padding, one token), so a program that holds only for its example fails here.
A program that leaves the batch size or the length free runs the eager decode step over the tokens (see
``DenseSSMModel._token_scan``): the same function as the eager schedules, to float rounding, hence the tolerance.
A program of fixed shapes traces the eager schedule itself and gives the eager result exactly.
"""

from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree
from torch.export import Dim
from transformers import Cache
from transformers.exporters.configs import DynamoConfig
from transformers.exporters.exporter_dynamo import DynamoExporter

from densessm import RecurrentCache
from densessm.inference import (
    InferenceOnlyError,
    Int8Linear,
    PrepackedLinear,
    prepack_for_cpu,
    prepacking_available,
    quantize_int8,
)
from densessm.models import FAMILIES
from densessm.presets import load_preset

NAMES = [family.name for family in FAMILIES]
TOLERANCE = 1e-4  # float32, and DenseRetNet's parallel form against its recurrent one (see the module docstring)
BATCH, LENGTH, WIDTH = Dim("batch", min=1, max=64), Dim("length", min=1, max=4096), Dim("width", min=1, max=8192)


def _family(name: str):
    return next(family for family in FAMILIES if family.name == name)


def _model(name: str, head: str = "causal_lm", **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    config = load_preset(f"dense_{name}_tiny", num_hidden_layers=2, dense_block_layers=1, chunk_size=3, **overrides)
    model = getattr(_family(name), head)(config).eval()
    with torch.no_grad():
        for param in model.parameters():  # opens the gates that start closed: the dense read-out takes part
            param.add_(torch.randn_like(param) * 0.2)
    return model


def _batch(model, rows: int, length: int, padded: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and attention mask; the first row left-padded by ``padded`` tokens."""
    tokens = torch.randint(3, model.config.vocab_size, (rows, length))
    mask = torch.ones_like(tokens)
    tokens[0, :padded], mask[0, :padded] = 0, 0
    return tokens, mask


class Prefill(torch.nn.Module):
    """A fresh call with the default ``use_cache=True``: logits and the state it leaves."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return out.logits, out.cache


class Continue(Prefill):
    """A call continuing a cache: the mask covers the whole sequence, the cache's tokens too."""

    def forward(self, input_ids, attention_mask, cache):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, cache=cache)
        return out.logits, out.cache


def _export(module, args, dynamic_shapes=None) -> torch.nn.Module:
    with torch.no_grad():
        return torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False).module()


def _assert_same_state(cache: RecurrentCache, expected: RecurrentCache, atol: float = TOLERANCE) -> None:
    assert isinstance(cache, RecurrentCache) and cache.steps == expected.steps
    assert torch.equal(cache.positions, expected.positions)
    assert [sorted(layer) for layer in cache.layers] == [sorted(layer) for layer in expected.layers]
    for layer, reference in zip(cache.layers, expected.layers, strict=True):
        for name, tensor in reference.items():
            torch.testing.assert_close(layer[name], tensor, atol=atol, rtol=atol)


def _one_fast() -> list:
    """The families, all but the first marked slow: for tests of a path every family shares (the stack's, the
    heads'); each family's own decode step is exported in the default run by the prefill test."""
    return [NAMES[0], *(pytest.param(name, marks=pytest.mark.slow) for name in NAMES[1:])]


# ---- causal LM: prefill and continuation, batch and length free ---------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_an_exported_prefill_gives_the_eager_logits_and_state(name, tmp_path):
    model = _model(name)
    with torch.no_grad():
        program = torch.export.export(
            Prefill(model), _batch(model, 2, 6, padded=2), dynamic_shapes=({0: BATCH, 1: LENGTH},) * 2, strict=False
        )
    path = tmp_path / "prefill.pt2"
    torch.export.save(program, path)  # the cache is a pytree node with a serialized name: the program reloads
    exported = torch.export.load(path).module()
    for rows, length, padded in [(3, 9, 4), (1, 1, 0), (2, 4, 0)]:
        tokens, mask = _batch(model, rows, length, padded)
        with torch.no_grad():
            expected = model(tokens, attention_mask=mask)
            logits, cache = exported(tokens, mask)
        torch.testing.assert_close(logits, expected.logits, atol=TOLERANCE, rtol=TOLERANCE)
        _assert_same_state(cache, expected.cache)
        assert cache.identity is None  # a program records no model: the eager model checks only the structure
        new = torch.randint(3, model.config.vocab_size, (rows, 1))
        whole = torch.cat([mask, torch.ones_like(new)], 1)
        with torch.no_grad():  # the eager model continues the program's state as its own
            continued = model(new, attention_mask=whole, cache=cache).logits
            torch.testing.assert_close(
                continued, model(new, attention_mask=whole, cache=expected.cache).logits, atol=TOLERANCE, rtol=0
            )
    tokens, mask = _batch(model, 2, 3)
    for bad in (model.config.vocab_size, -1):  # the saved program keeps the vocabulary check
        tokens[1, 2] = bad
        with (
            torch.no_grad(),
            pytest.raises(RuntimeError, match=rf"out of range for vocab_size {model.config.vocab_size}"),
        ):
            exported(tokens, mask)


@pytest.mark.parametrize("name", _one_fast())
def test_an_exported_continuation_steps_any_cache_and_changes_none(name):
    """One program continues a cache of any batch and length by any number of tokens: a prompt's rest, then a
    decode step fed its own output cache, each equal to the eager model continuing a copy of the same cache.
    It changes nothing it is given: the cache it returns is a new one."""
    model = _model(name)
    tokens, mask = _batch(model, 2, 5, padded=1)
    with torch.no_grad():
        example = model(tokens, attention_mask=mask).cache
    new = torch.randint(3, model.config.vocab_size, (2, 3))
    whole = torch.cat([mask, torch.ones_like(new)], 1)
    dynamic = ({0: BATCH, 1: LENGTH}, {0: BATCH, 1: WIDTH}, example.dynamic_shapes(BATCH))
    exported = _export(Continue(model), (new, whole, example), dynamic)

    tokens, mask = _batch(model, 3, 7, padded=3)
    with torch.no_grad():
        cache = model(tokens, attention_mask=mask).cache
        for length in (4, 1):
            new = torch.randint(3, model.config.vocab_size, (3, length))
            mask = torch.cat([mask, torch.ones_like(new)], 1)
            given, kept = cache, cache.clone()
            expected = model(new, attention_mask=mask, cache=cache.clone())
            logits, cache = exported(new, mask, cache)
            torch.testing.assert_close(logits, expected.logits, atol=TOLERANCE, rtol=TOLERANCE)
            _assert_same_state(cache, expected.cache)
            assert cache is not given
            _assert_same_state(given, kept, atol=0)
    assert cache.steps == 7 + 4 + 1 and cache.positions.tolist() == [9, 12, 12]


@pytest.mark.parametrize("name", NAMES)
def test_a_program_exported_and_run_with_gradients_on_gives_the_eager_logits(name):
    """Gradient mode is on by default: a program must not hold ops (``out=`` products) that autograd refuses."""
    model = _model(name)
    tokens, mask = _batch(model, 2, 6, padded=2)
    exported = torch.export.export(Prefill(model), (tokens, mask), strict=False).module()
    logits, _ = exported(tokens, mask)
    torch.testing.assert_close(logits, model(tokens, attention_mask=mask).logits, atol=TOLERANCE, rtol=TOLERANCE)
    assert logits.requires_grad


def test_a_free_length_export_with_gradients_is_refused_with_the_fix():
    model = _model("retnet")
    with pytest.raises(ValueError, match=r"is an inference program: export it under torch.no_grad\(\)"):
        torch.export.export(Prefill(model), _batch(model, 2, 4), dynamic_shapes=({1: LENGTH},) * 2, strict=False)


@pytest.mark.parametrize("name", NAMES)
def test_a_program_of_fixed_shapes_traces_the_eager_schedule_exactly(name):
    model = _model(name)
    tokens, mask = _batch(model, 2, 6, padded=2)
    exported = _export(Prefill(model), (tokens, mask))
    tokens, mask = _batch(model, 2, 6, padded=1)
    with torch.no_grad():
        expected = model(tokens, attention_mask=mask)
        logits, cache = exported(tokens, mask)
    assert torch.equal(logits, expected.logits)
    _assert_same_state(cache, expected.cache, atol=0)


# ---- sequence classification -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", _one_fast())
def test_sequence_classification_exports_with_batch_and_length_free(name):
    model = _model(name, "sequence_classification", num_labels=3)

    class Classify(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    exported = _export(Classify(), _batch(model, 2, 6, padded=2), ({0: BATCH, 1: LENGTH},) * 2)
    for rows, length, padded in [(3, 8, 5), (1, 1, 0)]:
        tokens, mask = _batch(model, rows, length, padded)
        with torch.no_grad():
            expected = model(tokens, attention_mask=mask).logits
        assert expected.shape == (rows, 3)
        torch.testing.assert_close(exported(tokens, mask), expected, atol=TOLERANCE, rtol=TOLERANCE)
    tokens, mask = _batch(model, 2, 4, padded=4)  # the first row is padding only
    with pytest.raises(ValueError, match="a row of the batch has no real token to classify"):
        model(tokens, attention_mask=mask)
    pooled = exported(tokens, mask)  # the program cannot refuse: it gives NaN, never another token's logits
    assert pooled[0].isnan().all() and pooled[1].isfinite().all()


# ---- transformers' exporter ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", _one_fast())
def test_transformers_dynamo_exporter_exports_with_the_default_cache(name):
    model = _model(name)
    tokens, mask = _batch(model, 2, 6)
    exported = DynamoExporter().export(model, {"input_ids": tokens, "attention_mask": mask}, DynamoConfig(dynamic=True))
    tokens, mask = _batch(model, 3, 9, padded=2)
    with torch.no_grad():
        expected = model(tokens, attention_mask=mask)
    out = exported(input_ids=tokens, attention_mask=mask)
    torch.testing.assert_close(out["logits"], expected.logits, atol=TOLERANCE, rtol=TOLERANCE)
    _assert_same_state(out["cache"], expected.cache)


# ---- the cache as a transformers Cache and a pytree node ------------------------------------------------------


def test_the_cache_defines_every_method_of_the_transformers_cache_protocol():
    """A ``transformers.Cache`` whose every public method and property is its own: none falls through to the base
    class, whose implementations assume per-layer key/value objects a recurrent state does not have. A method a
    new transformers release adds fails here until it is given its meaning for a recurrent state."""
    assert issubclass(RecurrentCache, Cache)
    protocol = {name for name in dir(Cache) if not name.startswith("_")}
    assert protocol >= {"get_seq_length", "reorder_cache", "batch_repeat_interleave", "is_linear", "crop"}
    inherited = sorted(name for name in protocol if name not in RecurrentCache.__dict__)
    assert not inherited, f"RecurrentCache inherits {inherited} from transformers.Cache"


def test_what_generate_asks_of_a_cache_means_a_fixed_size_state():
    model = _model("retnet")
    tokens, _ = _batch(model, 2, 4)
    empty = RecurrentCache(2)
    assert empty.batch_size == -1 and not empty.is_initialized and not empty.has_previous_state()
    with torch.no_grad():
        cache = model(tokens).cache
    assert isinstance(cache, Cache) and all(cache.is_linear) and not any(cache.is_sliding)
    assert cache.get_seq_length() == cache.get_query_offset() == 4 and cache.get_max_length() == -1
    assert cache.batch_size == 2 and cache.is_initialized and cache.has_previous_state(1)
    cache.crop(0)  # nothing to remove: nothing to do
    for refused, message in [
        (lambda: cache.crop(1), "cannot be rolled back"),
        (cache.activate_past_recording, "cannot be rolled back"),
        (lambda: cache.update(torch.zeros(1), torch.zeros(1), 0), "holds no keys and values"),
        (lambda: cache.get_recurrent_state(0), r"read cache.layers\[0\], a dict holding scale, state"),
        (lambda: cache.offload(0), "move it whole with cache.to"),
        (lambda: cache.early_initialization(2, 1, 1, torch.float32, "cpu"), "filled by its model's first call"),
    ]:
        with pytest.raises(NotImplementedError, match=message):
            refused()
    with pytest.raises(ValueError, match="no past keys for an attention mask"):
        cache.get_mask_sizes(1, 0)


def test_the_pytree_node_holds_the_state_positions_and_steps():
    model = _model("mamba")
    tokens, mask = _batch(model, 2, 5, padded=2)
    with torch.no_grad():
        cache = model(tokens, attention_mask=mask).cache
    leaves, spec = pytree.tree_flatten(cache)
    assert len(leaves) == 2 * 2 + 2 and leaves[-1] == 5  # conv and ssm per layer, the positions, the steps
    twin = pytree.tree_unflatten(leaves, spec)
    _assert_same_state(twin, cache, atol=0)
    assert twin.identity is None and twin.token_digest is None  # the eager model's checks are not in the tree
    leaves, spec = pytree.tree_flatten(RecurrentCache(3))
    assert leaves == [None, None, None, None, 0]  # an empty cache: no state, no positions, no step yet
    assert pytree.tree_unflatten(leaves, spec).is_empty


@pytest.mark.parametrize("transform", ["int8", "prepacked"])
def test_a_quantized_or_prepacked_model_is_refused_by_export_naming_the_fix(transform):
    """torch.export fails on int8 weights with a raw AttributeError before calling forward, and a prepacked
    program cannot be saved (torch.export.save: "Cannot access storage of OpaqueTensorImpl"): both are named."""
    if transform == "prepacked" and not prepacking_available():
        pytest.skip("this PyTorch build has no oneDNN linear kernels")
    model = _model(NAMES[0])
    quantize_int8(model, min_weight=1) if transform == "int8" else prepack_for_cpu(model, min_weight=1)
    assert any(isinstance(m, Int8Linear if transform == "int8" else PrepackedLinear) for m in model.modules())
    fix = "export the float model" if transform == "int8" else "export the model before prepack_for_cpu"
    with pytest.raises(InferenceOnlyError, match=f"cannot be exported: .*; {fix}$"):
        torch.export.export(Prefill(model), _batch(model, 2, 4), strict=False)
