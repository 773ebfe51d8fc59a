"""Frames built by stream.sim.frames decode with the unmodified atproto SDK; records round-trip."""

from __future__ import annotations

import re
from datetime import datetime, timezone

import libipld
import pytest
from atproto import CAR, parse_subscribe_repos_message
from atproto_client.models.com.atproto.sync import subscribe_repos as sdk_models
from atproto_subscription.frames import ErrorFrame, Frame

from stream.sim import frames as sim_frames

T = 1_735_689_600_123_456
DID = "did:plc:abcdefghijklmnopqrstuvwx"
OTHER = "did:plc:zyxwvutsrqponmlkjihgfedc"
DID_RE = re.compile(r"^did:[a-z]+:[a-zA-Z0-9._:%-]*[a-zA-Z0-9._-]$")


def sdk(data: bytes):
    return parse_subscribe_repos_message(Frame.from_bytes(data))


def test_commit_all_record_kinds_round_trip():
    parent_uri = f"at://{OTHER}/{sim_frames.POST}/3lenaaaaaaaaa"
    parent = sim_frames.strong_ref(parent_uri, "bafyreih6saflvfusprnz2nakd2nfngulpkaac7h2bsexennllufczcp4ri")
    records = [
        sim_frames.Op("create", sim_frames.POST, sim_frames.tid(T, 1), sim_frames.post_record("climate talk", T, ["en", "pt"])),
        sim_frames.Op("create", sim_frames.POST, sim_frames.tid(T, 2), sim_frames.post_record("agreed", T, ["en"], reply=(parent, parent))),
        sim_frames.Op("create", sim_frames.POST, sim_frames.tid(T, 3), sim_frames.post_record("look at this", T, quote=parent)),
        sim_frames.Op("create", sim_frames.LIKE, sim_frames.tid(T, 4), sim_frames.like_record(parent, T)),
        sim_frames.Op("create", sim_frames.REPOST, sim_frames.tid(T, 5), sim_frames.repost_record(parent, T)),
        sim_frames.Op("create", sim_frames.FOLLOW, sim_frames.tid(T, 6), sim_frames.follow_record(OTHER, T)),
        sim_frames.Op("delete", sim_frames.POST, sim_frames.tid(T, 7)),
    ]
    seq = 2**31 + 17  # seqs exceed 2^31
    msg = sdk(sim_frames.commit_frame(seq, DID, records, T))
    assert isinstance(msg, sdk_models.Commit)
    assert (msg.seq, msg.repo, msg.time) == (seq, DID, "2025-01-01T00:00:00.123456Z")
    assert not msg.rebase and not msg.too_big
    car = CAR.from_bytes(msg.blocks)
    assert car.root == msg.commit
    assert car.blocks[car.root]["did"] == DID and car.blocks[car.root]["rev"] == msg.rev
    assert [o.path for o in msg.ops] == [op.path for op in records]
    for op, wire in zip(records, msg.ops):
        assert wire.action == op.action
        if op.record is None:
            assert wire.cid is None
            continue
        assert car.blocks[wire.cid] == op.record  # the block under the op's CID is the record
    post = car.blocks[msg.ops[1].cid]
    assert post["reply"]["parent"]["uri"] == parent_uri
    assert car.blocks[msg.ops[2].cid]["embed"]["$type"] == "app.bsky.embed.record"
    assert car.blocks[msg.ops[5].cid]["subject"] == OTHER


def test_cids_are_sha256_dag_cbor_v1():
    rec = sim_frames.post_record("x", T)
    raw, data = sim_frames.encode_record(rec)
    cid = libipld.decode_cid(raw)
    assert (cid["version"], cid["codec"], cid["hash"]["code"]) == (1, 0x71, 0x12)
    assert libipld.decode_dag_cbor(data) == rec
    assert sim_frames.cid_str(raw).startswith("bafyrei")


def test_other_message_types():
    ident = sdk(sim_frames.identity_frame(5, DID, "alice.bsky.social", time_us=T))
    assert isinstance(ident, sdk_models.Identity) and ident.handle == "alice.bsky.social" and ident.seq == 5
    acct = sdk(sim_frames.account_frame(6, DID, False, "deactivated", time_us=T))
    assert isinstance(acct, sdk_models.Account) and acct.active is False and acct.status == "deactivated"
    assert sdk(sim_frames.account_frame(7, DID, True, time_us=T)).status is None
    sync = sdk(sim_frames.sync_frame(8, DID, time_us=T))
    assert isinstance(sync, sdk_models.Sync) and CAR.from_bytes(sync.blocks).blocks[CAR.from_bytes(sync.blocks).root]["rev"] == sync.rev
    info = sdk(sim_frames.info_frame("OutdatedCursor", "too old"))
    assert isinstance(info, sdk_models.Info) and info.name == "OutdatedCursor"
    err = Frame.from_bytes(sim_frames.error_frame("FutureCursor", "ahead"))
    assert isinstance(err, ErrorFrame) and err.body.error == "FutureCursor"
    assert sim_frames.split_frame(sim_frames.error_frame("FutureCursor")) == ({"op": -1}, {"error": "FutureCursor"})


def test_tid_and_time_formats():
    a, b = sim_frames.tid(T, 0), sim_frames.tid(T + 1, 0)
    assert len(a) == 13 and re.fullmatch(r"[234567abcdefghij][234567a-z]{12}", a)
    assert a < b and sim_frames.tid_time_us(a) == T
    assert sim_frames.tid(T, 1) != a
    assert sim_frames.iso_time(T) == datetime.fromtimestamp(T // 10**6, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S") + ".123456Z"
    assert sim_frames.parse_iso_time_us(sim_frames.iso_time(T)) == T


def test_bad_frames_are_bad_in_the_documented_way():
    bad = sim_frames.bad_frames(seq=9, time_us=T)
    for name in ("malformed_cbor", "truncated", "header_only"):
        with pytest.raises(Exception):
            sdk(bad[name])
    header, body = sim_frames.split_frame(bad["unknown_type"])
    assert header["t"] == "#bogus"
    msg = sdk(bad["car_missing_block"])
    assert msg.ops[0].cid not in CAR.from_bytes(msg.blocks).blocks
    with pytest.raises(Exception):
        CAR.from_bytes(sdk(bad["bad_car"]).blocks)
    msg = sdk(bad["wrong_record_type"])
    assert msg.ops[0].path.startswith(sim_frames.POST + "/")
    assert CAR.from_bytes(msg.blocks).blocks[msg.ops[0].cid]["$type"] == sim_frames.LIKE
    rec = CAR.from_bytes(sdk(bad["wrong_record_shape"]).blocks).blocks
    assert any(b.get("$type") == sim_frames.POST and "text" not in b for b in rec.values())
    assert not DID_RE.match(sim_frames.split_frame(bad["invalid_did"])[1]["repo"])
    assert len(bad["oversize"]) > sim_frames.MAX_FRAME_BYTES
    assert sim_frames.split_frame(bad["oversize"])[1]["seq"] == 9
