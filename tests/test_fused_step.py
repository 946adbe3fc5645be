"""The fused CPU decode step (densessm.ops.fused, densessm.inference.fused_step) computes the PyTorch step.

The reference is the same model with the same fused projections (``fuse_projections``) decoding through the
PyTorch step, so the only difference under test is the step itself. The extension is built once per machine
(in the user cache folder: 9-66 s the first time on two shared cores) and loaded from there after.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import tiny_config, tiny_mamba_config

from densessm import DenseMambaForCausalLM, DenseRetNetForCausalLM
from densessm.cli import main
from densessm.inference import InferenceOnlyError, fuse_projections
from densessm.inference import fused_step as fused_step_module
from densessm.inference.fused_step import FusedStepMambaMixer, FusedStepRetention, StepMambaMixer, fuse_decode_steps
from densessm.inference.fusion import FusedRetention
from densessm.models.mamba.modeling_dense_mamba import DenseMambaMixer
from densessm.ops.fused import fused_ops


class _Counting:
    """``torch.ops.densessm_fused`` with a count of the kernel calls: a test proves the fused path ran."""

    def __init__(self, ops):
        self.ops, self.calls = ops, 0

    def __getattr__(self, name):
        kernel = getattr(self.ops, name)

        def counted(*args):
            self.calls += 1
            return kernel(*args)

        return counted


@pytest.fixture
def counted(monkeypatch) -> _Counting:
    ops = fused_ops()
    assert ops is not None, "the fused decode step did not build on this machine (see the logged notice)"
    counter = _Counting(ops)
    monkeypatch.setattr(fused_step_module, "fused_ops", lambda: counter)
    return counter


def _model(family: str, dtype: torch.dtype = torch.float32, **overrides):
    """A tiny model with weights large enough that the dense gates and norms matter, and its fused twin."""
    if family == "retnet":
        model = DenseRetNetForCausalLM(tiny_config(**overrides))
    else:
        model = DenseMambaForCausalLM(tiny_mamba_config(**overrides))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if not name.endswith("A_log"):
                parameter.normal_(0, 0.3)
    fuse_projections(model.to(dtype).eval())
    reference, fused = copy.deepcopy(model), copy.deepcopy(model)  # twins: each accepts the other's caches
    assert fuse_decode_steps(fused)
    return reference, fused


def _decode(model, prompt, prompt_mask, steps, step_masks):
    """Prefill, then one token at a time; the logits of every decode step and the final cache."""
    torch.manual_seed(1)
    logits = []
    with torch.no_grad():
        out = model(prompt, attention_mask=prompt_mask, use_cache=True)
        mask, cache = prompt_mask, out.cache
        for real in step_masks[:steps]:
            token = torch.randint(3, 97, (prompt.shape[0], 1))
            mask = torch.cat([mask, real[:, None]], dim=1)
            out = model(token, attention_mask=mask, cache=cache, use_cache=True)
            logits.append(out.logits)
    return torch.cat(logits, dim=1), out.cache


def _assert_as_exact(got: torch.Tensor, expected: torch.Tensor, truth: torch.Tensor | None, tolerance: float):
    """``got`` equals ``expected`` at ``tolerance``; in fp32, where the reference's own rounding error exceeds
    that (a read-out whose terms cancel, then a norm that scales it up), elementwise at least as close to the
    float64 ``truth`` as ``expected`` is, within ``tolerance``."""
    if truth is None:
        torch.testing.assert_close(got, expected, atol=tolerance, rtol=tolerance)
        return
    truth = truth.to(got.dtype)
    allowed = (expected - truth).abs() + tolerance * (1 + truth.abs())
    worst = ((got - truth).abs() - allowed).max().item()
    assert worst <= 0, f"the fused step is {worst:.2e} farther from the float64 result than the reference is"


def _assert_same_decoding(reference, fused, batch, padding, counter, tolerance):
    prompt = torch.randint(3, 97, (batch, 4))
    prompt_mask = torch.ones(batch, 4, dtype=torch.long)
    steps = [torch.ones(batch, dtype=torch.long) for _ in range(3)]
    if padding and batch > 1:
        prompt_mask[1, :2] = 0  # a left-padded row
        steps[1][0] = 0  # a padded decode position in another row
    expected, expected_cache = _decode(reference, prompt, prompt_mask, 3, steps)
    truth, truth_cache = None, None
    if expected.dtype == torch.float32:
        truth, truth_cache = _decode(copy.deepcopy(reference).double(), prompt, prompt_mask, 3, steps)
    calls = counter.calls
    got, got_cache = _decode(fused, prompt, prompt_mask, 3, steps)
    assert counter.calls > calls, "the fused step did not run"
    _assert_as_exact(got, expected, truth, tolerance)
    for i, (layer_expected, layer_got) in enumerate(zip(expected_cache.layers, got_cache.layers, strict=True)):
        for name, tensor in layer_expected.items():
            exact = None if truth_cache is None else truth_cache.layers[i][name]
            _assert_as_exact(layer_got[name], tensor, exact, tolerance)


@pytest.mark.parametrize(
    ("batch", "heads", "key_dim", "dense", "padding"),
    [
        (1, 2, 8, 2, False),
        (1, 1, 8, 0, False),
        (1, 1, 96, 2, True),  # one head, many rows: the rows are split across work items and summed after
        (3, 2, 8, 2, True),
        (4, 4, 4, 1, True),
        (5, 2, 8, 0, True),
        (2, 8, 2, 3, False),
    ],
)
def test_retention_step_matches_the_pytorch_step(counted, batch, heads, key_dim, dense, padding):
    reference, fused = _model(
        "retnet",
        num_attention_heads=heads,
        query_key_dim=key_dim * heads,
        dense_block_layers=dense,
        num_hidden_layers=4,
    )
    assert isinstance(fused.model.layers[1].retention, FusedStepRetention)
    _assert_same_decoding(reference, fused, batch, padding, counted, 1e-6)


@pytest.mark.parametrize(
    ("batch", "state_size", "dense", "padding"),
    [(1, 4, 2, False), (1, 16, 0, False), (3, 4, 2, True), (4, 8, 1, True), (6, 16, 3, True)],
)
def test_scan_step_matches_the_pytorch_step(counted, batch, state_size, dense, padding):
    reference, fused = _model("mamba", state_size=state_size, dense_block_layers=dense, num_hidden_layers=4)
    layers = fused.backbone.layers
    assert isinstance(layers[0].mixer, StepMambaMixer)
    assert isinstance(layers[1].mixer, FusedStepMambaMixer if dense else StepMambaMixer)
    _assert_same_decoding(reference, fused, batch, padding, counted, 1e-6)


@pytest.mark.parametrize("family", ["retnet", "mamba"])
def test_wider_shapes_match_the_pytorch_step(counted, family):
    """Wider layers at a batch of 9: retention's dense tail over 300 key and 64 value columns, its state
    rows split across work items; the scan's 168 channels in blocks of 64 with a ragged last one. At these
    widths fp32's rounding in the longer sums is about 1e-6 on its own (either step's), hence 1e-5."""
    if family == "retnet":
        shape = dict(num_attention_heads=2, query_key_dim=300)
    else:
        shape = dict(hidden_size=56, expand=3, dense_gate_reduction=4)  # 168 channels: 64 + 64 + 40
    reference, fused = _model(family, num_hidden_layers=3, dense_block_layers=2, **shape)
    _assert_same_decoding(reference, fused, 9, True, counted, 1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_random_shapes_match_the_pytorch_step(counted, seed):
    """Shapes drawn at random (seeded): both families, any batch, heads, widths, depth and ``m``."""
    draw = torch.Generator().manual_seed(seed)

    def pick(*choices):
        return choices[int(torch.randint(len(choices), (1,), generator=draw))]

    layers = pick(2, 3, 5)
    shape = dict(num_hidden_layers=layers, dense_block_layers=pick(*range(layers)))
    if seed % 2:
        heads = pick(1, 2, 4)
        shape.update(num_attention_heads=heads, query_key_dim=heads * pick(2, 4, 6, 34), v_factor=pick(1, 2, 3))
        reference, fused = _model("retnet", **shape)
    else:
        shape.update(hidden_size=pick(8, 16, 24), state_size=pick(1, 3, 16, 20), expand=pick(1, 2))
        reference, fused = _model("mamba", **shape)
    _assert_same_decoding(reference, fused, pick(1, 2, 5, 9), bool(pick(0, 1)), counted, 1e-6)


@pytest.mark.parametrize("family", ["retnet", "mamba"])
def test_float64_steps_agree_to_rounding(counted, family):
    """In float64 the fused step and the PyTorch step agree far below fp32's noise: the algebra is the same."""
    reference, fused = _model(family, torch.float64)
    _assert_same_decoding(reference, fused, 3, True, counted, 1e-12)


