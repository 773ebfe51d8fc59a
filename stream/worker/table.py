"""A compact int64 hash table for the window store (numba kernels over one numpy array).

One ``(capacity, 1 + width)`` int64 array: column 0 holds the key (never 0; 0 marks an empty
slot), columns 1.. the values. Open addressing with linear probing; a key's first slot is its top
bits scaled to the capacity (keys are already uniform: 63-bit BLAKE2b digests, :func:`key_of`;
any capacity works, not only powers of two), deletion by backward shift (Knuth, TAOCP vol. 3,
6.4, algorithm R), so there are no tombstones. 8 * (1 + width) bytes per slot; the load stays
between 0.55 and 0.8 (1.25 to 1.8 slots per entry).

Entries may also expire lazily: the owner gives a ``live(array) -> bool mask`` and dead entries are
dropped whenever the table fills (:meth:`HashTable.put` rebuilds it with the live ones only, at
the capacity where they fill 0.55 of it). Readers check liveness themselves.
"""

from __future__ import annotations

from hashlib import blake2b
from typing import Callable

import numba
import numpy as np

MIN_CAPACITY = 1 << 10
MAX_LOAD = 0.8  # rebuild when this full
REBUILD_LOAD = 0.55  # how full a rebuilt table is


def key_of(text: str) -> int:
    """A stable 63-bit key of ``text`` (BLAKE2b, 8 bytes, top bit cleared), never 0."""
    return key_of_bytes(text.encode())


def key_of_bytes(b: bytes) -> int:
    """:func:`key_of` of a string given as its UTF-8 bytes."""
    return int.from_bytes(blake2b(b, digest_size=8).digest(), "little") >> 1 or 1


@numba.njit(cache=True, nogil=True, inline="always")
def _home(key, cap):
    """The first slot probed for ``key`` (a 63-bit key): its top 32 bits scaled to [0, cap)."""
    return ((key >> 31) * cap) >> 32


@numba.njit(cache=True, nogil=True)
def _find(a, key):
    """Slot of ``key``, or -1 - (the empty slot where it would go)."""
    cap = a.shape[0]
    i = _home(key, cap)
    while True:
        k = a[i, 0]
        if k == key:
            return i
        if k == 0:
            return -1 - i
        i += 1
        if i == cap:
            i = 0


@numba.njit(cache=True, nogil=True)
def _find_many(a, keys):
    """:func:`_find` of every key: its slot, or a negative number when absent."""
    out = np.empty(keys.shape[0], np.int64)
    for r in range(keys.shape[0]):
        out[r] = _find(a, keys[r])
    return out


@numba.njit(cache=True, nogil=True)
def _same_bytes(arena_a, off_a, len_a, arena_b, off_b, len_b):
    """Per row r: whether arena_a[off_a[r]:][:len_a[r]] equals arena_b[off_b[r]:][:len_b[r]]."""
    out = np.empty(off_a.shape[0], np.bool_)
    for r in range(off_a.shape[0]):
        same = len_a[r] == len_b[r]
        k = 0
        while same and k < len_a[r]:
            same = arena_a[off_a[r] + k] == arena_b[off_b[r] + k]
            k += 1
        out[r] = same
    return out


@numba.njit(cache=True, nogil=True)
def _delete(a, i):
    """Empty slot ``i`` and shift later entries of its probe run back (no tombstones)."""
    cap = a.shape[0]
    j = i
    while True:
        a[i, 0] = 0
        while True:
            j += 1
            if j == cap:
                j = 0
            if a[j, 0] == 0:
                return
            home = _home(a[j, 0], cap)
            # the entry at j may fill the hole at i unless its home lies cyclically in (i, j]
            if (i <= j and (home <= i or home > j)) or (i > j and home <= i and home > j):
                break
        for c in range(a.shape[1]):
            a[i, c] = a[j, c]
        i = j


@numba.njit(cache=True, nogil=True)
def _rebuild(old, keep, new):
    """Insert every row of ``old`` whose ``keep`` is True (keys != 0) into the empty ``new``."""
    cap = new.shape[0]
    n = 0
    for r in range(old.shape[0]):
        key = old[r, 0]
        if key == 0 or not keep[r]:
            continue
        i = _home(key, cap)
        while new[i, 0] != 0:
            i += 1
            if i == cap:
                i = 0
        for c in range(old.shape[1]):
            new[i, c] = old[r, c]
        n += 1
    return n


def _capacity(live: int) -> int:
    """Slots for ``live`` entries right after a rebuild (load REBUILD_LOAD)."""
    return max(MIN_CAPACITY, int(live / REBUILD_LOAD) + 1)


