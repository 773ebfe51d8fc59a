"""`chorus backfill`: the follow graph that already exists, from the repositories, into chorus.graph.

Flow: a listing (:mod:`stream.backfill.listing`: listRepos on a relay or a PDS, or a DIDs file)
feeds a bounded queue; ``concurrency`` workers take one repository each: skip it when the listing
says it is inactive, resolve its DID to its PDS and handle (:mod:`stream.backfill.identity`;
skipped with ``--pds``; for a relay's listing, ``did:plc`` from a mirror of the PLC directory's
export, :mod:`stream.backfill.plc_export`, read to its end first; a repository whose PDS from
the mirror no longer has it is tried once more at the PDS of its current DID document), fetch
``com.atproto.sync.getRepo`` (:mod:`stream.backfill.fetch`, capped at ``max_car_bytes``), read its follow records (:mod:`stream.backfill.car`) and publish one ``add``
per follow with the repository's rev (:mod:`stream.backfill.publish`). A repository that cannot be
had is counted by reason (``chorus_backfill_repos_total{status}``) and skipped; it never stops the
others. Progress is checkpointed (:mod:`stream.backfill.checkpoint`) every ``save_every_s`` and at
the end, so a killed backfill resumes where it stopped.

Reconciliation with the firehose lives in chorus.graph's consumer (operators/service/state.py):
per edge the op with the newest rev wins, so the backfill's adds (at the repository's checkpoint
rev) and the live stream's ops (at their commits' revs) can arrive in any order. Run ``chorus
ingest`` before the backfill starts, so that every change after a repository's checkpoint is on
the firehose.

Statuses: ``done``; inactive repositories (nothing to backfill; they count as covered):
``deactivated``, ``takendown``, ``suspended``, ``deleted``, ``inactive``; failures (not covered):
``not_found``, the :class:`~stream.backfill.car.RepoError`, :class:`~stream.backfill.fetch.
FetchError` and :class:`~stream.backfill.identity.IdentityError` reasons, ``http_error``.
``chorus_graph_coverage_ratio`` = covered / listed so far; the listing is paged in as the queue
drains, so until ``chorus_backfill_listing_complete`` is 1 the ratio is an upper bound (a run that
has listed 2 pages of 100 may read 98 % with most of the network still unlisted).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator

from stream import metrics
from stream.backfill.car import RepoError, read_follows
from stream.backfill.checkpoint import Checkpoint, State
from stream.backfill.fetch import Fetcher, FetchError, Limits, parse_networks
from stream.backfill.identity import PLC_DIRECTORY, IdentityError, Resolver
from stream.backfill.listing import Page, Repo, dids_pages, list_repos, read_dids_file
from stream.backfill.plc_export import ExportError, ExportMirror, ExportStats, mirror_path, sync_export
from stream.backfill.publish import GraphPublisher

if TYPE_CHECKING:
    from aiokafka import AIOKafkaProducer

log = logging.getLogger("chorus.backfill")

CAR_TYPE = "application/vnd.ipld.car"
INACTIVE = ("deactivated", "takendown", "suspended", "deleted", "inactive")
COVERED = ("done", *INACTIVE)
# XRPC error names of com.atproto.sync.getRepo -> status
REPO_ERRORS = {"RepoNotFound": "not_found", "RepoDeactivated": "deactivated", "RepoTakendown": "takendown",
               "RepoSuspended": "suspended", "RepoDeleted": "deleted"}
TICK_S = 0.1  # progress bar updates at most this often
# getRepo statuses that may only mean the account moved since the PLC export was read
MOVED = ("not_found", "deactivated", "unreachable", "unresolvable", "timeout")
MAX_UNREACHABLE = 5  # consecutive connection failures of the PLC directory before giving up


class BackfillError(Exception):
    """The backfill cannot go on (one line for the user): unreachable listing, PLC, Kafka."""


@dataclass
class Options:
    relay: str | None = None  # listRepos base URL (https://host)
    pds: str | None = None  # list and fetch from this PDS, no DID resolution
    dids_file: Path | None = None
    plc: str = PLC_DIRECTORY
    allow_nets: list[str] = field(default_factory=list)
    limits: Limits = field(default_factory=Limits)
    max_car_bytes: int = 128 * 1024 * 1024
    restart: bool = False
    progress: bool = True
    save_every_s: float = 1.0
    web_scheme: str = "https"
    plc_export: bool | None = None  # did:plc from the directory's export; None: for a relay's listing only
    topics: Any = None  # what to create: stream.topics.stage_topics("backfill", settings); None: registry defaults

    @property
    def source(self) -> str:
        if self.dids_file is not None:
            return f"dids:{Path(self.dids_file).resolve()}"
        if self.pds is not None:
            return f"pds:{self.pds.rstrip('/')}"
        return f"relay:{(self.relay or '').rstrip('/')}"

    @property
    def use_plc_export(self) -> bool:
        if self.pds is not None:
            return False
        return self.dids_file is None if self.plc_export is None else self.plc_export


@dataclass
class _PageTrack:
    page: Page
    remaining: int
    done: list[str] = field(default_factory=list)


class Backfill:
    """One backfill run against ``bootstrap`` Kafka (``idempotence``: the producer's setting)."""

    def __init__(self, bootstrap: str, state_dir: Path, options: Options, idempotence: bool = True):
        self.bootstrap, self.opts, self.idempotence = bootstrap, options, idempotence
        self.state_dir = Path(state_dir)
        self.checkpoint = Checkpoint(state_dir, options.source)
        self.export: ExportStats | None = None  # the PLC export read this run (None: not used)
        self.refreshed = 0  # repositories fetched again at the PDS of a fresh DID document
        self.state = State(options.source)
        self._pages: deque[_PageTrack] = deque()
        self._done_before: set[str] = set()
        self._fatal: BaseException | None = None
        self._failed = asyncio.Event()  # set with _fatal
        self._stopping = False
        self.listing_complete = False  # the listing ended: the coverage's denominator is final
        self._dirty = False
        self._progress = None
        self._ticked = 0.0
        self.started = time.monotonic()

    # --- counts ------------------------------------------------------------------------------
    @property
    def listed(self) -> int:
        return self.state.listed + sum(len(t.page.repos) for t in self._pages)

    @property
    def settled(self) -> int:
        return sum(self.state.counts.values())

    @property
    def covered(self) -> int:
        return sum(self.state.counts.get(s, 0) for s in COVERED)

    @property
    def coverage(self) -> float:
        return self.covered / self.listed if self.listed else 0.0

    def _count(self, status: str, edges: int) -> None:
        self.state.counts[status] = self.state.counts.get(status, 0) + 1
        self.state.edges += edges
        metrics.BACKFILL_REPOS.labels(status).inc()
        if edges:
            metrics.BACKFILL_EDGES.inc(edges)
        metrics.GRAPH_COVERAGE.set(self.coverage)
        self._dirty = True

    # --- the run -----------------------------------------------------------------------------
    async def run(self) -> State:
        """Backfill until the listing is exhausted (or :meth:`stop`); returns the final state."""
        from stream.schemas import TOPIC_GRAPH, TOPIC_IDENTITIES, TOPIC_PARTITIONS

        opts = self.opts
        if opts.restart:
            self.checkpoint.clear()
        self.state = self.checkpoint.load()
        if self.state.finished:
            metrics.GRAPH_COVERAGE.set(self.coverage)
            metrics.BACKFILL_LISTING_COMPLETE.set(1)
            log.info("backfill of %s already complete (%s)", opts.source, self.checkpoint.path)
            return self.state
        self._done_before = set(self.state.done)
        dids = read_dids_file(opts.dids_file) if opts.dids_file is not None else None
        producer = await start_producer(self.bootstrap, self.idempotence, opts.topics or
                                        {t: TOPIC_PARTITIONS[t] for t in (TOPIC_GRAPH, TOPIC_IDENTITIES)})
        publisher = resolver = None
        try:
            publisher = await GraphPublisher.create(producer)
            async with Fetcher(opts.limits, parse_networks(opts.allow_nets)) as fetcher:
                resolver = Resolver(fetcher, opts.plc, opts.web_scheme)
                if dids is not None:
                    pages = dids_pages(dids, self.state.cursor)
                else:
                    base = opts.pds or opts.relay
                    pages = list_repos(fetcher, base, self.state.cursor)
                if opts.use_plc_export:  # after the listing's first page: a dead relay is said first
                    first = await anext(pages, None)
                    if first is not None:
                        resolver.mirror = await self._read_export(fetcher)
                        pages = _prepend(first, pages)
                await self._drive(pages, fetcher, resolver, publisher)
        finally:
            if resolver is not None and resolver.mirror is not None:
                resolver.mirror.close()
            with contextlib.suppress(Exception):
                if publisher is not None:
                    await publisher.aclose()
                await producer.stop()
        return self.state

    async def _read_export(self, fetcher: Fetcher) -> ExportMirror | None:
        """The PLC directory's export read to its end into the mirror (None: the directory has
        none, each DID is resolved with its own request); raises BackfillError."""
        plc = self.opts.plc
        path = mirror_path(self.state_dir, plc)
        try:
            return await self._sync_mirror(ExportMirror(path), plc, fetcher)
        except sqlite3.Error as exc:  # a damaged file, a full disk, another run holding it
            raise BackfillError(f"cannot use the PLC export mirror {path}: {exc} (remove it, or pass "
                                "--no-plc-export)") from None

    async def _sync_mirror(self, mirror: ExportMirror, plc: str, fetcher: Fetcher) -> ExportMirror | None:
        progress = task = None
        if self.opts.progress:
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            progress = Progress(SpinnerColumn(), TextColumn("PLC export"), TextColumn("{task.fields[ops]:,} operations"),
                                TextColumn("{task.fields[mib]:,.0f} MiB"), TimeElapsedColumn(), transient=True)
            progress.start()
            task = progress.add_task("plc", total=None, ops=0, mib=0.0)

        def on_page(st: ExportStats) -> None:
            if progress is not None:
                progress.update(task, ops=st.applied + sum(st.by_reason.values()), mib=st.bytes / 2**20)

        try:
            self.export = await sync_export(fetcher, plc, mirror, on_page=on_page,
                                            stopped=lambda: self._stopping)
        except (ExportError, sqlite3.Error) as exc:
            mirror.close()
            if not isinstance(exc, ExportError):
                raise
            if exc.reason == "not_supported":
                log.warning("%s; resolving each DID with its own request", exc)
                return None
            if exc.reason in ("unreachable", "unresolvable", "timeout"):
                raise BackfillError(f"cannot reach the PLC directory at {plc}: {exc}") from None
            raise BackfillError(f"cannot read the PLC directory's export at {plc}: {exc} "
                                "(--no-plc-export: one request per DID instead)") from None
        finally:
            if progress is not None:
                progress.stop()
        bad = {k: v for k, v in sorted(self.export.by_reason.items()) if k != "nullified"}
        if bad:
            log.warning("PLC export: operations skipped: %s", ", ".join(f"{k} {v}" for k, v in bad.items()))
        if not self.export.complete:  # stopped mid-way: older entries could be stale (resumed next run)
            mirror.close()
            return None
        return mirror

    def stop(self) -> None:
        """Stop taking new repositories; :meth:`run` returns after the ones in flight (saved)."""
        self._stopping = True

    async def _drive(self, pages, fetcher: Fetcher, resolver: Resolver, publisher: GraphPublisher) -> None:
        queue: asyncio.Queue = asyncio.Queue(maxsize=self.opts.limits.concurrency * 4)
        workers = [asyncio.create_task(self._worker(queue, fetcher, resolver, publisher))
                   for _ in range(self.opts.limits.concurrency)]
        saver = asyncio.create_task(self._saver())
        self._start_progress()
        metrics.BACKFILL_LISTING_COMPLETE.set(0)
        finished = False
        try:
            async for page in pages:
                track = _PageTrack(page, 0)
                self._pages.append(track)
                todo = [r for r in page.repos if r.did not in self._done_before]
                track.done = [r.did for r in page.repos if r.did in self._done_before]
                track.remaining = len(todo)
                self._advance()
                for repo in todo:
                    if not await self._put(queue, (track, repo)):
                        break
                if self._stopping or self._fatal:
                    break
            else:
                finished = self.listing_complete = True
                metrics.BACKFILL_LISTING_COMPLETE.set(1)
                self._tick(force=True)
            joined = asyncio.create_task(queue.join())
            failed = asyncio.create_task(self._failed.wait())
            await asyncio.wait({joined, failed}, return_when=asyncio.FIRST_COMPLETED)
            for t in (joined, failed):
                t.cancel()
        finally:
            for w in (*workers, saver):
                w.cancel()
            await asyncio.gather(*workers, saver, return_exceptions=True)
            self._stop_progress()
        if self._fatal:
            self._save()
            raise self._fatal
        self.state.finished = finished and not self._pages
        self._save()
        metrics.GRAPH_COVERAGE.set(self.coverage)

    def _fail(self, exc: BackfillError) -> None:
        if self._fatal is None:
            self._fatal = exc
        self._failed.set()

    async def _put(self, queue: asyncio.Queue, item) -> bool:
        """Enqueue ``item``; False when stopping or failed first (the item's page stays unfinished)."""
        while not self._fatal and not self._stopping:
            try:
                await asyncio.wait_for(queue.put(item), 0.5)
                return True
            except TimeoutError:
                continue
        return False

    async def _worker(self, queue: asyncio.Queue, fetcher: Fetcher, resolver: Resolver,
                      publisher: GraphPublisher) -> None:
        while True:
            track, repo = await queue.get()
            try:
                status, edges = await self._repo(repo, fetcher, resolver, publisher)
            except BackfillError as exc:
                self._fail(exc)
                queue.task_done()
                return
            except Exception as exc:  # noqa: BLE001 - Kafka failures: the repo is not done
                self._fail(BackfillError(f"cannot publish to chorus.graph at {self.bootstrap}: {exc!r}"))
                queue.task_done()
                return
            self._count(status, edges)
            track.remaining -= 1
            track.done.append(repo.did)
            self._advance()
            self._tick()
            queue.task_done()

    async def _repo(self, repo: Repo, fetcher: Fetcher, resolver: Resolver,
                    publisher: GraphPublisher) -> tuple[str, int]:
        """(status, edges published) for one repository."""
        if not repo.active:
            return (repo.status if repo.status in INACTIVE else "inactive"), 0
        did = repo.did
        if self.opts.pds is not None:
            return await self._fetch(did, self.opts.pds.rstrip("/"), None, fetcher, publisher)
        try:
            ident = await resolver.resolve(did)
        except IdentityError as exc:
            if resolver.unreachable >= MAX_UNREACHABLE and resolver.resolved == 0:
                raise BackfillError(f"cannot reach the PLC directory at {resolver.plc_url}: {exc}") from None
            log.debug("%s: %s", did, exc)
            return exc.reason, 0
        status, n = await self._fetch(did, ident.pds, ident.handle, fetcher, publisher)
        if status in MOVED and ident.from_export:  # the export may predate a move to another PDS
            try:
                fresh = await resolver.resolve(did, fresh=True)
            except IdentityError as exc:
                log.debug("%s: %s", did, exc)
                return status, n
            if fresh.pds != ident.pds:
                self.refreshed += 1
                return await self._fetch(did, fresh.pds, fresh.handle, fetcher, publisher)
        return status, n

    async def _fetch(self, did: str, base: str, handle: str | None, fetcher: Fetcher,
                     publisher: GraphPublisher) -> tuple[str, int]:
        """(status, edges published) for the repository of ``did`` at the PDS ``base``."""
        try:
            resp = await fetcher.get(f"{base}/xrpc/com.atproto.sync.getRepo", {"did": did},
                                     max_bytes=self.opts.max_car_bytes, accept=CAR_TYPE)
        except FetchError as exc:
            log.debug("%s: %s", did, exc)
            return exc.reason, 0
        if resp.status != 200:
            err = resp.json_error()
            return REPO_ERRORS.get(err or "", "not_found" if resp.status == 404 else "http_error"), 0
        fetched_us = time.time_ns() // 1000
        try:
            follows = read_follows(resp.body, did)
        except RepoError as exc:
            log.debug("%s: %s", did, exc)
            return exc.reason, 0
        n = await publisher.publish_repo(did, follows.rev, follows.follows, handle, fetched_us=fetched_us)
        return "done", n

    # --- checkpointing -----------------------------------------------------------------------
    def _advance(self) -> None:
        """Drop finished pages from the front; the checkpoint cursor moves past them."""
        while self._pages and self._pages[0].remaining == 0:
            t = self._pages.popleft()
            self.state.listed += len(t.page.repos)
            self.state.cursor = t.page.next
            self._dirty = True

    def _save(self) -> None:
        self.state.done = [d for t in self._pages for d in t.done]
        self.checkpoint.save(self.state)
        self._dirty = False

    async def _saver(self) -> None:
        while True:
            await asyncio.sleep(self.opts.save_every_s)
            if self._dirty:
                self._save()

    # --- progress ----------------------------------------------------------------------------
    def _start_progress(self) -> None:
        if not self.opts.progress:
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("backfill"), BarColumn(), TextColumn("{task.completed:,}/{task.total:,} repos"),
            TextColumn("{task.fields[edges]:,} edges"), TextColumn("{task.fields[rate]:,.0f} repos/s"),
            TextColumn("coverage {task.fields[coverage]:.1%}{task.fields[listing]}"), TimeElapsedColumn(),
            TimeRemainingColumn(),
            transient=False)
        self._progress.start()
        self._task = self._progress.add_task("backfill", total=max(self.listed, 1), completed=self.settled,
                                             edges=self.state.edges, rate=0.0, coverage=self.coverage,
                                             listing=self._listing_note())

    def _tick(self, force: bool = False) -> None:
        if self._progress is None:
            return
        now = time.monotonic()
        if not force and now - self._ticked < TICK_S:  # a repository is ~1 ms: no redraw data per repository
            return
        self._ticked = now
        rate = self.settled / max(time.monotonic() - self.started, 1e-9)
        self._progress.update(self._task, total=max(self.listed, 1), completed=self.settled,
                              edges=self.state.edges, rate=rate, coverage=self.coverage,
                              listing=self._listing_note())

    def _listing_note(self) -> str:
        """What the coverage is of: final once the listing ended, else of the repos listed so far."""
        return "" if self.listing_complete else " of listed so far (listing)"

    def _stop_progress(self) -> None:
        if self._progress is not None:
            self._tick(force=True)
            self._progress.stop()
            self._progress = None

    def summary(self) -> str:
        c = self.state.counts
        failed = {k: v for k, v in sorted(c.items()) if k not in COVERED}
        inactive = sum(c.get(s, 0) for s in INACTIVE)
        return (f"{self.settled:,} repos ({c.get('done', 0):,} done, {inactive:,} inactive"
                + (", failed: " + ", ".join(f"{k} {v}" for k, v in failed.items()) if failed else "")
                + f"), {self.state.edges:,} edges, coverage {self.coverage:.1%}")


