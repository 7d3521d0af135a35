"""Per-session caches of what the network computed, keyed by image content; the lock that serialises the network.

A page passes in its ``st.session_state`` (any mutable mapping), so everything here runs without Streamlit.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections import OrderedDict
from collections.abc import MutableMapping
from typing import Any

from lesion.images import MAX_BYTES

CACHE_ENTRIES = 64

# One model is shared by every session (st.cache_resource); Grad-CAM needs gradients through
# it, so predictions are serialised. On a CPU they would compete for the same cores anyway.
PREDICT_LOCK = threading.Lock()


def digest(data: bytes) -> str:
    """sha256 of an image's bytes: the cache key that survives renaming and re-uploading."""
    return hashlib.sha256(data).hexdigest()


def named_bytes(data: bytes, name: str) -> Any:
    """The uploaded bytes as a BytesIO carrying the file name, so InvalidImage messages name the file."""
    if len(data) > MAX_BYTES:
        return bytes(data)  # load_image refuses it with the size in the message
    stream = io.BytesIO(data)
    stream.name = name
    return stream


def remember(cache: MutableMapping[Any, Any], key: Any, value: Any) -> Any:
    """Store ``value`` under ``key``; an OrderedDict keeps only the CACHE_ENTRIES most recent."""
    cache[key] = value
    if isinstance(cache, OrderedDict):
        cache.move_to_end(key)
        while len(cache) > CACHE_ENTRIES:
            cache.popitem(last=False)
    return value


def recall(cache: MutableMapping[Any, Any], key: Any) -> Any:
    """The value stored under ``key`` (None when there is none), marked as the most recent."""
    if key not in cache:
        return None
    if isinstance(cache, OrderedDict):
        cache.move_to_end(key)
    return cache[key]
