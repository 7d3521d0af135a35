"""Per-session caches of what the network computed, keyed by image content; one shared by every session;
the lock that serialises the network.

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

SHARED_ENTRIES = 32  # a room picking the same bundled samples; each entry holds a display-sized image and heatmap

# One model is shared by every session (st.cache_resource); Grad-CAM needs gradients through
# it, so predictions are serialised (the Predict page's batcher takes it around each batch).
# On a CPU they would compete for the same cores anyway.
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


class SharedCache:
    """What one session computed that another may reuse (same image bytes, same model and settings): thread-safe.

    The Predict page keeps only the bundled samples' here (an upload's stays in its session). Values are
    read, never changed, once stored.
    """

    def __init__(self, entries: int = SHARED_ENTRIES) -> None:
        self.entries = entries
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        """The value under ``key`` (None when there is none), marked as the most recent."""
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key: Any, value: Any) -> Any:
        """Store ``value``; only the ``entries`` most recent are kept."""
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.entries:
                self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


#: The server's one shared cache (a module global: every session's script imports the same module).
SHARED = SharedCache()
