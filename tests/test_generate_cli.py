"""`densessm generate`: runs on a saved tiny model, and names every bad input."""

from __future__ import annotations

import pytest
from conftest import tiny_config

from densessm import DenseRetNetForCausalLM
from densessm.cli import main


@pytest.fixture
def model_dir(tmp_path, word_tokenizer):
    model = DenseRetNetForCausalLM(tiny_config(max_position_embeddings=16))
    model.save_pretrained(tmp_path / "model")
    word_tokenizer.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_streams_a_single_prompt(model_dir, capsys):
    assert main(["generate", str(model_dir), "--prompt", "w1 w2", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert out.strip() and all(word.startswith("w") for word in out.split())


def test_batch_of_prompts_matches_single_runs(model_dir, tmp_path, capsys):
    prompts = ["w1 w2 w3 w4", "w5"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    assert (
        main(["generate", str(model_dir), "--prompt-file", str(tmp_path / "prompts.txt"), "--max-new-tokens", "4"]) == 0
    )
    batch = capsys.readouterr().out
    for prompt in prompts:
        assert main(["generate", str(model_dir), "--prompt", prompt, "--max-new-tokens", "4", "--no-stream"]) == 0
        alone = capsys.readouterr().out.strip()
        assert alone[len(prompt) :] in batch


def test_sampling_with_seed_is_reproducible(model_dir, capsys):
    args = ["generate", str(model_dir), "--prompt", "w3", "--do-sample", "--top-p", "0.9", "--seed", "3"]
    outputs = []
    for _ in range(2):
        assert main([*args, "--no-stream"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--temperature", "0"], "argument --temperature: must be greater than 0, got 0"),
        (
            ["--do-sample", "--temperature", "1e-300"],
            "argument --temperature: must be at least 1e-06, got 1e-300: a smaller one overflows the logits",
        ),
        (["--do-sample", "--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
        (["--temperature", "0.5"], "--temperature acts only when sampling: add --do-sample, or drop --temperature"),
        (["--top-k", "5", "--top-p", "0.9"], "--top-k, --top-p act only when sampling: add --do-sample"),
        (["--num-beams", "2", "--top-k", "5"], "--top-k acts only when sampling"),
        (["--top-k", "-1"], "argument --top-k: must be 0 or more, got -1"),
        (["--max-new-tokens", "0"], "argument --max-new-tokens: must be a positive integer, got 0"),
        (["--num-beams", "0"], "argument --num-beams: must be a positive integer, got 0"),
        (["--num-beams", "9" * 20], f"argument --num-beams: must be at most 2147483647 (2**31 - 1), got {'9' * 20}"),
        (["--max-new-tokens", str(2**31)], "argument --max-new-tokens: must be at most 2147483647 (2**31 - 1)"),
    ],
)
def test_bad_sampling_values(model_dir, capsys, extra, message):
    assert main(["generate", str(model_dir), "--prompt", "w1", *extra]) == 2
    assert message in capsys.readouterr().err


def test_prompt_longer_than_allowed(model_dir, capsys):
    long = " ".join(["w1"] * 17)
    assert main(["generate", str(model_dir), "--prompt", long]) == 2
    assert "allows at most 16" in capsys.readouterr().err


def test_missing_model_dir(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nothing"), "--prompt", "hi"]) == 1
    assert f"model directory {tmp_path / 'nothing'} does not exist" in capsys.readouterr().err


def test_missing_tokenizer(tmp_path, capsys):
    DenseRetNetForCausalLM(tiny_config()).save_pretrained(tmp_path / "bare")
    assert main(["generate", str(tmp_path / "bare"), "--prompt", "hi"]) == 1
    assert "has no tokenizer" in capsys.readouterr().err


def test_empty_prompt(model_dir, capsys):
    assert main(["generate", str(model_dir), "--prompt", "  "]) == 2
    assert "empty prompt" in capsys.readouterr().err


def test_bf16_runs(model_dir, capsys):
    args = ["generate", str(model_dir), "--prompt", "w1 w2", "--dtype", "bfloat16", "--max-new-tokens", "3"]
    assert main([*args, "--no-stream"]) == 0
    assert capsys.readouterr().out.startswith("w1 w2")


def test_cpu_weights_are_prepacked_unless_asked_not_to(model_dir, capsys, monkeypatch):
    from densessm.inference import decoding

    calls = []
    real = decoding.prepack_for_cpu
    monkeypatch.setattr(decoding, "prepack_for_cpu", lambda model: calls.append(model) or real(model))
    args = ["generate", str(model_dir), "--prompt", "w1 w2", "--max-new-tokens", "4", "--no-stream"]
    assert main(args) == 0
    packed = capsys.readouterr().out
    assert len(calls) == 1
    assert main([*args, "--no-prepack"]) == 0
    assert len(calls) == 1 and capsys.readouterr().out == packed


def test_compiled_decoding_gives_the_same_text(model_dir, capsys, monkeypatch):
    import functools

    import transformers

    from densessm.compiled_decoding import CompiledDecoder

    compiled_steps = []
    real_check = CompiledDecoder.is_decode_step
    monkeypatch.setattr(
        CompiledDecoder, "is_decode_step", lambda *a: compiled_steps.append(real_check(*a)) or compiled_steps[-1]
    )

    # aot_eager traces the step as inductor would, in a second (inductor itself: tests/test_compiled_decoding.py)
    monkeypatch.setattr(
        transformers, "CompileConfig", functools.partial(transformers.CompileConfig, backend="aot_eager")
    )
    args = ["generate", str(model_dir), "--prompt", "w1 w2", "--max-new-tokens", "5", "--no-stream"]
    assert main(args) == 0
    eager = capsys.readouterr().out
    assert main([*args, "--compile"]) == 0
    assert capsys.readouterr().out == eager
    assert compiled_steps.count(True) == 4  # 5 new tokens: the first from the prompt (eager), 4 compiled steps


def test_cpu_decoding_takes_the_fused_step_and_prints_the_same_text(model_dir, capsys, monkeypatch):
    """The fused C++ decode step is on by default on CPU (not under --compile, which compiles its own), and the
    text is the one the PyTorch step prints."""
    from densessm.inference import decoding
    from densessm.ops.fused import fused_ops

    assert fused_ops() is not None, "the fused step did not build here (g++ and ninja are test requirements)"
    fused = []
    real = decoding.fuse_decode_steps
    monkeypatch.setattr(decoding, "fuse_decode_steps", lambda model: fused.append((model, real(model))))
    args = ["generate", str(model_dir), "--prompt", "w1 w2", "--max-new-tokens", "6", "--no-stream"]
    assert main(args) == 0
    with_fused = capsys.readouterr().out
    assert len(fused) == 1 and fused[0][1] is True
    mixers = [type(getattr(layer, layer.mixer_name)).__name__ for layer in fused[0][0].base_model.layers]
    assert mixers and all(name == "FusedStepRetention" for name in mixers), mixers
    monkeypatch.setattr(decoding, "fuse_decode_steps", lambda model: False)
    assert main(args) == 0
    assert capsys.readouterr().out == with_fused
