"""Handles next to DIDs: chorus.identities -> the operator's top culprits, the console, alerts and
report lines; metric labels keep the DID only."""

from __future__ import annotations

from prometheus_client import REGISTRY

from operators.service.service import OperatorService
from stream.config import Settings
from stream.display import who
from stream.ingest.decode import decode_frame
from stream.local.console import snapshot_line
from stream.schemas import Features, Identity
from stream.sim import frames as sim_frames

T = 1_735_689_600_000_000


def test_top_culprits_carry_the_latest_handle_and_labels_keep_the_did():
    svc = OperatorService(Settings(indicators=["volume"]), steps=16, panel_k=1)
    for did, posts in (("did:plc:aaa", 5.0), ("did:plc:bbb", 3.0), ("did:plc:ccc", 1.0)):
        svc.apply_features(Features(did=did, window_end=60, topics={"t": [posts, 0.0, 0.0, 0.0]}))
    svc.apply_identity(Identity(did="did:plc:aaa", handle="old.example.com", time_us=T))
    svc.apply_identity(Identity(did="did:plc:aaa", handle="alice.example.com", time_us=T + 2))
    svc.apply_identity(Identity(did="did:plc:aaa", handle="stale.example.com", time_us=T + 1))  # older: ignored
    svc.apply_identity(Identity(did="did:plc:bbb", handle=None, time_us=T))  # no valid handle
    (snap,) = svc.recompute()
    top = {e["did"]: e for e in snap.top}
    assert top["did:plc:aaa"]["handle"] == "alice.example.com"
    assert "handle" not in top["did:plc:bbb"] and "handle" not in top["did:plc:ccc"]
    assert REGISTRY.get_sample_value("chorus_attribution_top_agent_info",
                                     {"topic": "t", "indicator": "volume", "rank": "1", "did": "did:plc:aaa"}) == 1
    line = snapshot_line(snap.model_dump())
    assert "top=alice.example.com (did:plc:aaa)" in line


def test_who_and_identity_frames():
    assert who({"did": "did:plc:abcdefghijklmnopqrstuvwx", "handle": "bob.bsky.social"}) == \
        "bob.bsky.social (did:plc:abcdefghi…)"  # the DID shortened to 18 characters
    assert who({"did": "did:plc:abc"}) == "did:plc:abc"
    d = decode_frame(sim_frames.identity_frame(7, "did:plc:abc", handle="Bob.Example.COM", time_us=T))
    assert d.identity == ("did:plc:abc", "bob.example.com") and d.events == []
    d = decode_frame(sim_frames.identity_frame(8, "did:plc:abc", handle="not a handle", time_us=T))
    assert d.identity == ("did:plc:abc", None)
