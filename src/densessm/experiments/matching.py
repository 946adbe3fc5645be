"""Equal-size comparisons: widen a plain baseline until it has as many non-embedding parameters as its dense twin.

The paper compares DenseSSM models with baselines "of similar size". The dense gates (and, for DenseRetNet, the
k/v norms) add parameters, so a fair baseline with ``m = 0`` must be made a little wider to pay for them. Embedding
and output-head parameters are left out of the count: they scale with the vocabulary, not with the architecture.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, PreTrainedConfig

EMBEDDING_NAMES = ("embed_tokens", "embeddings", "lm_head")


def non_embedding_parameters(config: PreTrainedConfig) -> int:
    """Parameters of the model ``config`` builds, without its token embeddings and LM head (counted on the meta
    device: nothing is allocated)."""
    import densessm  # noqa: F401  (registers our model types)

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for name, p in model.named_parameters() if not any(e in name for e in EMBEDDING_NAMES))


def _candidate(config: PreTrainedConfig, hidden: int) -> PreTrainedConfig | None:
    """``config`` at width ``hidden``, its other widths scaled to keep their ratios; None if no valid shape."""
    fields = config.to_dict()
    fields["hidden_size"] = hidden
    if "query_key_dim" in fields:  # DenseRetNet: q/k width keeps its ratio, rounded to even per-head widths
        heads = config.num_attention_heads
        unit = 2 * heads
        fields["query_key_dim"] = max(unit, round(config.query_key_dim * hidden / config.hidden_size / unit) * unit)
        if int(hidden * config.v_factor) % heads:
            return None
    if "intermediate_size" in fields and "expand" in fields:  # Mamba: derived from hidden_size
        fields.pop("intermediate_size")
        if fields.get("time_step_rank") == -(-config.hidden_size // 16):
            fields["time_step_rank"] = "auto"
    try:
        return type(config)(**fields)
    except Exception:  # a shape the configuration rejects
        return None


def widen_to_match(
    config: PreTrainedConfig, target: int, tolerance: float = 0.02, search: float = 0.5
) -> tuple[PreTrainedConfig, int]:
    """The width of ``config`` (``hidden_size``, other widths scaled with it) whose non-embedding parameter count is
    closest to ``target``; returns ``(config, count)``. Raises if none within ``search`` × the width is within
    ``tolerance`` of the target."""
    base = config.hidden_size
    best: tuple[int, PreTrainedConfig, int] | None = None
    for hidden in range(max(1, int(base * (1 - search))), int(base * (1 + search)) + 1):
        candidate = _candidate(config, hidden)
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


def matched_baseline(dense: PreTrainedConfig, tolerance: float = 0.02) -> tuple[PreTrainedConfig, int, int]:
    """The ``m = 0`` twin of ``dense``, widened to its non-embedding size.

    Returns ``(baseline, dense_count, baseline_count)``.
    """
    target = non_embedding_parameters(dense)
    plain = type(dense)(**{**dense.to_dict(), "dense_block_layers": 0})
    baseline, count = widen_to_match(plain, target, tolerance)
    return baseline, target, count
