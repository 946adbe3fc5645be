"""Bad input and faults at the command line: one clear line, the conventional exit code, nothing lost.

Every refused write is checked to have left the files already on disk byte for byte as they were.
Exit codes: 2 usage, 1 failure, 130 interrupted (see densessm.errors).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config, tiny_mamba_config
from safetensors.torch import load_file, save_file
from test_convert import _write_reference

import densessm.cli
from densessm import DenseMambaForCausalLM, DenseRetNetForCausalLM
from densessm.cli import main
from densessm.errors import Interrupted


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every file under ``root`` (symlinks as their target), to compare before and after."""
    files: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            files[key] = f"-> {os.readlink(path)}"
        elif path.is_file():
            files[key] = path.read_bytes()
        else:
            files[key] = "<dir>"
    return files


def run(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.fixture
def model_dir(tmp_path, word_tokenizer) -> Path:
    directory = tmp_path / "model"
    DenseRetNetForCausalLM(tiny_config(max_position_embeddings=32)).save_pretrained(directory)
    word_tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(" ".join(f"w{i % 90}" for i in range(200)) + "\n")
    return path


def _edit_weights(directory: Path, edit) -> None:
    state = load_file(directory / "model.safetensors")
    edit(state)
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})


def _first_key(directory: Path, part: str) -> str:
    return next(k for k in sorted(load_file(directory / "model.safetensors")) if part in k)


# --- the exit-code conventions --------------------------------------------------------------------------


def test_usage_errors_exit_2(capsys):
    assert run(["no-such-command"], capsys)[0] == 2
    code, err = run(["presets", "--bogus"], capsys)
    assert code == 2 and "unrecognized arguments: --bogus" in err


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(densessm.cli, "list_presets", lambda: interrupted(None))
    code, err = run(["presets"], capsys)
    assert code == 130 and err.strip() == "densessm presets: interrupted"


def test_interrupted_carries_what_to_do_next(monkeypatch, capsys):
    def interrupted():
        raise Interrupted("resume from out/checkpoint-4")

    monkeypatch.setattr(densessm.cli, "list_presets", interrupted)
    code, err = run(["presets"], capsys)
    assert code == 130 and err.strip() == "densessm presets: interrupted: resume from out/checkpoint-4"


def test_unexpected_exception_is_one_line_unless_asked_for_the_traceback(monkeypatch, capsys):
    def broken():
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(densessm.cli, "list_presets", broken)
    code, err = run(["presets"], capsys)
    assert code == 1 and "internal error (ZeroDivisionError): boom" in err and "DENSESSM_TRACEBACK=1" in err
    monkeypatch.setenv("DENSESSM_TRACEBACK", "1")
    with pytest.raises(ZeroDivisionError):
        main(["presets"])


# --- demo ------------------------------------------------------------------------------------------------


def test_demo_does_not_default_to_the_folder_the_demo_script_trains_into():
    args = densessm.cli.build_parser().parse_args(["demo"])
    assert Path(args.output_dir) != Path("outputs/demo")
    assert "outputs/demo" in (Path(__file__).parents[1] / "scripts" / "demo.sh").read_text()


def test_demo_refuses_a_folder_that_holds_files(tmp_path, capsys):
    out = tmp_path / "trained"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"precious weights")
    before = snapshot(out)
    code, err = run(["demo", "--output-dir", str(out), "--new-tokens", "2"], capsys)
    assert code == 1 and "already holds files" in err and "--overwrite" in err
    assert snapshot(out) == before


def test_demo_overwrites_only_when_asked(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "old.txt").write_text("old")
    assert main(["demo", "--output-dir", str(out), "--new-tokens", "2", "--overwrite"]) == 0
    assert not (out / "old.txt").exists() and (out / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary sibling left


@pytest.mark.parametrize("relative", [".", ".."])
def test_demo_cannot_replace_the_working_directory(tmp_path, capsys, monkeypatch, relative):
    """A rename cannot replace the directory a process works in: this was a raw OSError ("Device or resource
    busy") after the model was built."""
    work = tmp_path / "dm" / "work"
    work.mkdir(parents=True)
    (work / "notes.txt").write_text("keep")
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)
    code, err = run(["demo", "--output-dir", relative, "--new-tokens", "2", "--overwrite"], capsys)
    assert code == 2 and f"output directory {relative} is the working directory or holds it" in err, err
    assert snapshot(tmp_path) == before


def test_demo_output_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("keep")
    code, err = run(["demo", "--output-dir", str(tmp_path / "file")], capsys)
    assert code == 2 and "is a file, not a directory" in err
    assert (tmp_path / "file").read_text() == "keep"


def _broken_link(tmp_path: Path, name: str, kind: str) -> tuple[Path, str]:
    """A symlink ``name`` in ``tmp_path`` that leads nowhere, and how the refusal names it."""
    link = tmp_path / name
    if kind == "loop":
        (tmp_path / f"{name}-other").symlink_to(link)
        link.symlink_to(tmp_path / f"{name}-other")
        return link, "is a symlink loop"
    link.symlink_to(tmp_path / "nowhere" / "deeper")
    return link, f"is a symlink to a missing target ({tmp_path / 'nowhere' / 'deeper'})"


@pytest.mark.parametrize("kind", ["loop", "dangling"])
def test_demo_output_dir_that_is_a_broken_symlink_is_named_before_the_model_is_built(
    tmp_path, capsys, monkeypatch, kind
):
    monkeypatch.setattr(densessm.cli, "load_preset", lambda *a: pytest.fail("built before refusing"))
    link, reason = _broken_link(tmp_path, "out", kind)
    before = snapshot(tmp_path)
    code, err = run(["demo", "--output-dir", str(link)], capsys)
    assert (code, err.strip()) == (2, f"densessm demo: error: output directory {link} {reason}; name another path")
    code, err = run(["demo", "--output-dir", str(link / "sub"), "--overwrite"], capsys)
    assert (code, err.strip()) == (
        2,
        f"densessm demo: error: output directory {link / 'sub'} cannot be created: {link} {reason}; name another path",
    )
    assert snapshot(tmp_path) == before


def test_demo_unknown_preset_is_a_usage_error(tmp_path, capsys):
    code, err = run(["demo", "--preset", "nope", "--output-dir", str(tmp_path / "x")], capsys)
    assert code == 2 and "unknown preset 'nope'" in err and "dense_retnet_tiny" in err
    assert not (tmp_path / "x").exists()


# --- convert ---------------------------------------------------------------------------------------------


@pytest.fixture
def reference(tmp_path) -> Path:
    return _write_reference(tmp_path, DenseRetNetForCausalLM(tiny_config()))


def test_convert_refuses_a_destination_that_holds_files(reference, tmp_path, capsys):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "model.safetensors").write_bytes(b"another model")
    before = snapshot(dst)
    code, err = run(["convert", str(reference), str(dst)], capsys)
    assert code == 1 and "already holds files" in err
    assert snapshot(dst) == before


def test_convert_overwrites_when_asked(reference, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "stale.bin").write_bytes(b"x")
    assert main(["convert", str(reference), str(dst), "--overwrite"]) == 0
    assert not (dst / "stale.bin").exists() and (dst / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("dst", "message"),
    [(".", "is the source itself"), ("sub", "lies inside the source"), ("..", "contains the source")],
)
def test_convert_refuses_a_destination_overlapping_the_source(reference, capsys, dst, message):
    before = snapshot(reference)
    code, err = run(["convert", str(reference), str(reference / dst), "--overwrite"], capsys)
    assert code == 2 and message in err
    assert snapshot(reference) == before


@pytest.mark.parametrize(("kind", "what"), [("file", "a file"), ("fifo", "a pipe, socket or device")])
def test_convert_names_a_source_that_is_not_a_directory(tmp_path, capsys, kind, what):
    src = tmp_path / "weights.safetensors"
    if kind == "file":
        src.write_bytes(b"not a directory")
    else:
        os.mkfifo(src)
    code, err = run(["convert", str(src), str(tmp_path / "dst")], capsys)
    assert code == 1
    assert err.strip() == (
        f"densessm convert: error: {src} is {what}, not a reference directory: name the directory that holds it"
    )
    assert not (tmp_path / "dst").exists()


