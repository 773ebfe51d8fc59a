"""Fuzz the frame decoder (hypothesis): it never raises, and whatever it emits is a valid Event."""

from __future__ import annotations

import libipld
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream.sim import frames as sim_frames
from stream.ingest.decode import FRAME_TYPES, decode_frame
from stream.ingest.normalize import is_did
from stream.schemas import Event

pytestmark = pytest.mark.timeout(120)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
T0 = 1_735_689_600_000_000
DID = "did:plc:fuzz000000000000000000000"

# Values libipld can encode as DAG-CBOR (64-bit ints, finite floats, string keys).
scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=12)
           | st.binary(max_size=40) | st.floats(allow_nan=False, allow_infinity=False))
dag = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                   max_leaves=12)
collections = st.sampled_from([sim_frames.POST, sim_frames.LIKE, sim_frames.REPOST, sim_frames.FOLLOW, "app.bsky.actor.profile", "x"])


def check(d, raw: bytes) -> None:
    assert d.type in FRAME_TYPES
    assert all(isinstance(r, str) for r in d.invalid)
    for ev in d.events:
        Event.model_validate(ev)
        assert is_did(ev["did"]) and ev["seq"] == d.seq and ev["time_us"] == d.time_us
        if ev["kind"] != "account":
            assert ev["uri"] == f"at://{ev['did']}/{ev.get('collection') or ev['uri'].split('/')[3]}/{ev['rkey']}"


@FUZZ
@given(st.binary(max_size=600))
def test_arbitrary_bytes(raw):
    check(decode_frame(raw), raw)


def _valid_frame(seq: int, text: str) -> bytes:
    t = T0 + seq % 10**9
    ops = [sim_frames.Op("create", sim_frames.POST, "3p", sim_frames.post_record(text, t, ["en"])),
           sim_frames.Op("create", sim_frames.LIKE, "3l", sim_frames.like_record(sim_frames.strong_ref(f"at://{DID}/{sim_frames.POST}/3p", "c"), t)),
           sim_frames.Op("delete", sim_frames.FOLLOW, "3f")]
    return sim_frames.commit_frame(seq, DID, ops, t)


@FUZZ
@given(st.integers(0, 2**63 - 1), st.text(max_size=30), st.data())
def test_mutated_valid_frames(seq, text, data):
    raw = bytearray(_valid_frame(seq, text))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        i = data.draw(st.integers(0, len(raw) - 1)) if raw else 0
        if op == "flip" and raw:
            raw[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "cut":
            del raw[i:]
        elif op == "insert":
            raw[i:i] = data.draw(st.binary(min_size=1, max_size=8))
        elif raw:
            del raw[i:i + data.draw(st.integers(1, 8))]
    check(decode_frame(bytes(raw)), bytes(raw))


@FUZZ
@given(st.sampled_from(["#commit", "#account", "#identity", "#sync", "#info", "#other"]), st.dictionaries(
    st.sampled_from(["seq", "repo", "did", "time", "ops", "blocks", "active", "status", "name", "handle"]),
    dag, max_size=8))
def test_random_bodies(t, body):
    raw = libipld.encode_dag_cbor({"op": 1, "t": t}) + libipld.encode_dag_cbor(body)
    check(decode_frame(raw), raw)


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(["create", "delete", "update", "bogus"]), collections,
                          st.text(min_size=1, max_size=6), dag | st.fixed_dictionaries(
                              {"$type": collections, "text": dag, "subject": dag, "langs": dag, "reply": dag,
                               "embed": dag})), max_size=6),
       st.integers(0, 2**63 - 1))
def test_random_ops_and_records(ops, seq):
    wire = [sim_frames.Op(a, c, r, rec if a != "delete" and isinstance(rec, dict) else None) for a, c, r, rec in ops]
    raw = sim_frames.commit_frame(seq, DID, wire, T0)
    d = decode_frame(raw)
    check(d, raw)
    assert d.seq == seq and len(d.events) + len(d.invalid) <= len(ops)


json_values = st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**64) | st.text(max_size=12)
                           | st.floats(allow_nan=False, allow_infinity=False),
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                           max_leaves=12)


@FUZZ
@given(st.fixed_dictionaries({}, optional={
    "did": st.sampled_from([DID, "nope", 5]), "time_us": st.integers(-5, 2**64) | json_values,
    "kind": st.sampled_from(["commit", "account", "identity", "other"]) | json_values,
    "commit": st.fixed_dictionaries({}, optional={
        "operation": st.sampled_from(["create", "delete", "update"]) | json_values,
        "collection": collections | json_values, "rkey": st.text(max_size=6) | json_values,
        "record": dag | st.fixed_dictionaries({"$type": collections, "text": json_values, "subject": json_values,
                                               "langs": json_values, "reply": json_values, "embed": json_values}),
    }) | json_values,
    "account": json_values | st.fixed_dictionaries({"active": st.booleans(), "status": json_values}),
}))
def test_random_jetstream_messages(obj):
    import json

    from stream.ingest.jetstream import decode_message

    raw = json.dumps(obj, default=lambda b: b.hex())
    d = decode_message(raw)
    assert d.type in FRAME_TYPES and all(isinstance(r, str) for r in d.invalid)
    for ev in d.events:
        Event.model_validate(ev)
        assert is_did(ev["did"]) and ev["seq"] == ev["time_us"] == obj["time_us"]
        json.dumps(ev, ensure_ascii=False).encode()  # publishable as UTF-8
