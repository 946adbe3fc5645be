"""Where a benchmark script's results go: ``OUT.json``, ``OUT.md`` and ``OUT.png``, refused before any measuring
if they exist (unless replaced on purpose), written atomically at the end."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from matplotlib.figure import Figure

from densessm.argtypes import path_name
from densessm.files import atomic_output_file, atomic_write_text

SUFFIXES = (".json", ".md", ".png")


def suffixed(out: Path, suffix: str) -> Path:
    """``OUT`` with ``suffix`` appended: ``run.v2`` gives ``run.v2.json``, where ``with_suffix`` would give
    ``run.json`` (another name, and one two stems can share)."""
    return out.with_name(out.name + suffix)


def output_stem(text: str) -> Path:
    """An ``--out`` value as the stem of its files: one of their suffixes, if given, is dropped (``--out
    r.json`` means ``r``); a name ending in a path separator means a folder, which a stem is not."""
    if path_name(text).endswith(("/", os.sep)):
        raise argparse.ArgumentTypeError(
            f"{text} names a folder; --out names a stem for STEM.json, STEM.md and STEM.png (e.g. {text}results)"
        )
    out = Path(text)
    return out.with_suffix("") if out.suffix in SUFFIXES else out


def refuse_existing(out: Path, overwrite: bool) -> None:
    """Stop (naming them) if results at ``out`` exist and ``overwrite`` is not set: before hours of measuring,
    not after."""
    existing = [path for path in (suffixed(out, suffix) for suffix in SUFFIXES) if path.exists()]
    if existing and not overwrite:
        raise SystemExit(f"{', '.join(map(str, existing))} already exist(s); nothing was measured (--overwrite)")


def write_results(out: Path, results: dict, markdown: str, figure: Figure, overwrite: bool) -> None:
    """The results as ``out.json``, the report as ``out.md`` and the figure as ``out.png``, each atomically."""
    atomic_write_text(suffixed(out, ".json"), json.dumps(results, indent=2) + "\n", overwrite=overwrite)
    atomic_write_text(suffixed(out, ".md"), markdown, overwrite=overwrite)
    with atomic_output_file(suffixed(out, ".png"), overwrite=overwrite) as png:
        figure.savefig(png, dpi=120, format="png")


__all__ = ["SUFFIXES", "output_stem", "refuse_existing", "suffixed", "write_results"]
