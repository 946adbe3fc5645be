"""Bad input to the models' Python API is one clear ValueError naming the problem; padding never leaks.

Covers forward arguments (chunk sizes, positions, id and label dtypes and ranges, masks, embeddings, modes),
configuration validation (also through ``from_pretrained`` of a bad ``config.json``), and non-finite values
at masked positions, which must change nothing for the real tokens in any mode of either family.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import tiny_config, tiny_mamba_config
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import AutoModelForCausalLM, GenerationConfig

from densessm import DenseMambaForCausalLM, DenseRetNetForCausalLM
from densessm.errors import ModelLoadError, UsageError
from densessm.inference import (
    InferenceOnlyError,
    Int8Linear,
    fuse_decode_steps,
    fuse_projections,
    prepack_for_cpu,
    quantize_int8,
)
from densessm.loading import read_config
from densessm.models import FAMILIES as REGISTERED
from densessm.models.dense.mixer import MixerCall
from densessm.ops.retention import head_log_decays, retention
from densessm.presets import load_preset

FAMILIES = ["retnet", "mamba"]
MODES = ["parallel", "chunkwise", "recurrent"]
TOKENS = (torch.arange(14).reshape(2, 7) * 7 + 3) % 97


def _model(family: str, **overrides):
    torch.manual_seed(0)
    if family == "retnet":
        return DenseRetNetForCausalLM(tiny_config(**overrides)).eval()
    model = DenseMambaForCausalLM(tiny_mamba_config(**overrides)).eval()
    for layer in model.backbone.layers[1:]:  # open the dense gates (they start closed), so every path is used
        if layer.mixer.dense_gate is not None:
            torch.nn.init.normal_(layer.mixer.dense_gate.fc2.weight, std=0.5)
    return model


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return _model(request.param)


# --- forward arguments ------------------------------------------------------------------------------------------


def test_token_ids_on_the_meta_device_are_named(model):
    """They failed in the range check with torch's "Tensor.item() cannot be called on meta tensors"."""
    with pytest.raises(ValueError, match="input_ids are on meta but the model is on cpu: move them there"):
        model(TOKENS.to("meta"))


@pytest.mark.parametrize("chunk_size", [0, -1])
def test_chunk_size_must_be_a_positive_int(model, chunk_size):
    with pytest.raises(ValueError, match=rf"chunk_size must be >= 1 \(a positive integer\), got {chunk_size!r}"):
        model(TOKENS, mode="chunkwise", chunk_size=chunk_size)


def test_a_huge_chunk_size_is_named(model):
    """10**30 failed in the Mamba families with torch's "Overflow when unpacking long long"."""
    with pytest.raises(ValueError, match=r"^chunk_size must be at most 2147483647 \(2\*\*31 - 1\), got 10{30}"):
        model(torch.randint(3, 90, (1, 5)), mode="chunkwise", chunk_size=10**30)


@pytest.mark.parametrize(
    ("chunk_size", "kind"),
    [(torch.tensor(3), "Tensor"), (2.5, "float"), ("8", "str"), (True, "bool"), (np.int64(4), "int64")],
)
def test_a_chunk_size_of_another_type_is_named_by_its_type(model, chunk_size, kind):
    with pytest.raises(ValueError, match=rf"^chunk_size must be a Python int, got .*, a {kind} \(pass int"):
        model(TOKENS, mode="chunkwise", chunk_size=chunk_size)
    with pytest.raises(ValueError, match=rf"^chunk_size must be a Python int, got .*, a {kind}$"):
        retention(*[torch.zeros(1, 1, 4, 2)] * 3, torch.full((1,), -0.1), mode="chunkwise", chunk_size=chunk_size)
    config = tiny_config if isinstance(model, DenseRetNetForCausalLM) else tiny_mamba_config
    with pytest.raises(
        StrictDataclassClassValidationError,
        match=rf"chunk_size must be a positive integer, got .*: a {kind}, not a Python int",
    ):
        config(chunk_size=chunk_size)


def test_chunk_size_is_checked_whatever_the_mode_and_ignored_where_unused(model):
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        model(TOKENS, mode="recurrent", chunk_size=0)
    with torch.no_grad():
        torch.testing.assert_close(
            model(TOKENS, mode="recurrent", chunk_size=3).logits, model(TOKENS, mode="chunkwise", chunk_size=3).logits
        )


@pytest.mark.parametrize(
    ("position_ids", "message"),
    [
        (torch.arange(7), r"position_ids must have shape \[2, 7\] \(or \[1, 7\]\), one per input token, got \(7,\)"),
        (torch.zeros(2, 6, dtype=torch.long), r"got \(2, 6\)"),
        (torch.zeros(3, 7, dtype=torch.long), r"got \(3, 7\)"),
        (torch.zeros(2, 7), "position_ids must be integers, got dtype torch.float32"),
        ([list(range(7))] * 2, "position_ids must be a tensor, got list"),
    ],
)
def test_position_ids_of_the_wrong_shape_or_type(position_ids, message):
    with pytest.raises(ValueError, match=message):
        _model("retnet")(TOKENS, position_ids=position_ids)