class HashTable:
    """int64 key -> ``width`` int64 values (see the module docstring).

    ``live(array) -> bool mask`` (optional): which entries are still alive, used to drop dead ones
    when the table fills. ``used``: occupied slots (live or not yet dropped).
    """

    __slots__ = ("width", "a", "used", "live")

    def __init__(self, width: int, capacity: int = MIN_CAPACITY,
                 live: Callable[[np.ndarray], np.ndarray] | None = None):
        self.width = width
        self.a = np.zeros((max(MIN_CAPACITY, capacity), 1 + width), np.int64)
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
        """Drop dead entries (per ``live``) and resize so that the live ones fill REBUILD_LOAD."""
        a = self.a
        keep = a[:, 0] != 0
        if self.live is not None:
            keep &= self.live(a)
        n = int(keep.sum())
        cap = capacity or _capacity(n)
        new = np.zeros((cap, a.shape[1]), np.int64)
        self.used = _rebuild(a, keep, new)
        self.a = new

    def keep(self, mask: np.ndarray) -> None:
        """Keep only the slots where ``mask`` (one bool per slot of :attr:`a`) is True; rebuilt at
        the capacity where the kept entries fill REBUILD_LOAD."""
        keep = mask & (self.a[:, 0] != 0)
        new = np.zeros((_capacity(int(keep.sum())), self.a.shape[1]), np.int64)
        self.used = _rebuild(self.a, keep, new)
        self.a = new

    def extend(self, rows: np.ndarray) -> None:
        """Insert ``rows`` (an ``(n, 1 + width)`` array of key and values; keys != 0, distinct) whose
        keys are not in the table yet (a key present keeps its entry); rebuilt at the capacity
        where all the entries fill REBUILD_LOAD."""
        a = self.a
        rows = rows[rows[:, 0] != 0]
        rows = rows[_find_many(a, rows[:, 0]) < 0]
        if not rows.size:
            return
        both = np.concatenate([a[a[:, 0] != 0], rows.astype(np.int64, copy=False)])
        new = np.zeros((_capacity(both.shape[0]), a.shape[1]), np.int64)
        self.used = _rebuild(both, np.ones(both.shape[0], np.bool_), new)
        self.a = new

    def load(self, a: np.ndarray) -> None:
        """Adopt ``a`` (a table array from :attr:`a` of the same width, e.g. from a checkpoint)."""
        if a.ndim != 2 or a.shape[1] != 1 + self.width or a.shape[0] < 1:
            raise ValueError(f"not a hash table array of width {self.width}: shape {a.shape}")
        self.a = np.ascontiguousarray(a, np.int64)
        self.used = int(np.count_nonzero(self.a[:, 0]))


