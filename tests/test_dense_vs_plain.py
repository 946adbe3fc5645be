"""The dense-vs-plain experiment: held-out subsets, matched grid configurations, the statistics of the report,
and the whole pipeline (tokenizer, every family's dense and plain models, train, score, report, restart) at the
smoke scale on a tiny corpus."""

from __future__ import annotations

import json
import lzma
import math
import os
import subprocess
import sys
from dataclasses import replace

import pytest

from densessm.cli import main as cli_main
from densessm.data import BUNDLED_CORPUS
from densessm.models import FAMILIES
from densessm.presets import load_grid_shape
from densessm.tokenizer import train_bpe
from densessm_lab.experiments.dense_vs_plain import (
    SCALES,
    grid,
    grid_configs,
    grid_seconds,
    held_out_subset,
    model_names,
)
from densessm_lab.experiments.matching import non_embedding_parameters
from densessm_lab.experiments.results import compare


def sotu(n: int, start: int = 0) -> list[dict]:
    with lzma.open(BUNDLED_CORPUS / "sotu.jsonl.xz", "rt", encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    return [{"text": d["text"][:3000]} for d in docs[start : start + n]]


def test_held_out_subset_is_seeded_capped_and_in_order():
    docs = [{"text": "x" * (10 + i)} for i in range(50)]
    subset = held_out_subset(docs, 100)
    assert subset == held_out_subset(docs, 100)  # deterministic
    assert subset != docs[: len(subset)]  # sampled across the split, not its head
    size = sum(len(d["text"]) for d in subset)
    assert 100 <= size < 100 + 60  # stops at the first document past the cap
    assert subset == sorted(subset, key=docs.index)  # kept in corpus order
    assert held_out_subset(docs, None) is docs
    assert len(held_out_subset(docs, 1)) == 1  # at least one document, even under a tiny cap


def test_grid_configs_match_the_baselines_within_two_percent():
    tokenizer = train_bpe((d["text"] for d in sotu(5)), 300)
    for name in ("smoke", "cpu"):
        configs = grid_configs(SCALES[name], tokenizer)
        assert [m.family.name for m in SCALES[name].members()] == [f.name for f in FAMILIES]
        for dense, plain in (model_names(f) for f in FAMILIES):
            assert configs[dense].dense_block_layers == 2 and configs[plain].dense_block_layers == 0
            target = non_embedding_parameters(configs[dense])
            assert abs(non_embedding_parameters(configs[plain]) - target) <= 0.02 * target
            assert configs[plain].hidden_size > configs[dense].hidden_size  # widened to pay for the gates
            assert configs[dense].vocab_size == configs[plain].vocab_size == len(tokenizer)
        # Mamba's derived widths follow the scale's hidden size (not the preset's).
        mamba = configs["dense_mamba"]
        assert mamba.intermediate_size == mamba.expand * mamba.hidden_size
        assert mamba.hidden_size == load_grid_shape("mamba", name)["dense"]["hidden_size"]
        # Mamba-2's heads are widened with the model: num_heads x head_dim stays expand x hidden_size.
        for model in ("dense_mamba2", "mamba2"):
            m2 = configs[model]
            assert m2.num_heads * m2.head_dim == m2.expand * m2.hidden_size


def test_grid_order_is_seed_major(tmp_path):
    runs = grid(tmp_path, SCALES["smoke"], (0, 1))
    assert [(r.model, r.seed) for r in runs] == [
        (model, seed) for seed in (0, 1) for family in FAMILIES for model in model_names(family)
    ]
    assert [r.model for r in runs[:6]] == ["dense_retnet", "retnet", "dense_mamba", "mamba", "dense_mamba2", "mamba2"]
    assert not any(r.done for r in runs)


def _model(ppls: list[float]) -> dict:
    runs = [{"seed": s, "test": {"perplexity": p}} for s, p in enumerate(ppls)]
    mean = sum(ppls) / len(ppls)
    std = math.sqrt(sum((p - mean) ** 2 for p in ppls) / (len(ppls) - 1)) if len(ppls) > 1 else 0.0
    return {"runs": runs, "test_perplexity": (mean, std), "test_loss": (math.log(mean), std / mean)}


def test_compare_measures_the_difference_against_the_noise():
    out = compare(_model([10.0, 11.0, 12.0]), _model([13.0, 14.0, 15.0]))
    ppl = out["test_perplexity"]
    assert ppl["difference"] == pytest.approx(3.0)
    assert ppl["sigma_diff"] == pytest.approx(math.sqrt(2 / 3))
    assert ppl["z"] == pytest.approx(3.0 / math.sqrt(2 / 3))
    assert ppl["beyond_2_sigma_diff"] and ppl["beyond_2_sigma_seed"]  # 3 > 2 x 1
    assert out["paired_test_perplexity"] == {0: 3.0, 1: 3.0, 2: 3.0}
    close = compare(_model([10.0, 12.0, 14.0]), _model([11.0, 13.0, 15.0]))["test_perplexity"]
    assert not close["beyond_2_sigma_diff"] and not close["beyond_2_sigma_seed"]
    lone = compare(_model([10.0]), _model([13.0, 14.0]))
    assert lone["test_perplexity"]["z"] is None and lone["test_perplexity"]["beyond_2_sigma_diff"] is None
    assert lone["dense_better_seeds"] == [1, 1]


def test_the_planned_grid_time_is_never_below_its_longest_run():
    """``--plan`` divided the summed run times by ``--jobs``: with more jobs than runs it promised a grid shorter
    than one run (0.01 h for 37-minute runs with --jobs 1000)."""
    per_run = {"dense": 100.0, "plain": 60.0}
    assert grid_seconds(per_run, seeds=3, jobs=1000) == 100.0  # all six at once: the longest run
    assert grid_seconds(per_run, seeds=3, jobs=1) == 480.0
    assert grid_seconds(per_run, seeds=3, jobs=2) == 260.0  # 100, 100, 60 on one slot; 60, 100, 60 on the other
    assert grid_seconds(per_run, seeds=1, jobs=4) == 100.0


ARGUMENT_ERRORS = {
    "negative seed": (["--seeds=-5"], "argument --seeds: seeds must be in [0, 2**32), got -5"),
    "seed too large": (["--seeds", f"0,{2**32}"], f"argument --seeds: seeds must be in [0, 2**32), got {2**32}"),
    "steps not a number": (["--max-steps", "abc"], "argument --max-steps: expected an integer, got 'abc'"),
    "no jobs": (["--jobs", "0"], "argument --jobs: must be a positive integer, got 0"),
    "no seed": (["--seeds", ""], "argument --seeds: expected at least one seed (comma-separated integers), got ''"),
    "a seed twice": (["--seeds", "1,1"], "argument --seeds: expected distinct seeds, got '1,1'"),
}


@pytest.mark.parametrize("name", ["plan.md", "densessm_grid.md"])
def test_a_report_named_as_a_file_of_the_grid_is_refused(tmp_path, capsys, name):
    """--report OUT/plan.md wrote its data as OUT/plan.json, over the grid's own plan (its next start then refused
    the folder as no grid of this command)."""
    out = tmp_path / "grid"
    argv = ["experiment", "dense-vs-plain", "--scale", "smoke", "--output-dir", str(out), "--overwrite"]
    assert cli_main([*argv, "--report", str(out / name)]) == 2
    json_name = name.removesuffix(".md") + ".json"
    message = f"would write {out / json_name}, a file of the grid itself in --output-dir {out}: choose another name"
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(message)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", list(ARGUMENT_ERRORS))
def test_values_a_run_would_refuse_hours_later_are_usage_errors_at_parse_time(tmp_path, capsys, case):
    flags, message = ARGUMENT_ERRORS[case]
    argv = ["experiment", "dense-vs-plain", "--scale", "smoke", "--output-dir", str(tmp_path / "grid"), *flags]
    assert cli_main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f"error: {message}")
    assert list(tmp_path.iterdir()) == []


