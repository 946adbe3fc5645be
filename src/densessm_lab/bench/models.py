"""What the generation benchmark measures: models by name (our presets and two LLaMA baselines) and the
synthetic context a decode step starts from."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    StaticCache,
)

from densessm.cache import RecurrentCache
from densessm.models import MODEL_TYPES
from densessm.presets import load_preset
from densessm.runtime import DTYPES as ALL_DTYPES

# a LLaMA with about the parameters of the 350m presets (hidden 1024, 24 layers, SwiGLU 2816)
LLAMA_350M = dict(
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=24,
    num_attention_heads=16,
    num_key_value_heads=16,
    max_position_embeddings=16384,
)
LLAMA_TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=4096,
)
STOCK = "_stock"
"""Suffix of a LLaMA run as users run it: never prepacked, decoding with a growing ``DynamicCache``."""
LLAMAS = {
    "llama_350m": LLAMA_350M,
    "llama_350m" + STOCK: LLAMA_350M,
    "llama_tiny": LLAMA_TINY,
    "llama_tiny" + STOCK: LLAMA_TINY,
}
DTYPES = {name: ALL_DTYPES[name] for name in ("float32", "bfloat16")}
"""The dtypes measured: float16 decoding on a CPU is not a path users run."""


def is_stock(name: str) -> bool:
    """Whether ``name`` is a LLaMA measured as users run it: never prepacked, with a growing ``DynamicCache``."""
    return name in LLAMAS and name.endswith(STOCK)


def is_recurrent(model: PreTrainedModel) -> bool:
    """Whether ``model`` is one of ours: its context is a fixed-size ``RecurrentCache``, not a KV cache."""
    return model.config.model_type in MODEL_TYPES


def build(name: str, dtype: torch.dtype, device: str | torch.device = "cpu") -> PreTrainedModel:
    """A randomly initialised model by preset name, or a LLaMA (``llama_350m``, ``llama_tiny``, ``*_stock``),
    on ``device`` (initialised on the CPU, so its weights do not depend on the device)."""
    torch.manual_seed(0)
    if name in LLAMAS:
        model = LlamaForCausalLM(LlamaConfig(**LLAMAS[name]))
    else:
        model = AutoModelForCausalLM.from_config(load_preset(name))
    return model.to(device=device, dtype=dtype).eval()


def synthetic_cache(model: PreTrainedModel, batch: int, context: int, steps: int, dynamic: bool = False):
    """The cache a ``context``-token prefill leaves, with random contents (room for ``steps`` more tokens),
    on the model's device: a decode step's cost does not depend on the values, so long contexts are measured
    without their prefill.

    A Transformer gets a ``StaticCache``: preallocated, so a decode step does not copy the whole history the
    way the growing ``DynamicCache`` does. That is its fastest form on this path, so the comparison is fair
    to it. With ``dynamic`` it gets the default ``DynamicCache`` instead (the stock baseline), whose decode
    steps then append with its normal ``torch.cat``.
    """
    if context < 1:
        raise ValueError(f"context must be >= 1, got {context}")
    prompt = torch.randint(3, model.config.vocab_size, (batch, 1), device=model.device)
    if is_recurrent(model):
        cache = None
    elif dynamic:
        cache = DynamicCache(config=model.config)
    else:
        cache = StaticCache(config=model.config, max_cache_len=context + steps + 1)
    with torch.no_grad():
        cache = model(prompt, cache=cache, use_cache=True).cache  # the right structure, one real step
    return fill_context(cache, context, model.device)


def fill_context(cache, context: int, device: torch.device):
    """Turn the cache of one real step into that of ``context`` tokens with random contents; every tensor
    made here is made on ``device``."""
    if isinstance(cache, RecurrentCache):
        for layer in cache.layers:
            for name, tensor in layer.items():
                layer[name] = torch.rand_like(tensor, device=device) if tensor.is_floating_point() else tensor
        cache.steps = context
        cache.positions = torch.full((cache.batch_size,), context, dtype=torch.long, device=device)
        return cache
    if isinstance(cache, DynamicCache):
        for layer in cache.layers:  # [batch, kv_heads, 1, head_dim] after the real step: widen it to the context
            shape = (*layer.keys.shape[:2], context, layer.keys.shape[-1])
            layer.keys = torch.randn(shape, dtype=layer.keys.dtype, device=device)
            layer.values = torch.randn(shape, dtype=layer.values.dtype, device=device)
        return cache
    for layer in cache.layers:
        layer.keys[:, :, :context].normal_()
        layer.values[:, :, :context].normal_()
        layer.cumulative_length.fill_(context)
    return cache


def cache_bytes(cache, context: int) -> int:
    """Bytes a cache holds for the whole batch after ``context`` tokens (a KV cache: ``context`` entries)."""
    if isinstance(cache, RecurrentCache):
        return sum(t.numel() * t.element_size() for layer in cache.layers for t in layer.values())
    return sum(
        t[:, :, :context].numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
    )


def kv_bytes(model: PreTrainedModel, batch: int, context: int, dtype: torch.dtype) -> int:
    """Bytes of a Transformer's KV cache for ``batch`` rows of ``context`` tokens (0 for a recurrent model,
    whose state does not grow): what must fit before a long context is measured."""
    config = model.config
    if not hasattr(config, "num_key_value_heads"):
        return 0
    head_dim = config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim
    return batch * context * per_token * torch.finfo(dtype).bits // 8