def test_convert_into_an_empty_existing_directory(reference, tmp_path):
    (tmp_path / "empty").mkdir()
    assert main(["convert", str(reference), str(tmp_path / "empty")]) == 0
    assert (tmp_path / "empty" / "config.json").is_file()


def _sharded_reference(tmp_path) -> Path:
    return _write_reference(tmp_path, DenseRetNetForCausalLM(tiny_config()), layout="sharded-safetensors")


@pytest.mark.parametrize("escape", ["absolute", "parent", "nested"])
def test_convert_reads_no_shard_outside_the_source(tmp_path, capsys, escape):
    src = _sharded_reference(tmp_path)
    outside = tmp_path / "secret.safetensors"
    (src / "model-a.safetensors").rename(outside)
    index_file = src / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    name = {"absolute": str(outside), "parent": "../secret.safetensors", "nested": "sub/../../secret.safetensors"}
    index["weight_map"] = {
        k: (name[escape] if v == "model-a.safetensors" else v) for k, v in index["weight_map"].items()
    }
    index_file.write_text(json.dumps(index))
    code, err = run(["convert", str(src), str(tmp_path / "out")], capsys)
    assert code == 1 and repr(name[escape]) in err and "refused" in err
    assert not (tmp_path / "out").exists()


def test_convert_refuses_a_tokenizer_symlink_leading_out(reference, tmp_path, capsys):
    (tmp_path / "private.json").write_text('{"secret": 1}')
    (reference / "tokenizer.json").symlink_to(tmp_path / "private.json")
    code, err = run(["convert", str(reference), str(tmp_path / "out")], capsys)
    assert code == 1 and "'tokenizer.json'" in err and "leads outside" in err
    assert not (tmp_path / "out").exists()


