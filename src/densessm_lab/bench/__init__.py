"""``densessm bench generate``: generation speed of recurrent models against a Transformer with a KV cache.

Four measurements, all models in one run, same dtype, same machine, same batch:

1. end-to-end tokens/s while generating ``N`` new tokens from a short prompt (``generate()``, greedy);
2. the latency of one decode step after a context of ``C`` tokens;
3. the memory each sequence keeps between steps (recurrent state vs KV cache) at that context;
4. the dense overhead: each dense model (``dense_X``) whose plain twin (``X``) is also in ``--models`` decodes
   in alternation with it, one step each per round, so that the machine's minute-to-minute noise (±30%) hits
   both alike; two models measured minutes apart could not resolve an overhead of a few percent.

For (2) to (4) the context's cache is *synthesised*: filled with random tensors of exactly the shape a real
prefill of ``C`` tokens leaves (a decode step's cost does not depend on the values), so long contexts are
measured without minutes of prefill. A recurrent model's state has the same size after any context.

Two LLaMA baselines of the same configuration:

* ``llama_350m`` (``llama_tiny``), optimised: its weights are prepacked like ours and (2) uses a preallocated
  ``StaticCache``, transformers' fastest eager form, so our models are not compared against a handicapped
  Transformer;
* ``llama_350m_stock`` (``llama_tiny_stock``), as users run it: ``LlamaForCausalLM`` out of the box, never
  prepacked, and (2) uses the default growing ``DynamicCache`` (each decode step ``torch.cat``-s every layer's
  keys and values onto its history). Speed claims are stated against this one.

``generate()`` in (1) uses transformers' default ``DynamicCache`` for both.

``--device cuda`` runs everything on a GPU (prepacking is CPU-only and is skipped there; each timed region
synchronises the GPU at both ends). ``--compile`` runs the recurrent models' decode steps through
:class:`~densessm.compiled_decoding.CompiledDecoder` (``torch.compile``; on CUDA with ``reduce-overhead``: CUDA
graphs) in (1) to (4), untimed warm-up steps taking the compilation; the LLaMAs stay eager (their own
compilation is transformers' business, not the path measured here).

The rooms: :mod:`.models` builds what is measured (models by name, synthetic contexts), :mod:`.measure` times
it, :mod:`.report` writes the JSON, Markdown and plot, :mod:`.cli` is the subcommand.
"""
