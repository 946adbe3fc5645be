"""A saved RecurrentCache knows its model: crafted or damaged files, and caches of other models, are refused.

Every refusal is a ValueError (TypeError for a wrong type) whose message names the problem; a refused save
leaves the file already on disk byte for byte as it was; loading never allocates more than the file holds.
A model notices its own weights changing in place; ``generate()`` checks that the sequence it is given begins
with the tokens a cache consumed.
"""

from __future__ import annotations

import copy
import json
import os
import re
import tracemalloc
from pathlib import Path

import pytest
import torch
from conftest import tiny_config, tiny_mamba_config
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CompileConfig

from densessm import (
    DenseMamba2Config,
    DenseMamba2ForCausalLM,
    DenseMambaForCausalLM,
    DenseRetNetForCausalLM,
    RecurrentCache,
)
from densessm.cache import CacheIdentity, digest_embeddings, digest_tokens, embedding_values
from densessm.compiled_decoding import CompiledDecoder
from densessm.errors import UsageError
from densessm.files import DestinationExistsError
from densessm.inference import fuse_projections, prepack_for_cpu, quantize_int8

PROMPT = torch.arange(3, 15).reshape(2, 6) % 97


def _model(family: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    if family == "retnet":
        return DenseRetNetForCausalLM(tiny_config(**overrides)).eval()
    if family == "mamba2":
        shape = dict(hidden_size=16, num_heads=4, head_dim=8, n_groups=2, state_size=4, num_hidden_layers=3)
        config = DenseMamba2Config(**shape, vocab_size=97, dense_gate_reduction=4, chunk_size=4, **overrides)
        model = DenseMamba2ForCausalLM(config).eval()
    else:
        model = DenseMambaForCausalLM(tiny_mamba_config(**overrides)).eval()
    for layer in model.backbone.layers[1:]:  # open the dense gates (they start closed): the state then matters
        if layer.mixer.dense_gate is not None:
            torch.nn.init.normal_(layer.mixer.dense_gate.fc2.weight, std=0.5)
    return model


def _cache(model, tokens: torch.Tensor = PROMPT) -> RecurrentCache:
    with torch.no_grad():
        return model(tokens, use_cache=True).cache


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor], dict[str, str]]:
    """A genuine cache file of a tiny DenseRetNet, with its tensors and metadata to tamper with."""
    path = tmp_path_factory.mktemp("cache") / "prompt.safetensors"
    _cache(_model("retnet")).save(path)
    with safe_open(str(path), "pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is no dict)
        metadata = f.metadata()
    return path, tensors, metadata


def _write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    save_file(tensors, str(path), metadata=metadata)
    return path


# --- saving and restoring -------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["retnet", "mamba"])
def test_saved_state_records_its_model_and_continues_identically(family, tmp_path):
    model = _model(family)
    cache = _cache(model)
    cache.save(tmp_path / "c.safetensors")
    restored = RecurrentCache.load(tmp_path / "c.safetensors")
    assert restored.identity == cache.identity == model.state_identity()
    assert restored.identity.model_type == model.config.model_type
    full = torch.cat([PROMPT, PROMPT[:, :3]], dim=1)
    reference = model.generate(full, max_new_tokens=5, do_sample=False)
    assert torch.equal(model.generate(full, cache=restored, max_new_tokens=5, do_sample=False), reference)


def test_the_same_weights_loaded_again_accept_the_cache(tmp_path):
    model = _model("retnet")
    model.save_pretrained(tmp_path / "model")
    _cache(model).save(tmp_path / "c.safetensors")
    again = DenseRetNetForCausalLM.from_pretrained(tmp_path / "model").eval()
    restored = RecurrentCache.load(tmp_path / "c.safetensors")
    with torch.no_grad():
        assert torch.equal(
            again(PROMPT[:, :1], cache=restored).logits, model(PROMPT[:, :1], cache=_cache(model)).logits
        )


def test_the_fingerprint_ignores_precision_and_inference_fusion_but_follows_training():
    model = _model("retnet")
    identity = model.state_identity()
    assert model.base_model.state_identity() is identity  # kept while no weight changes
    assert _model("retnet").to(torch.bfloat16).state_identity() == identity  # the same weights, rounded
    fused = fuse_projections(_model("retnet"))
    assert fused.state_identity() == identity  # fused weights store the same function
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)  # the head does not shape the state
        assert model.state_identity() is identity
        model.model.layers[0].retention.q_proj.weight.add_(1.0)
    assert model.state_identity().weights != identity.weights


def test_a_fused_model_continues_the_state_of_the_original():
    model = _model("mamba")
    cache = _cache(model)
    reference = model(PROMPT[:, :1], cache=cache.clone()).logits
    fused = fuse_projections(_model("mamba"))
    torch.testing.assert_close(fused(PROMPT[:, :1], cache=cache).logits, reference, atol=1e-5, rtol=1e-5)


def test_clones_share_the_identity_object():
    cache = _cache(_model("retnet"))
    assert cache.clone().identity is cache.identity


def test_save_refuses_an_existing_file_unless_asked(tmp_path):
    cache = _cache(_model("retnet"))
    target = tmp_path / "c.safetensors"
    target.write_bytes(b"precious")
    with pytest.raises(DestinationExistsError, match="already exists; nothing was written"):
        cache.save(target)
    assert target.read_bytes() == b"precious"
    cache.save(target, overwrite=True)
    assert RecurrentCache.load(target).steps == PROMPT.shape[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors"]  # no temporary file left behind


@pytest.mark.parametrize("value", ["no", "false", 1, None])
def test_switches_that_guard_a_file_take_only_true_or_false(tmp_path, value):
    """``save(path, overwrite="no")`` replaced the file ("no" is truthy); ``check_model="no"`` was read as True."""
    cache = _cache(_model("retnet"))
    target = tmp_path / "c.safetensors"
    cache.save(target)
    before = target.read_bytes()
    with pytest.raises(TypeError, match=f"^overwrite must be True or False, got {value!r}$"):
        cache.save(target, overwrite=value)
    assert target.read_bytes() == before
    with pytest.raises(TypeError, match=f"^check_model must be True or False, got {value!r}$"):
        RecurrentCache.load(target, check_model=value)


@pytest.mark.parametrize("family", ["retnet", "mamba2"])
def test_save_writes_no_file_its_own_load_refuses(tmp_path, family):
    """``cache.steps`` set by hand (2.0, or fewer than the digest covers) was saved, and every load refused it."""
    cache = _cache(_model(family))
    edits = {
        "steps 2.0": (lambda c: setattr(c, "steps", 2.0), "cache.steps must be a non-negative int"),
        "steps below the digest": (lambda c: setattr(c, "steps", 2), "cache.steps is 2, but cache.token_digest covers"),
        "positions beyond steps": (
            lambda c: setattr(c, "positions", c.positions + 1),
            "cannot save the state: cache.positions",
        ),
        "positions as floats": (
            lambda c: setattr(c, "positions", c.positions.float()),
            "cannot save the state: cache.positions must be an int64 tensor [batch]",
        ),
    }
    for edit, message in edits.values():
        edited = cache.clone()
        edit(edited)
        with pytest.raises(ValueError, match=re.escape(message)):
            edited.save(tmp_path / "c.safetensors")
        assert list(tmp_path.iterdir()) == []


def test_save_names_a_directory_or_a_parent_that_is_a_file(tmp_path):
    cache = _cache(_model("retnet"))
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "kept.txt").write_bytes(b"kept")
    (tmp_path / "plain").write_bytes(b"a file")
    for overwrite in (False, True):  # overwrite=True cannot make a directory a file: the same message
        with pytest.raises(UsageError, match=r"folder is a directory: name the cache file to write, e\.g\. .*folder"):
            cache.save(tmp_path / "folder", overwrite=overwrite)
        with pytest.raises(UsageError, match=r"cache file .*plain/c.safetensors cannot be created: .*plain is a file"):
            cache.save(tmp_path / "plain" / "c.safetensors", overwrite=overwrite)
    assert (tmp_path / "folder" / "kept.txt").read_bytes() == b"kept"
    assert (tmp_path / "plain").read_bytes() == b"a file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "plain"]
    with pytest.raises(IsADirectoryError, match="folder is a directory: name the cache file to read"):
        RecurrentCache.load(tmp_path / "folder")