def test_position_ids_broadcast_over_the_batch():
    model = _model("retnet")
    with torch.no_grad():
        shifted = model(TOKENS, position_ids=torch.arange(7)[None] + 5, use_cache=False).logits
        torch.testing.assert_close(shifted, model(TOKENS).logits)


@pytest.mark.parametrize(
    ("position_ids", "use_cache", "message"),
    [
        (-torch.arange(7)[None], False, "position_ids of row 0 holds a negative position: got \\[0, -1, -2"),
        (torch.tensor([[0, 1, 2, 0, 1, 2, 3]]), False, "row 0 must count up by one per real token .*restart"),
        (torch.zeros(2, 7, dtype=torch.long), False, "row 0 must count up by one"),
        (torch.tensor([[0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 5, 6, 7]]), False, "position_ids of row 1 must count up"),
        (torch.arange(7)[None] + 5, True, "row 0 must continue the cache's count of real tokens .*use_cache=False"),
    ],
)
def test_position_ids_that_disagree_with_the_tokens_counted(position_ids, use_cache, message):
    """Retention decays one step per real token and a cache counts real tokens: positions that skip, repeat,
    restart (packed documents) or, with a cache, start elsewhere would be silently inconsistent."""
    with pytest.raises(ValueError, match=message):
        _model("retnet")(TOKENS, position_ids=position_ids, use_cache=use_cache)


def test_position_ids_of_left_padded_rows_and_a_continued_cache():
    """Padding may hold any position (transformers' own convention puts 1 there); a continuation counts on."""
    model = _model("retnet")
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    padded = torch.tensor([[1, 1, 0, 1, 2, 3, 4], list(range(7))])
    with torch.no_grad():
        out = model(TOKENS, attention_mask=mask, position_ids=padded)
        torch.testing.assert_close(out.logits, model(TOKENS, attention_mask=mask).logits)
        model(TOKENS[:, :1], past_key_values=out.past_key_values, position_ids=torch.tensor([[5], [7]]))
        with pytest.raises(ValueError, match="row 0 must continue the cache's count"):
            model(TOKENS[:, :1], past_key_values=out.past_key_values, position_ids=torch.tensor([[0], [8]]))


@pytest.fixture(scope="module", params=[family.name for family in REGISTERED])
def any_family(request):
    """A tiny model of every registered family (its ``dense_<name>_tiny`` preset)."""
    torch.manual_seed(0)
    family = next(family for family in REGISTERED if family.name == request.param)
    return family.causal_lm(load_preset(f"dense_{family.name}_tiny")).eval()


@pytest.mark.parametrize(
    ("logits_to_keep", "message"),
    [
        (
            1.5,
            "logits_to_keep must be a number of last positions (an int >= 0; 0 keeps all) or a 1-D tensor of "
            "positions, got 1.5",
        ),
        (
            -1,
            "logits_to_keep must be a number of last positions (an int >= 0; 0 keeps all) or a 1-D tensor of "
            "positions, got -1",
        ),
        (
            True,
            "logits_to_keep must be a number of last positions (an int >= 0; 0 keeps all) or a 1-D tensor of "
            "positions, got True",
        ),
        (
            torch.tensor(2),
            "logits_to_keep as a tensor must list positions (1-D, integers), got torch.int64 of shape ()",
        ),
        (
            torch.tensor([0.0]),
            "logits_to_keep as a tensor must list positions (1-D, integers), got torch.float32 of shape (1,)",
        ),
        (torch.tensor([0, 7]), "logits_to_keep lists position 7, outside the input's 7 positions"),
    ],
    ids=["float", "negative", "bool", "0-d tensor", "float tensor", "beyond the input"],
)
def test_logits_to_keep_that_cannot_work_is_named(any_family, logits_to_keep, message):
    with pytest.raises(ValueError) as refused:
        any_family(TOKENS, logits_to_keep=logits_to_keep)
    assert str(refused.value) == message


def test_logits_to_keep_takes_a_count_or_positions(any_family):
    with torch.no_grad():
        full = any_family(TOKENS).logits
        assert torch.equal(any_family(TOKENS, logits_to_keep=0).logits, full)
        torch.testing.assert_close(any_family(TOKENS, logits_to_keep=2).logits, full[:, -2:])
        torch.testing.assert_close(any_family(TOKENS, logits_to_keep=99).logits, full)
        torch.testing.assert_close(any_family(TOKENS, logits_to_keep=torch.tensor([0, -1])).logits, full[:, [0, 6]])