def test_convert_follows_a_symlink_that_stays_inside(reference, tmp_path):
    (reference / "real_tokenizer.json").write_text('{"inside": true}')
    (reference / "tokenizer.json").symlink_to("real_tokenizer.json")
    assert main(["convert", str(reference), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"inside": true}'
    assert not (tmp_path / "out" / "tokenizer.json").is_symlink()


def test_convert_refuses_weights_symlinked_from_outside(reference, tmp_path, capsys):
    (reference / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    (reference / "model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    code, err = run(["convert", str(reference), str(tmp_path / "out")], capsys)
    assert code == 1 and "'model.safetensors'" in err and "leads outside" in err


def test_convert_refuses_a_shard_that_is_a_directory(tmp_path, capsys):
    src = _sharded_reference(tmp_path)
    (src / "model-a.safetensors").unlink()
    (src / "model-a.safetensors").mkdir()
    code, err = run(["convert", str(src), str(tmp_path / "out")], capsys)
    assert code == 1 and "is not a regular file" in err


def test_convert_config_that_is_not_an_object(reference, tmp_path, capsys):
    (reference / "config.json").write_text("[1, 2]")
    code, err = run(["convert", str(reference), str(tmp_path / "out")], capsys)
    assert code == 1 and "holds a JSON list, not an object" in err


def test_a_crash_while_converting_leaves_no_destination(reference, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    real = PreTrainedModel.save_pretrained

    def crash(self, directory, *args, **kwargs):
        real(self, directory, *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", crash)
    assert main(["convert", str(reference), str(tmp_path / "out")]) == 1
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ref"]  # no temporary sibling left


def test_a_crash_while_overwriting_keeps_the_old_destination(reference, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    dst = tmp_path / "out"
    assert main(["convert", str(reference), str(dst)]) == 0
    before = snapshot(dst)

    def crash(self, directory, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", crash)
    assert main(["convert", str(reference), str(dst), "--overwrite"]) == 1
    assert snapshot(dst) == before


# --- strict loading: generate and eval refuse a model that is not what its config.json describes ----------

DAMAGE = {
    "missing": (lambda d: _edit_weights(d, lambda s: s.pop(_first_key(d, "q_proj"))), "missing tensors: model."),
    "unexpected": (
        lambda d: _edit_weights(d, lambda s: s.__setitem__("model.extra.weight", torch.zeros(2))),
        "unexpected tensors: model.extra.weight",
    ),
    "mis-shaped": (
        lambda d: _edit_weights(d, lambda s: s.__setitem__(_first_key(d, "q_proj"), torch.zeros(3, 3))),
        "tensors of another shape",
    ),
    "foreign model_type": (
        lambda d: (d / "config.json").write_text(
            json.dumps(json.loads((d / "config.json").read_text()) | {"model_type": "llama"})
        ),
        "describes model_type 'llama', not a densessm model",
    ),
    "invalid config.json": (lambda d: (d / "config.json").write_text("{oops"), "config.json is not valid JSON"),
    "truncated weights": (
        lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:100]),
        "corrupt or truncated weights file",
    ),
    "no weights": (lambda d: (d / "model.safetensors").unlink(), "no weights in"),
    "integer tensor": (  # a quantized or damaged tensor: cast into the float parameter it would load as zeros
        lambda d: _edit_weights(d, lambda s: s.__setitem__("model.embed_tokens.weight", torch.zeros(97, 32).char())),
        "tensors of another kind: model.embed_tokens.weight stored as I8 (the model holds floating-point values there)",
    ),
    "bad config value": (
        lambda d: (d / "config.json").write_text(
            json.dumps(json.loads((d / "config.json").read_text()) | {"num_hidden_layers": "three"})
        ),
        "not a valid dense_retnet configuration",
    ),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_generate_refuses_a_damaged_model(model_dir, capsys, damage):
    spoil, message = DAMAGE[damage]
    spoil(model_dir)
    code, err = run(["generate", str(model_dir), "--prompt", "w1 w2", "--max-new-tokens", "2"], capsys)
    assert code == 1 and message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("damage", ["missing", "foreign model_type", "truncated weights", "integer tensor"])
def test_eval_refuses_a_damaged_model(model_dir, corpus, capsys, damage):
    spoil, message = DAMAGE[damage]
    spoil(model_dir)
    code, err = run(["eval", "ppl", str(model_dir), "--data", str(corpus), "--window", "16"], capsys)
    assert code == 1 and message in err


def test_an_integer_tensor_in_a_torch_pickle_is_refused_too(model_dir, capsys):
    state = load_file(model_dir / "model.safetensors")
    state["model.norm.weight"] = state["model.norm.weight"].to(torch.int16)
    torch.save(state, model_dir / "pytorch_model.bin")
    (model_dir / "model.safetensors").unlink()
    code, err = run(["generate", str(model_dir), "--prompt", "w1 w2", "--max-new-tokens", "2"], capsys)
    assert code == 1
    assert err.strip() == (
        f"densessm generate: error: {model_dir} does not hold the model its config.json describes (dense_retnet): "
        "tensors of another kind: model.norm.weight stored as int16 (the model holds floating-point values there)"
    )


def test_weights_stored_in_another_floating_point_precision_load(model_dir, capsys):
    _edit_weights(model_dir, lambda s: s.update({k: v.to(torch.bfloat16) for k, v in s.items()}))
    code, err = run(["generate", str(model_dir), "--prompt", "w1 w2", "--max-new-tokens", "2"], capsys)
    assert code == 0, err


def test_eval_tasks_checks_the_weights_before_the_harness_loads_them(model_dir, capsys):
    DAMAGE["missing"][0](model_dir)
    code, err = run(["eval", "tasks", str(model_dir), "--tasks", "piqa"], capsys)
    assert code == 1 and "missing tensors" in err


def test_the_python_api_keeps_transformers_conventions(model_dir):
    """from_pretrained itself still loads a checkpoint with a missing tensor (and reports it), as transformers does."""
    DAMAGE["missing"][0](model_dir)
    model, info = DenseRetNetForCausalLM.from_pretrained(model_dir, output_loading_info=True)
    assert len(info["missing_keys"]) == 1


# --- non-finite values are reported, not hidden ----------------------------------------------------------


def _poison(directory: Path, part: str) -> str:
    name = _first_key(directory, part)
    _edit_weights(directory, lambda s: s[name].view(-1).__setitem__(0, float("nan")))
    return name


def test_generate_names_the_nan_parameter(model_dir, capsys):
    name = _poison(model_dir, "o_proj")
    code, err = run(["generate", str(model_dir), "--prompt", "w1 w2", "--max-new-tokens", "3"], capsys)
    assert code == 1 and f"parameter {name} holds NaN" in err and "generation step 1" in err


@pytest.mark.parametrize("sampling", [[], ["--do-sample", "--top-k", "5"], ["--num-beams", "2"]])
def test_generate_stops_on_nan_in_every_strategy(model_dir, capsys, sampling):
    _poison(model_dir, "lm_head")
    code, err = run(["generate", str(model_dir), "--prompt", "w1", "--max-new-tokens", "2", *sampling], capsys)
    assert code == 1 and "lm_head.weight holds NaN" in err


def test_eval_names_the_nan_parameter(model_dir, corpus, capsys):
    name = _poison(model_dir, "model.norm")
    code, err = run(["eval", "ppl", str(model_dir), "--data", str(corpus), "--window", "16"], capsys)
    assert code == 1 and f"parameter {name} holds NaN" in err


def test_overflow_without_a_bad_parameter_is_named_as_such():
    from densessm.errors import NonFiniteError
    from densessm.loading import raise_nonfinite

    model = DenseRetNetForCausalLM(tiny_config()).to(torch.bfloat16)
    with pytest.raises(NonFiniteError, match="overflowed in torch.bfloat16; try --dtype float32"):
        raise_nonfinite(model, "the logits")
    with pytest.raises(NonFiniteError, match="the input holds NaN"):
        raise_nonfinite(model, "the logits", inputs=torch.tensor([float("nan")]))


# --- generate: inputs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--device", "gpu"], "unknown device 'gpu'"),
        (["--device", "cuda:x"], "unknown device 'cuda:x'"),
        (["--device", "meta"], "densessm runs on cpu, cuda or mps, not meta"),
        (["--max-new-tokens", "ten"], "argument --max-new-tokens: expected an integer, got 'ten'"),
        (["--top-p", "nan"], "argument --top-p: expected a finite number, got 'nan'"),
        (["--temperature", "-1"], "argument --temperature: must be greater than 0"),
        (["--seed", "-3"], "argument --seed: must be in [0, 2**32), got -3"),
        (["--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    ],
)
def test_generate_usage_errors(model_dir, capsys, flags, message):
    code, err = run(["generate", str(model_dir), "--prompt", "w1", *flags], capsys)
    assert code == 2 and message in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
@pytest.mark.parametrize(
    ("prompt", "what"),
    [
        ("w1 \udcff\udcfe", "byte 0xff at character 3"),  # argv bytes that are not UTF-8, as Python decodes them
        ("\ud800w1", "a lone surrogate \\ud800 at character 0"),
    ],
)
def test_generate_names_a_prompt_that_is_not_utf8(model_dir, capsys, prompt, what):
    code, err = run(["generate", str(model_dir), "--prompt", "w1", "--prompt", prompt], capsys)
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        f"densessm generate: error: argument --prompt: not UTF-8 text: {what} (pass UTF-8 text, e.g. a UTF-8 file "
        "with --prompt-file)"
    )


def test_generate_on_a_missing_gpu(model_dir, capsys):
    code, err = run(["generate", str(model_dir), "--prompt", "w1", "--device", "cuda"], capsys)
    assert code == 2 and "no CUDA GPU is available on this machine" in err


def test_a_prompt_file_with_a_byte_order_mark_reads_as_its_text(model_dir, tmp_path, capsys):
    """An editor's UTF-8 BOM stayed in the first prompt and changed its answer without a word."""
    answers = []
    for name, content in (("bom.txt", b"\xef\xbb\xbfw1 w2\r\nw3\r\n"), ("plain.txt", b"w1 w2\nw3\n")):
        (tmp_path / name).write_bytes(content)
        argv = ["generate", str(model_dir), "--prompt-file", str(tmp_path / name), "--max-new-tokens", "3"]
        assert main([*argv, "--no-stream"]) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1] and "\ufeff" not in answers[0]


def test_the_recorded_eval_command_runs_again(model_dir, corpus, tmp_path, capsys):
    """It spelled the --overwrite switch as "--overwrite False", which the parser refuses."""
    argv = ["eval", "ppl", str(model_dir), "--data", str(corpus), "--window", "16", "--method", "carried"]
    assert main([*argv, "--output", str(tmp_path / "r")]) == 0
    recorded = json.loads((tmp_path / "r.json").read_text())["command"]
    assert "--overwrite" not in recorded
    again = shlex.split(recorded)[1:]
    assert main([*again, "--overwrite"]) == 0  # the same report's files: replaced as asked


def test_generate_prompt_file_problems(model_dir, tmp_path, capsys):
    code, err = run(["generate", str(model_dir), "--prompt-file", str(tmp_path / "none.txt")], capsys)
    assert code == 1 and "does not exist" in err
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    code, err = run(["generate", str(model_dir), "--prompt-file", str(tmp_path / "latin1.txt")], capsys)
    assert code == 1 and "is not UTF-8 text" in err and "byte 3" in err


def test_generate_with_a_tokenizer_larger_than_the_vocabulary(tmp_path, word_tokenizer, capsys):
    DenseRetNetForCausalLM(tiny_config(vocab_size=50)).save_pretrained(tmp_path / "small")
    word_tokenizer.save_pretrained(tmp_path / "small")
    code, err = run(["generate", str(tmp_path / "small"), "--prompt", "w90 w1"], capsys)
    assert code == 1 and "beyond the model's vocab_size 50" in err and "--tokenizer" in err


@pytest.mark.parametrize("stream", [True, False])
def test_generated_ids_the_tokenizer_lacks_are_named(tmp_path, word_tokenizer, capsys, stream):
    """A tokenizer smaller than the model's vocabulary (another model's) decoded the ids it lacks to nothing:
    an empty answer, exit 0."""
    torch.manual_seed(0)
    model = DenseRetNetForCausalLM(tiny_config(vocab_size=4096))
    with torch.no_grad():
        model.lm_head.weight[:97] -= 100  # every id the tokenizer has is unlikely: greedy picks one it lacks
    model.save_pretrained(tmp_path / "big")
    word_tokenizer.save_pretrained(tmp_path / "big")
    argv = ["generate", str(tmp_path / "big"), "--prompt", "w1 w2", "--max-new-tokens", "3"]
    code, err = run(argv if stream else [*argv, "--no-stream"], capsys)
    assert code == 1 and "which the tokenizer in" in err and "(97 tokens; the model's vocab_size 4096)" in err, err


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_a_config_at_odds_with_its_weights_is_blamed_on_the_config(tmp_path, word_tokenizer, capsys, command):
    """A config.json whose vocab_size disagrees with the embedding is named as such, not as a tokenizer problem."""
    directory = tmp_path / "model"
    DenseRetNetForCausalLM(tiny_config()).save_pretrained(directory)
    word_tokenizer.save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "vocab_size": 50}))
    argv = ["generate", str(directory), "--prompt", "w90 w1"] if command == "generate" else ["serve", str(directory)]
    code, err = run([*argv, "--port", "0"] if command == "serve" else argv, capsys)
    assert code == 1 and "does not hold the model its config.json describes" in err
    assert "model.embed_tokens.weight (97, 32) (config.json gives (50, 32))" in err and "tokenizer" not in err


def test_generate_tokenizer_dir_missing(model_dir, tmp_path, capsys):
    code, err = run(["generate", str(model_dir), "--prompt", "w1", "--tokenizer", str(tmp_path / "nope")], capsys)
    assert code == 1 and "tokenizer directory" in err and "does not exist" in err


def test_generate_runs_on_dense_mamba(tmp_path, word_tokenizer, capsys):
    directory = tmp_path / "mamba"
    DenseMambaForCausalLM(tiny_mamba_config()).save_pretrained(directory)
    word_tokenizer.save_pretrained(directory)
    code = main(["generate", str(directory), "--prompt", "w1 w2", "--max-new-tokens", "3", "--no-stream"])
    assert code == 0 and capsys.readouterr().out.startswith("w1 w2")


def test_model_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, err = run(["generate", str(tmp_path / "file"), "--prompt", "w1"], capsys)
    assert code == 1 and "is a file, not a model directory" in err


# --- eval: inputs and reports ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--batch-size", "0"], "argument --batch-size: must be a positive integer, got 0"),
        (["--batch-size", "-1"], "argument --batch-size: must be a positive integer, got -1"),
        (["--window", "0"], "argument --window: must be a positive integer"),
        (["--window", "8", "--stride", "8"], "--stride must be smaller than --window (8), got 8"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--overwrite"], "--overwrite replaces the report of --output STEM: give --output, or drop --overwrite"),
    ],
)
def test_eval_ppl_usage_errors(model_dir, corpus, capsys, flags, message):
    code, err = run(["eval", "ppl", str(model_dir), "--data", str(corpus), *flags], capsys)
    assert code == 2 and message in err


@pytest.mark.parametrize("limit", ["inf", "0", "-2", "many"])
def test_eval_tasks_limit_must_be_positive_and_finite(model_dir, capsys, limit):
    assert run(["eval", "tasks", str(model_dir), "--limit", limit], capsys)[0] == 2


def test_eval_names_a_file_that_is_not_utf8(model_dir, tmp_path, capsys):
    (tmp_path / "latin1.txt").write_bytes("na\xefve text\n".encode("latin-1"))
    code, err = run(["eval", "ppl", str(model_dir), "--data", str(tmp_path / "latin1.txt")], capsys)
    assert code == 1 and "latin1.txt is not UTF-8 text" in err and "at byte 2" in err


def test_eval_refuses_to_replace_a_report_before_evaluating(model_dir, corpus, tmp_path, capsys, monkeypatch):
    import densessm.evaluation.perplexity as perplexity

    (tmp_path / "report.json").write_text("{}")
    before = snapshot(tmp_path)
    monkeypatch.setattr(perplexity, "load_causal_lm", lambda *a, **k: pytest.fail("evaluated before refusing"))
    argv = [
        "eval",
        "ppl",
        str(model_dir),
        "--data",
        str(corpus),
        "--window",
        "16",
        "--output",
        str(tmp_path / "report"),
    ]
    code, err = run(argv, capsys)
    assert code == 1 and "report.json already exists" in err and "--overwrite" in err
    assert snapshot(tmp_path) == before


def test_eval_replaces_a_report_when_asked(model_dir, corpus, tmp_path, capsys):
    (tmp_path / "report.json").write_text("{}")
    argv = [
        "eval",
        "ppl",
        str(model_dir),
        "--data",
        str(corpus),
        "--window",
        "16",
        "--output",
        str(tmp_path / "report"),
    ]
    assert main([*argv, "--overwrite", "--method", "sliding"]) == 0
    assert json.loads((tmp_path / "report.json").read_text())["kind"] == "perplexity"


# --- bench -------------------------------------------------------------------------------------------------


def test_bench_refuses_to_replace_results(tmp_path, capsys):
    (tmp_path / "gen.md").write_text("earlier results")
    code, err = run(
        ["bench", "generate", "--models", "retnet_tiny", "--batch", "6", "--out", str(tmp_path / "gen")], capsys
    )
    assert code == 1 and "gen.md already exist" in err
    assert (tmp_path / "gen.md").read_text() == "earlier results"
    # several batch sizes write one report each: any one of them already there stops the run before it starts
    (tmp_path / "two_batch6.json").write_text("earlier results")
    code, err = run(["bench", "generate", "--models", "retnet_tiny", "--out", str(tmp_path / "two")], capsys)
    assert code == 1 and "two_batch6.json already exist" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen.md", "two_batch6.json"]


@pytest.mark.parametrize("flag", ["--batch", "--steps", "--overhead-context"])
def test_bench_numbers_must_be_positive(tmp_path, capsys, flag):
    code, err = run(["bench", "generate", flag, "0", "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and f"argument {flag}: must be a positive integer" in err
    code, err = run(["bench", "generate", flag, "9" * 20, "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and f"argument {flag}: must be at most 2147483647 (2**31 - 1), got {'9' * 20}" in err


def _no_measuring(monkeypatch):
    import densessm_lab.bench.measure

    monkeypatch.setattr(densessm_lab.bench.measure, "run", lambda *a, **k: pytest.fail("measured"))


def test_bench_out_under_a_file_is_refused_before_measuring(tmp_path, capsys, monkeypatch):
    _no_measuring(monkeypatch)
    (tmp_path / "a.txt").write_text("a corpus")
    out = tmp_path / "a.txt" / "x"
    code, err = run(["bench", "generate", "--models", "retnet_tiny", "--batch", "2", "--out", str(out)], capsys)
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        f"densessm bench: error: --out {out} cannot be created: {tmp_path / 'a.txt'} is a file, not a directory"
    )
    assert (tmp_path / "a.txt").read_text() == "a corpus"


def test_bench_out_where_a_directory_stands_is_refused_before_measuring(tmp_path, capsys, monkeypatch):
    _no_measuring(monkeypatch)
    (tmp_path / "gen.md").mkdir()
    out = tmp_path / "gen"
    argv = ["bench", "generate", "--models", "retnet_tiny", "--batch", "2", "--out", str(out), "--overwrite"]
    code, err = run(argv, capsys)
    assert code == 2
    assert err.strip().splitlines()[-1] == f"densessm bench: error: --out {out}: {out}.md is a directory, not a file"


def test_bench_out_naming_a_folder_is_refused_before_measuring(tmp_path, capsys, monkeypatch):
    """``--out DIR`` or ``--out DIR/`` wrote DIR_batch1.json and the rest beside the folder, not in it."""
    _no_measuring(monkeypatch)
    (tmp_path / "results").mkdir()
    argv = ["bench", "generate", "--models", "retnet_tiny", "--out"]
    code, err = run([*argv, str(tmp_path / "results")], capsys)
    assert code == 2 and f"--out {tmp_path / 'results'} is a directory; --out names a stem for STEM.json" in err
    code, err = run([*argv, str(tmp_path / "new") + "/"], capsys)
    assert code == 2 and f"argument --out: {tmp_path / 'new'}/ names a folder; --out names a stem" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def test_bench_out_with_a_dot_in_its_name_keeps_every_file_apart(tmp_path, monkeypatch):
    """``--out run.v2`` wrote run.json for both batch sizes (``with_suffix`` replaced ".v2"): the second
    batch's results replaced the first's, and a user's run.json could be replaced."""
    from densessm_lab.bench import cli as bench_cli
    from densessm_lab.bench.results import output_stem, suffixed

    def write_report(results, stem):
        suffixed(stem, ".md").write_text(f"batch {results['batch']}")

    monkeypatch.setattr(bench_cli.measure, "run", lambda args, checkpoint: {"batch": args.batch})
    monkeypatch.setattr(bench_cli.report, "write_report", write_report)
    (tmp_path / "run.json").write_text("a user's file")
    assert main(["bench", "generate", "--models", "retnet_tiny", "--out", str(tmp_path / "run.v2")]) == 0
    assert (tmp_path / "run.v2_batch1.md").read_text() == "batch 1"
    assert (tmp_path / "run.v2_batch6.md").read_text() == "batch 6"
    assert (tmp_path / "run.json").read_text() == "a user's file"
    assert output_stem(str(tmp_path / "run.json")) == tmp_path / "run"  # a suffix given names the stem's files


@pytest.mark.parametrize("kind", ["loop", "dangling"])
def test_bench_out_that_is_a_broken_symlink_is_refused_before_measuring(tmp_path, capsys, monkeypatch, kind):
    _no_measuring(monkeypatch)
    link, reason = _broken_link(tmp_path, "gen.md", kind)
    argv = ["bench", "generate", "--models", "retnet_tiny", "--batch", "2", "--out", str(tmp_path / "gen")]
    code, err = run(argv, capsys)
    assert code == 2
    assert err.strip().splitlines()[-1] == f"densessm bench: error: --out {link} {reason}; name another path"
    assert link.is_symlink() and not (tmp_path / "nowhere").exists()


def test_bench_unknown_compile_backend_is_a_usage_error(tmp_path, capsys, monkeypatch):
    _no_measuring(monkeypatch)
    argv = ["bench", "generate", "--compile", "--compile-backend", "bogus", "--out", str(tmp_path / "x")]
    code, err = run(argv, capsys)
    assert code == 2
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith(
            "densessm bench generate: error: argument --compile-backend: unknown torch.compile backend 'bogus': this "
            "PyTorch has "
        )
    )
    assert "inductor" in err and err.strip().endswith("(and, for debugging, eager and aot_eager)")


# --- the file primitives every writer uses -----------------------------------------------------------------


def test_atomic_write_refuses_and_replaces_only_when_asked(tmp_path):
    from densessm.files import DestinationExistsError, atomic_write_text

    path = tmp_path / "a.json"
    atomic_write_text(path, "one")
    with pytest.raises(DestinationExistsError, match="already exists"):
        atomic_write_text(path, "two")
    assert path.read_text() == "one"
    atomic_write_text(path, "two", overwrite=True)
    assert path.read_text() == "two" and [p.name for p in tmp_path.iterdir()] == ["a.json"]


@pytest.mark.parametrize("value", ["no", "false", 0, None])
def test_the_writers_overwrite_switch_takes_only_true_or_false(tmp_path, value):
    """``overwrite="no"`` (truthy) replaced a file, and emptied a folder of the user's files."""
    from densessm.files import atomic_output_dir, atomic_output_file, atomic_write_text, check_destination

    kept, folder = tmp_path / "keep.txt", tmp_path / "victim"
    kept.write_text("mine")
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    refused = pytest.raises(TypeError, match=f"^overwrite must be True or False, got {value!r}$")
    with refused:
        atomic_write_text(kept, "new", overwrite=value)
    with refused, atomic_output_file(kept, overwrite=value):
        pytest.fail("worked before refusing")
    with refused, atomic_output_dir(folder, overwrite=value):
        pytest.fail("worked before refusing")
    with refused:
        check_destination(folder, value)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("kind", ["loop", "dangling"])
def test_a_file_or_folder_destination_that_is_a_broken_symlink_is_named_and_replaced_only_when_asked(tmp_path, kind):
    from densessm.errors import UsageError
    from densessm.files import atomic_output_dir, atomic_write_text

    link, reason = _broken_link(tmp_path, "a.json", kind)
    with pytest.raises(UsageError, match=f"^{re.escape(f'output file {link} {reason}; name another path')}$"):
        atomic_write_text(link, "one")
    atomic_write_text(link, "one", overwrite=True)  # the link itself is replaced, its target is not created
    assert not link.is_symlink() and link.read_text() == "one" and not (tmp_path / "nowhere").exists()
    folder, reason = _broken_link(tmp_path, "out", kind)
    refused = pytest.raises(UsageError, match=f"^{re.escape(f'destination {folder} {reason}; name another path')}$")
    with refused, atomic_output_dir(folder):
        pytest.fail("worked before refusing")
    with atomic_output_dir(folder, overwrite=True) as staging:
        (staging / "x").write_text("x")
    assert not folder.is_symlink() and (folder / "x").read_text() == "x" and not (tmp_path / "nowhere").exists()
    with pytest.raises(UsageError, match=re.escape(f"cannot be created: {link} is a file, not a directory")):
        atomic_write_text(link / "b.json", "two", overwrite=True)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_writes_get_the_modes_a_plain_write_would(tmp_path, umask):
    """The temporary siblings are private (tempfile's 0600/0700); what is moved into place must not stay so: a
    model directory written for a team would otherwise be unreadable to it."""
    from densessm.files import atomic_output_dir, atomic_output_file, atomic_write_text

    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "a")
        with atomic_output_file(tmp_path / "b.png") as tmp:
            tmp.write_bytes(b"b")
        with atomic_output_dir(tmp_path / "model") as staging:
            (staging / "config.json").write_text("{}")
    finally:
        os.umask(old)
    modes = {name: (tmp_path / name).stat().st_mode & 0o777 for name in ("a.txt", "b.png", "model")}
    assert modes == {"a.txt": 0o666 & ~umask, "b.png": 0o666 & ~umask, "model": 0o777 & ~umask}


def test_atomic_output_dir_leaves_the_old_content_when_the_writer_fails(tmp_path):
    from densessm.files import atomic_output_dir

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_output_dir(tmp_path / "out", overwrite=True) as staging:
        (staging / "half.txt").write_text("new")
        raise RuntimeError("killed halfway")
    assert snapshot(tmp_path) == {"out": "<dir>", "out/keep.txt": b"old"}


def test_confined_file_refuses_every_way_out(tmp_path):
    from densessm.files import OutsideDirectoryError, confined_file

    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "ok.txt").write_text("ok")
    (tmp_path / "outside.txt").write_text("secret")
    (root / "link").symlink_to(tmp_path / "outside.txt")
    (root / "loop").symlink_to(root / "loop")
    assert confined_file(root, "sub/../ok.txt").read_text() == "ok"
    for name, message in [
        ("../outside.txt", "leads outside"),
        (str(tmp_path / "outside.txt"), "absolute path"),
        ("link", "leads outside"),
        ("sub", "not a regular file"),
        ("loop", "is a symlink loop: refused"),  # was a raw RuntimeError
        ("", "names the directory itself, not a file in it"),  # was "leads outside it"
        (".", "names the directory itself, not a file in it"),
    ]:
        with pytest.raises(OutsideDirectoryError, match=message):
            confined_file(root, name)
    with pytest.raises(FileNotFoundError):
        confined_file(root, "absent.txt")


# --- cases found by an independent review ---------------------------------------------------------------------


def test_a_destination_filled_by_another_writer_meanwhile_is_not_replaced(tmp_path):
    from densessm.files import DestinationExistsError, atomic_output_dir

    out = tmp_path / "out"
    with pytest.raises(DestinationExistsError, match="filled by another process"), atomic_output_dir(out) as staging:
        (staging / "mine.txt").write_text("mine")
        out.mkdir()
        (out / "theirs.txt").write_text("theirs")  # another writer finished first
    assert snapshot(tmp_path) == {"out": "<dir>", "out/theirs.txt": b"theirs"}


def test_two_converts_into_one_destination_keep_one_result_whole(reference, tmp_path, monkeypatch):
    """The second convert to finish is refused: without --overwrite nothing is replaced, even in a race."""
    from transformers import PreTrainedModel

    dst = tmp_path / "dst"
    real = PreTrainedModel.save_pretrained
    raced = []

    def race(self, directory, *args, **kwargs):
        real(self, directory, *args, **kwargs)
        if not raced:  # the other convert finishes while this one is still writing
            raced.append(True)
            assert main(["convert", str(reference), str(dst)]) == 0

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", race)
    first = None
    code = main(["convert", str(reference), str(dst)])
    assert code == 1 and raced
    first = snapshot(dst)
    assert "model.safetensors" in first and first == snapshot(dst)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the refused result is not left behind


def test_leftovers_of_a_killed_writer_are_removed_and_a_live_ones_kept(reference, tmp_path):
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    stale = tmp_path / f".out.tmp-{host}-{int(dead.stdout)}-abc"
    live = tmp_path / f".out.tmp-{host}-{os.getppid()}-def"
    for leftover in (stale, live):
        leftover.mkdir()
        (leftover / "model.safetensors").write_bytes(b"half a model")
    assert main(["convert", str(reference), str(tmp_path / "out")]) == 0
    assert not stale.exists() and live.is_dir()


def test_overwriting_a_symlinked_destination_leaves_nothing_behind(reference, tmp_path):
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "old.txt").write_text("old")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    assert main(["convert", str(reference), str(tmp_path / "link"), "--overwrite"]) == 0
    assert (tmp_path / "link" / "config.json").is_file() and not (tmp_path / "link").is_symlink()
    assert (tmp_path / "target" / "old.txt").read_text() == "old"  # the link's target is not touched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "ref", "target"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hidden_size": "32"}, "hidden_size must be a positive integer, got '32'"),
        ({"hidden_size": 0}, "hidden_size must be a positive integer, got 0"),
        ({"hidden_size": 4}, "k_select.fc1 has width 8, which no gate of hidden_size 4 has"),
        ({"num_hidden_layers": 1}, "num_hidden_layers = 1 but the weights hold 3 layers"),
        ({"dense_block_layers": "2"}, "dense_block_layers must be an integer >= 0, got '2'"),
        ({"v_factor": -1}, "is not a valid DenseRetNet configuration: v_factor"),
    ],
)
def test_convert_names_a_bad_reference_config(reference, tmp_path, capsys, change, message):
    config = json.loads((reference / "config.json").read_text())
    (reference / "config.json").write_text(json.dumps(config | change))
    code, err = run(["convert", str(reference), str(tmp_path / "out")], capsys)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_convert_to_a_dtype_that_cannot_hold_the_weights_is_refused(tmp_path, capsys):
    model = DenseRetNetForCausalLM(tiny_config())
    with torch.no_grad():
        model.lm_head.weight[0, 0] = 1e6
    src = _write_reference(tmp_path, model)
    code, err = run(["convert", str(src), str(tmp_path / "out"), "--dtype", "float16"], capsys)
    assert code == 1 and "lm_head.weight holds values beyond the range of torch.float16" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--window", "1"], "argument --window: must be at least 2 tokens"),
        (["--stride", "4", "--method", "carried"], "--stride applies to the sliding method"),
        (["--data", ""], "argument --data: an empty path"),
    ],
)
def test_eval_usage_errors_found_by_review(model_dir, corpus, capsys, flags, message):
    code, err = run(["eval", "ppl", str(model_dir), "--data", str(corpus), *flags], capsys)
    assert code == 2 and message in err


