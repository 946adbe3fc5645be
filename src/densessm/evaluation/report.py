"""Evaluation reports as a JSON record and a markdown table, ready to drop into ``docs/``.

A report is the dict that :func:`~densessm.evaluation.perplexity.evaluate_perplexity` or
:func:`~densessm.evaluation.harness.run_tasks` returns, plus the ``command`` that produced it, the
``date`` and the ``versions``, which :func:`finish_report` adds.
"""

from __future__ import annotations

import json
import platform
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from densessm.files import atomic_write_text

VERSIONED = ("densessm", "torch", "transformers", "datasets", "lm_eval")


def finish_report(report: dict, command: str) -> dict:
    """Add the command line that produced ``report``, the date and the versions that matter."""
    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = version(name.replace("_", "-"))
        except PackageNotFoundError:
            continue
    return report | {
        "command": command,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": versions | {"python": platform.python_version()},
    }


def _number(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}" if abs(value) < 1e6 else f"{value:.3e}"


def perplexity_table(report: dict) -> str:
    rows = [
        "| method | window | stride | tokens scored | tokens read | perplexity | bits per byte | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        stride = "–" if r["method"] == "carried" else f"{r['stride']:,d}"
        rows.append(
            f"| {r['method']} | {r['window']:,d} | {stride} | {r['tokens']:,d} | {r['forward_tokens']:,d} | "
            f"{_number(r['perplexity'], 3)} | {_number(r['bits_per_byte'])} | {r['seconds']:.1f} |"
        )
    return "\n".join(rows)


def tasks_table(report: dict) -> str:
    rows = [
        "| task | split | examples | metric | value | ± stderr | random guess |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for name, task in report["tasks"].items():
        examples = f"{task['examples']:,d} of {task['of']:,d}"
        for metric, result in task["metrics"].items():
            guess = _number(task["random_guess"]) if metric.startswith("acc") else "–"
            rows.append(
                f"| {name} | {task['split']} | {examples} | {metric} | {_number(result['value'])} | "
                f"{_number(result['stderr'])} | {guess} |"
            )
    return "\n".join(rows)


def render_markdown(report: dict) -> str:
    """A markdown section: what was measured, the table, and the command that produced it."""
    if report["kind"] == "perplexity":
        head = (
            f"Perplexity of `{report['model']}` on `{report['data']}`: {report['documents']:,d} documents, "
            f"{report['tokens']:,d} tokens scored, {report['bytes']:,d} UTF-8 bytes; batch size "
            f"{report['batch_size']}, dtype {report['dtype']}, device {report['device']}."
        )
        table = perplexity_table(report)
    else:
        limit = report["limit"]
        if limit is None:
            limit = "all documents"
        else:
            limit = f"the first {limit:.0%} of each task" if limit < 1 else f"at most {limit} documents per task"
        head = (
            f"Zero-shot accuracy of `{report['model']}` (lm-evaluation-harness {report['lm_eval']}, `hf` model, "
            f"{limit}, batch size {report['batch_size']}, dtype {report['dtype']}, device {report['device']})."
        )
        table = tasks_table(report)
    lines = [head, "", table]
    if "command" in report:
        versions = ", ".join(f"{k} {v}" for k, v in report["versions"].items())
        lines += ["", f"Produced on {report['date']} by", "", "```", report["command"], "```", "", versions]
    return "\n".join(lines) + "\n"


def report_paths(stem: str | Path) -> tuple[Path, Path]:
    """``stem.json`` and ``stem.md``."""
    stem = Path(stem)
    return stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".md")


def write_report(report: dict, stem: str | Path, overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``stem.json`` and ``stem.md`` (each atomically; an existing one only with ``overwrite``)."""
    json_path, md_path = report_paths(stem)
    if not overwrite:
        for path in (json_path, md_path):
            if path.exists():
                raise FileExistsError(f"{path} already exists; nothing was written (pass --overwrite to replace it)")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json_path, json.dumps(report, indent=2) + "\n", overwrite=True)
    atomic_write_text(md_path, render_markdown(report), overwrite=True)
    return json_path, md_path
