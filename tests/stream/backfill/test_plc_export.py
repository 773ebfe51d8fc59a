"""did:plc identities from the PLC directory's export (stream/backfill/plc_export.py) against the
synthetic directory (stream/sim/xrpc.py, real HTTP on loopback): the same identities as the
per-DID documents, tombstones and nullified operations, DIDs the export lacks, hostile operations
and pages; and a relay-mode backfill that resolves through it."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest

from stream.backfill.fetch import Fetcher, Limits, parse_networks
from stream.backfill.identity import IdentityError, Resolver
from stream.backfill.plc_export import (MAX_LINE_BYTES, NO_PDS, OK, TOMBSTONE, ExportError, ExportMirror,
                                        mirror_path, parse_op, sync_export)
from stream.backfill.service import Backfill, BackfillError, Options
from stream.sim.relay import FrameSource, Relay
from stream.sim.repos import SyntheticRepos, plc_export_entry
from stream.sim.synth import Population
from stream.sim.xrpc import SyncServer

pytestmark = pytest.mark.timeout(240)
LOOPBACK = ["127.0.0.0/8"]
START = 1_735_689_600_000_000
LIMITS = Limits(concurrency=8, per_host=8, retries=1, backoff_base_s=0.05, backoff_cap_s=0.2)
DID = "did:plc:" + "a" * 24


def line(entry: dict) -> bytes:
    return json.dumps(entry).encode()


@contextlib.asynccontextmanager
async def directory(repos: SyntheticRepos, **server_kw):
    """(the synthetic directory on a free loopback port, a fetcher allowed loopback)."""
    server = await SyncServer(repos, lambda: None, **server_kw).start()
    try:
        async with Fetcher(LIMITS, parse_networks(LOOPBACK)) as f:
            yield server, f
    finally:
        await server.stop()


async def resolve_all(resolver: Resolver, dids: list[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for did in dids:
        try:
            ident = await resolver.resolve(did)
            out[did] = (ident.pds, ident.handle)
        except IdentityError as exc:
            out[did] = exc.reason
    return out


# --- one operation ---------------------------------------------------------------------------------

def test_parse_op_takes_the_fields_used_and_refuses_the_rest():
    ok = plc_export_entry(DID, 1, "https://pds.example.com/", "Alice.Example.com")
    assert parse_op(line(ok)) == (DID, OK, "https://pds.example.com", "alice.example.com")
    assert parse_op(line(plc_export_entry(DID, 2, None, None, tombstone=True))) == (DID, TOMBSTONE, None, None)
    legacy = {"did": DID, "nullified": False, "createdAt": "2023-01-01T00:00:00Z",
              "operation": {"type": "create", "service": "https://bsky.social", "handle": "bob.bsky.social",
                            "signingKey": "did:key:x", "recoveryKey": "did:key:y", "prev": None, "sig": "s"}}
    assert parse_op(line(legacy)) == (DID, OK, "https://bsky.social", "bob.bsky.social")
    # a PDS that is no plain http(s) origin: the DID has no PDS now (an older one must not survive)
    for bad in ("https://u:p@pds.example.com", "https://pds.example.com/x?y=1", "file:///etc/passwd", 42, None):
        e = plc_export_entry(DID, 3, "https://x.example.com", "ok.example.com")
        e["operation"]["services"]["atproto_pds"]["endpoint"] = bad
        assert parse_op(line(e)) == (DID, NO_PDS, None, "ok.example.com"), bad
    wrong_type = plc_export_entry(DID, 3, "https://x.example.com", "ok.example.com")
    wrong_type["operation"]["services"]["atproto_pds"]["type"] = "Other"
    assert parse_op(line(wrong_type))[1] == NO_PDS
    bad_handle = plc_export_entry(DID, 4, "https://x.example.com", "-not a handle-")
    assert parse_op(line(bad_handle)) == (DID, OK, "https://x.example.com", None)
    assert parse_op(line(plc_export_entry(DID, 5, "https://x.example.com", "a.b", nullified=True))) == "nullified"
    assert parse_op(line({**ok, "nullified": "no"})) == "bad_op"
    assert parse_op(line({**ok, "did": "did:plc:short"})) == "bad_did"
    assert parse_op(line({**ok, "did": "did:web:example.com"})) == "bad_did"
    assert parse_op(line({**ok, "operation": {"type": "plc_something"}})) == "bad_op"
    assert parse_op(line({**ok, "operation": "x"})) == "bad_op"
    assert parse_op(b"[1, 2]") == "bad_line" and parse_op(b"{not json") == "bad_line"
    long = dict(ok, operation=dict(ok["operation"], pad="x" * MAX_LINE_BYTES))
    assert parse_op(line(long)) == "bad_line"


# --- the synthetic directory: bulk == per-DID ------------------------------------------------------

def world(n: int = 50, seed: int = 5):
    pop = Population(n, seed=seed, events_per_account=1)
    dids = list(pop.dids)
    faults = {dids[0]: "tombstoned", dids[1]: "nullified", dids[2]: "export_missing", dids[3]: "private_pds",
              dids[4]: "metadata_pds"}
    return pop, SyntheticRepos(pop, 1, START), faults


def test_export_identities_equal_the_per_did_documents(tmp_path):
    """Every DID of the synthetic population resolves to the same PDS and handle (or the same
    failure) through the export mirror as through its own DID document; both match the
    population's truth; only the DID the export lacks costs a request; a second sync only
    catches up from the saved cursor."""
    pop, repos, faults = world()

    async def main():
        async with directory(repos, faults=faults) as (server, f):
            mirror = ExportMirror(mirror_path(tmp_path, server.plc_url))
            stats = await sync_export(f, server.plc_url, mirror, count=7)
            per_did = await resolve_all(Resolver(f, server.plc_url), pop.dids)
            asked = server.requests["plc"]
            bulk_resolver = Resolver(f, server.plc_url, mirror=mirror)
            bulk = await resolve_all(bulk_resolver, pop.dids)
            bulk_requests = server.requests["plc"] - asked
            again = await sync_export(f, server.plc_url, mirror, count=7)
            mirror.close()
            return server, stats, per_did, bulk, bulk_resolver, bulk_requests, again

    server, stats, per_did, bulk, resolver, bulk_requests, again = asyncio.run(main())
    assert bulk == per_did
    for i, did in enumerate(pop.dids):  # independent truth: the population and the faults
        want = {"tombstoned": "did_tombstoned", "private_pds": ("http://10.0.0.1", repos.handle(i)),
                "metadata_pds": ("http://169.254.169.254", repos.handle(i))}.get(
            faults.get(did, ""), (server.url, repos.handle(i)))
        assert bulk[did] == want, did
    assert bulk[pop.dids[1]] == (server.url, repos.handle(1))  # the nullified operation is not current
    log = server.export_log()
    assert len(log) == pop.n - 1 + 2  # all but export_missing, + a tombstone and a nullified op
    assert stats.pages == -(-len(log) // 7) and stats.applied == len(log) - 1
    assert stats.by_reason == {"nullified": 1}
    assert bulk_requests == 1 and resolver.from_export == pop.n - 2  # the missing DID; the tombstone raised
    assert again.pages == 0 and again.applied == 0 and server.requests["plc_export"] == stats.pages + 2  # + the log's first line
    assert stats.complete and again.complete


def test_a_stopped_read_is_incomplete_and_resumes_from_its_cursor(tmp_path):
    pop, repos, faults = world()

    async def main():
        async with directory(repos, faults=faults) as (server, f):
            mirror = ExportMirror(tmp_path / "m.sqlite")
            pages = []
            part = await sync_export(f, server.plc_url, mirror, count=10, on_page=lambda st: pages.append(st.pages),
                                     stopped=lambda: len(pages) >= 2)
            held, cursor = len(mirror), mirror.cursor
            mirror.close()
            mirror = ExportMirror(tmp_path / "m.sqlite")  # a later run
            rest = await sync_export(f, server.plc_url, mirror, count=10)
            rows = {did: mirror.lookup(did) for did in pop.dids}
            mirror.close()
            return part, held, cursor, rest, rows, server.export_log()

    part, held, cursor, rest, rows, log = asyncio.run(main())
    assert not part.complete and part.pages == 2 and held == 20 and cursor == "20"
    assert rest.complete and part.applied + rest.applied == len(log) - 1  # all but the nullified op
    assert sum(r is not None for r in rows.values()) == pop.n - 1  # all but export_missing


def test_a_mirror_of_another_log_starts_over(tmp_path):
    """The same URL now serving another population's log (a synthetic directory restarted): the
    resumed read sees another first line and rebuilds the mirror, no DID of the old log left."""
    old_pop, old_repos, _ = world(seed=5)
    new_pop, new_repos, _ = world(seed=6)

    async def read(repos, port):
        async with directory(repos, port=port) as (server, f):
            mirror = ExportMirror(tmp_path / "m.sqlite")
            try:
                st = await sync_export(f, server.plc_url, mirror, count=20)
                return st, server.port, {d: mirror.lookup(d) for d in old_pop.dids + new_pop.dids}
            finally:
                mirror.close()

    first, port, _ = asyncio.run(read(old_repos, 0))
    second, _, rows = asyncio.run(read(new_repos, port))
    assert first.applied == second.applied == new_pop.n
    gone = set(old_pop.dids) - set(new_pop.dids)
    assert gone and all(rows[d] is None for d in gone)
    assert all(rows[d] is not None for d in new_pop.dids)


@pytest.mark.parametrize("fault,reason", [("oversize", "too_large"), ("garbage", "bad_page"),
                                          ("absent", "not_supported")])
def test_a_hostile_or_absent_export_raises_one_line(tmp_path, fault, reason):
    pop, repos, _ = world()

    async def main():
        async with directory(repos, export_fault=fault) as (server, f):
            mirror = ExportMirror(tmp_path / "m.sqlite")
            try:
                with pytest.raises(ExportError) as err:
                    await sync_export(f, server.plc_url, mirror)
                return err.value, len(mirror), mirror.cursor
            finally:
                mirror.close()

    exc, held, cursor = asyncio.run(main())
    assert exc.reason == reason and "\n" not in str(exc)
    assert held == 0 and cursor is None


@contextlib.asynccontextmanager
async def export_server(handler):
    """A directory whose /export is ``handler``: its base URL (stopped on exit, or by cleanup())."""
    from aiohttp import web

    app = web.Application()
    app.router.add_get("/export", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}", runner
    finally:
        await runner.cleanup()


def test_an_unreachable_directory_and_a_stuck_cursor_raise(tmp_path):
    from aiohttp import web

    async def stuck(request):  # ignores `after`: always the same full page
        return web.Response(text="\n".join(json.dumps(plc_export_entry(DID, 1, "https://p.example.com", None))
                                           for _ in range(2)))

    async def main():
        mirror = ExportMirror(tmp_path / "m.sqlite")
        try:
            async with export_server(stuck) as (url, runner), Fetcher(LIMITS, parse_networks(LOOPBACK)) as f:
                with pytest.raises(ExportError) as a:
                    await sync_export(f, url, mirror, count=2)
                await runner.cleanup()
                with pytest.raises(ExportError) as b:
                    await sync_export(f, url, mirror, count=2)
                async with Fetcher(LIMITS, []) as strict:  # loopback not allowed: refused
                    with pytest.raises(ExportError) as c:
                        await sync_export(strict, "http://127.0.0.1:9", mirror)
            return a.value, b.value, c.value
        finally:
            mirror.close()

    a, b, c = asyncio.run(main())
    assert a.reason == "stuck_cursor" and b.reason == "unreachable" and c.reason == "private_address"


def test_a_directory_without_seq_pages_by_created_at(tmp_path):
    """Older directories number nothing: the next page is after the last line's createdAt."""
    from aiohttp import web

    dids = ["did:plc:" + c * 24 for c in "abcde"]
    entries = []
    for k, did in enumerate(dids):
        e = plc_export_entry(did, k + 1, f"https://pds{k}.example.com", f"user{k}.example.com")
        del e["seq"], e["type"]
        entries.append(e)
    asked = []

    async def legacy(request):
        after, count = request.query.get("after", ""), int(request.query["count"])
        asked.append(after)
        page = [e for e in entries if e["createdAt"] > after][:count]
        return web.Response(text="\n".join(json.dumps(e) for e in page))

    async def main():
        mirror = ExportMirror(tmp_path / "m.sqlite")
        try:
            async with export_server(legacy) as (url, _), Fetcher(LIMITS, parse_networks(LOOPBACK)) as f:
                st = await sync_export(f, url, mirror, count=2)
            return st, {d: mirror.lookup(d) for d in dids}, mirror.cursor
        finally:
            mirror.close()

    st, rows, cursor = asyncio.run(main())
    assert st.complete and st.pages == 3 and st.applied == 5
    assert asked == ["", entries[1]["createdAt"], entries[3]["createdAt"]] and cursor == entries[4]["createdAt"]
    assert rows == {d: (OK, f"https://pds{k}.example.com", f"user{k}.example.com") for k, d in enumerate(dids)}


