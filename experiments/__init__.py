"""Experiments, launched with ``python -m experiments.main --config=... --workdir=...``."""