async def _prepend(first: Page, rest: AsyncIterator[Page]) -> AsyncIterator[Page]:
    yield first
    async for page in rest:
        yield page


async def start_producer(bootstrap: str, idempotence: bool, topics) -> "AIOKafkaProducer":
    """Create ``topics`` (specs, :func:`stream.topics.stage_topics`, or {name: partitions}) and
    start a producer; raises BackfillError (one line) when Kafka cannot be had. aiokafka's own line
    per failed dial is held back meanwhile (the error says it all)."""
    from stream.kafka import ensure_topics, make_producer
    from stream.process import PRODUCER_START, kafka_start_error

    kafka_log = logging.getLogger("aiokafka")
    level = kafka_log.level
    kafka_log.setLevel(logging.CRITICAL)
    producer = None
    step = "create the topics"
    try:
        await asyncio.wait_for(ensure_topics(bootstrap, topics), 30)
        producer = make_producer(bootstrap, idempotence)
        step = PRODUCER_START
        await asyncio.wait_for(producer.start(), 30)
        return producer
    except Exception as exc:  # noqa: BLE001 - aiokafka raises its own errors
        if producer is not None:
            with contextlib.suppress(Exception):
                await producer.stop()
        raise BackfillError(kafka_start_error(bootstrap, step, exc, idempotence)) from None
    finally:
        kafka_log.setLevel(level)


