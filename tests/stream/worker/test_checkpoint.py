"""Worker checkpoint files: atomic, torn or corrupt files detected and the previous one used,
another format or window never misread (stream/worker/checkpoint.py)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from stream.worker.checkpoint import FORMAT, META, CheckpointDir, CheckpointMismatch
from stream.worker.windows import STATE_FORMAT, WindowStore
from tests.stream.worker.test_windows import HOP, WIN, fake_classify, random_stream, run


def store_after(events):
    s = WindowStore(WIN, HOP, fake_classify)
    run(s, events, flush=False)
    return s


def test_write_read_round_trip_keeps_two_and_gives_the_newest(tmp_path):
    d = CheckpointDir(tmp_path, keep=2)
    events = random_stream(3)
    paths = []
    for i, k in enumerate((100, 200, 300)):
        paths.append(d.write(store_after(events[:k]).to_arrays(), {"n": i}))
    assert d.files() == paths[:0:-1]  # the oldest was removed
    path, meta, arrays = d.latest()
    assert path == paths[-1] and meta["n"] == 2 and meta["format"] == FORMAT
    want = store_after(events[:300]).to_arrays()
    assert arrays.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(arrays[k], want[k], err_msg=k)


def test_workers_sharing_the_directory_keep_their_own_files(tmp_path):
    """Tags (one per partition assignment): each keeps its own newest two, whatever the other
    writes; a file of another tag is removed only once older than stale_s."""
    import os
    import time

    d = CheckpointDir(tmp_path, keep=2, stale_s=3600)
    arrays = store_after(random_stream(3)[:50]).to_arrays()
    old = d.write(arrays, {"n": 0}, tag="all")
    a = [d.write(arrays, {"n": i}, tag="aaa1") for i in range(3)]
    b = [d.write(arrays, {"n": i}, tag="bbb2") for i in range(3)]
    assert d.files() == [b[2], b[1], a[2], a[1], old]
    assert CheckpointDir.tag_of(old) == "all" and d.latest()[0] == b[2]
    hour_ago = time.time() - 3601
    os.utime(old, (hour_ago, hour_ago))
    d.write(arrays, {"n": 3}, tag="aaa1")
    assert old not in d.files() and b[2] in d.files()  # stale: its offsets are past retention
    with pytest.raises(ValueError, match="letters and digits"):
        d.write(arrays, {}, tag="../x")


def test_furthest_offsets_take_every_checkpoint_of_the_cluster(tmp_path):
    """Where a consumer may start (restore skips up to the replay's end): per partition the
    largest offset any checkpoint of this cluster records, whichever assignment wrote it."""
    d = CheckpointDir(tmp_path)
    arrays = store_after(random_stream(3)[:50]).to_arrays()
    d.write(arrays, {"kafka": "k:1", "offsets": {"events": {"0": 5, "1": 9}, "ops": {"0": 2}}}, tag="aa")
    d.write(arrays, {"kafka": "k:1", "offsets": {"events": {"1": 4, "2": 7}}}, tag="bb")
    d.write(arrays, {"kafka": "other:1", "offsets": {"events": {"3": 99}}}, tag="cc")
    (tmp_path / "ckpt-000000000099-zz.npz").write_bytes(b"torn")  # unreadable: ignored
    assert d.furthest_offsets("events", "k:1") == {0: 5, 1: 9, 2: 7}
    assert d.furthest_offsets("ops", "k:1") == {0: 2}
    assert d.furthest_offsets("events")[3] == 99


@pytest.mark.parametrize("damage", ["truncated", "bit_flip"])
def test_a_torn_or_corrupt_checkpoint_is_detected_and_the_previous_one_used(tmp_path, damage, caplog):
    d = CheckpointDir(tmp_path, keep=2)
    events = random_stream(4)
    old = d.write(store_after(events[:200]).to_arrays(), {"n": 1})
    new = d.write(store_after(events[:400]).to_arrays(), {"n": 2})
    raw = bytearray(new.read_bytes())
    if damage == "truncated":  # a crash while writing (were it not for the rename) or a full disk
        new.write_bytes(bytes(raw[: len(raw) // 2]))
    else:  # one bit flipped inside the records table's data
        at = raw.find(b"records.npy") + 200
        raw[at + 4096] ^= 0x10
        new.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="chorus.worker.checkpoint"):
        path, meta, arrays = d.latest()
    assert path == old and meta["n"] == 1
    assert any("is broken" in r.getMessage() and new.name in r.getMessage() for r in caplog.records)
    s = WindowStore.from_arrays(arrays, fake_classify, window_s=WIN, hop_s=HOP)
    assert s.stats == store_after(events[:200]).stats


def test_an_older_format_or_another_window_is_refused_with_a_clear_error(tmp_path, caplog):
    d = CheckpointDir(tmp_path)
    arrays = store_after(random_stream(5)[:100]).to_arrays()
    path = d.write(arrays, {"window": [WIN, HOP]})
    # rewrite the meta member as a checkpoint of format 0 would have it
    with np.load(path) as z:
        members = {k: z[k] for k in z.files}
    members[META] = np.frombuffer(json.dumps({"format": 0, "window": [WIN, HOP]}).encode(), np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **members)
    with caplog.at_level(logging.WARNING, logger="chorus.worker.checkpoint"):
        assert d.latest() is None
    assert any(f"has format 0; this chorus reads format {FORMAT}" in r.getMessage() for r in caplog.records)

    d.write(arrays, {"window": [WIN, HOP]})

    def accept(meta):
        if meta["window"] != [2 * WIN, HOP]:
            raise CheckpointMismatch("checkpoint for another window")

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="chorus.worker.checkpoint"):
        assert d.latest(accept) is None
    # a changed setup (another window, or another cluster: a new embedded broker per `chorus run`)
    # is expected, so a WARNING, not an ERROR
    assert [r.levelno for r in caplog.records if "another window" in r.getMessage()] == [logging.WARNING]
    # the store's own format is checked too
    meta = json.loads(bytes(arrays["meta"]))
    arrays["meta"] = np.frombuffer(json.dumps({**meta, "format": STATE_FORMAT - 1}).encode(), np.uint8)
    with pytest.raises(ValueError, match=f"format {STATE_FORMAT - 1}, this chorus reads {STATE_FORMAT}"):
        WindowStore.from_arrays(arrays, fake_classify)


def test_covering_takes_per_partition_the_furthest_whole_checkpoint_of_any_assignment(tmp_path, caplog):
    """A takeover (issue 17): the partitions of several workers' checkpoints, each partition from the
    whole, accepted checkpoint that is furthest along it (the newest on a tie); a broken file's
    partitions come from the next best one, a refused file gives none, an uncovered one is in none."""
    d = CheckpointDir(tmp_path)
    arrays = store_after(random_stream(3)[:50]).to_arrays()
    E, O = "chorus.events", "ops"

    def meta(assigned, events, ops=None, **kw):
        return {"assigned": [list(tp) for tp in assigned], "offsets": {"events": events, "ops": ops or {}}, **kw}

    old_all = d.write(arrays, meta([(E, 0), (E, 1), (E, 2), (O, 0)], {"0": 5, "1": 5, "2": 5}, {"0": 3}), tag="all")
    a = d.write(arrays, meta([(E, 0), (E, 1), (O, 0)], {"0": 9, "1": 4}, {"0": 3}), tag="aa")
    b = d.write(arrays, meta([(E, 2)], {"2": 8}), tag="bb")
    other = d.write(arrays, meta([(E, 3)], {"3": 99}, window=[1, 1]), tag="cc")

    def accept(m):
        if m.get("window") == [1, 1]:
            raise CheckpointMismatch("checkpoint for another window")

    def progress(m, tp):
        return m["offsets"]["events" if tp[0] == E else "ops"].get(str(tp[1]), 0)

    wanted = {(E, 0), (E, 1), (E, 2), (E, 3), (O, 0)}
    got = {path: take for path, _m, arr, take in d.covering(wanted, accept, progress)}
    # (E, 1): 5 in the older file of every partition beats 4; (O, 0): a tie, the newer one
    assert got == {a: {(E, 0), (O, 0)}, old_all: {(E, 1)}, b: {(E, 2)}}
    assert [p for p, *_ in d.covering(wanted, accept, progress)][0] == a  # the one giving the most first
    raw = bytearray(a.read_bytes())
    at = raw.find(b"records.npy") + 200
    raw[at + 4096] ^= 0x10  # a bit flipped in its arrays: its meta still reads
    a.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="chorus.worker.checkpoint"):
        got = {path: take for path, _m, arr, take in d.covering(wanted, accept, progress)}
    assert got == {old_all: {(E, 0), (E, 1), (O, 0)}, b: {(E, 2)}}
    assert any("broken" in r.getMessage() and a.name in r.getMessage() for r in caplog.records)
    assert any("another window" in r.getMessage() for r in caplog.records) and other.exists()
    assert d.covering({(E, 7)}, accept, progress) == []
