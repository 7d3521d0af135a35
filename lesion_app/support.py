"""The old home of the app's helpers, kept only for ``app_pages/train.py``, which changes on another branch.

New code imports from where each helper lives: :mod:`lesion_app.access`, :mod:`lesion_app.gallery`,
:mod:`lesion_app.predict_view`, :mod:`lesion_app.ood_view`, :mod:`lesion_app.runs_view`, :mod:`lesion_app.wording`.
Delete this module once the Train page imports from them.
"""

from __future__ import annotations

from lesion_app.access import LOCKED_HELP, may_change
from lesion_app.runs_view import measured_duration, recipe_names, run_rows
from lesion_app.wording import format_duration

__all__ = ["LOCKED_HELP", "format_duration", "may_change", "measured_duration", "recipe_names", "run_rows"]