def test_a_misspelt_keyword_is_refused_not_dropped(any_family):
    """A forward that dropped ``attention_masks=`` would run unmasked without a word."""
    mask = torch.ones_like(TOKENS)
    name = type(any_family).__name__
    with pytest.raises(
        TypeError, match=f"^{name}.forward\\(\\) got unexpected keyword argument\\(s\\): attention_masks$"
    ):
        any_family(TOKENS, attention_masks=mask)
    backbone = type(any_family.base_model).__name__
    with pytest.raises(
        TypeError, match=f"^{backbone}.forward\\(\\) got unexpected keyword argument\\(s\\): bogus, typo$"
    ):
        any_family.base_model(TOKENS, typo=1, bogus=2)
    classifier = next(f for f in REGISTERED if isinstance(any_family, f.causal_lm)).sequence_classification
    torch.manual_seed(0)
    scorer = classifier(any_family.config).eval()
    with pytest.raises(TypeError, match="unexpected keyword argument\\(s\\): attention_masks$"):
        scorer(TOKENS, attention_masks=mask)
    with pytest.raises(ValueError, match="^sequence classification reads whole sequences: it takes no cache$"):
        scorer(TOKENS, cache_params=any_family(TOKENS[:, :3], use_cache=True).cache)


def test_transformers_names_for_the_cache_are_the_cache(any_family):
    """Mamba's ``cache_params=`` and generate's ``past_key_values=`` continue the state as ``cache=`` does."""
    with torch.no_grad():
        cache = any_family(TOKENS[:, :4], use_cache=True).cache
        expected = any_family(TOKENS[:, 4:], cache=cache.clone()).logits
        for name in ("cache_params", "past_key_values"):
            torch.testing.assert_close(
                any_family(TOKENS[:, 4:], **{name: cache.clone()}).logits, expected, rtol=0, atol=0
            )
        with pytest.raises(ValueError, match="^two caches were given \\(cache and cache_params\\)"):
            any_family(TOKENS[:, 4:], cache=cache.clone(), cache_params=cache.clone())
        with pytest.raises(ValueError, match="^two caches were given \\(past_key_values and cache_params\\)"):
            any_family(TOKENS[:, 4:], cache_params=cache.clone(), past_key_values=cache.clone())


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.uint8, torch.int32])
def test_narrow_integer_ids_are_widened(model, dtype):
    with torch.no_grad():
        assert torch.equal(model(TOKENS.to(dtype)).logits, model(TOKENS).logits)


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (TOKENS.float(), "input_ids must be integer token ids, got dtype torch.float32"),
        (TOKENS.bool(), "input_ids must be integer token ids, got dtype torch.bool"),
        (TOKENS[0], r"input_ids must have shape \[batch, length\], got \(7,\)"),
        (TOKENS[:, :0], r"empty input: input_ids has shape \(2, 0\)"),
        (
            TOKENS.index_put((torch.tensor(1), torch.tensor(2)), torch.tensor(181)),
            "token id 181 is out of range for vocab_size 97",
        ),
        (
            TOKENS.to(torch.int8).index_put((torch.tensor(0), torch.tensor(5)), torch.tensor(-100, dtype=torch.int8)),
            "token id -100 is out of range",
        ),
        (TOKENS.tolist(), "input_ids must be a tensor of token ids, got list"),
    ],
)
def test_bad_input_ids(model, ids, message):
    with pytest.raises(ValueError, match=message):
        model(ids)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (
            TOKENS.index_put((torch.tensor(1), torch.tensor(2)), torch.tensor(181)),
            r"label 181 is out of range: labels are token ids in \[0, 97\) or -100",
        ),
        (TOKENS.index_put((torch.tensor(0), torch.tensor(5)), torch.tensor(-5)), "label -5 is out of range"),
        (TOKENS.float(), "labels must be integer token ids .*got torch.float32"),
        (TOKENS.bool(), "labels must be integer token ids .*got torch.bool"),
        (TOKENS[:, :6], r"labels must have shape \(2, 7\), got \(2, 6\)"),
        (TOKENS.tolist(), "labels must be a tensor of token ids, got list"),
    ],
)
def test_bad_labels(model, labels, message):
    with pytest.raises(ValueError, match=message):
        model(TOKENS, labels=labels)


def test_labels_may_be_ignored_positions_and_narrow_integers(model):
    labels = TOKENS.clone()
    labels[:, :3] = -100
    loss = model(TOKENS, labels=labels).loss
    assert torch.equal(model(TOKENS, labels=labels.to(torch.int8)).loss, loss)
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="label -100 is out of range.* or -1 "):
        model(TOKENS, labels=labels, ignore_index=-1)


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (torch.full((2, 7), 2), "attention_mask must hold 1 for real tokens and 0 for padding, found 2"),
        (torch.zeros(2, 7).masked_fill(torch.eye(2, 7, dtype=torch.bool), float("-inf")), "found -inf"),
        (torch.full((2, 7), 0.5), "found 0.5"),
        (torch.ones(2, 7, dtype=torch.complex64), "got dtype torch.complex64"),
        (torch.ones(2, 6), r"attention_mask must have shape \[2, >= 7\] \(one entry per token\), got \(2, 6\)"),
        (torch.ones(1, 7), r"got \(1, 7\)"),
        (torch.ones(2, 1, 7, 7), r"got \(2, 1, 7, 7\)"),
        ([[1] * 7] * 2, "got list"),
    ],
)
def test_bad_attention_masks(model, mask, message):
    with pytest.raises(ValueError, match=message):
        model(TOKENS, attention_mask=mask)