async def run_graph_file(bootstrap: str, state_dir: Path, path: Path, idempotence: bool = True,
                         restart: bool = False, checked: bool = False, topics=None) -> State:
    """`chorus backfill --graph-file`: import pairs (:mod:`stream.backfill.graph_file`), resuming
    from the checkpoint's row (its cursor); counts rows in ``edges``. ``checked``: the whole file
    was validated already (:func:`~stream.backfill.graph_file.check_file`; rows are not again);
    ``topics``: as :class:`Options`."""
    from stream.backfill.graph_file import import_file, read_pairs
    from stream.schemas import TOPIC_GRAPH, TOPIC_PARTITIONS

    ckpt = Checkpoint(state_dir, f"graph-file:{Path(path).resolve()}")
    if restart:
        ckpt.clear()
    state = ckpt.load()
    if state.finished:
        return state
    if not checked:
        next(read_pairs(path, int(state.cursor or 0)), None)  # column and first-batch errors before Kafka
    producer = await start_producer(bootstrap, idempotence, topics or {TOPIC_GRAPH: TOPIC_PARTITIONS[TOPIC_GRAPH]})

    def saved(rows: int, n: int) -> None:
        state.cursor, state.edges = str(rows), state.edges + n
        metrics.BACKFILL_EDGES.inc(n)
        ckpt.save(state)

    try:
        await import_file(producer, path, int(state.cursor or 0), on_batch=saved, validate=not checked)
    finally:
        with contextlib.suppress(Exception):
            await producer.stop()
    state.finished = True
    ckpt.save(state)
    return state
