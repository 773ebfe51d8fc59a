"""Reading follow records from getRepo CAR files: the MST walk, and each way a repository is bad."""

from __future__ import annotations

import random

import libipld
import pytest

from stream.backfill.car import RepoError, read_follows
from stream.sim import frames as frame_codec

DID = "did:plc:carreader000000000000000a"
T = 1_735_689_600_000_000


def follows(n: int) -> list[tuple[str, dict]]:
    return [(f"{frame_codec.FOLLOW}/{frame_codec.tid(T + 1000 * i, i)}", frame_codec.follow_record(f"did:plc:subject{i:017d}", T))
            for i in range(n)]


def test_walks_the_mst_and_keeps_only_follows():
    likes = [(f"{frame_codec.LIKE}/{frame_codec.tid(T + 7 * i, i)}", frame_codec.like_record(frame_codec.strong_ref(f"at://{DID}/{frame_codec.POST}/x", "bafy"), T))
             for i in range(400)]
    bad = [(f"{frame_codec.FOLLOW}/3zzzzzzzzzzz2", {"$type": frame_codec.FOLLOW, "subject": "not a did"}),
           (f"{frame_codec.FOLLOW}/3zzzzzzzzzzz3", {"$type": frame_codec.LIKE, "subject": "did:plc:x"})]
    profile = [("app.bsky.actor.profile/self", {"$type": "app.bsky.actor.profile", "displayName": "me"})]
    records = follows(300) + likes + bad + profile
    random.Random(1).shuffle(records)
    car = frame_codec.repo_car(DID, frame_codec.tid(T, 5), records)
    got = read_follows(car, DID)
    assert got.rev == frame_codec.tid(T, 5) and got.skipped == 2
    assert got.follows == [(p.split("/")[1], r["subject"]) for p, r in sorted(follows(300))]
    # a multi-level tree: more MST nodes than one per 4 keys would give at a single level
    blocks = libipld.decode_car(car)[1]
    nodes = [b for b in blocks.values() if isinstance(b, dict) and "e" in b]
    assert len(nodes) > 50 and any(b["l"] is not None for b in nodes)


def test_empty_repository():
    got = read_follows(frame_codec.repo_car(DID, frame_codec.tid(T), []), DID)
    assert got.follows == [] and got.skipped == 0


@pytest.mark.parametrize("mangle, reason", [
    (lambda car: car[: len(car) // 2], "bad_car"),           # truncated
    (lambda car: b"\x05hello", "bad_car"),                    # not a CAR
    (lambda car: car.replace(frame_codec.encode_record(follows(3)[1][1])[1], b"\xff" * len(frame_codec.encode_record(follows(3)[1][1])[1])),
     "bad_block"),                                            # one block is not DAG-CBOR
])
def test_bad_cars_are_refused_with_a_reason(mangle, reason):
    car = frame_codec.repo_car(DID, frame_codec.tid(T), follows(3))
    with pytest.raises(RepoError) as err:
        read_follows(mangle(car), DID)
    assert err.value.reason == reason


def test_commit_of_another_repository_or_missing_tree():
    car = frame_codec.repo_car(DID, frame_codec.tid(T), follows(3))
    with pytest.raises(RepoError) as err:
        read_follows(car, "did:plc:someoneelse0000000000000")
    assert err.value.reason == "bad_commit"
    # the commit's MST root points at a block the CAR does not hold
    commit_cid, commit = frame_codec._commit_block(DID, frame_codec.tid(T), frame_codec.cid_of(b"nothing"))
    with pytest.raises(RepoError) as err:
        read_follows(frame_codec.encode_car([commit_cid], [(commit_cid, commit)]), DID)
    assert err.value.reason == "bad_mst"


def test_a_cycle_in_the_tree_is_refused():
    # a node whose left pointer is its own commit's data root cannot be built by hashing, so point
    # two entries' subtrees at the same node: the walk must not visit it twice
    leaf = libipld.encode_dag_cbor({"l": None, "e": [{"p": 0, "k": f"{frame_codec.FOLLOW}/3aaa".encode(), "v": frame_codec.cid_of(b"r"), "t": None}]})
    leaf_cid = frame_codec.cid_of(leaf)
    root = libipld.encode_dag_cbor({"l": leaf_cid, "e": [{"p": 0, "k": f"{frame_codec.FOLLOW}/3zzz".encode(), "v": frame_codec.cid_of(b"r"), "t": leaf_cid}]})
    root_cid = frame_codec.cid_of(root)
    commit_cid, commit = frame_codec._commit_block(DID, frame_codec.tid(T), root_cid)
    car = frame_codec.encode_car([commit_cid], [(commit_cid, commit), (root_cid, root), (leaf_cid, leaf)])
    with pytest.raises(RepoError) as err:
        read_follows(car, DID)
    assert err.value.reason == "bad_mst"