def test_attention_masks_of_any_real_dtype_agree(model):
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :2] = 0
    with torch.no_grad():
        reference = model(TOKENS, attention_mask=mask).logits
        for dtype in (torch.bool, torch.int8, torch.float32):
            assert torch.equal(model(TOKENS, attention_mask=mask.to(dtype)).logits, reference)


def test_unknown_modes_name_the_valid_ones():
    with pytest.raises(ValueError, match="unknown mode 'fast': expected one of auto, parallel, chunkwise, recurrent"):
        _model("retnet")(TOKENS, mode="fast")
    with pytest.raises(ValueError, match="unknown mode 'fast': expected one of auto, parallel, chunkwise, recurrent"):
        _model("mamba")(TOKENS, mode="fast")


def test_bad_inputs_embeds(model):
    hidden = model.config.hidden_size
    embeds = model.get_input_embeddings()(TOKENS).detach()
    with pytest.raises(ValueError, match="inputs_embeds is torch.float64 but the model's weights are torch.float32"):
        model(inputs_embeds=embeds.double())
    nan = embeds.clone()
    nan[1, 3, 0] = float("nan")
    with pytest.raises(ValueError, match=r"inputs_embeds holds NaN or infinite values at real \(unmasked\) positions"):
        model(inputs_embeds=nan)
    with pytest.raises(ValueError, match="inputs_embeds must be a floating-point tensor, got torch.int64"):
        model(inputs_embeds=TOKENS[..., None].expand(-1, -1, hidden))
    with pytest.raises(ValueError, match=rf"inputs_embeds must have shape \[batch, length, {hidden}\]"):
        model(inputs_embeds=embeds[..., :-1])
    with pytest.raises(ValueError, match="pass exactly one of input_ids or inputs_embeds"):
        model(TOKENS, inputs_embeds=embeds)


# --- configurations ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"rms_norm_eps": 0.0}, "rms_norm_eps must be a finite number > 0, got 0.0"),
        ({"rms_norm_eps": -1e-6}, "rms_norm_eps must be a finite number > 0"),
        ({"rms_norm_eps": float("nan")}, "rms_norm_eps must be a finite number > 0, got nan"),
        ({"dense_block_layers": 3}, r"dense_block_layers=3 exceeds the 2 layer\(s\) below the top of a 3-layer model"),
        ({"dense_block_layers": 9}, "use at most 2 "),
        ({"num_hidden_layers": 1}, r"dense_block_layers=2 exceeds the 0 layer\(s\) .*\(0 for a plain model\)"),
        ({"num_attention_heads": 3}, "must split into 3 heads of even width"),
        ({"hidden_size": -32}, "hidden_size must be a positive integer, got -32"),
        ({"vocab_size": True}, "vocab_size must be a positive integer, got True"),
        ({"chunk_size": 2.5}, "chunk_size must be a positive integer, got 2.5: a float, not a Python int"),
        ({"chunk_size": True}, "chunk_size must be a positive integer, got True: a bool, not a Python int"),
        ({"max_position_embeddings": 0}, "max_position_embeddings must be a positive integer"),
        ({"v_factor": 1.01}, r"hidden_size \* v_factor \(32 \* 1.01\) must be a whole number"),
        ({"v_factor": float("inf")}, "v_factor must be a positive number, got inf"),
        ({"pad_token_id": 97}, r"pad_token_id 97 is not a token id of the vocabulary \[0, 97\)"),
        ({"pad_token_id": -1}, "pad_token_id -1 is not a token id"),
        ({"initializer_range": -0.02}, "initializer_range must be a finite number >= 0"),
        ({"dropout": float("nan")}, r"dropout must be in \[0, 1\), got nan"),
    ],
)
def test_bad_retnet_configs_are_named(overrides, message):
    with pytest.raises(StrictDataclassClassValidationError, match=message) as error:
        tiny_config(**overrides)
    assert isinstance(error.value.__cause__, ValueError)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"layer_norm_epsilon": 0.0}, "layer_norm_epsilon must be a finite number > 0, got 0.0"),
        ({"layer_norm_epsilon": float("nan")}, "layer_norm_epsilon must be a finite number > 0, got nan"),
        ({"dense_block_layers": 3}, r"dense_block_layers=3 exceeds the 2 layer\(s\) below the top"),
        ({"expand": 1.5}, "expand must be a positive integer, got 1.5"),
        ({"chunk_size": True}, "chunk_size must be a positive integer, got True"),
        ({"time_step_min": 0.0}, "time_step_min must be a finite number > 0"),
        ({"time_step_max": float("inf")}, "time_step_max must be a finite number > 0"),
        ({"time_step_floor": -1.0}, "time_step_floor must be a finite number >= 0"),
        ({"time_step_scale": float("nan")}, "time_step_scale must be a finite number >= 0"),
        ({"initializer_range": -0.1}, "initializer_range must be a finite number >= 0"),
        ({"pad_token_id": -1}, r"pad_token_id -1 is not a token id of the vocabulary \[0, 97\)"),
        ({"pad_token_id": 97}, "pad_token_id 97 is not a token id"),
    ],
)
def test_bad_mamba_configs_are_named(overrides, message):
    with pytest.raises(StrictDataclassClassValidationError, match=message) as error:
        tiny_mamba_config(**overrides)
    assert isinstance(error.value.__cause__, ValueError)