def test_eval_report_problems_are_refused_before_evaluating(model_dir, corpus, tmp_path, capsys, monkeypatch):
    import densessm.evaluation.perplexity as perplexity

    monkeypatch.setattr(perplexity, "load_causal_lm", lambda *a, **k: pytest.fail("evaluated before refusing"))
    argv = ["eval", "ppl", str(model_dir), "--data", str(corpus), "--window", "16", "--overwrite", "--output"]
    before = snapshot(tmp_path)
    code, err = run([*argv, str(corpus / "report")], capsys)  # under a file
    assert code == 2 and f"{corpus} is a file, not a directory" in err
    (tmp_path / "rep.md").mkdir()
    (tmp_path / "rep.json").write_text("{}")
    code, err = run([*argv, str(tmp_path / "rep")], capsys)
    assert code == 2 and "rep.md is a directory, not a file" in err
    assert (tmp_path / "rep.json").read_text() == "{}"
    code, err = run([*argv, str(model_dir / "config")], capsys)  # would replace the model's config.json
    assert code == 2 and "inside the model directory" in err
    (tmp_path / "reports").mkdir()
    for folder in (str(tmp_path / "reports"), str(tmp_path / "new") + "/"):  # a stem, not a folder to write into
        code, err = run([*argv, folder], capsys)
        assert code == 2 and f"--output {folder} is a directory; --output names a stem for STEM.json" in err
    assert snapshot(tmp_path) == before | {"rep.md": "<dir>", "rep.json": b"{}", "reports": "<dir>"}