def test_save_refuses_a_link_unless_asked(tmp_path):
    cache = _cache(_model("retnet"))
    (tmp_path / "dangling.safetensors").symlink_to(tmp_path / "nowhere")
    (tmp_path / "loop.safetensors").symlink_to(tmp_path / "loop.safetensors")
    with pytest.raises(UsageError, match=r"cache file .*dangling.safetensors is a symlink to a missing target"):
        cache.save(tmp_path / "dangling.safetensors")
    with pytest.raises(UsageError, match=r"cache file .*loop.safetensors is a symlink loop; name another path"):
        cache.save(tmp_path / "loop.safetensors")
    assert not (tmp_path / "nowhere").exists()
    cache.save(tmp_path / "dangling.safetensors", overwrite=True)
    assert RecurrentCache.load(tmp_path / "dangling.safetensors").steps == PROMPT.shape[1]


@pytest.mark.parametrize(
    ("num_layers", "error", "message"),
    [
        ("3", TypeError, "num_layers must be an int \\(the model's number of layers\\), got '3'"),
        (2.0, TypeError, "num_layers must be an int .* got 2.0"),
        (True, TypeError, "num_layers must be an int .* got True"),
        (0, ValueError, "num_layers must be >= 1 .* got 0"),
        (-1, ValueError, "num_layers must be >= 1 .* got -1"),
    ],
)
def test_a_cache_needs_a_positive_number_of_layers(num_layers, error, message):
    with pytest.raises(error, match=message):
        RecurrentCache(num_layers)


@pytest.mark.parametrize("repeats", [2.5, -1, 0, True, "2"])
def test_batch_repeat_interleave_names_a_count_that_is_no_positive_int(repeats):
    cache = _cache(_model("retnet"))
    with pytest.raises(ValueError, match=r"repeats must be a positive int \(copies of each row\), got"):
        cache.batch_repeat_interleave(repeats)
    assert cache.batch_size == 2
    cache.batch_repeat_interleave(2)
    assert cache.batch_size == 4 and cache.token_digest.shape == (4,)


def test_a_clone_is_detached_from_the_graph_that_made_the_state():
    """The README's recipe without torch.no_grad(): the cache of a forward with gradients clones and continues."""
    model = _model("retnet")
    cache = model(PROMPT[:, :-1], use_cache=True).cache  # gradients enabled: the state is part of a graph
    assert cache.layers[0]["state"].requires_grad
    twin = cache.clone()
    assert not any(t.requires_grad for layer in twin.layers for t in layer.values())
    assert all(
        torch.equal(a, b)
        for x, y in zip(cache.layers, twin.layers, strict=True)
        for a, b in zip(x.values(), y.values(), strict=True)
    )
    twin.layers[0]["state"].add_(1)  # independent of the original
    assert not torch.equal(twin.layers[0]["state"], cache.layers[0]["state"])
    reference = model.generate(PROMPT, max_new_tokens=4, do_sample=False)
    assert torch.equal(model.generate(PROMPT, cache=cache.clone(), max_new_tokens=4, do_sample=False), reference)


def test_save_refuses_a_cache_without_identity_or_state(tmp_path):
    cache = _cache(_model("retnet"))
    cache.identity = None
    with pytest.raises(ValueError, match="records no model identity"):
        cache.save(tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match="nothing to save"):
        RecurrentCache(3).save(tmp_path / "c.safetensors")
    cache.layers[1] = None
    with pytest.raises(ValueError, match="partial state"):
        cache.save(tmp_path / "c.safetensors")
    assert not list(tmp_path.iterdir())


# --- crafted and damaged files ----------------------------------------------------------------------------------