def test_the_deepest_dense_connection_is_accepted():
    assert tiny_config(num_hidden_layers=3, dense_block_layers=2).dense_block_layers == 2
    assert tiny_mamba_config(num_hidden_layers=1, dense_block_layers=0).num_hidden_layers == 1


@pytest.mark.parametrize(
    ("family", "field", "value", "message"),
    [
        ("retnet", "rms_norm_eps", 0, "rms_norm_eps must be a finite number > 0"),
        ("retnet", "dense_block_layers", 5, "dense_block_layers=5 exceeds"),
        ("mamba", "layer_norm_epsilon", -1, "layer_norm_epsilon must be a finite number > 0"),
        ("mamba", "dense_block_layers", 3, "dense_block_layers=3 exceeds"),
    ],
)
def test_a_bad_config_json_is_refused_when_loading(tmp_path, family, field, value, message):
    _model(family).save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    config = json.loads(config_file.read_text())
    config[field] = value
    config_file.write_text(json.dumps(config))
    with pytest.raises(StrictDataclassClassValidationError, match=message):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=f"is not a valid dense_{family} configuration: {message}") as error:
        read_config(tmp_path)
    assert "\n" not in str(error.value)


def test_keyword_overrides_of_from_pretrained_are_validated(tmp_path):
    _model("retnet").save_pretrained(tmp_path)
    with pytest.raises(StrictDataclassClassValidationError, match="rms_norm_eps must be a finite number > 0"):
        DenseRetNetForCausalLM.from_pretrained(tmp_path, rms_norm_eps=0.0)


# --- non-finite values at masked positions ----------------------------------------------------------------------


def _padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    mask[1, 4] = 0  # a hole in the middle
    return TOKENS, mask


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_nan_in_padded_embeddings_never_reaches_real_tokens(family, mode):
    model = _model(family).train()  # dropout is 0: train mode only so that no state is kept
    tokens, mask = _padded_batch()
    real = mask.bool()
    clean = model.get_input_embeddings()(tokens).detach()
    dirty = clean.clone()
    dirty[~real] = float("nan")
    dirty.requires_grad_(True)
    kwargs = dict(attention_mask=mask, mode=mode, chunk_size=3)
    reference = model(inputs_embeds=clean, **kwargs).logits
    out = model(inputs_embeds=dirty, **kwargs).logits
    assert torch.equal(out[real], reference[real])
    out[real].sum().backward()
    assert torch.isfinite(dirty.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_a_nan_pad_token_row_never_reaches_real_tokens(family, mode):
    model = _model(family)
    tokens, mask = _padded_batch()
    padded = tokens.masked_fill(mask == 0, 0)
    with torch.no_grad():
        reference = model(padded, attention_mask=mask, mode=mode, chunk_size=3).logits
        model.get_input_embeddings().weight[0] = float("nan")  # the pad token's row
        out = model(padded, attention_mask=mask, mode=mode, chunk_size=3, use_cache=True)
    real = mask.bool()
    # column 0 is the pad token's own logit: DenseMamba ties its head to the embeddings, so that one is NaN
    assert torch.equal(out.logits[real][:, 1:], reference[real][:, 1:])
    assert all(torch.isfinite(t).all() for layer in out.cache.layers for t in layer.values())


@pytest.mark.parametrize("mode", MODES)
def test_the_retention_op_selects_rather_than_multiplies_by_the_mask(mode):
    torch.manual_seed(0)
    q, k = torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    v = torch.randn(2, 2, 6, 4)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, :2] = False
    mask[1, 3] = False
    clean, _ = retention(q, k, v, head_log_decays(2), mode, mask=mask, chunk_size=4)
    dirty = [x.clone() for x in (q, k, v)]
    for x in dirty:
        x.masked_fill_(~mask[:, None, :, None], float("nan"))
    out, state = retention(*dirty, head_log_decays(2), mode, mask=mask, chunk_size=4, output_state=True)
    real = mask[:, None, :].expand(-1, 2, -1)
    assert torch.equal(out[real], clean[real])
    assert all(torch.isfinite(s).all() for s in state)