def test_eval_report_never_replaces_the_data_it_evaluates(model_dir, tmp_path, capsys, monkeypatch):
    """--overwrite replaces an earlier report, never the corpus: ``--data X.json --output X`` once evaluated X
    and then wrote the report over it."""
    import densessm.evaluation.perplexity as perplexity

    monkeypatch.setattr(perplexity, "load_causal_lm", lambda *a, **k: pytest.fail("evaluated before refusing"))
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"text": " ".join(f"w{i % 90}" for i in range(200))}]))
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("w1 w2 w3\n")
    before = snapshot(tmp_path)
    for source, stem, where in ((data, tmp_path / "data", "over"), (folder, folder / "report", "inside")):
        argv = ["eval", "ppl", str(model_dir), "--data", str(source), "--window", "16", "--overwrite"]
        code, err = run([*argv, "--output", str(stem)], capsys)
        assert code == 2 and f"--output {stem} would write {stem}.json {where} the --data {source}" in err, err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("kind", ["loop", "dangling"])
def test_eval_report_file_that_is_a_broken_symlink_is_refused_before_evaluating(
    model_dir, corpus, tmp_path, capsys, monkeypatch, kind
):
    import densessm.evaluation.perplexity as perplexity

    monkeypatch.setattr(perplexity, "load_causal_lm", lambda *a, **k: pytest.fail("evaluated before refusing"))
    link, reason = _broken_link(tmp_path, "rep.json", kind)
    before = snapshot(tmp_path)
    argv = ["eval", "ppl", str(model_dir), "--data", str(corpus), "--window", "16", "--output", str(tmp_path / "rep")]
    code, err = run(argv, capsys)
    assert (code, err.strip()) == (2, f"densessm eval: error: --output {link} {reason}; name another path")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("limit", ["1.5", "2.99"])