def test_a_tiny_file_claiming_300m_layers_is_refused_without_allocating(tmp_path):
    tensors = {"layers.0.state": torch.zeros(1, 1), "positions": torch.zeros(1, dtype=torch.long)}
    old = _write(
        tmp_path / "old.safetensors",
        tensors,
        {"format": "densessm.RecurrentCache/1", "num_layers": "300000000", "steps": "0"},
    )
    assert old.stat().st_size < 300
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="declares 300000000 layers but holds the state of 1"):
            RecurrentCache.load(old, check_model=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20  # a list of 300M layer slots alone would take 2.4 GB


def test_an_old_format_file_is_refused_unless_unchecked(tmp_path, saved):
    _, tensors, metadata = saved
    legacy = {"format": "densessm.RecurrentCache/1", "num_layers": metadata["num_layers"], "steps": metadata["steps"]}
    path = _write(tmp_path / "v1.safetensors", tensors, legacy)
    with pytest.raises(ValueError, match="older format densessm.RecurrentCache/1, which does not record the model"):
        RecurrentCache.load(path)
    cache = RecurrentCache.load(path, check_model=False)
    assert cache.identity is None and cache.steps == int(metadata["steps"])


def _tampered(tmp_path, saved, tensors=None, **metadata_changes) -> Path:
    _, original_tensors, metadata = saved
    tensors = dict(original_tensors) if tensors is None else tensors
    metadata = {**metadata, **metadata_changes}
    return _write(tmp_path / "crafted.safetensors", tensors, {k: v for k, v in metadata.items() if v is not None})


@pytest.mark.parametrize(
    ("rename", "message"),
    [
        ({"layers.0.state": "layers.0"}, r"unexpected tensor 'layers.0'"),
        ({"layers.0.state": "weights.0.state"}, r"unexpected tensor 'weights.0.state'"),
        ({"layers.0.state": "layers.01.state"}, r"unexpected tensor 'layers.01.state'"),
        ({"layers.0.state": "layers.-1.state"}, r"unexpected tensor 'layers.-1.state'"),
        (
            {"layers.2.state": "layers.7.state", "layers.2.scale": "layers.7.scale"},
            "names layer 7, but the file declares 3",
        ),
        (
            {"layers.0.state": "layers.0.memory"},
            r"layer 0 holds memory \[2, 8, 32\] float32, scale .* but its metadata",
        ),
    ],
)
def test_crafted_tensor_names_are_refused(tmp_path, saved, rename, message):
    tensors = {rename.get(k, k): v for k, v in saved[1].items()}
    with pytest.raises(ValueError, match=message):
        RecurrentCache.load(_tampered(tmp_path, saved, tensors))


def test_layers_of_different_tensors_are_refused_without_a_layout(tmp_path, saved):
    tensors = {k.replace("layers.1.state", "layers.1.memory"): v for k, v in saved[1].items()}
    metadata = {"format": "densessm.RecurrentCache/1", "num_layers": "3", "steps": "6"}
    path = _write(tmp_path / "v1.safetensors", tensors, metadata)
    with pytest.raises(ValueError, match=r"the layers hold different sets of tensors: \[\['memory', 'scale'\]"):
        RecurrentCache.load(path, check_model=False)


def test_a_missing_layer_is_refused(tmp_path, saved):
    tensors = {k: v for k, v in saved[1].items() if not k.startswith("layers.1.")}
    with pytest.raises(ValueError, match=r"declares 3 layers but holds the state of 2 \(no tensor for layers \[1\]\)"):
        RecurrentCache.load(_tampered(tmp_path, saved, tensors))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.update({"layers.1.state": t["layers.1.state"][:1]}), r"has shape \[1, .*not \[batch=2"),
        (lambda t: t.update({"positions": t["positions"].float()}), "positions must be a non-empty int64 vector"),
        (lambda t: t.update({"positions": t["positions"][None]}), "positions must be a non-empty int64 vector"),
        (lambda t: t.pop("positions"), "lacks the positions tensor"),
        (lambda t: t.update({"layers.0.scale": t["layers.0.scale"].long()}), "has dtype I64; a state is floating"),
        (lambda t: t.update({"layers.0.state": t["layers.0.state"].double()}), r"layer 0 holds .* but its metadata"),
        (
            lambda t: t.update({"layers.2.state": t["layers.2.state"][..., :4].contiguous()}),
            r"layer 2 holds .* but its metadata",
        ),
        (lambda t: t.update({"positions": torch.tensor([6, -1])}), r"positions \[6, -1\] must lie in \[0, steps=6\]"),
        (lambda t: t.update({"positions": torch.tensor([6, 7])}), r"positions \[6, 7\] must lie in \[0, steps=6\]"),
    ],
)
def test_crafted_shapes_dtypes_and_positions_are_refused(tmp_path, saved, change, message):
    tensors = dict(saved[1])
    change(tensors)
    with pytest.raises(ValueError, match=message):
        RecurrentCache.load(_tampered(tmp_path, saved, tensors))


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"format": "something/else"}, "is not a densessm recurrent-state file"),
        ({"format": None}, "is not a densessm recurrent-state file"),
        ({"steps": "-1"}, "'steps' must be a non-negative integer, got '-1'"),
        ({"steps": "1e3"}, "'steps' must be a non-negative integer"),
        (
            {"steps": "2", "token_digest": None, "digest_steps": None, "embedding_digest": None}
            | {"embedding_digest_steps": None},
            r"must lie in \[0, steps=2\]",
        ),
        ({"steps": "2"}, r"'digest_steps' \(6\) exceeds steps \(2\)"),  # steps below what was consumed
        ({"num_layers": "2"}, "names layer 2, but the file declares 2 layers"),
        ({"num_layers": "0"}, "declares 0 layers"),
        ({"num_layers": None}, "'num_layers' must be a non-negative integer, got None"),
        ({"layout": "[1, 2"}, "'layout' is missing or not a list"),
        ({"layout": None}, "'layout' is missing or not a list"),
        ({"layout": json.dumps([{}] * 3)}, r"layer 0 holds .* but its metadata declares nothing"),
        ({"layout": json.dumps([{"state": [[2], "float32"]}] * 2)}, "declares 3 layers but its layout describes 2"),
        ({"model_type": None}, "lacks the model_type"),
        ({"config": "{not json"}, "'config' is missing or not a JSON object"),
        ({"config": "[1]"}, "'config' is missing or not a JSON object"),
        ({"weights": "not-a-fingerprint"}, "'weights' is missing or not a hexadecimal fingerprint"),
        ({"layout": "[" * 200_000 + "]" * 200_000}, "metadata field 'layout' is nested too deeply to be read"),
        ({"config": "[" * 200_000 + "]" * 200_000}, "metadata field 'config' is nested too deeply to be read"),
        ({"config": '{"a":' * 100_000 + "1" + "}" * 100_000}, "metadata field 'config' is nested too deeply"),
        ({"token_digest": "1,2,3"}, "'token_digest' must hold 2 comma-separated integers"),
        ({"token_digest": "-1,2"}, "'token_digest' must hold 2 comma-separated integers"),
        ({"token_digest": None}, "'token_digest' must hold 2 comma-separated integers"),
        ({"token_digest": "2147483647,0"}, "'token_digest' holds a value of 2147483647 or more"),
        ({"digest_steps": None}, "'digest_steps' must be a non-negative integer, got None"),
        ({"digest_steps": "7"}, r"'digest_steps' \(7\) exceeds steps \(6\)"),
        ({"embedding_digest": "1"}, "'embedding_digest' must hold 2 comma-separated integers"),
        ({"embedding_digest": "2147483647,1"}, "'embedding_digest' holds a value of 2147483647 or more"),
        ({"embedding_digest_steps": "9"}, r"'embedding_digest_steps' \(9\) exceeds steps \(6\)"),
        ({"embedding_digest_steps": None}, "'embedding_digest_steps' must be a non-negative integer, got None"),
    ],
)
def test_crafted_metadata_is_refused(tmp_path, saved, metadata, message):
    with pytest.raises(ValueError, match=message):
        RecurrentCache.load(_tampered(tmp_path, saved, **metadata))


def test_corrupt_and_truncated_files_are_refused(tmp_path, saved):
    data = saved[0].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 20])
    with pytest.raises(ValueError, match="corrupt or truncated cache file"):
        RecurrentCache.load(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="corrupt or truncated cache file"):
        RecurrentCache.load(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError, match="no cache file"):
        RecurrentCache.load(tmp_path / "absent.safetensors")
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        RecurrentCache.load(saved[0], device="gpu")
    with pytest.raises(ValueError, match="^a cache cannot be loaded onto the meta device"):  # generate failed later
        RecurrentCache.load(saved[0], device="meta")


def test_a_pipe_is_named_as_not_a_regular_file(tmp_path):
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(ValueError) as refused:
        RecurrentCache.load(fifo)
    assert str(refused.value) == (
        f"{fifo} is not a regular file (a pipe, socket or device): name the cache file to read"
    )


@pytest.mark.parametrize(("key", "value"), [("layers.0.state", float("nan")), ("layers.2.scale", float("-inf"))])
def test_a_state_holding_nan_or_inf_is_refused_on_load(tmp_path, saved, key, value):
    tensors = dict(saved[1])
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[1] = value
    with pytest.raises(ValueError, match=f"tensor {key} holds NaN or infinite values; a state computed by a model"):
        RecurrentCache.load(_tampered(tmp_path, saved, tensors))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_state_holding_nan_or_inf_is_refused_on_save(tmp_path, value):
    """It was written without a word, as a file that every load then refused."""
    cache = _cache(_model("mamba"))
    cache.layers[0]["conv"][0, 0, 0] = value
    with pytest.raises(ValueError, match="cannot save the state: tensor layers.0.conv holds NaN or infinite values"):
        cache.save(tmp_path / "c.safetensors")
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="needs a machine without MPS (any Linux one)")
def test_a_device_that_is_not_there_is_named(saved):
    with pytest.raises(ValueError, match="device 'mps' is not available here"):
        RecurrentCache.load(saved[0], device="mps")


