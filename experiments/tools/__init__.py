"""Experiment tooling: config files, sweeps, plotting and progress lines.

Not part of the installed `mergejax` package; the research stack it needs
(``ml_collections``, ``absl``, ``matplotlib``) comes with
``pip install -e '.[experiments]'``.
"""
