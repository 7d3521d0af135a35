"""Who may change things: with $LESION_ADMIN_PASSWORD set, training and saving a threshold need the presenter.

Nothing here imports Streamlit: a page passes in its ``st.session_state``.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import MutableMapping
from typing import Any

# With this variable set, training and saving a threshold need the presenter's password.
ADMIN_ENV = "LESION_ADMIN_PASSWORD"
ADMIN_SESSION_KEY = "presenter_unlocked"
LOCKED_HELP = (
    "Visitors can predict and explore; training and saving a threshold need the presenter's password (sidebar)."
)


def admin_password() -> str | None:
    """$LESION_ADMIN_PASSWORD, or None when unset or empty (then everything stays open, for local use)."""
    return os.environ.get(ADMIN_ENV) or None


def password_matches(given: str, expected: str) -> bool:
    """Compare in constant time, so the answer's timing tells nothing about the password."""
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def may_change(session: MutableMapping[str, Any]) -> bool:
    """Whether this browser session may train or save a threshold: always without a password set,
    otherwise once the presenter has unlocked it."""
    return admin_password() is None or session.get(ADMIN_SESSION_KEY) is True
