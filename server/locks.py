"""Locks by key (a submission, a client's dataset) that exist only while someone holds or waits for one.

A plain ``dict`` of locks grows by one lock per submission for as long as the process runs; here an
entry is removed when its last user leaves, so the table holds only keys in use right now.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterator
from contextlib import contextmanager


class KeyedLocks:
    def __init__(self) -> None:
        self._entries: dict[Hashable, list] = {}  # key -> [lock, users (holding or waiting)]
        self._guard = threading.Lock()

    def __len__(self) -> int:
        with self._guard:
            return len(self._entries)

    @contextmanager
    def hold(self, key: Hashable, timeout: float = -1) -> Iterator[bool]:
        """Hold the lock of ``key`` for the block; yields False (without holding it) if it could not be
        had within ``timeout`` seconds (-1: wait as long as it takes; 0: do not wait)."""
        with self._guard:
            entry = self._entries.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        got = entry[0].acquire(timeout=timeout) if timeout != 0 else entry[0].acquire(blocking=False)
        try:
            yield got
        finally:
            if got:
                entry[0].release()
            with self._guard:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._entries[key]
