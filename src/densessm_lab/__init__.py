"""densessm_lab: the tooling around the densessm library, installed with it but not part of it.

``bench`` measures generation speed (``densessm bench generate``) and ``experiments`` runs the dense-vs-plain
grid (``densessm experiment dense-vs-plain``). Both use only densessm's public API, as a user's code would: the
library never imports them, except its command line, which mounts their subcommands.
"""