# --- a relay-mode backfill through the export -------------------------------------------------------

def test_relay_backfill_resolves_through_the_export(fresh_broker, tmp_path):
    """One export read, per-DID requests only for the DID the export lacks and the one whose PDS
    moved since (fetched again at its current PDS); a tombstone and a private address from the
    export refused and counted; the graph holds every follow of the repositories that could be
    had."""
    from tests.stream.backfill.test_backfill import read_graph, truth

    pop = Population(80, seed=21, events_per_account=1)
    deact = set(pop.retractions()["deactivated"])
    dids = [d for d in pop.dids if d not in deact]
    faults = {dids[0]: "tombstoned", dids[1]: "nullified", dids[2]: "export_missing", dids[3]: "private_pds",
              dids[4]: "moved"}

    async def main():
        relay = Relay(FrameSource.from_population(pop, 1, START), repos=SyntheticRepos(pop, 1, START),
                      sync={"faults": faults})
        async with relay:
            opts = Options(relay=relay.sync.url, plc=relay.sync.plc_url, allow_nets=LOOPBACK, progress=False,
                           limits=LIMITS)
            bf = Backfill(fresh_broker.bootstrap, tmp_path, opts, idempotence=False)
            await bf.run()
            return bf, relay.sync

    bf, server = asyncio.run(main())
    c = bf.state.counts
    assert c["did_tombstoned"] == 1 and c["private_address"] == 1
    assert c["done"] == pop.n - len(deact) - 2 and c.get("deactivated", 0) == len(deact)
    assert bf.export is not None and bf.export.by_reason == {"nullified": 1}
    assert bf.refreshed == 1
    # per-DID documents: the DID the export lacks and the moved one's fresh document only
    assert server.requests["plc"] == 2
    failed = {dids[0], dids[3]}
    want = {e for e in truth(pop) if e[1] not in failed}
    assert {(e.src, e.dst) for e in read_graph(fresh_broker.bootstrap)} == want


