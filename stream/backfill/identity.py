"""DID -> PDS endpoint and handle, from DID documents (untrusted input).

- ``did:plc:<24 base32>``: ``GET {plc}/{did}`` on a PLC directory (default https://plc.directory).
- ``did:web:<hostname>``: ``GET https://<hostname>/.well-known/did.json`` (hostname-level only,
  as atproto allows; a ``%3A``-encoded port is accepted for tests, with ``web_scheme="http"``).

The document is parsed with the atproto SDK's :class:`atproto_core.did_doc.DidDocument`; its ``id``
must be the DID asked for; the PDS is the ``#atproto_pds`` service of type
``AtprotoPersonalDataServer`` (an ``http(s)`` URL without credentials, query or fragment); the
handle is the first ``at://`` entry of ``alsoKnownAs`` if it is a syntactically valid handle.
Handles are displayed, never trusted for anything: they are what the document claims (not
verified back through DNS/HTTPS); the relay's ``#identity`` events carry verified ones. Whether
the PDS address is public is checked when it is fetched (:mod:`stream.backfill.fetch`).

With a mirror of the PLC directory's export (:mod:`stream.backfill.plc_export`, set as
:attr:`Resolver.mirror`), a ``did:plc`` the mirror holds is answered from it (no request; the same
rules applied when the operation was read: ``pds_base``, ``valid_handle``, a tombstone is
``did_tombstoned``, no usable PDS ``no_pds``); one it lacks (created since) is fetched as above.

Failures raise :class:`IdentityError` with a ``reason``: ``unsupported_did``, ``did_not_found``,
``did_tombstoned``, ``did_unresolvable`` (other status / fetch failure: its reason is kept when it
is ``private_address``, ``too_large``...), ``bad_did_doc``, ``did_mismatch``, ``no_pds``.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from atproto_core.did_doc import DidDocument

from stream.backfill.fetch import Fetcher, FetchError

if TYPE_CHECKING:
    from stream.backfill.plc_export import ExportMirror

PLC_DIRECTORY = "https://plc.directory"
OK, NO_PDS, TOMBSTONE = 0, 1, 2  # a DID's state in the export mirror (stream.backfill.plc_export)
MAX_DOC_BYTES = 64 * 1024
_PLC = re.compile(r"did:plc:[a-z2-7]{24}")
_HOSTNAME = re.compile(r"(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]([a-z0-9-]{0,61}[a-z0-9])?")
# https://atproto.com/specs/handle
_HANDLE = re.compile(r"(?=.{1,253}$)([a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?\.)+"
                     r"[a-zA-Z]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?")


class IdentityError(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Identity:
    did: str
    pds: str  # base URL, no trailing slash
    handle: str | None
    from_export: bool = False  # from the export mirror (may be older than a DID document)


def valid_handle(value: object) -> str | None:
    """The handle, lower-cased, if it is syntactically valid (else None)."""
    if isinstance(value, str) and _HANDLE.fullmatch(value):
        return value.lower()
    return None


def pds_base(url: object) -> str | None:
    """A PDS endpoint as a base URL, or None when it is not a plain http(s) origin."""
    if not isinstance(url, str) or len(url) > 512:
        return None
    try:
        u = urllib.parse.urlsplit(url)
        u.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return None
    if u.scheme not in ("http", "https") or not u.hostname or u.username or u.password or u.query \
            or u.fragment or u.path not in ("", "/"):
        return None
    return f"{u.scheme}://{u.netloc}"


class Resolver:
    """Resolve DIDs with a :class:`Fetcher` (cached: ``cache_size`` most recent), ``did:plc``
    from ``mirror`` first when one is set."""

    def __init__(self, fetcher: Fetcher, plc_url: str = PLC_DIRECTORY, web_scheme: str = "https",
                 cache_size: int = 10_000, mirror: "ExportMirror | None" = None):
        self.fetcher, self.plc_url, self.web_scheme = fetcher, plc_url.rstrip("/"), web_scheme
        self.cache_size = cache_size
        self.mirror = mirror
        self._cache: OrderedDict[str, Identity] = OrderedDict()
        self.resolved = 0  # successful document fetches
        self.from_export = 0  # DIDs answered by the mirror
        self.unreachable = 0  # consecutive connection-level failures of the directory

    def document_url(self, did: str) -> str:
        if did.startswith("did:plc:"):
            if not _PLC.fullmatch(did):
                raise IdentityError("unsupported_did", f"malformed did:plc {did[:80]!r}")
            return f"{self.plc_url}/{did}"
        if did.startswith("did:web:"):
            host = urllib.parse.unquote(did[8:])
            name, _, port = host.partition(":")
            if ":" in port or not _HOSTNAME.fullmatch(name) or (port and not port.isdigit()):
                raise IdentityError("unsupported_did", f"did:web must name a hostname: {did[:80]!r}")
            return f"{self.web_scheme}://{host}/.well-known/did.json"
        raise IdentityError("unsupported_did", f"unsupported DID method: {did[:80]!r}")

    def _exported(self, did: str) -> Identity | None:
        """``did`` from the mirror (None: not there); raises IdentityError for a tombstone / no PDS."""
        row = self.mirror.lookup(did) if self.mirror is not None and did.startswith("did:plc:") else None
        if row is None:
            return None
        state, pds, handle = row
        if state == TOMBSTONE:
            raise IdentityError("did_tombstoned", f"{did}: tombstoned (PLC export)")
        if state == NO_PDS or pds is None:
            raise IdentityError("no_pds", f"{did}: no usable #atproto_pds service (PLC export)")
        self.from_export += 1
        return Identity(did, pds, handle, from_export=True)

    async def resolve(self, did: str, fresh: bool = False) -> Identity:
        """``did``'s identity; ``fresh``: from its DID document, neither the cache nor the mirror.
        Raises :class:`IdentityError`."""
        if not fresh:
            hit = self._cache.get(did) or self._exported(did)
            if hit is not None:
                if not hit.from_export:
                    self._cache.move_to_end(did)
                return hit
        url = self.document_url(did)
        try:
            resp = await self.fetcher.get(url, max_bytes=MAX_DOC_BYTES, accept="application/json")
        except FetchError as exc:
            if exc.reason in ("unreachable", "timeout", "unresolvable") and did.startswith("did:plc:"):
                self.unreachable += 1
            reason = exc.reason if exc.reason in ("private_address", "too_large") else "did_unresolvable"
            raise IdentityError(reason, f"cannot resolve {did}: {exc}") from None
        self.unreachable = 0
        if resp.status == 404:
            raise IdentityError("did_not_found", f"{did}: not found ({url})")
        if resp.status == 410:
            raise IdentityError("did_tombstoned", f"{did}: tombstoned ({url})")
        if resp.status != 200:
            raise IdentityError("did_unresolvable", f"{did}: HTTP {resp.status} from {url}")
        try:
            doc = DidDocument.from_dict(json.loads(resp.body))
        except Exception:  # noqa: BLE001 - json/pydantic errors: the document is garbage
            raise IdentityError("bad_did_doc", f"{did}: malformed DID document") from None
        if doc.id != did:
            raise IdentityError("did_mismatch", f"{did}: the document is for {doc.id[:80]!r}")
        try:
            pds = pds_base(doc.get_pds_endpoint())
        except Exception:  # noqa: BLE001 - the SDK's URL parsing of a hostile value
            pds = None
        if pds is None:
            raise IdentityError("no_pds", f"{did}: no usable #atproto_pds service")
        ident = Identity(did, pds, valid_handle(doc.get_handle()))
        self.resolved += 1
        self._cache[did] = ident
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return ident
