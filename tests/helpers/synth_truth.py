"""Ground truth of the synthetic population for tests: the chorus.events values its frames should
produce (an oracle written from the population's own plan, never from the ingester's output)."""

from __future__ import annotations

from typing import Any, Iterator

from stream.sim import frames as frame_codec
from stream.sim.synth import DEFAULT_START_US, Population


def expected_events(pop: Population, start_seq: int = 1, start_time_us: int | None = None) -> Iterator[dict[str, Any]]:
    """The chorus.events values (DESIGN.md schema, without ``v``) the frames should produce, in
    order; ``#account``/``#identity``/``#sync`` frames produce none. Follow creates and deletes
    carry the commit's ``rev``."""
    t0 = DEFAULT_START_US if start_time_us is None else int(start_time_us)
    for seq, (t, k, a, ops) in enumerate(pop._items(t0), start=start_seq):
        if ops is None:
            continue
        did = pop.did(a)
        for op in ops:
            ev: dict[str, Any] = {"did": did, "rkey": op.rkey, "uri": f"at://{did}/{op.path}",
                                  "seq": seq, "time_us": t}
            rec = op.record
            if op.collection == frame_codec.FOLLOW:
                ev["rev"] = frame_codec.tid(t, seq & 0x3FF)  # commit_frame's default rev
            if op.action == "delete":
                ev.update(kind="delete", collection=op.collection)
            elif op.collection == frame_codec.FOLLOW:
                ev.update(kind="follow", subject_did=rec["subject"])
            elif op.collection == frame_codec.POST:
                ev.update(kind="post", text=rec["text"], langs=rec.get("langs"))
                if "reply" in rec:
                    ev.update(reply_parent=rec["reply"]["parent"]["uri"], reply_root=rec["reply"]["root"]["uri"])
                if "embed" in rec:
                    ev["quote_uri"] = rec["embed"]["record"]["uri"]
            else:
                uri = rec["subject"]["uri"]
                ev.update(kind="like" if op.collection == frame_codec.LIKE else "repost", subject_uri=uri,
                          subject_did=uri.split("/")[2])
            yield ev
