"""Command-line entry points: ``python -m train`` (fine-tune) and ``python -m train.evaluate``."""
