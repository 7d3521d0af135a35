"""Counts the app's network calls for bench/app.py, from outside the app: one line per scored image.

bench/app.py puts this folder on the server's PYTHONPATH with $LESION_PREDICT_COUNTER set; Python
imports ``sitecustomize`` at start-up, and this one wraps ``Predictor.predict`` and ``predict_batch``
as soon as ``lesion.predict`` is imported (not before: the app imports torch only once a page needs it).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import time

COUNTER = os.environ.get("LESION_PREDICT_COUNTER")


def _note(count: int) -> None:
    with open(COUNTER, "a", encoding="utf-8") as stream:
        stream.write(f"{time.time():.3f}\tscored\n" * count)


def _wrap(module) -> None:
    predictor = module.Predictor
    predict, predict_batch = predictor.predict, predictor.predict_batch

    def counted_predict(self, image, *args, **kwargs):
        _note(1)
        return predict(self, image, *args, **kwargs)

    def counted_batch(self, images, *args, **kwargs):
        images = list(images)
        _note(len(images))
        return predict_batch(self, images, *args, **kwargs)

    predictor.predict, predictor.predict_batch = counted_predict, counted_batch


class _WrapOnImport(importlib.abc.MetaPathFinder):
    """Finds lesion.predict through the other finders, then wraps it once it has run."""

    def find_spec(self, name, path=None, target=None):
        if name != "lesion.predict":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_wrap(module):
            exec_module(module)
            _wrap(module)

        loader.exec_module = exec_and_wrap
        return spec


if COUNTER:
    sys.meta_path.insert(0, _WrapOnImport())
