"""The synthetic population's repositories and DID documents, as of a point of its firehose.

What ``com.atproto.sync.getRepo`` and a PLC directory would answer for a :class:`stream.sim.synth.
Population` whose frames a relay has published up to seq ``head``: each account's repository holds
its profile (``app.bsky.actor.profile/self``), its pre-existing follows (the population's follow
graph, never on the firehose unless ``graph_on_firehose``) and the follows it made on the firehose
up to ``head``, minus the ones it deleted by then; its ``rev`` is that of its latest commit at or
before ``head`` (the pre-existing state has a rev just before the activity span). An account whose
``#account active=false`` frame is at or before ``head`` is deactivated. Records, rkeys and revs
are exactly those of the frames (same encoders, same TIDs), so a backfill taken at ``head`` and the
firehose after ``head`` reconcile by rev as they would on the network.

DID documents: ``did:plc`` documents with the handle ``user<i>.bsky.social`` in ``alsoKnownAs``
(the handle the population's ``#identity`` frames announce) and an ``#atproto_pds`` service at the
URL the caller gives; the same identity as a PLC export entry (:func:`plc_export_entry`). The
commit's signature and the listing's ``head`` CID are stand-ins (nothing
here signs; chorus does not verify).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property
from typing import Any

import numpy as np

from stream.sim import frames as frame_codec
from stream.sim.synth import (ACCOUNT, DEFAULT_START_US, DELETE, FOLLOW, SYNC, UNFOLLOW, Population)

PROFILE = "app.bsky.actor.profile"


def plc_export_entry(did: str, seq: int, pds_url: str | None, handle: str | None, *, tombstone: bool = False,
                     prev: str | None = None, nullified: bool = False) -> dict[str, Any]:
    """One line of a PLC directory's ``/export`` (did-method-plc): a ``plc_operation`` setting
    ``pds_url`` and ``handle`` (``prev`` None: the genesis operation), or a ``plc_tombstone``.
    Keys and signature are stand-ins (nothing here signs; chorus does not verify)."""
    if tombstone:
        op: dict[str, Any] = {"type": "plc_tombstone", "prev": prev, "sig": "c3RhbmQtaW4"}
    else:
        op = {"type": "plc_operation", "rotationKeys": ["did:key:zQ3shStandIn"],
              "verificationMethods": {"atproto": "did:key:zQ3shStandIn"},
              "alsoKnownAs": [f"at://{handle}"] if handle else [],
              "services": {"atproto_pds": {"type": "AtprotoPersonalDataServer", "endpoint": pds_url}},
              "prev": prev, "sig": "c3RhbmQtaW4"}
    cid = frame_codec.cid_str(frame_codec.cid_of(f"{did}/{seq}".encode()))
    created = datetime.fromtimestamp(1_704_067_200 + seq / 1000, timezone.utc).isoformat(timespec="milliseconds")
    return {"type": "sequenced_op", "seq": seq, "did": did, "operation": op, "cid": cid, "nullified": nullified,
            "createdAt": created.replace("+00:00", "Z")}


@dataclass(frozen=True)
class RepoState:
    """One repository at a head: ``status`` None when active, else e.g. ``"deactivated"``."""

    did: str
    rev: str
    status: str | None
    records: list[tuple[str, dict]]  # (path, record)

    @property
    def follows(self) -> set[tuple[str, str]]:
        """(rkey, subject DID) of its follow records."""
        return {(p.split("/", 1)[1], r["subject"]) for p, r in self.records if p.startswith(frame_codec.FOLLOW + "/")}


class SyntheticRepos:
    """Repositories of ``population`` for frames numbered from ``start_seq`` at ``start_time_us``
    (the values given to :meth:`Population.timed_frames`)."""

    def __init__(self, population: Population, start_seq: int = 1, start_time_us: int | None = None):
        pop = self.pop = population
        t0 = DEFAULT_START_US if start_time_us is None else int(start_time_us)
        self.base_us = pop.activity_start_us(t0)
        n_fc = len(pop._follow_commits) - 1 if len(pop.follow_edges[0]) else 0
        self.first_seq = int(start_seq) + (n_fc if pop.graph_on_firehose else 0)  # seq of timeline entry 0
        self._ft = pop._follow_commit_times(t0)
        tl = pop.timeline
        kind = tl.kind
        commits = np.flatnonzero((kind <= DELETE) | (kind == FOLLOW) | (kind == UNFOLLOW) | (kind == SYNC))
        self._c_pos, self._c_start = self._by_author(commits, tl.author[commits], pop.n)
        changes = np.flatnonzero((kind == FOLLOW) | (kind == UNFOLLOW))
        self._f_pos, self._f_start = self._by_author(changes, tl.author[changes], pop.n)
        self._deact = {int(tl.author[i]): int(i) for i in np.flatnonzero(kind == ACCOUNT)}
        _, dst = pop.follow_edges
        self._pre_start = np.searchsorted(dst, np.arange(pop.n + 1))  # follow_edges sorted by dst

    @staticmethod
    def _by_author(pos: np.ndarray, author: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        order = np.lexsort((pos, author))
        return pos[order], np.searchsorted(author[order], np.arange(n + 1))

    @property
    def n(self) -> int:
        return self.pop.n

    def position(self, head_seq: int | None) -> int:
        """Timeline position of the last entry published at ``head_seq`` (-1: none yet)."""
        if head_seq is None:
            return -1
        return min(int(head_seq) - self.first_seq, len(self.pop.timeline.t) - 1)

    def index(self, did: str) -> int | None:
        """Account index of ``did`` (None: not in the population)."""
        return self._index.get(did)

    @cached_property
    def _index(self) -> dict[str, int]:
        return {d: i for i, d in enumerate(self.pop.dids)}

    def rev(self, i: int, head_seq: int | None) -> str:
        """Rev of account i's repository at ``head_seq``."""
        p = self.position(head_seq)
        pos = self._c_pos[self._c_start[i]:self._c_start[i + 1]]
        k = int(np.searchsorted(pos, p, side="right"))
        if k == 0:
            return frame_codec.tid(self.base_us - 1, i & 0x3FF)  # the pre-existing state
        j = int(pos[k - 1])
        return frame_codec.tid(self.base_us + int(self.pop.timeline.t[j]), (self.first_seq + j) & 0x3FF)

    def status(self, i: int, head_seq: int | None) -> str | None:
        j = self._deact.get(i)
        return "deactivated" if j is not None and j <= self.position(head_seq) else None

    def state(self, i: int, head_seq: int | None) -> RepoState:
        """Account i's repository after the frames up to ``head_seq``."""
        pop, tl = self.pop, self.pop.timeline
        dids = pop.did_bytes
        src, _ = pop.follow_edges
        follows: dict[str, dict] = {}
        pre = range(int(self._pre_start[i]), int(self._pre_start[i + 1]))
        for j in pre:
            c = int(np.searchsorted(pop._follow_commits, j, side="right")) - 1
            follows[frame_codec.tid(int(self._ft[c]), j & 0x3FF)] = frame_codec.follow_record(dids[src[j]].decode(), int(self._ft[c]))
        p = self.position(head_seq)
        for j in self._f_pos[self._f_start[i]:self._f_start[i + 1]]:
            j = int(j)
            if j > p:
                break
            t = self.base_us + int(tl.t[j])
            if tl.kind[j] == FOLLOW:
                follows[frame_codec.tid(t, j & 0x3FF)] = frame_codec.follow_record(dids[int(tl.target[j])].decode(), t)
            else:
                follows.pop(pop._follow_rkey(j, self.base_us, self._ft), None)
        records = [(f"{PROFILE}/self", {"$type": PROFILE, "displayName": f"user {i}"})]
        records += [(f"{frame_codec.FOLLOW}/{rkey}", rec) for rkey, rec in follows.items()]
        return RepoState(pop.did(i), self.rev(i, head_seq), self.status(i, head_seq), records)

    def car(self, i: int, head_seq: int | None) -> bytes:
        """Account i's repository as a getRepo CAR file."""
        st = self.state(i, head_seq)
        return frame_codec.repo_car(st.did, st.rev, st.records)

    def handle(self, i: int) -> str:
        return f"user{i}.bsky.social"

    def did_document(self, i: int, pds_url: str) -> dict[str, Any]:
        """The DID document a PLC directory returns for account i, its PDS at ``pds_url``."""
        did = self.pop.did(i)
        return {
            "@context": ["https://www.w3.org/ns/did/v1"],
            "id": did,
            "alsoKnownAs": [f"at://{self.handle(i)}"],
            "verificationMethod": [],
            "service": [{"id": "#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": pds_url}],
        }

    def listing(self, i: int, head_seq: int | None) -> dict[str, Any]:
        """Account i's ``com.atproto.sync.listRepos`` entry (``head``: a stand-in CID)."""
        did, rev = self.pop.did(i), self.rev(i, head_seq)
        entry: dict[str, Any] = {"did": did, "head": frame_codec.cid_str(frame_codec.cid_of(f"{did}/{rev}".encode())), "rev": rev,
                                 "active": True}
        status = self.status(i, head_seq)
        if status is not None:
            entry.update(active=False, status=status)
        return entry
