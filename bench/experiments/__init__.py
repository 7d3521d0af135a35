"""One-off experiments that decided something in the design (``python -m bench.experiments.<name>``); see docs/experiments.md."""
