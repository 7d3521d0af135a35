"""Benchmarks: scripts that print ratios against a baseline measured in the same run (``python -m bench.<name>``).

Shared helpers live in :mod:`bench.common`; one-off studies in :mod:`bench.experiments`.
"""