def test_relay_backfill_without_a_usable_export(fresh_broker, tmp_path):
    """A directory without an export: every DID resolved with its own request, all done; an
    oversized export page or a damaged mirror file: a one-line BackfillError before any
    repository."""
    pop = Population(50, seed=22, events_per_account=1)
    deact = set(pop.retractions()["deactivated"])

    async def main(fault: str | None, damaged: bool = False):
        relay = Relay(FrameSource.from_population(pop, 1, START), repos=SyntheticRepos(pop, 1, START),
                      sync={"export_fault": fault})
        async with relay:
            if damaged:
                path = mirror_path(tmp_path / "damaged", relay.sync.plc_url)
                path.parent.mkdir()
                path.write_bytes(b"not a database" * 100)
                fault = "damaged"
            opts = Options(relay=relay.sync.url, plc=relay.sync.plc_url, allow_nets=LOOPBACK, progress=False,
                           limits=LIMITS)
            bf = Backfill(fresh_broker.bootstrap, tmp_path / fault, opts, idempotence=False)
            try:
                await bf.run()
            except BackfillError as exc:
                return bf, relay.sync, exc
            return bf, relay.sync, None

    bf, server, exc = asyncio.run(main("absent"))
    assert exc is None and bf.export is None
    assert bf.state.counts["done"] == pop.n - len(deact) and server.requests["plc"] == pop.n - len(deact)
    bf, server, exc = asyncio.run(main("oversize"))
    assert exc is not None and "\n" not in str(exc) and "export" in str(exc) and "--no-plc-export" in str(exc)
    assert server.requests["getRepo"] == 0 and not bf.state.counts
    bf, server, exc = asyncio.run(main(None, damaged=True))
    assert exc is not None and "\n" not in str(exc) and "mirror" in str(exc) and "--no-plc-export" in str(exc)
    assert server.requests["getRepo"] == 0 and server.requests["plc_export"] == 0