# --- a model checks the cache it is given ------------------------------------------------------------------------


@pytest.mark.parametrize(("maker", "user"), [("retnet", "mamba"), ("mamba", "retnet")])
def test_a_cache_of_another_family_is_refused(maker, user, tmp_path):
    cache = _cache(_model(maker))
    cache.save(tmp_path / "c.safetensors")
    other = f"dense_{maker}"
    for given in (cache, RecurrentCache.load(tmp_path / "c.safetensors")):
        with pytest.raises(ValueError, match=f"made by a {other} model and this is a dense_{user} model"):
            _model(user)(PROMPT[:, :1], cache=given)
    # without the identity the layout still tells: never read as an empty state
    unchecked = RecurrentCache.load(tmp_path / "c.safetensors", check_model=False)
    with pytest.raises(ValueError, match="a state of another model family"):
        _model(user)(PROMPT[:, :1], cache=unchecked)


def test_a_same_shaped_cache_of_other_weights_is_refused_in_forward_and_generate(tmp_path):
    cache = _cache(_model("retnet", seed=0))
    other = _model("retnet", seed=1)
    with pytest.raises(ValueError, match="does not belong to this model: .* with other weights"):
        other(PROMPT[:, :1], cache=cache.clone())
    full = torch.cat([PROMPT, PROMPT[:, :2]], dim=1)
    with pytest.raises(ValueError, match="with other weights"):
        other.generate(full, cache=cache.clone(), max_new_tokens=2)
    cache.identity = None  # the expert's override: the layout fits, so the state is used
    assert other(PROMPT[:, :1], cache=cache).logits.shape == (2, 1, 97)


def test_a_cache_of_another_configuration_is_refused():
    cache = _cache(_model("retnet"))
    with pytest.raises(ValueError, match=r"another configuration: rms_norm_eps=1e-06 \(this model: 0.001\)"):
        _model("retnet", rms_norm_eps=1e-3)(PROMPT[:, :1], cache=cache)


def test_an_empty_cache_takes_the_identity_of_the_model_that_fills_it():
    cache = _cache(_model("retnet", seed=1))
    cache.reset()
    model = _model("retnet")
    model(PROMPT, cache=cache)
    assert cache.identity is model.state_identity()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda c: c.layers[1].update(state=c.layers[1]["state"][..., :4]), r"layers.1.state has shape \(2, 2, 8, 4\)"),
        (lambda c: c.layers[0].update(state=c.layers[0]["state"].double()), "is torch.float64, but this model"),
        (lambda c: c.layers[2].pop("scale"), "layer 2 of the cache holds state, but this model's layers keep"),
        (lambda c: setattr(c, "positions", c.positions.float()), "cache.positions must be an int64 tensor"),
        (lambda c: c._map_batch(lambda t: t.to("meta")), "the cache is on meta but the model computes on cpu"),
        (lambda c: c.layers[0].update(scale=c.layers[0]["scale"].to("meta")), "layers.0.scale is on meta"),
        (lambda c: setattr(c, "identity", "dense_retnet"), "cache.identity must be a CacheIdentity or None"),
        (lambda c: c.layers.append(None), "cache holds the state of 4 layers but the model has 3"),
    ],
)
def test_a_damaged_cache_is_refused(damage, message):
    model = _model("retnet")
    cache = _cache(model)
    damage(cache)
    with pytest.raises(ValueError, match=message):
        model(PROMPT[:, :1], cache=cache)


@pytest.mark.parametrize(
    ("target", "error", "message"),
    [
        (torch.float16, TypeError, "RecurrentCache.to takes a device .* got torch.float16: a cache keeps the dtypes"),
        ("meta", ValueError, "a cache cannot be moved to the meta device: its state would be lost"),
        ("nosuch", ValueError, "unknown device 'nosuch': use e.g. 'cpu', 'cuda' or 'cuda:1'"),
        ("cuda:99", ValueError, "device 'cuda:99' is not available here"),
    ],
)
def test_a_cache_moves_only_to_a_device_that_keeps_it(target, error, message):
    """``cache.to(torch.float16)`` cast the positions and token digests too (ruining the cache in place), and
    the error came only at its next use, blaming the positions."""
    model = _model("retnet")
    cache = _cache(model)
    kept = cache.clone()
    with pytest.raises(error, match=message):
        cache.to(target)
    for name in ("positions", "token_digest"):
        assert torch.equal(getattr(cache, name), getattr(kept, name))
    torch.testing.assert_close(model(PROMPT[:, :1], cache=cache).logits, model(PROMPT[:, :1], cache=kept).logits)


@pytest.mark.parametrize(
    ("call", "indices", "error", "message"),
    [
        (
            "reorder_cache",
            torch.tensor([5, 0]),
            ValueError,
            "beam_idx holds row 5, but the cache holds 2 rows (0 to 1)",
        ),
        (
            "reorder_cache",
            torch.tensor([-1, 0]),
            ValueError,
            "beam_idx holds row -1, but the cache holds 2 rows (0 to 1)",
        ),
        (
            "reorder_cache",
            torch.tensor([1]),
            ValueError,
            "beam_idx picks 1 rows, but the cache holds 2: reordering keeps them all",
        ),
        (
            "reorder_cache",
            torch.tensor([1.0, 0.0]),
            ValueError,
            "beam_idx must be a 1-D tensor of integer row indices, got torch.float32 of shape (2,)",
        ),
        ("reorder_cache", [1, 0], TypeError, "beam_idx must be a tensor of row indices, got list"),
        ("batch_select_indices", torch.tensor([0, 2]), ValueError, "indices holds row 2, but the cache holds 2 rows"),
    ],
)
def test_row_indices_out_of_the_batch_are_named_and_change_nothing(call, indices, error, message):
    cache = _cache(_model("retnet"))
    before = cache.clone()
    with pytest.raises(error) as refused:
        getattr(cache, call)(indices)
    assert str(refused.value).startswith(message)
    assert torch.equal(cache.positions, before.positions)
    for layer, kept in zip(cache.layers, before.layers, strict=True):
        assert all(torch.equal(layer[name], kept[name]) for name in kept)
    cache.reorder_cache(torch.tensor([1, 0]))  # a valid reordering still works
    assert torch.equal(cache.layers[0]["state"], before.layers[0]["state"].flip(0))


def test_a_cache_of_another_dtype_or_batch_is_refused(tmp_path):
    model = _model("mamba")
    cache = _cache(model)
    with pytest.raises(ValueError, match="cache holds 2 rows but the input has 1"):
        model(PROMPT[:1, :1], cache=cache.clone())
    with pytest.raises(
        ValueError, match=r"layers.0.conv is torch.float32, but this model, computing in torch.bfloat16"
    ):
        _model("mamba").to(torch.bfloat16)(PROMPT[:, :1], cache=cache.clone())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts every operand: the fp32 state is usable
        assert torch.isfinite(model(PROMPT[:, :1], cache=cache.clone()).logits).all()
    with pytest.raises(TypeError, match="cache must be a densessm RecurrentCache, got dict"):
        model(PROMPT[:, :1], cache={})


