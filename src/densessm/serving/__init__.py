"""``densessm serve``: an OpenAI-compatible HTTP server with continuous batching and a prompt-state cache.

Modules: :mod:`~densessm.serving.engine` (the decode loop and its batch of recurrent states),
:mod:`~densessm.serving.prefix_cache` (states of prompt prefixes, LRU in bytes),
:mod:`~densessm.serving.sampling` and :mod:`~densessm.serving.text` (choosing tokens, turning them into
text), :mod:`~densessm.serving.protocol` and :mod:`~densessm.serving.chat` (the API's requests),
:mod:`~densessm.serving.app` (HTTP), :mod:`~densessm.serving.metrics` (Prometheus),
:mod:`~densessm.serving.cli` (the command). Only the command's parser is imported with the package
command line; the rest needs the ``serve`` extra (FastAPI, uvicorn, prometheus-client).
"""