@pytest.mark.parametrize("mode", MODES)
def test_the_mamba_mixer_keeps_a_nan_padded_input_out_of_conv_and_scan(mode):
    mixer = _model("mamba").backbone.layers[1].mixer
    torch.manual_seed(0)
    x = torch.randn(2, 6, 16)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, :2] = False
    mask[1, 3] = False
    scan_mode = "parallel" if mode == "chunkwise" else mode
    shallow = [(torch.randn(2, 6, 32, 4),)]
    call = MixerCall(
        mask=mask, position_ids=torch.zeros(2, 6, dtype=torch.long), mode=scan_mode, chunk_size=4, output_state=True
    )
    with torch.no_grad():
        clean, _, state = mixer(x, shallow, call, None)
        dirty_x = x.masked_fill(~mask[..., None], float("nan"))
        out, _, dirty = mixer(dirty_x, shallow, call, None)
    assert torch.equal(out[mask], clean[mask])
    assert torch.equal(dirty["conv"], state["conv"]) and torch.equal(dirty["ssm"], state["ssm"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_prepacked_model_refuses_another_dtype_before_anything_changes(dtype):
    """oneDNN's packed weights cannot follow ``.half()``: the conversion once failed with a raw backend error
    after it had already rounded the modules before the first packed one to float16."""
    model = prepack_for_cpu(_model("retnet").to(dtype), min_weight=1)
    ids = TOKENS[:, :4]
    with torch.no_grad():
        expected = model(ids).logits
    other = torch.float16
    with pytest.raises(InferenceOnlyError, match="cannot convert PrepackedLinear: prepacked weights stay in "):
        model.to(other)
    with pytest.raises(InferenceOnlyError, match="prepacked weights run on the CPU only, not on meta"):
        model.to("meta")
    assert {t.dtype for t in model.parameters()} == {dtype}
    assert model.to("cpu").to(dtype) is model  # what changes nothing still works
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)


@pytest.mark.parametrize(
    "transform",
    [fuse_projections, lambda m: prepack_for_cpu(m, min_weight=1), lambda m: quantize_int8(m, min_weight=0)],
)
def test_a_transformed_model_refuses_a_backward_rather_than_train_nothing(transform):
    """A backward through a transformed model would update copies its weights no longer share (prepacked: the
    step changed nothing at all): its parameters stop requiring gradients, and a loss asked for with gradients
    on is refused naming the transform (its backward failed with torch's "does not require grad" only)."""
    model = transform(_model("mamba"))
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(InferenceOnlyError, match="cannot train .* compute the loss under torch.no_grad"):
        model(TOKENS[:, :4], labels=TOKENS[:, :4])
    with pytest.raises(RuntimeError, match="does not require grad"):  # no labels: a backward still fails
        model(TOKENS[:, :4]).logits.sum().backward()
    with torch.no_grad():
        assert torch.isfinite(model(TOKENS[:, :4], labels=TOKENS[:, :4]).loss)  # evaluating a loss: allowed


@pytest.mark.parametrize(
    "transform",
    [fuse_projections, lambda m: prepack_for_cpu(m, min_weight=1), lambda m: quantize_int8(m, min_weight=0)],
)
def test_a_transformed_model_made_to_require_gradients_again_refuses_to_train(transform):
    """``requires_grad_(True)`` on a transformed model made its backward run again, a step that changed nothing
    (prepacked): its forward with gradients on refuses instead; under no_grad, or frozen, it still runs."""
    model = transform(_model("mamba"))
    ids = TOKENS[:, :4]
    assert model(ids).logits.shape[1] == 4  # frozen: a forward with gradients on is inference
    model.requires_grad_(True)
    with pytest.raises(InferenceOnlyError, match="cannot train .*a parameter was made to require gradients again"):
        model(ids, labels=ids)
    with torch.no_grad():
        assert model(ids).logits.shape[1] == 4


def test_a_prepacked_model_refuses_to_be_copied_or_pickled(tmp_path):
    """oneDNN's packed weights have no storage: copy.deepcopy and torch.save failed with a raw backend error."""
    import copy
    import pickle

    model = prepack_for_cpu(_model("retnet"), min_weight=1)
    for attempt in (
        lambda: copy.deepcopy(model),
        lambda: pickle.dumps(model),
        lambda: torch.save(model, tmp_path / "m"),
    ):
        with pytest.raises(
            InferenceOnlyError, match="cannot copy or pickle PrepackedLinear: .* copy or save the original"
        ):
            attempt()


@pytest.mark.parametrize(
    ("convert", "problem"),
    [
        (lambda m: m.half(), "compute in float32, not in float16"),
        (lambda m: m.to(torch.bfloat16), "compute in float32, not in bfloat16"),
        (lambda m: m.to("meta"), "run on the CPU only, not on meta"),
    ],
)
def test_an_int8_model_refuses_another_dtype_before_anything_changes(convert, problem):
    model = quantize_int8(_model("retnet"), min_weight=0)
    ids = TOKENS[:, :4]
    with torch.no_grad():
        expected = model(ids).logits
    for target in (model, next(m for m in model.modules() if isinstance(m, Int8Linear))):
        with pytest.raises(InferenceOnlyError, match=f"cannot convert Int8Linear: int8 weights {problem}; choose the"):
            convert(target)
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in model.parameters())
    assert model.to("cpu").float().to(torch.float32) is model  # what changes nothing still works
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)


