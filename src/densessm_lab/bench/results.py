"""Where a benchmark script's results go: ``OUT.json``, ``OUT.md`` and ``OUT.png``, refused before any measuring
if they exist (unless replaced on purpose), written atomically at the end."""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.figure import Figure

from densessm.files import atomic_output_file, atomic_write_text

SUFFIXES = (".json", ".md", ".png")


def refuse_existing(out: Path, overwrite: bool) -> None:
    """Stop (naming them) if results at ``out`` exist and ``overwrite`` is not set: before hours of measuring,
    not after."""
    existing = [path for path in (out.with_suffix(suffix) for suffix in SUFFIXES) if path.exists()]
    if existing and not overwrite:
        raise SystemExit(f"{', '.join(map(str, existing))} already exist(s); nothing was measured (--overwrite)")


def write_results(out: Path, results: dict, markdown: str, figure: Figure, overwrite: bool) -> None:
    """The results as ``out.json``, the report as ``out.md`` and the figure as ``out.png``, each atomically."""
    atomic_write_text(out.with_suffix(".json"), json.dumps(results, indent=2) + "\n", overwrite=overwrite)
    atomic_write_text(out.with_suffix(".md"), markdown, overwrite=overwrite)
    with atomic_output_file(out.with_suffix(".png"), overwrite=overwrite) as png:
        figure.savefig(png, dpi=120, format="png")


__all__ = ["SUFFIXES", "refuse_existing", "write_results"]