def test_an_output_dir_that_is_or_lies_under_a_file_is_refused_before_any_work(tmp_path, capsys):
    taken = tmp_path / "notes.txt"
    taken.write_bytes(b"mine\n")
    for given, message in (
        (taken, f"--output-dir {taken} is a file, not a directory"),
        (taken / "grid", f"--output-dir {taken / 'grid'} cannot be created: {taken} is a file, not a directory"),
    ):
        assert cli_main(["experiment", "dense-vs-plain", "--corpus", str(tmp_path), "--output-dir", str(given)]) == 2
        assert capsys.readouterr().err.strip() == f"densessm experiment: error: {message}"
    assert taken.read_bytes() == b"mine\n" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_report_file_that_is_a_broken_symlink_is_refused_before_any_work(tmp_path, capsys):
    """The report's .json and -curves.png siblings too: found hours later they would lose the grid's report."""
    (tmp_path / "r.json").symlink_to(tmp_path / "r.json")
    (tmp_path / "r-curves.png").symlink_to(tmp_path / "nowhere" / "x.png")
    argv = [
        "experiment",
        "dense-vs-plain",
        "--corpus",
        str(tmp_path / "corpus"),
        "--output-dir",
        str(tmp_path / "grid"),
    ]
    assert cli_main([*argv, "--report", str(tmp_path / "r.md")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"densessm experiment: error: --report {tmp_path / 'r.json'} is a symlink loop; name another path"
    )
    (tmp_path / "r.json").unlink()
    assert cli_main([*argv, "--report", str(tmp_path / "r.md")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"densessm experiment: error: --report {tmp_path / 'r-curves.png'} is a symlink to a missing target "
        f"({tmp_path / 'nowhere' / 'x.png'}); name another path"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r-curves.png"]


def test_an_output_dir_in_the_corpus_is_refused_before_any_work(tmp_path, capsys):
    """The runs would write tokenizer/, models/ and the token cache among the data they read."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "train.jsonl").write_text('{"text": "a"}\n')
    for given in (corpus, corpus / "grid"):
        argv = ["experiment", "dense-vs-plain", "--corpus", str(corpus), "--output-dir", str(given)]
        assert cli_main([*argv, "--report", str(tmp_path / "r.md")]) == 2
        assert capsys.readouterr().err.strip() == (
            f"densessm experiment: error: --output-dir {given} is the corpus directory {corpus} or lies inside it: "
            "the runs would write among the data they read; choose another directory"
        )
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["corpus", "train.jsonl"]


def test_a_report_in_the_corpus_is_refused_even_with_overwrite(tmp_path, capsys):
    """--report CORPUS/train.jsonl --overwrite would have replaced the training data with the report's JSON."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "train.jsonl").write_text('{"text": "a"}\n')
    argv = ["experiment", "dense-vs-plain", "--corpus", str(corpus), "--output-dir", str(tmp_path / "grid")]
    assert cli_main([*argv, "--report", str(corpus / "train.md"), "--overwrite"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"densessm experiment: error: --report {corpus / 'train.md'} would write {corpus / 'train.md'} inside the "
        f"corpus directory {corpus}: choose another path"
    )
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["corpus", "train.jsonl"]


def test_a_corpus_that_is_a_file_is_named_as_such(tmp_path, capsys):
    """--corpus train.jsonl was reported as a missing train.jsonl/train.jsonl."""
    (tmp_path / "train.jsonl").write_text('{"text": "a"}\n')
    argv = ["experiment", "dense-vs-plain", "--corpus", str(tmp_path / "train.jsonl"), "--output-dir"]
    assert cli_main([*argv, str(tmp_path / "g"), "--report", str(tmp_path / "r.md")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"densessm experiment: error: --corpus {tmp_path / 'train.jsonl'} is a file; it names the directory of "
        "train/validation/test.jsonl that scripts/build_experiment_corpus.py writes"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.jsonl"]


@pytest.mark.parametrize("name", ["rep.json", "run.v2", "report"])
def test_a_report_not_named_as_markdown_is_refused(tmp_path, capsys, name):
    """Its data went to ``with_suffix(".json")``: for rep.json the report's own path (the Markdown then replaced
    the data), for run.v2 a run.json the user never named."""
    (tmp_path / "run.json").write_text("a user's file")
    argv = ["experiment", "dense-vs-plain", "--corpus", str(tmp_path / "c"), "--output-dir", str(tmp_path / "g")]
    assert cli_main([*argv, "--report", str(tmp_path / name), "--overwrite"]) == 2
    assert f"--report {tmp_path / name} must name a Markdown file ending in .md" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_an_output_dir_holding_files_of_no_grid_is_refused(tmp_path, capsys):
    """A folder without the grid's plan (a user's, with its own tokenizer/) had its tokenizer replaced by the
    grid's BPE."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for split in ("train", "validation", "test"):
        (corpus / f"{split}.jsonl").write_text('{"text": "a b c"}\n')
    mine = tmp_path / "mine"
    (mine / "tokenizer").mkdir(parents=True)
    (mine / "tokenizer" / "tokenizer.json").write_text("my tokenizer")
    argv = ["experiment", "dense-vs-plain", "--corpus", str(corpus), "--output-dir", str(mine), "--scale", "smoke"]
    assert cli_main([*argv, "--report", str(tmp_path / "r.md"), "--tasks-limit", "0"]) == 1
    assert f"--output-dir {mine} holds files but no grid of this command (no plan.json)" in capsys.readouterr().err
    assert (mine / "tokenizer" / "tokenizer.json").read_text() == "my tokenizer"
    assert sorted(p.name for p in mine.rglob("*")) == ["tokenizer", "tokenizer.json"]


def test_a_corpus_split_linked_from_outside_is_refused(tmp_path, capsys):
    """A train.jsonl that is a link out of the corpus directory was read (every other corpus directory refuses
    such links)."""
    corpus, elsewhere = tmp_path / "corpus", tmp_path / "elsewhere"
    corpus.mkdir()
    elsewhere.mkdir()
    (elsewhere / "train.jsonl").write_text('{"text": "a b c"}\n')
    (corpus / "train.jsonl").symlink_to(elsewhere / "train.jsonl")
    for split in ("validation", "test"):
        (corpus / f"{split}.jsonl").write_text('{"text": "a b c"}\n')
    argv = ["experiment", "dense-vs-plain", "--corpus", str(corpus), "--output-dir", str(tmp_path / "g")]
    assert cli_main([*argv, "--report", str(tmp_path / "r.md"), "--tasks-limit", "0"]) == 1
    err = capsys.readouterr().err
    assert f"'train.jsonl' (in {corpus}) leads outside it, to {elsewhere / 'train.jsonl'}: refused" in err
    assert not (tmp_path / "g").exists()


def test_two_grids_in_one_folder_at_once_are_refused(tmp_path, capsys):
    """Two grids in one --output-dir collided on their runs' files, the second failing with an internal error."""
    from densessm.run_state import RunLock

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for split in ("train", "validation", "test"):
        (corpus / f"{split}.jsonl").write_text('{"text": "a b c"}\n')
    holder = RunLock(tmp_path / "g", what="experiment grid", flag="--output-dir")
    holder.acquire()
    try:
        argv = ["experiment", "dense-vs-plain", "--corpus", str(corpus), "--output-dir", str(tmp_path / "g")]
        assert cli_main([*argv, "--report", str(tmp_path / "r.md"), "--tasks-limit", "0"]) == 1
    finally:
        holder.release()
    err = capsys.readouterr().err
    assert f"{tmp_path / 'g'} is in use by another experiment grid (pid {os.getpid()}" in err
    assert "choose another --output-dir" in err


def test_task_data_given_where_no_tasks_run_is_checked_and_said_unused(tmp_path, capsys):
    """At a scale without zero-shot tasks a --task-data that does not exist was ignored without a word."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for split in ("train", "validation", "test"):
        (corpus / f"{split}.jsonl").write_text('{"text": "a b c"}\n')
    argv = ["experiment", "dense-vs-plain", "--corpus", str(corpus), "--output-dir", str(tmp_path / "g")]
    argv += ["--report", str(tmp_path / "r.md"), "--scale", "smoke", "--tasks-limit", "0"]
    assert cli_main([*argv, "--task-data", str(tmp_path / "nowhere")]) == 1
    assert f"task data folder {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()


def test_a_missing_corpus_is_named_before_the_output_dir_is_created(tmp_path, capsys):
    argv = ["experiment", "dense-vs-plain", "--corpus", str(tmp_path / "corpus"), "--output-dir", str(tmp_path / "g")]
    assert cli_main([*argv, "--scale", "smoke", "--report", str(tmp_path / "r.md")]) == 1
    assert f"{tmp_path / 'corpus' / 'train.jsonl'} is missing: build the corpus first" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_smoke_grid_end_to_end_and_restart(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for split, (n, start) in {"train": (12, 0), "validation": (3, 12), "test": (3, 15)}.items():
        (corpus / f"{split}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in sotu(n, start)))
    out, report = tmp_path / "grid", tmp_path / "docs" / "result.md"
    argv = [sys.executable, "-m", "densessm.cli", "experiment", "dense-vs-plain", "--scale", "smoke"]
    argv += ["--corpus", str(corpus), "--output-dir", str(out), "--report", str(report), "--seeds", "0", "--jobs", "2"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "0 of 6 runs already done" in done.stdout

    data = json.loads(report.with_suffix(".json").read_text())
    assert set(data["models"]) == {"dense_retnet", "retnet", "dense_mamba", "mamba", "dense_mamba2", "mamba2"}
    for model in data["models"].values():
        (run,) = model["runs"]
        assert run["train"]["num_input_tokens_seen"] == replace(SCALES["smoke"], seeds=(0,)).tokens_per_run
        assert math.isfinite(run["test"]["perplexity"]) and run["test"]["tokens"] > 100
        assert len(run["curve"]["validation"]) == 2  # every eval_steps = 3 of 6 steps
    assert set(data["comparisons"]) == {"retnet", "mamba", "mamba2"}
    text = report.read_text()
    assert "## Is the difference beyond the noise?" in text and "--seeds 0" in text
    assert (report.parent / "result-curves.png").stat().st_size > 10_000
    assert not list(out.glob("runs/*/seed0/checkpoint-*"))  # finished runs keep only their final weights
    assert (out / "reports" / "dense_retnet" / "seed0" / "ppl_test.json").is_file()  # beside the model, not in it

    written = {path: path.read_bytes() for path in report.parent.iterdir()}
    refused = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900)
    assert refused.returncode == 1 and "already exist(s); nothing was run" in refused.stderr
    assert {path: path.read_bytes() for path in report.parent.iterdir()} == written

    other = [*argv, "--max-steps", "7", "--report", str(tmp_path / "other.md")]
    mixed = subprocess.run(other, capture_output=True, text=True, env=env, timeout=900)
    assert mixed.returncode == 1 and "holds a grid started with other settings (max_steps: 6 -> 7)" in mixed.stderr

    result = out / "runs" / "dense_retnet" / "seed0" / "result.json"
    before = result.stat().st_mtime_ns
    again = subprocess.run([*argv, "--overwrite"], capture_output=True, text=True, env=env, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "6 of 6 runs already done; running 0" in again.stdout
    assert result.stat().st_mtime_ns == before  # nothing was trained again


def _edit_grid_shape(monkeypatch, family: str, part: str, **fields) -> None:
    """Lay ``fields`` over ``part`` ("dense" or "widen") of ``family``'s grid shapes, as a hand-edited file would."""
    import densessm_lab.experiments.dense_vs_plain as experiment

    real = experiment.load_grid_shape

    def edited(name, scale):
        shape = real(name, scale)
        if name == family and shape is not None:
            shape = {**shape, part: {**shape[part], **fields}}
        return shape

    monkeypatch.setattr(experiment, "load_grid_shape", edited)


def test_a_grid_shape_the_configuration_rejects_is_one_line_naming_the_file(monkeypatch):
    _edit_grid_shape(monkeypatch, "mamba2", "dense", head_dim=47)
    tokenizer = train_bpe((d["text"] for d in sotu(2)), 300)
    with pytest.raises(ValueError) as error:
        grid_configs(SCALES["smoke"], tokenizer)
    message = str(error.value)
    assert message.startswith(
        "grid shape mamba2_smoke.json (the mamba2 model at scale smoke) is no valid DenseMamba2Config: "
    ), message
    assert message.endswith("must equal num_heads * head_dim (94)") and "\n" not in message, message


def test_a_grid_shape_naming_a_field_the_configuration_lacks_is_refused(monkeypatch):
    """A misspelt field in a shape file would be stored in the config and change nothing: named instead."""
    _edit_grid_shape(monkeypatch, "mamba", "dense", typo_layers=5)
    tokenizer = train_bpe((d["text"] for d in sotu(2)), 300)
    with pytest.raises(
        ValueError, match="^grid shape mamba_smoke.json names fields DenseMambaConfig does not have: typo_layers$"
    ):
        grid_configs(SCALES["smoke"], tokenizer)


@pytest.mark.parametrize("part", ["dense", "widen"])
def test_a_grid_shape_naming_another_family_is_refused(monkeypatch, part):
    """A model_type in a shape was dropped without a word (the family's class decides it)."""
    _edit_grid_shape(monkeypatch, "mamba2", part, model_type="dense_retnet")
    tokenizer = train_bpe((d["text"] for d in sotu(2)), 300)
    with pytest.raises(ValueError) as error:
        grid_configs(SCALES["smoke"], tokenizer)
    assert str(error.value) == (
        "grid shape mamba2_smoke.json sets model_type, which the file's name decides (the mamba2 family): remove "
        "them from the file"
    )


@pytest.mark.parametrize("field", ["dense_block_layers", "vocab_size"])
def test_a_grid_shape_setting_a_field_the_grid_decides_is_refused(monkeypatch, field):
    """A shape holding m = 0 would make the "dense" model its plain twin, and the report plain-vs-plain."""
    _edit_grid_shape(monkeypatch, "mamba", "dense", **{field: 0 if field == "dense_block_layers" else 10})
    tokenizer = train_bpe((d["text"] for d in sotu(2)), 300)
    with pytest.raises(ValueError) as error:
        grid_configs(SCALES["smoke"], tokenizer)
    assert str(error.value) == (
        f"grid shape mamba_smoke.json sets {field}, which the grid decides (m, the tokenizer's vocabulary and "
        "special tokens, the position limit): remove them from the file"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "grid shape x_y.json is not valid JSON: "),
        ('{"dense": {"hidden_size": 8}}', "must be an object with exactly the keys dense and widen"),
        ('{"dense": {"hidden_size": 0}, "widen": {}}', "dense must be an object of configuration fields with a posi"),
        ('{"dense": {"hidden_size": 8}, "widen": []}', "widen must be an object of field: step, got list"),
        ('{"dense": {"hidden_size": 8}, "widen": {"hidden_size": 2}}', "widen.hidden_size is the width the search"),
        ('{"dense": {"hidden_size": 8}, "widen": {"head_dim": 2}}', "widen.head_dim must be a positive integer step"),
    ],
)
def test_a_grid_shape_file_that_cannot_work_is_named(monkeypatch, tmp_path, text, message):
    import densessm.presets

    (tmp_path / "grid").mkdir()
    (tmp_path / "grid" / "x_y.json").write_text(text)
    monkeypatch.setattr(densessm.presets.resources, "files", lambda package: tmp_path)
    with pytest.raises(ValueError) as error:
        load_grid_shape("x", "y")
    assert message in str(error.value)


def test_a_bad_grid_shape_is_refused_before_the_tokenizer_is_trained(monkeypatch, tmp_path):
    """The shape checks ran after the BPE training (minutes at the larger scales) and left its folders behind."""
    import densessm_lab.experiments.dense_vs_plain as experiment

    def no_training(*args, **kwargs):
        raise AssertionError("the tokenizer was trained before the grid shapes were checked")

    _edit_grid_shape(monkeypatch, "mamba", "dense", typo_layers=5)
    monkeypatch.setattr(experiment, "train_bpe", no_training)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for split in experiment.SPLITS:
        (corpus / f"{split}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in sotu(2)))
    out = tmp_path / "grid"
    with pytest.raises(ValueError, match="^grid shape mamba_smoke.json names fields DenseMambaConfig does not have"):
        experiment.prepare(corpus, out, SCALES["smoke"])
    assert not out.exists()


def test_ctrl_c_stops_the_grid_without_starting_the_queued_runs(tmp_path, monkeypatch):
    """The executor's exit ran every queued run after Ctrl-C: the experiment went on training and evaluating
    without a word until it was killed."""
    import densessm_lab.experiments.dense_vs_plain as exp
    from densessm.errors import Interrupted

    started = []

    def execute(corpus, out, scale, run, threads, task_data=None):
        started.append(run.model)
        raise KeyboardInterrupt  # as _subprocess raises when the run's command exits 130

    monkeypatch.setattr(exp, "execute", execute)
    scale = SCALES["smoke"]
    with pytest.raises(Interrupted, match="experiment stopped: finished runs keep their result.json"):
        list(exp.run_grid(tmp_path, tmp_path / "out", scale, [0, 1], jobs=1))
    assert len(started) == 1


@pytest.mark.parametrize(("code", "error"), [(130, KeyboardInterrupt), (-2, KeyboardInterrupt), (1, RuntimeError)])
def test_a_command_of_the_grid_that_was_interrupted_stops_its_worker(tmp_path, monkeypatch, code, error):
    import densessm_lab.experiments.dense_vs_plain as exp

    class Finished:
        def __init__(self, argv, **kwargs):
            assert argv[1:3] == ["-m", "densessm_entry"]  # the console script's guard against Ctrl-C on import

        def wait(self, timeout=None):
            return code

    monkeypatch.setattr(exp.subprocess, "Popen", Finished)
    with pytest.raises(error, match=r"`densessm train \.\.\.` (was interrupted|failed \(exit 1\)); see "):
        exp._subprocess(["train"], tmp_path / "log", 1)