@pytest.mark.parametrize("family", ["retnet", "mamba"])
def test_bfloat16_steps_stay_close(counted, family):
    """bf16 weights: the fused step rounds once per stored value (the PyTorch step after every operator)."""
    reference, fused = _model(family, torch.bfloat16)
    _assert_same_decoding(reference, fused, 2, True, counted, 0.1)


@pytest.mark.parametrize("family", ["retnet", "mamba"])
def test_generate_with_the_fused_step_gives_the_same_tokens(counted, family):
    reference, fused = _model(family, num_hidden_layers=4)
    prompt = torch.randint(3, 97, (3, 6))
    mask = torch.ones_like(prompt)
    mask[0, :3] = 0
    settings = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        expected = reference.generate(prompt, **settings)
        got = fused.generate(prompt, **settings)
    assert counted.calls >= 11 * fused.config.num_hidden_layers
    assert torch.equal(got, expected)


def test_other_calls_take_the_pytorch_path(counted):
    """Prefill (several tokens) and calls under autograd run the mixer's own forward; training is refused."""
    reference, fused = _model("retnet")
    tokens = torch.randint(3, 97, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(fused(tokens).logits, reference(tokens).logits, atol=0, rtol=0)
    cache = reference(tokens, use_cache=True).cache  # a kept state under autograd: the PyTorch step
    fused(tokens[:, :1], cache=cache.clone(), use_cache=True)
    assert counted.calls == 0
    with pytest.raises(InferenceOnlyError):
        fused.train()


def test_a_shared_cache_row_is_not_written_through(counted):
    """A cache whose rows are views of one (as beam search expands a prompt's state) is copied before the
    in-place update, so the other rows keep their values."""
    reference, fused = _model("retnet")
    with torch.no_grad():
        cache = fused(torch.randint(3, 97, (1, 4)), use_cache=True).cache
        kept = cache.clone()
        twin = cache.clone()
        twin.batch_repeat_interleave(2)
        shared = twin.clone()
        shared.layers = [{n: t.expand(2, *t.shape[1:]) for n, t in layer.items()} for layer in cache.layers]
        token = torch.randint(3, 97, (2, 1))
        got = fused(token, cache=shared, use_cache=True).logits
        expected = reference(token, cache=twin, use_cache=True).logits
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    for source, before, after in zip(cache.layers, kept.layers, shared.layers, strict=True):
        assert all(torch.equal(source[name], before[name]) for name in before)  # the shared row is as it was
        assert after["state"].is_contiguous() and not torch.equal(after["state"][0], before["state"][0])


@pytest.fixture
def fresh_loader():
    """The loader's memo forgotten before and after: the test decides what it finds."""
    fused_ops.cache_clear()
    yield
    fused_ops.cache_clear()


def test_without_a_compiler_the_model_keeps_the_pytorch_step(monkeypatch, caplog, fresh_loader):
    model, _ = _model("retnet")
    reference = copy.deepcopy(model)
    with monkeypatch.context() as patch, caplog.at_level(logging.WARNING, logger="densessm.ops.fused"):
        patch.setenv("CXX", "densessm-no-such-compiler")
        fused_ops.cache_clear()
        assert fuse_decode_steps(model) is False
        assert fuse_decode_steps(model) is False
    notices = [r.getMessage() for r in caplog.records if r.name == "densessm.ops.fused"]
    assert len(notices) == 1 and "\n" not in notices[0]
    assert "no C++ compiler found (densessm-no-such-compiler)" in notices[0]
    assert type(model.model.layers[1].retention) is FusedRetention
    prompt = torch.randint(3, 97, (2, 5))
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        assert torch.equal(model.generate(prompt, **settings), reference.generate(prompt, **settings))


def test_a_failing_build_is_a_notice_not_an_error(monkeypatch, caplog, tmp_path, fresh_loader):
    model = DenseMambaForCausalLM(tiny_mamba_config()).eval()
    monkeypatch.setenv("DENSESSM_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a compiler that exists and fails
    with caplog.at_level(logging.WARNING, logger="densessm.ops.fused"):
        assert fuse_decode_steps(model) is False
    (notice,) = [r.getMessage() for r in caplog.records if r.name == "densessm.ops.fused"]
    assert "its build failed" in notice and "\n" not in notice
    assert type(model.backbone.layers[0].mixer) is DenseMambaMixer


def test_a_build_lock_left_by_a_killed_process_is_cleared(monkeypatch, tmp_path, fresh_loader):
    """torch's loader guards a build folder with a plain file that a process killed while loading leaves behind:
    every later load waited on it forever, silently. Loads are serialised by a lock the OS releases with its
    holder, under which a leftover file is stale and removed."""
    import filelock

    import densessm.ops.fused as fused

    monkeypatch.setenv("DENSESSM_EXTENSIONS_DIR", str(tmp_path))
    folder = tmp_path / fused.extension_name()
    folder.mkdir()
    (folder / "lock").touch()  # what a killed load leaves
    seen = []

    def load(name, sources, build_directory, **kwargs):
        seen.append((Path(build_directory) / "lock").exists())
        with pytest.raises(filelock.Timeout):  # held while loading: another process waits for it
            filelock.FileLock(Path(build_directory) / fused.BUILD_LOCK).acquire(timeout=0)

    monkeypatch.setattr(fused.cpp_extension, "load", load)
    monkeypatch.setattr(fused, "_LOADED", set())
    assert fused.fused_ops() is not None
    assert seen == [False]
    after = filelock.FileLock(folder / fused.BUILD_LOCK)
    after.acquire(timeout=0)  # released once loaded
    after.release()


def test_waiting_for_another_build_is_said(monkeypatch, tmp_path, fresh_loader, caplog):
    """A command started while another process built the step waited up to a minute without a word."""
    import threading

    import filelock

    import densessm.ops.fused as fused

    monkeypatch.setenv("DENSESSM_EXTENSIONS_DIR", str(tmp_path))
    folder = tmp_path / fused.extension_name()
    folder.mkdir()
    monkeypatch.setattr(fused.cpp_extension, "load", lambda *args, **kwargs: None)
    monkeypatch.setattr(fused, "_LOADED", set())
    other = filelock.FileLock(folder / fused.BUILD_LOCK)
    other.acquire()
    result = []
    with caplog.at_level(logging.WARNING, logger="densessm.ops.fused"):
        waiter = threading.Thread(target=lambda: result.append(fused.fused_ops()))
        waiter.start()
        for _ in range(200):
            if "waiting for another process that is building the fused CPU decode step" in caplog.text:
                break
            waiter.join(0.05)
        assert "waiting for another process that is building the fused CPU decode step" in caplog.text
        assert waiter.is_alive()  # still waiting
        other.release()
        waiter.join(30)
    assert result and result[0] is not None


def test_bench_generate_reports_each_batch_size(tmp_path):
    """``densessm bench generate --batch 1 6``: batch 1 (interactive use) is measured beside batch 6, each with
    its own report; existing results of any of them are refused before anything is measured."""
    out = tmp_path / "gen"
    args = ["bench", "generate", "--models", "retnet_tiny", "--batch", "1", "3", "--new-tokens", "2"]
    args += ["--contexts", "8", "--steps", "1", "--overhead-steps", "0", "--out", str(out)]
    assert main(args) == 0
    for batch in (1, 3):
        stem = tmp_path / f"gen_batch{batch}"
        assert json.loads(stem.with_suffix(".json").read_text())["meta"]["batch"] == batch
        assert f"batch {batch}" in stem.with_suffix(".md").read_text()
    assert not out.with_suffix(".json").exists()
    (tmp_path / "gen_batch3.md").unlink()
    assert main(args) == 1  # gen_batch1.* exist: nothing is measured
    assert not (tmp_path / "gen_batch3.md").exists()


def test_a_model_without_such_mixers_is_left_as_it_was_and_said_so():
    """DenseMamba2 has no fused step: the transform says False and changes nothing (it still trains and saves)."""
    from densessm.models import FAMILIES
    from densessm.presets import load_preset

    family = next(f for f in FAMILIES if f.name == "mamba2")
    torch.manual_seed(0)
    model = family.causal_lm(load_preset("dense_mamba2_tiny")).train()
    before = [type(m) for m in model.modules()]
    assert fuse_decode_steps(model) is False
    assert [type(m) for m in model.modules()] == before and model.training