def test_a_mamba2_pad_token_outside_the_vocabulary_is_named():
    from densessm import DenseMamba2Config

    with pytest.raises(StrictDataclassClassValidationError, match="pad_token_id -1 is not a token id") as error:
        DenseMamba2Config(vocab_size=97, pad_token_id=-1)
    assert isinstance(error.value.__cause__, ValueError)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_refuses_a_right_padded_prompt_batch(family):
    """Decoding continues each row from its last position: a row ending in padding continued from the pad token
    (a silently wrong answer, transformers only warns). Left padding gives the per-row answers."""
    model = _model(family)
    tokens = torch.randint(3, 90, (2, 6))
    right = torch.ones_like(tokens)
    right[1, 4:] = 0
    with pytest.raises(ValueError, match=r"^row 1 of the attention_mask ends in padding \(right padding\).*'left'"):
        model.generate(tokens, attention_mask=right, max_new_tokens=2, do_sample=False, pad_token_id=0)
    # no mask: generate() infers it from the padding token, and the refusal stands
    padded_right = tokens.clone()
    padded_right[1, 4:] = 0
    with pytest.raises(ValueError, match=r"^row 1 of the attention_mask ends in padding"):
        model.generate(padded_right, max_new_tokens=2, do_sample=False, pad_token_id=0, eos_token_id=2)
    # the padding token is also the end-of-text token: transformers infers no mask, and cannot tell them apart
    with pytest.raises(ValueError, match=r"^row 1 ends in token 0, the padding token and also the end-of-text token"):
        model.generate(padded_right, max_new_tokens=2, do_sample=False, pad_token_id=0, eos_token_id=0)
    for wrong in (right.numpy(), right.tolist()):
        with pytest.raises(ValueError, match="^attention_mask must be a torch.Tensor, got "):
            model.generate(tokens, attention_mask=wrong, max_new_tokens=2, do_sample=False)
    left = right.flip(1)
    padded = torch.cat([tokens[1:, 4:], tokens[1:, :4]], dim=1)  # the row's 4 tokens, on the right of 2 pads
    out = model.generate(torch.cat([tokens[:1], padded]), attention_mask=left, max_new_tokens=2, do_sample=False)
    alone = model.generate(tokens[1:, :4], max_new_tokens=2, do_sample=False)
    assert torch.equal(out[1, -2:], alone[0, -2:])


@pytest.mark.parametrize("transform", ["quantize_int8", "prepack_for_cpu"])
@pytest.mark.parametrize("min_weight", ["x", None, 2.5, -1, True])
def test_a_transform_names_a_min_weight_that_is_no_count(transform, min_weight):
    """A string or None failed inside with a bare comparison error; the model is left as it was."""
    model = _model("retnet")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"^min_weight must be an integer >= 0, got {re.escape(repr(min_weight))}$"):
        {"quantize_int8": quantize_int8, "prepack_for_cpu": prepack_for_cpu}[transform](model, min_weight=min_weight)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("transform", [quantize_int8, prepack_for_cpu, fuse_projections, fuse_decode_steps])
@pytest.mark.parametrize("model", [None, "checkpoints/model", {"weight": 1}])
def test_a_transform_given_no_model_names_what_it_got(transform, model):
    """None or a path failed inside with "'NoneType' object has no attribute 'modules'"."""
    with pytest.raises(TypeError, match=rf"^{transform.__name__} takes a model \(a torch.nn.Module\), got "):
        transform(model)


@pytest.mark.parametrize("family", [family.name for family in REGISTERED])
def test_a_config_claiming_a_billion_layers_is_named_before_memory_runs_out(family):
    """A one-field crafted config.json made the configuration build per-layer lists of 10**9 items (8 GB, then
    an empty MemoryError)."""
    config_class = next(f.config for f in REGISTERED if f.name == family)
    with pytest.raises(ValueError, match="num_hidden_layers=1000000000 is beyond 10,000: no model has that many"):
        config_class(num_hidden_layers=10**9)


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_ids_without_a_mask_get_transformers_note(family, monkeypatch):
    """Padding tokens given without an attention mask are read as text (transformers' convention): that was
    silent; the model now says so once, as transformers' own models do."""
    import transformers.modeling_utils

    model = _model(family)
    tokens = torch.randint(3, 90, (2, 6))
    tokens[1, :2] = model.config.pad_token_id
    notes = []
    monkeypatch.setattr(transformers.modeling_utils.logger, "warning_once", notes.append)
    model(tokens)
    assert len(notes) == 1 and "We strongly recommend passing in an `attention_mask`" in notes[0]
    model(tokens, attention_mask=(tokens != model.config.pad_token_id).long())
    model(tokens[:1])
    assert len(notes) == 1


@pytest.mark.parametrize("mode", ["parallel", "recurrent"])
def test_a_kernel_path_that_does_not_exist_is_refused_by_dense_mamba2_too(mode, monkeypatch):
    """DenseMamba2's SSD has no kernel of its own and never read DENSESSM_KERNELS: "cuda" ran without a word,
    where the other families refuse it."""
    from densessm import DenseMamba2Config, DenseMamba2ForCausalLM
    from densessm.errors import UsageError

    shape = dict(hidden_size=16, num_heads=4, head_dim=8, n_groups=2, state_size=4, num_hidden_layers=3)
    config = DenseMamba2Config(**shape, vocab_size=97, dense_gate_reduction=4, chunk_size=4)
    model = DenseMamba2ForCausalLM(config).eval()
    monkeypatch.setenv("DENSESSM_KERNELS", "cuda")
    with pytest.raises(UsageError, match=r"DENSESSM_KERNELS='cuda' is not a kernel path: use one of auto, torch"):
        model(TOKENS, mode=mode)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_names_a_batch_row_without_any_real_token(family):
    """It was blamed on right padding, which no left padding could fix."""
    model = _model(family)
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]])
    with pytest.raises(ValueError, match=r"^row 1 of the attention_mask holds no real token: give each row a prompt"):
        model.generate(TOKENS[:, :4], attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)


