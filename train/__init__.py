"""Command-line entry points: ``python -m train`` (fine-tune), ``python -m train.evaluate`` and ``python -m train.predict`` (also run as ``python -m lesion.predict``)."""
