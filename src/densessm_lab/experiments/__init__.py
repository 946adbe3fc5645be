"""``densessm experiment``: controlled re-runs of the paper's claims.

``corpus`` assembles the experiment corpus (text handling only; ``scripts/build_experiment_corpus.py`` fetches
and writes), ``matching`` sizes a plain baseline to its dense twin, ``dense_vs_plain`` runs the grid of every
registered family and ``results`` turns the grid's folder into the report.
"""
