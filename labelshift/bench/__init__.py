"""Benchmarks of the label-shift machinery (not timed tests): ``python -m labelshift.bench.priors``.

Modules here may use heavier optional dependencies (scikit-learn, the ``bench`` extra); they import them
inside the functions that need them, and nothing in :mod:`labelshift` imports this package.
"""
