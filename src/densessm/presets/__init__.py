"""Named model configurations: the reference sizes (350m, 1.3b), their m = 0 twins, and tiny ones for CPU.

Each preset is a JSON file beside this module; ``model_type`` in it selects the configuration class. The
``grid/`` folder holds each family's model shapes for the scales of the dense-vs-plain experiment.
"""

from __future__ import annotations

import json
import re
from importlib import resources

from transformers import AutoConfig, PreTrainedConfig


def list_presets() -> list[str]:
    """Names of the bundled presets."""
    files = resources.files(__package__).iterdir()
    return sorted(f.name.removesuffix(".json") for f in files if f.name.endswith(".json"))


def load_preset(name: str, **overrides) -> PreTrainedConfig:
    """The configuration of preset ``name``, with ``overrides`` applied."""
    import densessm  # noqa: F401  (registers our model types with AutoConfig)

    available = list_presets()
    if name not in available:
        raise ValueError(f"unknown preset {name!r}: available presets are {', '.join(available)}")
    fields = json.loads(resources.files(__package__).joinpath(f"{name}.json").read_text())
    fields.update(overrides)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


_GRID_NAME = re.compile(r"[a-z0-9]+(_[a-z0-9]+)*")


def load_grid_shape(family: str, scale: str) -> dict | None:
    """Family ``family``'s dense model at scale ``scale`` of the dense-vs-plain experiment, or None when the
    family sits that scale out: ``grid/<family>_<scale>.json`` (format in ``grid/README.md``).

    Returns ``{"dense": fields, "widen": steps}``: ``fields`` shape the dense model (laid over the family's
    tiny preset); ``steps`` name the fields that keep their ratio to ``hidden_size`` when the ``m = 0`` twin
    is widened to the same size, each rounded to a multiple of its step. Data, not code, so that a new family
    joins the experiment with its presets.
    """
    for what, name in (("family", family), ("scale", scale)):
        if not isinstance(name, str) or not _GRID_NAME.fullmatch(name):
            raise ValueError(f"{what} must be a lower-case name (letters, digits and _), got {name!r}")
    file = resources.files(__package__).joinpath("grid", f"{family}_{scale}.json")
    if not file.is_file():
        return None
    where = f"grid shape {family}_{scale}.json"
    try:
        shape = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{where} is not valid JSON: {err}") from None
    if not isinstance(shape, dict) or set(shape) != {"dense", "widen"}:
        found = sorted(shape) if isinstance(shape, dict) else type(shape).__name__
        raise ValueError(f"{where} must be an object with exactly the keys dense and widen, got {found}")
    dense, widen = shape["dense"], shape["widen"]
    hidden = dense.get("hidden_size") if isinstance(dense, dict) else None
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
        raise ValueError(f"{where}: dense must be an object of configuration fields with a positive hidden_size")
    if not isinstance(widen, dict):
        raise ValueError(f"{where}: widen must be an object of field: step, got {type(widen).__name__}")
    for name, step in widen.items():
        if name == "hidden_size":  # the width searched over; a step for it would be overwritten without effect
            raise ValueError(
                f"{where}: widen.hidden_size is the width the search varies; widen names the fields that follow it"
            )
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (step, dense.get(name))):
            raise ValueError(
                f"{where}: widen.{name} must be a positive integer step for a positive integer field "
                f"of dense, got {step!r} for {name} = {dense.get(name)!r}"
            )
    return shape


__all__ = ["list_presets", "load_grid_shape", "load_preset"]
