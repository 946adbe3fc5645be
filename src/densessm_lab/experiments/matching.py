"""Equal-size comparisons: widen a plain baseline until it has as many non-embedding parameters as its dense twin.

The paper compares DenseSSM models with baselines "of similar size". The dense gates (and, for DenseRetNet, the
k/v norms) add parameters, so a fair baseline with ``m = 0`` must be made a little wider to pay for them. Embedding
and output-head parameters are left out of the count: they scale with the vocabulary, not with the architecture.

Widening knows no family: it changes ``hidden_size``; the fields a configuration derives from it (Mamba's
``intermediate_size``) are derived again, and the fields named in ``widths`` (a family's grid shape says which:
RetNet's ``query_key_dim``, Mamba-2's ``head_dim``) keep their ratio to it, each rounded to a multiple of its
step. A width the configuration refuses is skipped.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers import AutoModelForCausalLM, PreTrainedConfig

import densessm  # noqa: F401  (registers our model types with the Auto classes)

EMBEDDING_NAMES = ("embed_tokens", "embeddings", "lm_head")


def non_embedding_parameters(config: PreTrainedConfig) -> int:
    """Parameters of the model ``config`` builds, without its token embeddings and LM head (counted on the meta
    device: nothing is allocated)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for name, p in model.named_parameters() if not any(e in name for e in EMBEDDING_NAMES))


def _rebuild(config_class: type[PreTrainedConfig], fields: dict) -> PreTrainedConfig | None:
    """``config_class(**fields)``, or None when the configuration refuses them."""
    try:
        return config_class(**fields)
    except Exception:  # a shape the configuration rejects, whatever its validators raise
        return None


def explicit_fields(config: PreTrainedConfig) -> dict:
    """The fields of ``config`` that build it again, without those it derives from the others or holds at their
    defaults: a copy at another ``hidden_size`` built from them derives those again (Mamba's
    ``intermediate_size = expand * hidden_size``, ``time_step_rank``)."""
    full = config.to_dict()
    fields = dict(full)
    for name in full:
        if name in ("model_type", "hidden_size"):
            continue
        fewer = {k: v for k, v in fields.items() if k != name}
        rebuilt = _rebuild(type(config), fewer)
        if rebuilt is not None and rebuilt.to_dict() == full:
            fields = fewer
    return fields


def _candidate(
    config_class: type[PreTrainedConfig], fields: dict, hidden: int, widths: Mapping[str, int]
) -> PreTrainedConfig | None:
    """The configuration ``fields`` at width ``hidden``, the ``widths`` keeping their ratio to it (rounded to a
    multiple of their step); None if it is no valid shape."""
    base = fields["hidden_size"]
    trial = dict(fields, hidden_size=hidden)
    for name, step in widths.items():
        trial[name] = max(step, round(fields[name] * hidden / base / step) * step)
    return _rebuild(config_class, trial)


def widen_to_match(
    config: PreTrainedConfig,
    target: int,
    widths: Mapping[str, int] | None = None,
    tolerance: float = 0.02,
    search: float = 0.5,
) -> tuple[PreTrainedConfig, int]:
    """The width of ``config`` (``hidden_size``; see the module docstring for the fields that follow it) whose
    non-embedding parameter count is closest to ``target``; returns ``(config, count)``. Raises if none within
    ``search`` × the width is within ``tolerance`` of the target."""
    widths = widths or {}
    unknown = sorted(set(widths) - set(config.to_dict()))
    if unknown:
        raise ValueError(f"{type(config).__name__} has no field {', '.join(unknown)} to widen with hidden_size")
    fields = explicit_fields(config) | {name: getattr(config, name) for name in widths}
    base = config.hidden_size
    best: tuple[int, PreTrainedConfig, int] | None = None
    for hidden in range(max(1, int(base * (1 - search))), int(base * (1 + search)) + 1):
        candidate = _candidate(type(config), fields, hidden, widths)
        if candidate is None:
            continue
        count = non_embedding_parameters(candidate)
        if best is None or abs(count - target) < best[0]:
            best = (abs(count - target), candidate, count)
    if best is None or best[0] > tolerance * target:
        found = "no valid width" if best is None else f"closest {best[2]:,} parameters"
        raise ValueError(
            f"no width of {type(config).__name__} within {tolerance:.0%} of {target:,} parameters: {found}"
        )
    return best[1], best[2]


def matched_baseline(
    dense: PreTrainedConfig, widths: Mapping[str, int] | None = None, tolerance: float = 0.02
) -> tuple[PreTrainedConfig, int, int]:
    """The ``m = 0`` twin of ``dense``, widened to its non-embedding size (``widths``: the fields that follow
    ``hidden_size``, with their steps).

    Returns ``(baseline, dense_count, baseline_count)``.
    """
    target = non_embedding_parameters(dense)
    plain = type(dense)(**{**dense.to_dict(), "dense_block_layers": 0})
    baseline, count = widen_to_match(plain, target, widths, tolerance)
    return baseline, target, count