def test_a_compiled_decode_step_checks_the_cache_before_stepping():
    decoder = CompiledDecoder(_model("retnet"), CompileConfig(fullgraph=True, dynamic=False, backend="eager"))
    foreign = _cache(_model("retnet", seed=1))
    with torch.no_grad(), pytest.raises(ValueError, match="with other weights"):
        decoder(input_ids=PROMPT[:, :1], cache=foreign, use_cache=True, return_dict=True)
    assert foreign.steps == PROMPT.shape[1]  # refused before the step: the state is untouched


def test_an_identity_names_the_differing_fields():
    a = CacheIdentity("dense_mamba", json.dumps({"expand": 2, "state_size": 4}), "0" * 64)
    b = CacheIdentity("dense_mamba", json.dumps({"expand": 2.0, "state_size": 8}), "0" * 64)
    assert a.mismatch(b) == "it was made by a dense_mamba model of another configuration: state_size=4 (this model: 8)"
    assert a.mismatch(a) is None


def test_a_state_computed_in_parallel_mode_can_be_continued():
    model = _model("retnet")
    with torch.no_grad():
        cache = model(PROMPT, use_cache=True, mode="parallel").cache
        continued = model(PROMPT[:, :1], cache=cache).logits
        reference = model(torch.cat([PROMPT, PROMPT[:, :1]], 1), mode="recurrent").logits[:, -1:]
    torch.testing.assert_close(continued, reference, atol=1e-5, rtol=1e-4)


# --- weights that change after the cache was made ----------------------------------------------------------------


def _scale_every_weight(model):
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(1.5)  # in place, as an optimizer step updates them


def _load_other_weights(model):
    model.load_state_dict(_model("retnet", seed=1).state_dict())


def _optimizer_step(model):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model(PROMPT, labels=PROMPT).loss.backward()
    optimizer.step()


@pytest.mark.parametrize("change", [_scale_every_weight, _load_other_weights, _optimizer_step])
def test_a_cache_made_before_the_weights_changed_is_refused(change, tmp_path):
    model = _model("retnet")
    cache = _cache(model)
    cache.save(tmp_path / "c.safetensors")
    loaded = RecurrentCache.load(tmp_path / "c.safetensors")
    with torch.no_grad():
        model(PROMPT[:, :1], cache=loaded.clone())  # accepted (an equal identity, another object) and remembered
    change(model)
    for given in (cache, cache.clone(), loaded):
        with pytest.raises(
            ValueError, match="does not belong to this model: it was made by a dense_retnet model with "
        ):
            model(PROMPT[:, :1], cache=given)
    with pytest.raises(ValueError, match="with other weights"):
        model.generate(torch.cat([PROMPT, PROMPT[:, :1]], 1), cache=cache.clone(), max_new_tokens=2)
    assert cache.steps == PROMPT.shape[1]  # refused before any step
    with torch.no_grad():
        model(PROMPT[:, :1], cache=_cache(model))  # a state of the changed weights is accepted


def test_a_fused_model_refuses_the_caches_of_its_weights_before_they_changed():
    model = _model("mamba")
    cache = _cache(model)
    fused = fuse_projections(_model("mamba"))
    with torch.no_grad():
        fused(PROMPT[:, :1], cache=cache.clone())  # the fusion keeps the identity
        fused.backbone.embeddings.weight.mul_(1.5)
        with pytest.raises(ValueError, match="with other weights"):
            fused(PROMPT[:, :1], cache=cache.clone())


TRANSFORMS = {
    "fuse": fuse_projections,
    "prepack": lambda model: prepack_for_cpu(model, min_weight=1),
    "quantize": lambda model: quantize_int8(model, min_weight=1),
}


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("family", ["retnet", "mamba", "mamba2"])
def test_a_transformed_model_keeps_its_caches_until_a_weight_changes(family, transform):
    kept, changed = _model(family), _model(family)
    cache = _cache(kept)
    with torch.no_grad():
        reference = kept(PROMPT[:, :1], cache=cache.clone()).logits
        TRANSFORMS[transform](kept)
        continued = kept(PROMPT[:, :1], cache=cache.clone()).logits  # the transform keeps the identity
        if transform != "quantize":  # int8 rounds the function; the others store the same one
            torch.testing.assert_close(continued, reference, atol=1e-5, rtol=1e-5)
        TRANSFORMS[transform](changed)
        for parameter in changed.parameters():  # changed before any use of the transformed model
            parameter.mul_(1.5)
        with pytest.raises(ValueError, match=f"made by a {changed.config.model_type} model with other weights"):
            changed(PROMPT[:, :1], cache=cache.clone())
        changed(PROMPT[:, :1], cache=_cache(changed))  # a state of the changed weights is accepted


def test_weights_loaded_after_a_transform_refuse_the_caches_of_the_weights_before():
    model, other = _model("mamba2"), _model("mamba2", seed=1)
    cache = _cache(model)
    fuse_projections(model)  # nothing to fuse in DenseMamba2 (its projections are one product already)
    model.load_state_dict(other.state_dict())
    full = torch.cat([PROMPT, PROMPT[:, :1]], 1)
    with pytest.raises(ValueError, match="made by a dense_mamba2 model with other weights"):
        model.generate(full, cache=cache, max_new_tokens=2, do_sample=False)
    assert cache.steps == PROMPT.shape[1]  # refused before any step


def test_an_unchanged_model_checks_a_cache_without_recomputing_its_identity():
    model = _model("retnet")
    identity = model.state_identity()
    cache = _cache(model)
    with torch.no_grad():
        for _ in range(3):
            model(PROMPT[:, :1], cache=cache)
    assert model.state_identity() is identity is cache.identity  # the same object: no fingerprint computed again
    model.model.layers[0].retention.q_proj.weight = torch.nn.Parameter(
        torch.randn_like(model.model.layers[0].retention.q_proj.weight)
    )
    assert model.state_identity() is not identity  # a replaced parameter is a change too


# --- the tokens a cache consumed ---------------------------------------------------------------------------------


def test_the_token_digest_is_the_same_piece_by_piece_and_ignores_padding():
    tokens = torch.randint(0, 97, (3, 9))
    whole = digest_tokens(tokens)
    assert torch.equal(digest_tokens(tokens[:, 5:], start=digest_tokens(tokens[:, :5])), whole)
    one_by_one = None
    for i in range(9):
        one_by_one = digest_tokens(tokens[:, i : i + 1], start=one_by_one)
    assert torch.equal(one_by_one, whole)
    padded = torch.cat([torch.full((3, 4), 7), tokens], 1)
    mask = torch.cat([torch.zeros(3, 4, dtype=torch.bool), torch.ones(3, 9, dtype=torch.bool)], 1)
    assert torch.equal(digest_tokens(padded, mask), whole)
    stepped = digest_tokens(tokens[:, :1], torch.tensor([[True], [False], [True]]), start=whole)
    assert (stepped == whole).tolist() == [False, True, False]  # a padded decode step leaves its row's digest
    other = tokens.clone()
    other[1, 0] += 1
    assert (digest_tokens(other) != whole).tolist() == [False, True, False]  # per row
    assert len(set(digest_tokens(torch.arange(2000).reshape(1000, 2)).tolist())) == 1000