class Interner:
    """Strings (DIDs) <-> dense int ids, compactly: a :class:`HashTable` from the string's key to
    its id, and the strings' UTF-8 bytes in one arena (offset and length per id). About 60 bytes
    per string instead of a dict entry and a str object (~170). A key collision between two
    strings is detected (the stored bytes are compared) and resolved by re-keying with a salt.
    Freed ids are reused; the arena is compacted when half of it is garbage.
    """

    def __init__(self, capacity: int = MIN_CAPACITY):
        self._tab = HashTable(1, capacity)
        self._arena = bytearray()
        self._off = np.zeros(capacity, np.int64)
        self._len = np.full(capacity, -1, np.int32)  # -1: free (or never used)
        self._n = 0  # ids handed out (the id space)
        self._free: list[int] = []
        self._garbage = 0

    def __len__(self) -> int:
        return self._n - len(self._free)

    @property
    def size(self) -> int:
        """The id space: every id is < size."""
        return self._n

    @property
    def nbytes(self) -> int:
        return self._tab.nbytes + len(self._arena) + self._off.nbytes + self._len.nbytes

    def did(self, i: int) -> str | None:
        n = int(self._len[i])
        if n < 0:
            return None
        o = int(self._off[i])
        return self._arena[o: o + n].decode()

    def _slot(self, s: str, b: bytes) -> tuple[int, int]:
        """(slot of s, or -1; the key it has or would get)."""
        salt = 0
        while True:
            k = key_of(s if not salt else f"{s}\x00{salt}")
            i = self._tab.slot(k)
            if i < 0:
                return -1, k
            j = int(self._tab.a[i, 1])
            o, n = int(self._off[j]), int(self._len[j])
            if n == len(b) and self._arena[o: o + n] == b:
                return i, k
            salt += 1

    def get(self, s: str) -> int | None:
        i, _ = self._slot(s, s.encode())
        return None if i < 0 else int(self._tab.a[i, 1])

    def _reserve(self, n: int) -> None:
        """Room for ids < ``n``: the offset and length arrays doubled until they fit."""
        while self._off.size < n:
            off = np.zeros(2 * self._off.size, np.int64)
            off[: self._off.size] = self._off
            ln = np.full(2 * self._off.size, -1, np.int32)
            ln[: self._len.size] = self._len
            self._off, self._len = off, ln

    def id(self, s: str) -> int:
        """The id of ``s``, assigned if new."""
        b = s.encode()
        i, k = self._slot(s, b)
        if i >= 0:
            return int(self._tab.a[i, 1])
        if self._free:
            j = self._free.pop()
        else:
            j = self._n
            self._n += 1
            self._reserve(self._n)
        self._off[j], self._len[j] = len(self._arena), len(b)
        self._arena += b
        self._tab.put(k, (j,))
        return j

    def intern_from(self, other: "Interner") -> np.ndarray:
        """Intern every string of ``other`` here; returns its ids here by other's id (int64, -1
        for a free id of other). The same as ``self.id(other.did(i))`` for each, in bulk (merging
        two workers' states): keys from other's bytes, looked up and the new strings added at
        once; a string whose key another string here (or of other) already has takes the
        one-by-one path, which salts it."""
        n = other._n
        idmap = np.full(n, -1, np.int64)
        live = np.flatnonzero(other._len[:n] >= 0)
        if not live.size:
            return idmap
        src = bytes(other._arena)
        offs, lens = other._off[live], other._len[live].astype(np.int64)
        keys = np.fromiter((key_of_bytes(src[o: o + ln]) for o, ln in zip(offs.tolist(), lens.tolist())),
                           np.int64, live.size)
        slots = _find_many(self._tab.a, keys)
        found = slots >= 0
        j = self._tab.a[slots[found], 1]
        same = _same_bytes(np.frombuffer(bytes(self._arena), np.uint8), self._off[j], self._len[j].astype(np.int64),
                           np.frombuffer(src, np.uint8), offs[found], lens[found])
        idmap[live[found][same]] = j[same]
        slow = live[found][~same].tolist()  # a key collision: salted one by one
        new, new_keys = live[~found], keys[~found]
        _, first = np.unique(new_keys, return_index=True)
        dup = np.ones(new.size, np.bool_)
        dup[first] = False
        slow += new[dup].tolist()  # two strings of other with one key: the first in bulk
        new, new_keys = new[first], new_keys[first]
        k = new.size
        reuse = [self._free.pop() for _ in range(min(k, len(self._free)))]
        ids = np.concatenate([np.array(reuse, np.int64), np.arange(self._n, self._n + k - len(reuse), dtype=np.int64)])
        self._n += k - len(reuse)
        self._reserve(self._n)
        new_lens = other._len[new].astype(np.int64)
        self._off[ids] = len(self._arena) + np.cumsum(new_lens) - new_lens
        self._len[ids] = new_lens
        self._arena += b"".join(src[o: o + ln] for o, ln in zip(other._off[new].tolist(), new_lens.tolist()))
        self._tab.extend(np.stack([new_keys, ids], axis=1))
        idmap[new] = ids
        for i in slow:
            idmap[i] = self.id(other.did(i))
        return idmap

    def free(self, ids) -> None:
        """Forget the strings of ``ids`` (their ids are reused)."""
        for j in ids:
            s = self.did(j)
            if s is None:
                continue
            i, _ = self._slot(s, s.encode())
            self._tab.delete_slot(i)
            self._garbage += int(self._len[j])
            self._len[j] = -1
            self._free.append(j)
        if self._garbage > len(self._arena) // 2:
            self._compact()

    def _compact(self) -> None:
        live = np.flatnonzero(self._len[: self._n] >= 0)
        arena = bytearray()
        for j in live.tolist():
            o, n = int(self._off[j]), int(self._len[j])
            self._off[j] = len(arena)
            arena += self._arena[o: o + n]
        self._arena, self._garbage = arena, 0

    def to_arrays(self) -> dict[str, np.ndarray]:
        self._compact()
        return {"tab": self._tab.a.copy(), "arena": np.frombuffer(bytes(self._arena), np.uint8).copy(),
                "off": self._off[: self._n].copy(), "len": self._len[: self._n].copy(),
                "free": np.array(self._free, np.int64)}

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> "Interner":
        it = cls(max(MIN_CAPACITY, int(a["off"].size)))
        it._tab.load(a["tab"])
        it._arena = bytearray(a["arena"].tobytes())
        it._n = int(a["off"].size)
        it._off[: it._n], it._len[: it._n] = a["off"], a["len"]
        it._free = a["free"].tolist()
        return it