def test_eval_tasks_limit_above_one_must_be_whole(model_dir, capsys, limit):
    code, err = run(["eval", "tasks", str(model_dir), "--limit", limit], capsys)
    assert code == 2 and "must be whole" in err


def test_eval_tasks_limit_is_at_most_the_largest_count(model_dir, capsys):
    """10**20 failed in Python's islice after the contexts were built, naming no flag."""
    code, err = run(["eval", "tasks", str(model_dir), "--limit", "9" * 20], capsys)
    assert code == 2 and f"argument --limit: must be at most 2147483647 (2**31 - 1), got {'9' * 20}" in err


def test_eval_tasks_data_that_is_a_file(model_dir, corpus, capsys):
    code, err = run(["eval", "tasks", str(model_dir), "--tasks", "piqa", "--task-data", str(corpus)], capsys)
    assert code == 1 and "is a file, not a directory" in err


def test_eval_tasks_report_inside_its_task_data_is_refused(model_dir, tmp_path, capsys):
    """eval ppl refused a report inside its --data; eval tasks wrote one inside its --task-data."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "piqa.jsonl").write_text("{}\n")
    before = snapshot(tmp_path)
    argv = ["eval", "tasks", str(model_dir), "--tasks", "piqa", "--task-data", str(tasks), "--overwrite"]
    code, err = run([*argv, "--output", str(tasks / "report")], capsys)
    assert code == 2 and f"would write {tasks / 'report'}.json inside the --task-data {tasks}" in err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--seed", str(2**70)], "argument --seed: must be in [0, 2**32)"),
        (["demo", "--output-dir", ""], "argument --output-dir: an empty path"),
        (["bench", "generate", "--out", ""], "argument --out: an empty path"),
        (["generate", "", "--prompt", "w1"], "argument model_dir: an empty path"),
        (["convert", "", "x"], "argument src: an empty path"),
    ],
)
def test_values_that_cannot_work_are_usage_errors(capsys, argv, message):
    code, err = run(argv, capsys)
    assert code == 2 and message in err


def test_demo_under_a_file_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "file").write_text("keep")
    code, err = run(["demo", "--output-dir", str(tmp_path / "file" / "sub")], capsys)
    assert code == 2 and f"{tmp_path / 'file'} is a file, not a directory" in err


@pytest.mark.parametrize("kind", ["directory", "device"])
def test_generate_prompt_file_that_is_not_a_regular_file(model_dir, tmp_path, capsys, kind):
    path = tmp_path if kind == "directory" else Path("/dev/null")
    code, err = run(["generate", str(model_dir), "--prompt-file", str(path)], capsys)
    assert code == 2 and "is not a regular file" in err


def test_generate_tokenizer_path_that_is_a_file(model_dir, capsys):
    code, err = run(
        ["generate", str(model_dir), "--prompt", "w1", "--tokenizer", str(model_dir / "config.json")], capsys
    )
    assert code == 1 and "is a file, not a directory" in err


def test_generate_refuses_a_broken_generation_config(model_dir, capsys):
    (model_dir / "generation_config.json").write_text("{oops")
    code, err = run(["generate", str(model_dir), "--prompt", "w1", "--max-new-tokens", "2"], capsys)
    assert code == 1 and "generation_config.json is not valid JSON" in err


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_new_tokens": -3}, "generation_config.json: `max_new_tokens` must be greater than 0, but is -3."),
        ({"bad_words_ids": [[5000]]}, "generation_config.json: bad_words_ids holds 5000, which is no token id"),
        ({"eos_token_id": [2, -1]}, "generation_config.json: eos_token_id holds -1, which is no token id"),
        ([1, 2], "generation_config.json holds a JSON list, not an object of settings"),
    ],
)
def test_generate_names_the_generation_config_that_holds_a_bad_value(model_dir, capsys, settings, message):
    """These once failed at generation with transformers' words, blaming the command's own flags (the user gave
    --max-new-tokens 2) or naming no file."""
    (model_dir / "generation_config.json").write_text(json.dumps(settings))
    code, err = run(["generate", str(model_dir), "--prompt", "w1", "--max-new-tokens", "2"], capsys)
    assert code == 1 and message in err and str(model_dir) in err, err


def test_a_model_directory_without_tokenizer_files_is_one_line(tmp_path, corpus, capsys):
    DenseRetNetForCausalLM(tiny_config()).save_pretrained(tmp_path / "bare")
    (tmp_path / "bare" / "tokenizer_config.json").write_text('{"tokenizer_file": "/elsewhere/tokenizer.json"}')
    capsys.readouterr()
    for argv in (["generate", str(tmp_path / "bare"), "--prompt", "w1"], ["eval", "ppl", str(tmp_path / "bare")]):
        code, err = run([*argv, "--data", str(corpus)] if argv[0] == "eval" else argv, capsys)
        assert code == 1 and "has no tokenizer (tokenizer.json / tokenizer.model / vocab.json)" in err
        assert len([line for line in err.splitlines() if "error" in line]) == 1


def test_a_tokenizer_with_custom_code_is_refused_without_asking(model_dir, capsys, monkeypatch):
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["custom.MyTokenizer", None]}
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    (model_dir / "custom.py").write_text("raise SystemExit('custom code ran')\n")
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("asked on the terminal"))
    code, err = run(["generate", str(model_dir), "--prompt", "w1"], capsys)
    assert code == 1 and "never runs code from a model or tokenizer directory" in err


@pytest.mark.parametrize("role", ["pad_token", "eos_token"])
@pytest.mark.parametrize("command", ["generate", "eval"])
def test_a_special_token_beyond_the_vocabulary_is_named(tmp_path, capsys, role, command):
    """A special token tokenizer_config.json names but the vocabulary lacks is added at load, beyond the model's
    ids: eval blamed the whole tokenizer ("not the tokenizer the model was trained with"), and generate ran
    without a word where only the end-of-text token was such."""
    from transformers import PreTrainedTokenizerFast

    from densessm.tokenizer import load_tokenizer

    directory = tmp_path / "model"
    DenseRetNetForCausalLM(tiny_config(vocab_size=4096)).save_pretrained(directory)
    tokenizer: PreTrainedTokenizerFast = load_tokenizer()
    setattr(tokenizer, role, "<added>")  # a new token: id 4096
    tokenizer.save_pretrained(directory)
    (tmp_path / "c.txt").write_text("a b c d e f g\n")
    argv = ["generate", str(directory), "--prompt", "a", "--prompt", "b c"]
    if command == "eval":
        argv = ["eval", "ppl", str(directory), "--data", str(tmp_path / "c.txt")]
    code, err = run(argv, capsys)
    assert code == 1 and f"its {role} '<added>' has id 4096, beyond the model's vocab_size 4096" in err, err


def test_a_shard_index_without_metadata_is_named(tmp_path, capsys, word_tokenizer):
    directory = tmp_path / "model"
    DenseRetNetForCausalLM(tiny_config()).save_pretrained(directory, max_shard_size="20KB")
    word_tokenizer.save_pretrained(directory)
    index_file = directory / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index_file.write_text(json.dumps({"weight_map": index["weight_map"]}))
    code, err = run(["generate", str(directory), "--prompt", "w1"], capsys)
    assert code == 1 and "has no 'metadata' object" in err


def test_ctrl_c_while_the_command_is_still_importing_is_one_line(monkeypatch, capsys):
    import sys

    import densessm_entry

    class Interrupting:
        def find_spec(self, name, path=None, target=None):
            if name == "densessm.cli":
                raise KeyboardInterrupt
            return None

    monkeypatch.delitem(sys.modules, "densessm.cli")
    monkeypatch.setattr(sys, "meta_path", [Interrupting(), *sys.meta_path])
    assert densessm_entry.main() == 130
    assert capsys.readouterr().err.strip() == "densessm: interrupted"


def test_a_reader_that_leaves_early_ends_the_command_quietly():
    import subprocess
    import sys

    command = [sys.executable, "-m", "densessm.cli", "presets"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        process.stdout.readline()
        process.stdout.close()  # as `| head -1` does
        code, err = process.wait(timeout=120), process.stderr.read()
    assert code == 141 and not err.strip()


# --- crafted JSON and long names ----------------------------------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000  # deeper than Python's JSON parser follows (it raises RecursionError)


@pytest.mark.parametrize("name", ["config.json", "generation_config.json", "tokenizer_config.json"])
def test_a_settings_file_nested_too_deep_is_named(model_dir, name, capsys):
    """A crafted settings file whose JSON nests 100,000 deep ended in an internal error (RecursionError)."""
    file = model_dir / name
    settings = json.loads(file.read_text()) if file.is_file() else {}
    file.write_text(json.dumps(settings)[:-1] + (", " if settings else "") + f'"deep": {DEEP}}}')
    code, err = run(["generate", str(model_dir), "--prompt", "w1", "--max-new-tokens", "1"], capsys)
    assert code == 1 and "internal error" not in err, err
    assert f"{file} is not valid JSON: its JSON nests deeper than Python's parser can follow" in err, err


def test_long_names_are_refused_before_the_work_and_fit_when_allowed(model_dir, tmp_path, capsys):
    """The temporary sibling of a long (valid) name was longer than the file system allows, so the write failed
    after the work, naming that sibling; a name that cannot exist at all is refused before the work."""
    stem = tmp_path / ("r" * 248)  # STEM.json is 253 bytes: allowed
    ppl = ["eval", "ppl", str(model_dir), "--data", str(tmp_path / "c.txt"), "--output"]
    code, err = run([*ppl, str(stem)], capsys)
    assert code == 1 and "c.txt" in err  # the missing corpus, not the name
    (tmp_path / "c.txt").write_text(" ".join(f"w{i % 90}" for i in range(60)) + "\n")
    code, err = run([*ppl, str(stem)], capsys)
    assert code == 0, err
    assert json.loads(stem.with_name(stem.name + ".json").read_text())["kind"] == "perplexity"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left
    too_long = tmp_path / ("s" * 252)  # STEM.json would be 257 bytes
    code, err = run([*ppl, str(too_long)], capsys)
    assert code == 2 and "is 257 bytes long, and this file system allows at most 255" in err, err
    demo = tmp_path / ("d" * 255)
    code, err = run(["demo", "--output-dir", str(demo), "--new-tokens", "1"], capsys)
    assert code == 0 and (demo / "config.json").is_file(), err


@pytest.mark.parametrize("kind", ["directory", "dangling symlink"])
def test_weights_that_are_there_but_not_a_file_are_named(model_dir, kind, capsys):
    """A model.safetensors that is a directory, or a symlink to nothing, was reported as no weights at all."""
    weights = model_dir / "model.safetensors"
    weights.unlink()
    if kind == "directory":
        weights.mkdir()
    else:
        weights.symlink_to(model_dir / "gone.safetensors")
    code, err = run(["generate", str(model_dir), "--prompt", "w1", "--max-new-tokens", "1"], capsys)
    expected = "is a symlink to a missing target" if kind != "directory" else "is not a regular file"
    assert code == 1 and f"{weights} {expected}" in err, err


def test_a_saved_dtype_that_is_not_floating_point_is_blamed_on_the_config(model_dir, capsys):
    config = json.loads((model_dir / "config.json").read_text())
    config["dtype"] = "int8"
    (model_dir / "config.json").write_text(json.dumps(config))
    code, err = run(["generate", str(model_dir), "--prompt", "w1", "--max-new-tokens", "1"], capsys)
    assert code == 1 and f"{model_dir / 'config.json'}: dtype 'int8' is not a floating-point dtype" in err, err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "ppl", "M", "--data", "a.txt", "--data", "b.txt"], "argument --data: given more than once; name one"),
        (["generate", "M", "--prompt-file", "a.txt", "--prompt-file", "b.txt"], "argument --prompt-file: given more"),
    ],
)
def test_a_flag_naming_one_input_given_twice_is_refused(model_dir, tmp_path, argv, message, capsys):
    """argparse kept the last value: the first corpus or prompt file was dropped without a word."""
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("w1 w2 w3\n")
    argv = [str(model_dir) if a == "M" else str(tmp_path / a) if a.endswith(".txt") else a for a in argv]
    code, err = run(argv, capsys)
    assert code == 2 and message in err, err


def test_a_model_directory_holding_two_sets_of_weights_is_refused(model_dir, capsys):
    """A sharded save over a single-file one leaves the old model.safetensors, which transformers reads first:
    the CLI generated from the stale weights without a word."""
    model = DenseRetNetForCausalLM.from_pretrained(model_dir)
    model.save_pretrained(model_dir, max_shard_size="20KB")
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "model.safetensors.index.json").is_file()
    code, err = run(["generate", str(model_dir), "--prompt", "w1", "--max-new-tokens", "1"], capsys)
    assert code == 1 and "holds two sets of weights (model.safetensors and model.safetensors.index.json" in err, err


@pytest.mark.parametrize(("place", "message"), [("sub", "in a folder: shards lie beside"), ("..", "outside")])
def test_a_shard_index_naming_a_path_is_refused_naming_why(tmp_path, word_tokenizer, capsys, place, message):
    directory = tmp_path / "model"
    DenseRetNetForCausalLM(tiny_config()).save_pretrained(directory, max_shard_size="20KB")
    word_tokenizer.save_pretrained(directory)
    index_file = directory / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    target = (directory / place / shard).resolve()
    target.parent.mkdir(exist_ok=True)
    (directory / shard).rename(target)
    index["weight_map"] = {k: f"{place}/{v}" if v == shard else v for k, v in index["weight_map"].items()}
    index_file.write_text(json.dumps(index))
    code, err = run(["generate", str(directory), "--prompt", "w1", "--max-new-tokens", "1"], capsys)
    assert code == 1 and f"names the shard '{place}/{shard}' {message}" in err, err


def test_the_version_is_printed(capsys):
    """`densessm --version` was refused as a missing command."""
    with pytest.raises(SystemExit) as done:
        densessm.cli.build_parser().parse_args(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"densessm {densessm.__version__}"


def test_convert_names_a_source_that_is_a_symlink_to_nowhere(tmp_path, capsys):
    (tmp_path / "ref").symlink_to(tmp_path / "gone")
    code, err = run(["convert", str(tmp_path / "ref"), str(tmp_path / "out")], capsys)
    assert code == 1 and "is a symlink that leads nowhere" in err, err


def test_bench_compile_backend_without_compile_is_a_usage_error(tmp_path, capsys, monkeypatch):
    """It was checked and then ignored: the run measured eager steps."""
    _no_measuring(monkeypatch)
    argv = ["bench", "generate", "--compile-backend", "eager", "--out", str(tmp_path / "x")]
    code, err = run(argv, capsys)
    assert (code, err.strip().splitlines()[-1]) == (
        2,
        "densessm bench: error: --compile-backend eager applies with --compile: add it, or drop the backend",
    )


@pytest.fixture
def read_only_dir(tmp_path, monkeypatch) -> Path:
    """A directory that refuses new files as a read-only mount does (root's permission bits refuse nothing)."""
    directory = tmp_path / "ro"
    directory.mkdir()
    (directory / "kept.txt").write_text("user data\n")
    make = densessm.files.tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == directory:
            raise OSError(30, "Read-only file system")
        return make(*args, dir=dir, **kwargs)

    monkeypatch.setattr(densessm.files.tempfile, "mkstemp", mkstemp)
    return directory


def test_a_destination_that_refuses_new_files_is_refused_before_the_work(
    model_dir, corpus, read_only_dir, tmp_path, word_tokenizer, capsys
):
    """A report under a read-only mount (or /proc) failed with a raw errno when it was written, after the whole
    evaluation; the writers' temporary siblings are now tried on the destination's folder first."""
    before = snapshot(read_only_dir)
    tokenizer = tmp_path / "tok"
    word_tokenizer.save_pretrained(tokenizer)
    ref = _write_reference(tmp_path, DenseRetNetForCausalLM(tiny_config()).eval())
    commands = {
        "--output": ["eval", "ppl", str(model_dir), "--data", str(corpus), "--output", str(read_only_dir / "rep")],
        "output directory": ["demo", "--output-dir", str(read_only_dir / "demo")],
        "--output_dir": shlex.split("train --model_name_or_path dense_retnet_tiny --max_steps 1 --tokenizer_name")
        + [str(tokenizer), "--dataset_dir", str(corpus), "--output_dir", str(read_only_dir / "run")],
        "destination": ["convert", str(ref), str(read_only_dir / "new" / "model")],
    }
    for what, argv in commands.items():
        code, err = run(argv, capsys)
        assert code == 2, (argv, err)
        assert f"{what} {read_only_dir}/" in err and f"cannot be written: {read_only_dir} does not accept new " in err
        assert "Read-only file system" in err and err.count("\n") == 1, err
    assert snapshot(read_only_dir) == before


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_a_report_under_proc_is_refused_before_the_evaluation(model_dir, corpus, capsys):
    code, err = run(["eval", "ppl", str(model_dir), "--data", str(corpus), "--output", "/proc/report"], capsys)
    assert code == 2 and "--output /proc/report cannot be written: /proc does not accept new files" in err, err


HOLD_LOCK = """
import sys, time
from densessm.run_state import RunLock
lock = RunLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_overwrite_never_replaces_the_folder_of_a_running_training_run(tmp_path, capsys):
    """``convert --overwrite`` into the folder of a live run deleted its lock, run files and checkpoints while it
    trained on, and a second run was then let in beside the first."""
    from densessm.files import DestinationInUseError, atomic_write_text

    run_dir = tmp_path / "run"
    holder = subprocess.Popen(  # another process holds the run's lock, as `densessm train` does for its lifetime
        [sys.executable, "-c", HOLD_LOCK, str(run_dir)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        (run_dir / "checkpoint-5").mkdir()
        (run_dir / "checkpoint-5" / "model.safetensors").write_bytes(b"weights")
        (run_dir / "notes.txt").write_text("mine")
        before = snapshot(run_dir)
        ref = _write_reference(tmp_path, DenseRetNetForCausalLM(tiny_config()).eval())
        for target in (run_dir, run_dir / "checkpoint-5"):
            code, err = run(["convert", str(ref), str(target), "--overwrite"], capsys)
            assert code == 1, err
            assert (
                f"destination {target} cannot be replaced: {run_dir} is in use by a running densessm command (pid"
                in err
            )
        with pytest.raises(DestinationInUseError, match="is in use by a running densessm command"):
            atomic_write_text(run_dir / "notes.txt", "new", overwrite=True)
        assert snapshot(run_dir) == before
    finally:
        holder.kill()
        holder.wait()
    code, err = run(["convert", str(ref), str(run_dir), "--overwrite"], capsys)  # ended: replaced as asked
    assert code == 0 and (run_dir / "config.json").is_file() and not (run_dir / "notes.txt").exists(), err


def test_a_settings_or_vocabulary_file_that_is_a_device_is_named_as_such(model_dir, tmp_path, capsys):
    """A config.json linked to /dev/zero was reported as missing ("has no config.json"), and so was such a
    tokenizer.json; ``read_json`` of a device read without end."""
    from densessm.files import read_json

    device = Path("/dev/null")
    with pytest.raises(OSError, match=f"^{re.escape(str(device))} is not a regular file \\(a device or a pipe\\)"):
        read_json(device)
    for name, message in (
        ("config.json", "config.json is not a regular file: a model's config.json is a JSON file"),
        ("tokenizer.json", "tokenizer.json is not a regular file: a tokenizer's vocabulary is a file"),
    ):
        broken = tmp_path / f"broken-{name}"
        shutil.copytree(model_dir, broken)
        (broken / name).unlink()
        (broken / name).symlink_to(device)
        code, err = run(["generate", str(broken), "--prompt", "w1", "--max-new-tokens", "1"], capsys)
        assert code == 1 and f"{broken / name}" in err and message in err, err


def test_atomic_write_text_names_bytes_given_as_text(tmp_path):
    from densessm.files import atomic_write_text

    with pytest.raises(TypeError, match=r"^text must be a str, got bytes \(atomic_write_bytes writes bytes\)$"):
        atomic_write_text(tmp_path / "a.txt", b"bytes")
    assert list(tmp_path.iterdir()) == []
