"""Loopback HTTP endpoints of the synthetic world: a relay's and a PDS's sync XRPC, a PLC directory.

Served for a :class:`stream.sim.repos.SyntheticRepos` as of the relay's current head seq:

- ``GET /xrpc/com.atproto.sync.listRepos?limit=&cursor=``: ``{cursor?, repos: [{did, head, rev,
  active, status?}]}``, paged in population order (``limit`` 1..1000, default 500; the cursor is
  opaque to clients).
- ``GET /xrpc/com.atproto.sync.getRepo?did=``: the repository as a CAR file
  (``application/vnd.ipld.car``); ``400 {error: RepoNotFound | RepoDeactivated | RepoTakendown}``.
- ``GET /plc/{did}``: the DID document (so ``--plc http://HOST:PORT/plc``); ``404`` if unknown,
  ``410`` if tombstoned.
- ``GET /plc/export?count=&after=``: the directory's operation log as JSON lines (did-method-plc's
  export: one genesis ``plc_operation`` per account in population order, then the faults' later
  operations; ``seq`` numbers them, ``after`` is a seq; ``count`` 1..1000, default 10).

Fault injection for the backfill's tests (constructor arguments): ``throttle`` answers the first
``throttle`` getRepo requests with ``429`` and ``Retry-After: retry_after_s``; ``faults`` maps a
DID to one of :data:`FAULTS`; ``getrepo_delay_s`` answers every getRepo that much later (a slow
PDS: keeps a backfill mid-way long enough to be killed there). ``requests`` counts what was asked,
by endpoint.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Callable

from aiohttp import web

from stream.sim import frames as frame_codec
from stream.sim.repos import SyntheticRepos, plc_export_entry

CAR_TYPE = "application/vnd.ipld.car"
# what a faulty repository or DID document does
FAULTS = {
    "bad_block": "getRepo: the CAR holds a block that is not DAG-CBOR",
    "oversize": "getRepo: a CAR of OVERSIZE_BYTES (a padding record)",
    "not_found": "getRepo: 400 RepoNotFound",
    "takendown": "getRepo: 400 RepoTakendown",
    "redirect_loop": "getRepo: 302 to itself, forever",
    "private_pds": "PLC: the DID document's PDS is http://10.0.0.1 (a private address)",
    "metadata_pds": "PLC: the DID document's PDS is http://169.254.169.254 (link-local)",
    "tombstoned": "PLC: 410 for the DID document; the export's last operation is a plc_tombstone",
    "nullified": "PLC export: a later operation (PDS http://10.0.0.2, another handle) marked nullified",
    "export_missing": "PLC export: the DID is not in it (created after the export was read)",
    "moved": "PLC export: the PDS is an old one (http://127.0.0.1:9, nothing listens); the document's is current",
}
# what the whole export does (constructor argument export_fault)
EXPORT_FAULTS = {
    "oversize": "every page starts with an EXPORT_OVERSIZE_BYTES line (over the backfill's page cap)",
    "garbage": "every page is HTML, not JSON lines",
    "absent": "404: the directory has no export",
}
OVERSIZE_BYTES = 3 * 1024 * 1024
EXPORT_OVERSIZE_BYTES = 9 * 1024 * 1024


class SyncServer:
    """aiohttp server for the endpoints above on ``host:port`` (0 = a free port).

    ``head`` returns the relay's head seq (the repositories' state); ``url`` is the base URL (the
    relay/PDS host), ``plc_url`` the PLC directory's.
    """

    def __init__(self, repos: SyntheticRepos, head: Callable[[], int | None], host: str = "127.0.0.1",
                 port: int = 0, throttle: int = 0, retry_after_s: float = 1.0,
                 faults: dict[str, str] | None = None, export_fault: str | None = None,
                 getrepo_delay_s: float = 0.0):
        bad = set((faults or {}).values()) - FAULTS.keys()
        if bad:
            raise ValueError(f"unknown fault(s) {sorted(bad)}; known: {sorted(FAULTS)}")
        if export_fault is not None and export_fault not in EXPORT_FAULTS:
            raise ValueError(f"unknown export fault {export_fault!r}; known: {sorted(EXPORT_FAULTS)}")
        self.export_fault = export_fault
        self._export_log: list[dict] | None = None
        self.repos, self.head, self.host, self.port = repos, head, host, port
        self.throttle, self.retry_after_s = int(throttle), retry_after_s
        self.getrepo_delay_s = float(getrepo_delay_s)
        self.faults = dict(faults or {})
        self.requests: Counter[str] = Counter()
        self.throttled_at: list[float] = []  # loop time of every 429 sent
        self.served_at: dict[str, float] = {}  # DID -> loop time its CAR was served
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def plc_url(self) -> str:
        return f"{self.url}/plc"

    async def start(self) -> "SyncServer":
        app = web.Application()
        app.router.add_get("/xrpc/com.atproto.sync.listRepos", self._list_repos)
        app.router.add_get("/xrpc/com.atproto.sync.getRepo", self._get_repo)
        app.router.add_get("/plc/export", self._plc_export)
        app.router.add_get("/plc/{did}", self._plc)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @staticmethod
    def _error(status: int, error: str, message: str) -> web.Response:
        return web.json_response({"error": error, "message": message}, status=status)

    async def _list_repos(self, request: web.Request) -> web.Response:
        self.requests["listRepos"] += 1
        try:
            limit = int(request.query.get("limit", 500))
            start = int(request.query.get("cursor", 0))
        except ValueError:
            return self._error(400, "InvalidRequest", "limit and cursor must be integers")
        if not 1 <= limit <= 1000 or start < 0:
            return self._error(400, "InvalidRequest", "limit must be 1..1000")
        head = self.head()
        end = min(start + limit, self.repos.n)
        body: dict = {"repos": [self.repos.listing(i, head) for i in range(start, end)]}
        if end < self.repos.n:
            body["cursor"] = str(end)
        return web.json_response(body)

    async def _get_repo(self, request: web.Request) -> web.StreamResponse:
        self.requests["getRepo"] += 1
        if self.getrepo_delay_s > 0:
            await asyncio.sleep(self.getrepo_delay_s)
        if self.throttle > 0:
            self.throttle -= 1
            self.throttled_at.append(asyncio.get_running_loop().time())
            return web.json_response({"error": "RateLimitExceeded", "message": "slow down"}, status=429,
                                     headers={"Retry-After": f"{self.retry_after_s:g}"})
        did = request.query.get("did", "")
        i = self.repos.index(did)
        fault = self.faults.get(did)
        if i is None or fault == "not_found":
            return self._error(400, "RepoNotFound", f"could not find repo for DID: {did}")
        if fault == "takendown":
            return self._error(400, "RepoTakendown", f"repo has been taken down: {did}")
        if fault == "redirect_loop":
            raise web.HTTPFound(str(request.rel_url))
        head = self.head()
        if self.repos.status(i, head) == "deactivated":
            return self._error(400, "RepoDeactivated", f"repo has been deactivated: {did}")
        st = self.repos.state(i, head)
        records = st.records
        if fault == "oversize":
            records = records + [("app.bsky.feed.post/pad", frame_codec.post_record("x" * OVERSIZE_BYTES, 0))]
        car = frame_codec.repo_car(st.did, st.rev, records)
        if fault == "bad_block":  # the last block's bytes replaced by a CBOR break code
            data = frame_codec.encode_record(records[-1][1])[1]
            car = car.replace(data, b"\xff" * len(data))
        self.served_at[did] = asyncio.get_running_loop().time()
        return web.Response(body=car, content_type=CAR_TYPE)

    async def _plc(self, request: web.Request) -> web.Response:
        self.requests["plc"] += 1
        did = request.match_info["did"]
        i = self.repos.index(did)
        if i is None:
            return web.json_response({"message": f"DID not registered: {did}"}, status=404)
        if self.faults.get(did) == "tombstoned":
            return web.json_response({"message": f"DID not available: {did}"}, status=410)
        return web.json_response(self.repos.did_document(i, self._pds(did)))

    def _pds(self, did: str) -> str:
        """The PDS the DID document of ``did`` names."""
        return {"private_pds": "http://10.0.0.1", "metadata_pds": "http://169.254.169.254"}.get(
            self.faults.get(did, ""), self.url)

    def export_log(self) -> list[dict]:
        """The directory's operation log (entries as :func:`~stream.sim.repos.plc_export_entry`)."""
        log, pop = [], self.repos.pop
        for i in range(self.repos.n):
            did = pop.did(i)
            fault = self.faults.get(did)
            if fault != "export_missing":
                pds = "http://127.0.0.1:9" if fault == "moved" else self._pds(did)
                log.append(plc_export_entry(did, len(log) + 1, pds, self.repos.handle(i)))
        for did, fault in self.faults.items():
            i = self.repos.index(did)
            if i is None or fault not in ("tombstoned", "nullified"):
                continue
            prev = next(e["cid"] for e in log if e["did"] == did)
            if fault == "tombstoned":
                log.append(plc_export_entry(did, len(log) + 1, None, None, tombstone=True, prev=prev))
            else:
                log.append(plc_export_entry(did, len(log) + 1, "http://10.0.0.2", "evil.example.com", prev=prev,
                                            nullified=True))
        return log

    async def _plc_export(self, request: web.Request) -> web.Response:
        self.requests["plc_export"] += 1
        if self.export_fault == "absent":
            return web.json_response({"message": "Not Found"}, status=404)
        try:
            count = int(request.query.get("count", 10))
            after = int(request.query.get("after", 0))
        except ValueError:
            return web.json_response({"message": "count and after must be integers"}, status=400)
        if not 1 <= count <= 1000:
            return web.json_response({"message": "count must be 1..1000"}, status=400)
        if self.export_fault == "garbage":
            return web.Response(text="<html><body>maintenance</body></html>\n", content_type="text/html")
        if self._export_log is None:  # built on first use: it names this server's URL (its port)
            self._export_log = self.export_log()
        log = self._export_log
        page = [json.dumps(e, separators=(",", ":")) for e in log[after:after + count]]  # seq k at index k - 1
        if self.export_fault == "oversize":
            page.insert(0, json.dumps({"pad": "x" * EXPORT_OVERSIZE_BYTES}))
        return web.Response(text="\n".join(page) + ("\n" if page else ""), content_type="application/jsonlines")
