"""Named model configurations: the reference sizes (350m, 1.3b), their m = 0 twins, and tiny ones for CPU.

Each preset is a JSON file beside this module; ``model_type`` in it selects the configuration class.
"""

from __future__ import annotations

import json
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


__all__ = ["list_presets", "load_preset"]