def test_a_cache_records_the_digest_of_what_it_consumed(tmp_path):
    model = _model("retnet")
    cache = _cache(model, PROMPT[:, :4])
    assert torch.equal(cache.token_digest, digest_tokens(PROMPT[:, :4])) and cache.digest_steps == 4
    with torch.no_grad():
        model(PROMPT[:, 4:], cache=cache)
        model(PROMPT[:, :1], cache=cache)
    full = torch.cat([PROMPT, PROMPT[:, :1]], 1)
    assert torch.equal(cache.token_digest, digest_tokens(full)) and cache.digest_steps == 7
    cache.save(tmp_path / "c.safetensors")
    restored = RecurrentCache.load(tmp_path / "c.safetensors")
    assert torch.equal(restored.token_digest, cache.token_digest) and restored.digest_steps == 7
    embeds = model.get_input_embeddings()(PROMPT)
    with torch.no_grad():
        assert model(inputs_embeds=embeds, use_cache=True).cache.token_digest is None  # no ids: nothing to digest
        model(inputs_embeds=embeds[:, :1], cache=cache)  # the digest now covers the first 7 of 8 steps
    assert cache.digest_steps == 7 and cache.steps == 8


def test_generate_refuses_a_cache_of_other_tokens():
    model = _model("retnet")
    cache = _cache(model, PROMPT[:, :5])
    other = PROMPT.clone()
    other[1, 2] = (other[1, 2] + 1) % 97  # the same length, one token of one row differs
    with pytest.raises(ValueError, match="input_ids does not begin with the 5 tokens this cache consumed"):
        model.generate(other, cache=cache.clone(), max_new_tokens=2, do_sample=False)
    with pytest.raises(ValueError, match="does not begin with the 5 tokens"):
        model.generate(PROMPT.flip(0), cache=cache.clone(), max_new_tokens=2, do_sample=False)  # rows swapped
    reference = model.generate(PROMPT, max_new_tokens=3, do_sample=False)
    assert torch.equal(model.generate(PROMPT, cache=cache.clone(), max_new_tokens=3, do_sample=False), reference)
    cache.token_digest = None  # the expert's override: the state is used as it is
    assert model.generate(other, cache=cache, max_new_tokens=2, do_sample=False).shape == (2, 8)


def test_a_file_without_a_digest_still_loads_and_continues(tmp_path, saved):
    _, tensors, metadata = saved
    metadata = {k: v for k, v in metadata.items() if k not in ("token_digest", "digest_steps")}
    path = _write(tmp_path / "no-digest.safetensors", tensors, metadata)
    cache = RecurrentCache.load(path)
    assert cache.token_digest is None
    model = _model("retnet")
    full = torch.cat([PROMPT, PROMPT[:, :2]], 1)
    reference = model.generate(full, max_new_tokens=3, do_sample=False)
    assert torch.equal(model.generate(full, cache=cache, max_new_tokens=3, do_sample=False), reference)


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        (-5, "cache.steps must be a non-negative int .*, got -5"),
        ("6", "cache.steps must be a non-negative int .*, got '6'"),
        (3, r"cache.steps is 3, but cache.token_digest covers 6 tokens it consumed"),
        (8, r"the cache consumed \[6, 6\] real tokens per row, but the first 8 tokens of input_ids hold \[8, 8\]"),
    ],
)
def test_a_steps_counter_that_disagrees_with_the_state_is_refused(steps, message):
    model = _model("retnet")
    cache = _cache(model)
    cache.steps = steps
    full = torch.cat([PROMPT, PROMPT[:, :4]], 1)
    with pytest.raises(ValueError, match=message):
        model.generate(full, cache=cache, max_new_tokens=2, do_sample=False)
    assert torch.equal(cache.positions, torch.tensor([6, 6]))  # refused before any step


def test_a_steps_counter_below_the_state_is_refused_without_a_digest():
    model = _model("retnet")
    cache = _cache(model)
    cache.steps, cache.token_digest, cache.embedding_digest = 3, None, None
    with pytest.raises(ValueError, match=r"the cache consumed \[6, 6\] real tokens per row, but the first 3 tokens"):
        model.generate(torch.cat([PROMPT, PROMPT[:, :4]], 1), cache=cache, max_new_tokens=2, do_sample=False)
    cache.steps = -1
    with pytest.raises(ValueError, match="cache.steps must be a non-negative int"):
        model(PROMPT[:, :1], cache=cache)  # forward refuses it too


def test_generate_checks_the_padding_of_the_consumed_tokens():
    model = _model("retnet")
    tokens = torch.cat([torch.zeros(2, 2, dtype=torch.long), PROMPT], 1)
    mask = torch.ones_like(tokens)
    mask[0, :2] = 0  # row 0 is left-padded; row 1 reads the two zeros as tokens
    with torch.no_grad():
        cache = model(tokens[:, :-1], attention_mask=mask[:, :-1], use_cache=True).cache
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    reference = model.generate(tokens, attention_mask=mask, **kwargs)
    assert torch.equal(model.generate(tokens, attention_mask=mask, cache=cache.clone(), **kwargs), reference)
    with pytest.raises(
        ValueError, match=r"consumed \[5, 7\] real tokens per row, but the first 7 tokens of input_ids hold \[5, 5\]"
    ):  # no mask: generate() takes every 0 (the pad token) for padding
        model.generate(tokens, cache=cache.clone(), max_new_tokens=3, do_sample=False, pad_token_id=0)
    with pytest.raises(ValueError, match=r"consumed \[5, 7\] real tokens per row, but the first 7 tokens .* \[7, 7\]"):
        model.generate(tokens, attention_mask=torch.ones_like(tokens), cache=cache.clone(), **kwargs)


def test_generate_refuses_a_non_finite_state():
    model = _model("retnet")
    cache = _cache(model)
    cache.layers[1]["scale"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="cache tensor layers.1.scale holds NaN or infinite values"):
        model.generate(torch.cat([PROMPT, PROMPT[:, :1]], 1), cache=cache, max_new_tokens=2, do_sample=False)


def test_a_compiled_decode_step_leaves_the_digest_on_the_prompt():
    """The digest is not advanced inside a compiled step (no host state there): it keeps covering the tokens
    before it, so a later generate() still checks those."""
    model = _model("retnet")
    decoder = CompiledDecoder(model, CompileConfig(fullgraph=True, dynamic=False, backend="eager"))
    cache = _cache(model)
    digest = cache.token_digest
    with torch.no_grad():
        for i in range(2):
            decoder(input_ids=PROMPT[:, i : i + 1], cache=cache, use_cache=True, return_dict=True)
    assert cache.steps == 8 and cache.digest_steps == 6 and torch.equal(cache.token_digest, digest)
    full = torch.cat([PROMPT, PROMPT[:, :3]], 1)
    assert model.generate(full, cache=cache.clone(), max_new_tokens=1, do_sample=False).shape == (2, 10)
    with pytest.raises(ValueError, match="does not begin with the 6 tokens"):
        model.generate(full.flip(1), cache=cache, max_new_tokens=1, do_sample=False)


# --- the input vectors a cache consumed ----------------------------------------------------------------------------


