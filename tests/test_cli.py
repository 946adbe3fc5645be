"""The command line: the README's main job and the preset listing run end to end."""

from __future__ import annotations

from densessm.cli import main


def test_demo_runs(tmp_path, capsys):
    assert main(["demo", "--output-dir", str(tmp_path / "demo"), "--new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "parallel vs recurrent logits" in out and "tokens/s" in out
    assert (tmp_path / "demo" / "model.safetensors").is_file()


def test_presets_listing(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "dense_retnet_350m" in out and "367,630,080" in out


def test_unknown_preset_is_an_error(tmp_path, capsys):
    assert main(["demo", "--preset", "nope", "--output-dir", str(tmp_path)]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