def test_save_pretrained_into_a_file_is_an_error(tmp_path):
    """transformers logged it and returned: nothing was saved, and no exception told the caller."""
    (tmp_path / "afile").write_text("keep")
    with pytest.raises(NotADirectoryError, match="it is a file, not a directory"):
        _model("retnet").save_pretrained(tmp_path / "afile")
    assert (tmp_path / "afile").read_text() == "keep"


@pytest.mark.parametrize("kind", ["dangling", "loop"])
def test_save_pretrained_into_a_symlink_that_leads_nowhere_is_named(tmp_path, kind):
    """transformers' ``os.makedirs`` said only "[Errno 17] File exists"."""
    link = tmp_path / "out"
    link.symlink_to(tmp_path / ("nowhere" if kind == "dangling" else "out"))
    reason = "is a symlink loop" if kind == "loop" else f"is a symlink to a missing target ({tmp_path / 'nowhere'})"
    with pytest.raises(UsageError, match=f"^{re.escape(f'save_directory {link} {reason}; name another path')}$"):
        _model("mamba").save_pretrained(link)
    assert link.is_symlink() and not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("preset", ["dense_retnet_tiny", "dense_mamba_tiny", "dense_mamba2_tiny"])
@pytest.mark.parametrize("mode", ["parallel", "chunkwise"])
def test_a_chunk_size_set_on_the_configuration_after_loading_is_checked(preset, mode):
    """``model.config.chunk_size = 0`` after construction ended in a raw ZeroDivisionError (DenseMamba2's blocked
    SSD) instead of the constructor's check."""
    from densessm.presets import load_preset

    model = AutoModelForCausalLM.from_config(load_preset(preset)).eval()
    model.config.chunk_size = 0
    with pytest.raises(ValueError, match=r"^config.chunk_size must be >= 1 \(a positive integer\), got 0$"):
        model(TOKENS[:, :6], mode=mode)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (dict(max_new_tokens=2.5), "max_new_tokens must be an int, got 2.5"),
        (dict(top_k=2.0), "top_k must be an int, got 2.0"),
        (dict(top_p=float("nan")), "top_p must be a finite number, got nan"),
        (dict(temperature=float("inf")), "temperature must be a finite number, got inf"),
        (dict(repetition_penalty=float("nan")), "repetition_penalty must be a finite number, got nan"),
        (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number, got nan"),
        (dict(length_penalty=float("nan"), num_beams=2), "length_penalty must be a finite number, got nan"),
        (dict(num_beams=2.5), "num_beams must be an int, got 2.5"),
        (dict(num_beams=0), "num_beams must be at least 1, got 0"),
        (dict(num_return_sequences=0), "num_return_sequences must be at least 1, got 0"),
        (dict(min_new_tokens=-1), "min_new_tokens must be at least 0, got -1"),
        (dict(do_sample="no"), "do_sample must be True or False, got 'no'"),
        (dict(eos_token_id=-1), "eos_token_id -1 is not a token of this model (ids 0..96)"),
        (dict(eos_token_id=[2, 97]), "eos_token_id 97 is not a token of this model (ids 0..96)"),
    ],
)
def test_generation_settings_that_cannot_mean_anything_are_refused(model, setting, message):
    """transformers' processors compare a NaN top_p false everywhere (the filter was off) and rounded a
    fractional max_new_tokens up; the CLI refused both, the Python generate() did not. A NaN length penalty made
    every beam score NaN, a NaN guidance scale repeated token 0, num_beams 2.5 or 0 failed deep in transformers,
    and do_sample="no" sampled."""
    kwargs = dict(max_new_tokens=2, do_sample=True, pad_token_id=0) | setting
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        model.generate(TOKENS[:, :4], **kwargs)
    config = GenerationConfig(**kwargs) if "max_new_tokens" not in setting else None
    if config is not None:  # the same settings in a generation config
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            model.generate(TOKENS[:, :4], generation_config=config)
    assert model.generate(TOKENS[:, :4], max_new_tokens=np.int64(2), do_sample=False, pad_token_id=0).shape[1] == 6


@pytest.mark.parametrize("ids", [np.array([[3, 4, 5]]), [[3, 4, 5]]])
def test_generate_names_ids_that_are_no_tensor(model, ids):
    """transformers failed with "'str' object has no attribute 'type'" on a numpy array."""
    with pytest.raises(ValueError, match=f"^inputs must be a torch.Tensor of token ids, got {type(ids).__name__}$"):
        model.generate(ids, max_new_tokens=2)
    with pytest.raises(ValueError, match="^input_ids must be a torch.Tensor of token ids"):
        model.generate(input_ids=ids, max_new_tokens=2)