def test_the_vector_digest_is_exact_piece_by_piece_and_ignores_padding():
    vectors = torch.randn(3, 9, 16)
    whole = digest_embeddings(vectors)
    assert torch.equal(digest_embeddings(vectors[:, 4:], start=digest_embeddings(vectors[:, :4])), whole)
    assert torch.equal(embedding_values(vectors, block=16), embedding_values(vectors))  # one row at a time
    padded = torch.cat([torch.randn(3, 2, 16), vectors], 1)
    mask = torch.cat([torch.zeros(3, 2, dtype=torch.bool), torch.ones(3, 9, dtype=torch.bool)], 1)
    assert torch.equal(digest_embeddings(padded, mask), whole)
    nudged = vectors.clone()
    nudged[1, 3, 5] = torch.nextafter(nudged[1, 3, 5], torch.tensor(10.0))  # one bit of one value of one row
    assert (digest_embeddings(nudged) != whole).tolist() == [False, True, False]
    assert (digest_embeddings(vectors[:, [1, 0, *range(2, 9)]]) != whole).all()  # order counts
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        assert digest_embeddings(vectors.to(dtype)).shape == (3,)
    assert len(set(embedding_values(torch.randn(2000, 8)).tolist())) == 2000


@pytest.mark.parametrize("family", ["retnet", "mamba", "mamba2"])
def test_generate_from_embeddings_refuses_a_cache_of_other_tokens(family, tmp_path):
    """A prompt given as embeddings names no token: the cache's digest of the vectors it consumed (the
    embeddings of its ids, or the vectors it was given) is what generate() checks them against."""
    model = _model(family)
    embed = model.get_input_embeddings()
    with torch.no_grad():
        reference = model.generate(PROMPT, max_new_tokens=3, do_sample=False)[:, PROMPT.shape[1] :]
        by_ids = _cache(model, PROMPT[:, :5])
        by_vectors = model(inputs_embeds=embed(PROMPT[:, :5]), use_cache=True).cache
        other = _cache(model, PROMPT[:, :5].flip(0))  # the other row's tokens
        embeds = embed(PROMPT)
    assert torch.equal(by_ids.embedding_digest, by_vectors.embedding_digest) and by_ids.embedding_digest_steps == 5
    for cache in (by_ids, by_vectors):
        continued = model.generate(inputs_embeds=embeds, cache=cache.clone(), max_new_tokens=3, do_sample=False)
        assert torch.equal(continued, reference)
    with pytest.raises(ValueError, match="inputs_embeds does not begin with the 5 input vectors this cache consumed"):
        model.generate(inputs_embeds=embeds, cache=other.clone(), max_new_tokens=2, do_sample=False)
    with pytest.raises(ValueError, match=r"^inputs_embeds is torch.float64 but the model's weights are torch.float32"):
        model.generate(inputs_embeds=embeds.double(), cache=by_ids.clone(), max_new_tokens=2, do_sample=False)
    nudged = embeds.clone()
    nudged[0, 2, 0] += 1e-3
    with pytest.raises(ValueError, match="does not begin with the 5 input vectors"):
        model.generate(inputs_embeds=nudged, cache=by_ids.clone(), max_new_tokens=2, do_sample=False)
    other.save(tmp_path / "other.safetensors")  # the digest survives a file
    with pytest.raises(ValueError, match="does not begin with the 5 input vectors"):
        model.generate(
            inputs_embeds=embeds, cache=RecurrentCache.load(tmp_path / "other.safetensors"), max_new_tokens=2
        )
    # a state made from vectors, continued by ids: their embeddings are checked
    flipped = PROMPT.flip(0)
    ids_message = "input_ids do not begin with the 5 input vectors this cache consumed (it was given inputs_embeds"
    with pytest.raises(ValueError, match="^" + re.escape(ids_message)):
        model.generate(flipped, cache=by_vectors.clone(), max_new_tokens=2, do_sample=False)
    other.embedding_digest = None  # the expert's override
    assert model.generate(inputs_embeds=embeds, cache=other, max_new_tokens=2, do_sample=False).shape == (2, 2)


@pytest.mark.parametrize("family", ["retnet", "mamba", "mamba2"])
def test_ids_are_checked_against_the_vectors_a_cache_consumed_beyond_its_token_digest(family):
    """A state made from ids and continued by embeddings: its token digest covers only the ids, the vector digest
    every step, so ids given to generate() later are checked against the vectors too (their embeddings)."""
    model = _model(family)
    embed = model.get_input_embeddings()
    with torch.no_grad():
        cache = _cache(model, PROMPT[:, :3])
        model(inputs_embeds=torch.randn(2, 2, embed.embedding_dim), cache=cache)  # not the embeddings of PROMPT[:, 3:5]
        honest = _cache(model, PROMPT[:, :3])
        model(inputs_embeds=embed(PROMPT[:, 3:5]), cache=honest)
    assert (cache.digest_steps, cache.embedding_digest_steps) == (3, 5)
    ids_message = "input_ids do not begin with the 5 input vectors this cache consumed (it was given inputs_embeds"
    with pytest.raises(ValueError, match="^" + re.escape(ids_message)):
        model.generate(PROMPT, cache=cache.clone(), max_new_tokens=2, do_sample=False)
    reference = model.generate(PROMPT, max_new_tokens=2, do_sample=False)
    assert torch.equal(model.generate(PROMPT, cache=honest, max_new_tokens=2, do_sample=False), reference)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("embedding_digest", torch.tensor([1, 2, 3]), r"cache.embedding_digest must be an int64 tensor with one value"),
        ("token_digest", torch.tensor([1, 2, 3]), r"cache.token_digest must be an int64 tensor with one value per row"),
        ("embedding_digest", [1, 2], r"cache.embedding_digest must be .* or None, got list"),
        ("token_digest", "abc", r"cache.token_digest must be .* or None, got str"),
        ("embedding_digest", torch.tensor([1.0, 2.0]), r"got a torch.float32 tensor of shape \(2,\)"),
        ("embedding_digest_steps", 2.5, r"cache.embedding_digest_steps must be a non-negative int, .* got 2.5"),
        ("digest_steps", -1, r"cache.digest_steps must be a non-negative int, .* got -1"),
        ("embedding_digest_steps", True, r"must be a non-negative int, .* got True"),
        ("embedding_digest_steps", 7, r"cache.steps is 6, but cache.embedding_digest covers 7 tokens"),
    ],
)
def test_a_malformed_digest_is_named_by_generate_and_forward(field, value, message):
    """A digest of another shape was skipped silently, one of another type or a fractional step count failed
    inside the comparison: each is a ValueError naming the field, in generate() and in a forward step."""
    model = _model("retnet")
    cache = _cache(model)
    setattr(cache, field, value)
    with pytest.raises(ValueError, match=message):
        model.generate(torch.cat([PROMPT, PROMPT[:, :1]], 1), cache=cache.clone(), max_new_tokens=1)
    with pytest.raises(ValueError, match=message), torch.no_grad():
        model(PROMPT[:, :1], cache=cache)
    assert torch.equal(cache.positions, torch.tensor([6, 6]))  # refused before the step


@pytest.mark.parametrize("family", ["retnet", "mamba", "mamba2"])
def test_a_cache_given_with_use_cache_false_is_refused(family):
    """The forward advanced the given cache in place and returned none: a later call that took the cache for
    unchanged was silently wrong."""
    model = _model(family)
    cache = _cache(model, PROMPT[:, :4])
    steps = cache.steps
    with pytest.raises(ValueError, match="^a cache was given with use_cache=False: .* pass use_cache=True"):
        model(PROMPT[:, 4:], cache=cache, use_cache=False)
    assert cache.steps == steps


