"""A compact int64 hash table for the window store (numba kernels over one numpy array).

One ``(capacity, 1 + width)`` int64 array: column 0 holds the key (never 0; 0 marks an empty
slot), columns 1.. the values. Open addressing with linear probing; the slot of a key is its low
bits (keys are already uniform: 63-bit BLAKE2b digests, :func:`key_of`), deletion by backward
shift (Knuth, TAOCP vol. 3, 6.4, algorithm R), so there are no tombstones. 8 * (1 + width) bytes
per slot; the load stays between 0.25 and 0.7.

Entries may also expire lazily: the owner gives a ``live(array) -> bool mask`` and dead entries are
dropped whenever the table fills (:meth:`HashTable.put` rebuilds it with the live ones only, at
the capacity where they fill at most half of it). Readers check liveness themselves.
"""

from __future__ import annotations

from hashlib import blake2b
from typing import Callable

import numba
import numpy as np

MIN_CAPACITY = 1 << 10
MAX_LOAD = 0.7


def key_of(text: str) -> int:
    """A stable 63-bit key of ``text`` (BLAKE2b, 8 bytes, top bit cleared), never 0."""
    k = int.from_bytes(blake2b(text.encode(), digest_size=8).digest(), "little") >> 1
    return k or 1


@numba.njit(cache=True, nogil=True)
def _find(a, key):
    """Slot of ``key``, or -1 - (the empty slot where it would go)."""
    m = a.shape[0] - 1
    i = key & m
    while True:
        k = a[i, 0]
        if k == key:
            return i
        if k == 0:
            return -1 - i
        i = (i + 1) & m


@numba.njit(cache=True, nogil=True)
def _delete(a, i):
    """Empty slot ``i`` and shift later entries of its probe run back (no tombstones)."""
    m = a.shape[0] - 1
    j = i
    while True:
        a[i, 0] = 0
        while True:
            j = (j + 1) & m
            if a[j, 0] == 0:
                return
            home = a[j, 0] & m
            # the entry at j may fill the hole at i unless its home lies cyclically in (i, j]
            if (i <= j and (home <= i or home > j)) or (i > j and home <= i and home > j):
                break
        for c in range(a.shape[1]):
            a[i, c] = a[j, c]
        i = j


@numba.njit(cache=True, nogil=True)
def _rebuild(old, keep, new):
    """Insert every row of ``old`` whose ``keep`` is True (keys != 0) into the empty ``new``."""
    m = new.shape[0] - 1
    n = 0
    for r in range(old.shape[0]):
        key = old[r, 0]
        if key == 0 or not keep[r]:
            continue
        i = key & m
        while new[i, 0] != 0:
            i = (i + 1) & m
        for c in range(old.shape[1]):
            new[i, c] = old[r, c]
        n += 1
    return n


def _pow2(n: int) -> int:
    return max(MIN_CAPACITY, 1 << max(0, int(n) - 1).bit_length())


class HashTable:
    """int64 key -> ``width`` int64 values (see the module docstring).

    ``live(array) -> bool mask`` (optional): which entries are still alive, used to drop dead ones
    when the table fills. ``used``: occupied slots (live or not yet dropped).
    """

    __slots__ = ("width", "a", "used", "live")

    def __init__(self, width: int, capacity: int = MIN_CAPACITY,
                 live: Callable[[np.ndarray], np.ndarray] | None = None):
        self.width = width
        self.a = np.zeros((_pow2(capacity), 1 + width), np.int64)
        self.used = 0
        self.live = live

    def __len__(self) -> int:
        return self.used

    @property
    def nbytes(self) -> int:
        return self.a.nbytes

    def slot(self, key: int) -> int:
        """The slot holding ``key``, or -1."""
        i = _find(self.a, key)
        return i if i >= 0 else -1

    def get(self, key: int) -> list[int] | None:
        """The values of ``key`` (a list of ``width`` ints), or None."""
        i = _find(self.a, key)
        return self.a[i, 1:].tolist() if i >= 0 else None

    def put(self, key: int, values: tuple) -> None:
        """Insert or overwrite ``key`` with ``values`` (``width`` ints)."""
        i = _find(self.a, key)
        if i < 0:
            if (self.used + 1) > MAX_LOAD * self.a.shape[0]:
                self.rebuild()
                i = _find(self.a, key)
            i = -1 - i
            self.used += 1
        self.a[i] = (key, *values)

    def pop(self, key: int) -> list[int] | None:
        """Remove ``key``; returns its values, or None if absent."""
        i = _find(self.a, key)
        if i < 0:
            return None
        out = self.a[i, 1:].tolist()
        _delete(self.a, i)
        self.used -= 1
        return out

    def delete_slot(self, i: int) -> None:
        _delete(self.a, i)
        self.used -= 1

    def occupied(self) -> np.ndarray:
        """Slots holding a key (live or not)."""
        return np.flatnonzero(self.a[:, 0] != 0)

    def rebuild(self, capacity: int | None = None) -> None:
        """Drop dead entries (per ``live``) and resize so that the live ones fill at most half."""
        a = self.a
        keep = a[:, 0] != 0
        if self.live is not None:
            keep &= self.live(a)
        n = int(keep.sum())
        cap = capacity or _pow2(2 * max(n, 1))
        new = np.zeros((cap, a.shape[1]), np.int64)
        self.used = _rebuild(a, keep, new)
        self.a = new

    def load(self, a: np.ndarray) -> None:
        """Adopt ``a`` (a table array from :attr:`a` of the same width, e.g. from a checkpoint)."""
        if a.ndim != 2 or a.shape[1] != 1 + self.width or a.shape[0] & (a.shape[0] - 1):
            raise ValueError(f"not a hash table array of width {self.width}: shape {a.shape}")
        self.a = np.ascontiguousarray(a, np.int64)
        self.used = int(np.count_nonzero(self.a[:, 0]))
