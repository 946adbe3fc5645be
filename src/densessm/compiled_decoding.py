"""Compiled decode steps: ``torch.compile`` for ``generate()``, with CUDA graphs on a GPU.

A decode step of a recurrent model is the same fixed-shape computation for every token: one token per row
through each layer's state. On a GPU at a few rows per batch, launching its hundreds of small kernels costs
more than running them, so the step is captured once and replayed (``mode="reduce-overhead"``: CUDA graphs).
What makes the step capturable:

* the state is updated in place, in tensors that keep their addresses (marked as static inputs);
* nothing inside reads a tensor's value on the host: the token-range check and the all-real-mask shortcut
  are skipped while tracing (the step's tokens are the model's own samples, and the new tokens' mask is
  passed on as a tensor);
* the compiled function is given the state's tensors, not the cache object: it rebuilds a bare cache around
  them, so no Python value of the caller's cache (its step counter above all, which would specialise the
  compiled code and recompile at every token) can become a guard; the step counter is advanced here, outside;
* on a GPU each call starts a new CUDA-graph step and the logits are copied out of the graph's memory: a
  replay (of this model or of another compiled model) reuses that memory, and logits still held by the
  caller would read as overwritten.

Use it through transformers' own switch: ``model.generate(..., compile_config=CompileConfig())``. The prompt
runs eagerly; the first decode steps trace and compile (tens of seconds), later ones replay.

It is meant for GPUs. On a CPU it compiles and computes the same tokens (the tests check that), but the eager
step with prepacked weights is faster there (docs/benchmarks/generation.md): inductor's small-batch GEMMs and the
copies that functionalising the in-place state update adds cost more than the launches they save.
"""

from __future__ import annotations

import weakref

import torch
from transformers import CompileConfig
from transformers.modeling_outputs import CausalLMOutputWithPast

from densessm.cache import RecurrentCache

# keyword arguments a decode step from generate() may carry that do not change what the step computes
_BENIGN = {"return_dict", "use_cache", "logits_to_keep", "output_attentions"}


class CompiledDecoder:
    """A drop-in for ``model.__call__`` in ``generate()``'s decode loop: single-token steps with a carried
    :class:`~densessm.cache.RecurrentCache` run compiled; any other call runs the model eagerly."""

    def __init__(self, model: torch.nn.Module, compile_config: CompileConfig | None = None):
        self.model = model
        self.compile_config = compile_config or CompileConfig(fullgraph=True, dynamic=False)
        options = self.compile_config.to_dict()
        if options.get("backend", "inductor") == "inductor" and any(
            getattr(m, "onednn_packed", False) for m in model.modules()
        ):
            raise ValueError(
                "cannot compile a model with prepacked CPU weights (densessm.inference.prepack_for_cpu): inductor "
                "only takes oneDNN-packed weights it packed itself; compile the model without prepacking"
            )
        if options.get("backend", "inductor") != "inductor":
            options.pop("mode", None)  # modes are inductor's
        if options.get("mode") == "reduce-overhead" and model.device.type != "cuda":
            options["mode"] = None  # CUDA graphs need a GPU; elsewhere inductor's default
        self._step = torch.compile(self._decode, **options)
        self._checked: weakref.ref[RecurrentCache] | None = None  # the cache last checked (see _check)

    def _decode(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor | None,
        layers: list[dict[str, torch.Tensor]],
        positions: torch.Tensor,
    ) -> torch.Tensor:
        cache = RecurrentCache(len(layers))  # bare: the caller checked the real one (_check)
        cache.layers, cache.positions = layers, positions  # updated in place, where the caller's cache holds them
        out = self.model(input_ids=input_ids, attention_mask=mask, cache=cache, use_cache=True, return_dict=True)
        return out.logits

    def is_decode_step(self, input_ids, cache, kwargs: dict) -> bool:
        """Whether this call is one the compiled step computes exactly: one token per row from a carried
        state, no gradient, no extra outputs."""
        extra = {k for k, v in kwargs.items() if v is not None and v is not False} - _BENIGN
        return (
            isinstance(cache, RecurrentCache)
            and not cache.is_empty
            and input_ids is not None
            and input_ids.dim() == 2
            and input_ids.shape[1] == 1
            and not torch.is_grad_enabled()
            and not extra
        )

    def __call__(self, input_ids=None, attention_mask=None, cache=None, **kwargs):
        cache = kwargs.pop("past_key_values", None) if cache is None else cache
        if not self.is_decode_step(input_ids, cache, kwargs):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, cache=cache, **kwargs)
        first = self._check(cache, input_ids.shape[0])
        cuda = self.model.device.type == "cuda"
        if cuda:
            _mark_static(cache)
            torch.compiler.cudagraph_mark_step_begin()
        # fixed shapes and strides, or every token would recompile: generate() passes views of growing tensors,
        # and a [1, 1] view keeps its parent's row stride through .contiguous()
        mask = None if attention_mask is None else _fresh(attention_mask[:, -1:])
        kept = _addresses(cache) if first else None  # every step runs the same graph: the first one tells
        logits = self._step(_fresh(input_ids), mask, list(cache.layers), cache.positions)
        if cuda:
            logits = logits.clone()
        if first and _addresses(cache) != kept:  # a captured graph would go on writing where the state is not
            raise RuntimeError("the compiled decode step replaced a state tensor instead of updating it in place")
        cache.steps += 1
        return CausalLMOutputWithPast(logits=logits, cache=cache)

    def _check(self, cache: RecurrentCache, batch: int) -> bool:
        """Check a cache the first time a compiled step meets it (the step itself cannot: it reads no Python
        state); generate()'s later steps reuse the same cache, so they pay nothing. Returns whether this was
        the first time."""
        if self._checked is not None and self._checked() is cache:
            return False
        backbone = self.model.base_model
        weight = backbone.get_input_embeddings().weight
        backbone.check_cache(cache, batch, weight.dtype, weight.device)
        self._checked = weakref.ref(cache)
        return True


def _fresh(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.clone(memory_format=torch.contiguous_format)


def _addresses(cache: RecurrentCache) -> list[int]:
    return [layer[name].data_ptr() for layer, name in cache._tensors()] + [cache.positions.data_ptr()]


def _mark_static(cache: RecurrentCache) -> None:
    """Tell the CUDA-graph runner that the state tensors keep their addresses (they are updated in place),
    so it reads them where they are instead of copying them in and out of the graph at every step."""
    for tensor in [layer[name] for layer, name in cache._tensors()] + [cache.positions]:
        if getattr(tensor, "_dynamo_static_input_type", None) is None:
            torch._dynamo.mark_static_address(tensor, guard=False)  # no recompile for a new cache