@pytest.mark.parametrize("family", ["retnet", "mamba", "mamba2"])
def test_a_flipped_byte_in_a_saved_state_is_refused(family, tmp_path):
    """Every structural check passed a state with one byte flipped: the continuation was silently wrong. The
    file records a checksum of its tensors."""
    model = _model(family)
    path = _cache(model).save(tmp_path / "c.safetensors")
    assert RecurrentCache.load(path).steps == PROMPT.shape[1]  # intact: loads
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="the state's bytes do not match the checksum recorded when it was saved"):
        RecurrentCache.load(path)


@pytest.mark.parametrize("family", ["retnet", "mamba", "mamba2"])
def test_a_cache_filled_under_inference_mode_is_refused_outside_it_before_any_update(family):
    """Its tensors can be updated only under ``torch.inference_mode()``: torch raised at the first in-place
    update, after some layers (and the positions) had taken theirs, and the cache continued wrongly after."""
    model = _model(family)
    with torch.inference_mode():
        cache = model(PROMPT, use_cache=True).cache
    layers = [{name: t.clone() for name, t in layer.items()} for layer in cache.layers]
    positions = cache.positions.clone()
    token = PROMPT[:, -1:]
    for context in (torch.no_grad, torch.enable_grad):
        with context(), pytest.raises(ValueError, match=r"filled under torch.inference_mode\(\).*continue it under"):
            model(token, cache=cache, use_cache=True)
    for layer, kept in zip(cache.layers, layers, strict=True):
        assert all(torch.equal(layer[name], tensor) for name, tensor in kept.items())
    assert torch.equal(cache.positions, positions) and cache.steps == PROMPT.shape[1]
    with torch.inference_mode():  # where it was made, it continues as the full sequence does
        step = model(token, cache=cache, use_cache=True).logits[:, -1]
        whole = model(torch.cat([PROMPT, token], dim=1)).logits[:, -1]
    torch.testing.assert_close(step, whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["retnet", "mamba", "mamba2"])
@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"labels": torch.tensor([[99999, 1], [1, 2]])}, "label 99999 is out of range"),
        ({"labels": torch.tensor([[1.0, 2.0], [1.0, 2.0]])}, "labels must be integer token ids"),
        ({"labels": torch.tensor([[1, 2, 3], [1, 2, 3]])}, r"labels must have shape \(2, 2\)"),
        ({"logits_to_keep": -1}, "logits_to_keep must be a number of last positions"),
        ({"logits_to_keep": torch.tensor([5])}, "logits_to_keep lists position 5, outside the input's 2 positions"),
        ({"labels": torch.tensor([[1, 2], [1, 2]]), "ignore_index": "x"}, "ignore_index must be an int"),
        ({"labels": torch.tensor([[1, 2], [1, 2]]), "num_items_in_batch": "abc"}, "num_items_in_batch must be"),
    ],
    ids=[
        "label out of range",
        "float labels",
        "labels of another shape",
        "negative count",
        "position outside",
        "ignore_index not an int",
        "num_items_in_batch not a count",
    ],
)
def test_a_call_refused_for_its_labels_or_logits_to_keep_leaves_the_cache_as_it_was(family, arguments, message):
    """They were checked after the backbone had advanced the cache: the error read as "nothing happened", and a
    retry fed the tokens a second time (logits off, no error)."""
    model = _model(family)
    cache = _cache(model, PROMPT[:2])
    layers = [{name: t.clone() for name, t in layer.items()} for layer in cache.layers]
    steps, positions = cache.steps, cache.positions.clone()
    step = torch.randint(3, 97, (2, 2))
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        model(step, cache=cache, use_cache=True, **arguments)
    assert cache.steps == steps and torch.equal(cache.positions, positions)
    for layer, kept in zip(cache.layers, layers, strict=True):
        assert all(torch.equal(layer[name], tensor) for name, tensor in kept.items())
    with torch.no_grad():
        retried = model(step, cache=cache, use_cache=True).logits
        whole = model(torch.cat([PROMPT[:2], step], dim=1)).logits[:, -2:]
    torch.testing.assert_close(retried, whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["retnet", "mamba", "mamba2"])
def test_copy_copy_of_a_cache_is_independent(family):
    """A shallow copy shared the state tensors, which a step updates in place: stepping the copy changed the
    original's state while its counters stayed, and its next logits were off without an error."""
    model = _model(family)
    cache = _cache(model)
    twin = copy.copy(cache)
    step = torch.randint(3, 97, (2, 1))
    with torch.no_grad():
        model(step, cache=twin, use_cache=True)
        continued = model(step, cache=cache, use_cache=True).logits
        whole = model(torch.cat([PROMPT, step], dim=1)).logits[:, -1:]
    torch.testing.assert_close(continued, whole, atol=1e-5, rtol=1e-5)
    assert twin.identity is cache.identity


@pytest.mark.parametrize("family", ["retnet", "mamba", "mamba2"])
def test_deepcopy_of_a_cache_made_with_gradients_is_an_independent_detached_state(family):
    """``copy.deepcopy`` of the cache of a forward run with gradients enabled failed inside torch ("Only Tensors
    created explicitly by the user support the deepcopy protocol")."""
    model = _model(family)
    out = model(PROMPT, use_cache=True)
    twin = copy.deepcopy(out.past_key_values)
    assert not any(t.requires_grad for layer in twin.layers for t in layer.values())
    step = torch.randint(3, 97, (2, 1))
    with torch.no_grad():
        model(step, cache=out.past_key_values.clone(), use_cache=True)  # the original is untouched by the copy
        continued = model(step, cache=twin, use_cache=True).logits
        whole = model(torch.cat([PROMPT, step], dim=1)).logits[:, -1:]
    torch.testing.assert_close(continued, whole, atol=1e-5, rtol=1e-5)


class _Failure(RuntimeError):
    pass


@pytest.mark.parametrize("family", ["retnet", "mamba", "mamba2"])
@pytest.mark.parametrize("where", ["a middle layer", "the LM head"])
def test_an_error_in_the_middle_of_a_step_leaves_a_cache_that_refuses_to_continue(family, where):
    """An error raised after some layers had taken their new state (out of memory for the logits, Ctrl-C) left
    the cache half-advanced: a retry fed the tokens again and its logits were off, without an error."""
    model = _model(family)
    cache = _cache(model, PROMPT)
    layers = model.base_model.layers
    module = layers[len(layers) // 2] if where == "a middle layer" else model.lm_head

    def fail(*args):
        raise _Failure("CUDA out of memory (simulated)")

    hook = module.register_forward_hook(fail)
    with torch.no_grad(), pytest.raises(_Failure):
        model(PROMPT[:, -2:], cache=cache, use_cache=True)
    hook.remove()
    message = r"left half-updated by an error in the middle of an earlier step \(_Failure: CUDA out of memory"
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        model(PROMPT[:, -2:], cache=cache, use_cache=True)
    with pytest.raises(ValueError, match="nothing to save: this cache was left half-updated"):
        cache.save("/nonexistent/never-written.safetensors")
    with torch.no_grad(), pytest.raises(ValueError, match=message):  # a clone is as broken as its source
        model(PROMPT[:, -2:], cache=cache.clone(), use_cache=True)


def test_get_seq_length_names_a_layer_the_cache_lacks():
    cache = _cache(_model("retnet"))
    assert cache.get_seq_length() == PROMPT.shape[1] == cache.get_seq_length(len(cache.layers) - 1)
    with pytest.raises(ValueError, match="layer_idx 99 names no layer of this"):
        cache.get_seq_length(99)
