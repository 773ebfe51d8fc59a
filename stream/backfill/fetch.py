"""HTTP GET for untrusted hosts: address vetting, size caps, bounded redirects, politeness, retries.

Every host a backfill talks to comes from untrusted input (a relay's listing, a DID document), so:

- **Addresses.** Every address a host resolves to must be globally routable
  (:attr:`ipaddress.IPv4Address.is_global`: not loopback, private, link-local, shared, reserved,
  multicast, unspecified) unless it lies in an allowed network (``allow_nets``, e.g.
  ``127.0.0.0/8`` for loopback tests). The check runs in the connector's resolver
  (:class:`VettingResolver`), i.e. on the very addresses the connection then uses, so a DNS answer
  cannot change between the check and the connect; IP literals are checked before the request.
  TLS keeps the host name (SNI, certificate). Refused: :class:`FetchError` ``private_address``.
- **Size.** A body larger than ``max_bytes`` (after decompression) is cut off while streaming
  (``too_large``); a ``Content-Length`` above it is refused before reading.
- **Redirects** are followed by hand, at most ``max_redirects`` (``too_many_redirects``), each
  target vetted again; only ``http``/``https`` URLs (``bad_url``).
- **Politeness.** At most ``concurrency`` requests in flight overall and ``per_host`` per host
  (``host:port``). A ``429`` or ``503`` pauses the whole host for its ``Retry-After`` (seconds or an
  HTTP date; exponential backoff when absent), then the request is retried.
- **Timeouts and retries.** Connect/read timeouts per request and a total deadline; connection
  errors, timeouts, 429, 5xx are retried up to ``retries`` times with capped exponential backoff
  and jitter (``base * 2^attempt``, at most ``cap``); a ``Retry-After`` longer than
  ``max_retry_after_s`` is not waited for (``throttled``). Other statuses are returned to the
  caller (a 400 with an XRPC error body is an answer, not a failure).

Client: aiohttp (a dependency of faust-streaming). The atproto SDK's httpx was the first choice;
on loopback it cost 12-20x the CPU per request of aiohttp (2.3 ms vs 0.12-0.2 ms), which bounds a
backfill's rate on one core (BENCHMARKS.md, "Backfill").
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import random
import socket
import time
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Iterable, Mapping

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

USER_AGENT = "chorus-backfill"
RETRY_STATUSES = {429, 500, 502, 503, 504}
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class FetchError(Exception):
    """A request that failed for good; ``reason`` is a short label (counted by the caller)."""

    def __init__(self, reason: str, message: str, retryable: bool = False):
        super().__init__(message)
        self.reason = reason
        self.retryable = retryable


@dataclass(frozen=True)
class Limits:
    """Politeness and robustness settings (durations in seconds)."""

    concurrency: int = 32
    per_host: int = 8
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0
    total_timeout_s: float = 180.0
    retries: int = 4
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 60.0
    max_retry_after_s: float = 600.0
    max_redirects: int = 3
    dns_ttl_s: float = 300.0


@dataclass(frozen=True)
class Response:
    status: int
    headers: Mapping[str, str]  # case-insensitive
    body: bytes
    url: str

    def json_error(self) -> str | None:
        """The XRPC ``error`` name of an error body, if it has one."""
        try:
            value = json.loads(self.body[:65536])
        except ValueError:
            return None
        err = value.get("error") if isinstance(value, dict) else None
        return err if isinstance(err, str) and len(err) <= 100 else None


class RefusedAddress(OSError):
    """A host that resolves to an address outside the allowed ones (raised by the resolver)."""


@dataclass
class _Host:
    slots: asyncio.Semaphore
    resume_at: float = 0.0  # loop time before which no request may start (429/503)


@dataclass
class Stats:
    requests: int = 0
    retries: int = 0
    throttled: int = 0  # 429/503 answers
    waited_s: float = 0.0  # time spent waiting for Retry-After / backoff
    refused: int = 0  # addresses refused
    by_reason: dict[str, int] = field(default_factory=dict)


def parse_networks(values: Iterable[str]) -> list[Network]:
    """``["127.0.0.0/8", "::1"]`` -> networks; raises ValueError with the bad value."""
    out = []
    for v in values:
        try:
            out.append(ipaddress.ip_network(v.strip(), strict=False))
        except ValueError:
            raise ValueError(f"not an IP network: {v!r} (expected e.g. 127.0.0.0/8)") from None
    return out


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date; RFC 9110
    section 10.2.3); None when absent or malformed."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def allowed_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, allow_nets: Iterable[Network]) -> bool:
    """Globally routable (and not multicast), or inside one of ``allow_nets``."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip in net for net in allow_nets):
        return True
    return ip.is_global and not ip.is_multicast


def refused_addresses(url: str, allow_nets: Iterable[Network]) -> list[str]:
    """The addresses ``url``'s host resolves to (now, with the system resolver) that
    :func:`allowed_address` refuses; [] when all are allowed or the host does not resolve (that
    is found, and reported, on the first request). For a start-up check of the URLs a user gives:
    a run whose PLC directory or relay is refused would only count every repository as refused."""
    try:
        u = URL(url)
        host, port = u.host, u.port
    except (ValueError, TypeError):
        return []
    if not host:
        return []
    try:
        literal = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        literal = None
    if literal is not None:
        ips = [literal]
    else:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            return []
        ips = [ipaddress.ip_address(i[4][0].split("%", 1)[0]) for i in infos]
    nets = list(allow_nets)
    return sorted({str(ip) for ip in ips if not allowed_address(ip, nets)})


class VettingResolver(AbstractResolver):
    """The connector's resolver: the system's answers (getaddrinfo), every address vetted."""

    def __init__(self, allow_nets: Iterable[Network]):
        self.allow_nets = list(allow_nets)

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
                      ) -> list[ResolveResult]:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                                 family=family)
        except (OSError, UnicodeError) as exc:
            raise OSError(f"cannot resolve {host}: {exc}") from None
        out, bad = [], []
        for fam, _, proto, _, addr in infos:
            ip = addr[0].split("%", 1)[0]
            if not allowed_address(ipaddress.ip_address(ip), self.allow_nets):
                bad.append(ip)
            out.append({"hostname": host, "host": ip, "port": addr[1], "family": fam, "proto": proto,
                        "flags": socket.AI_NUMERICHOST})
        if bad or not out:
            raise RefusedAddress(f"{host} resolves to a non-public address ({', '.join(bad[:3]) or 'none'})")
        return out

    async def close(self) -> None:
        return None


class Fetcher:
    """GET with the rules of the module docstring. Use as an async context manager (inside a
    running event loop)."""

    def __init__(self, limits: Limits | None = None, allow_nets: Iterable[Network] = (),
                 user_agent: str = USER_AGENT):
        self.limits = lim = limits or Limits()
        self.allow_nets = list(allow_nets)
        self.stats = Stats()
        self.user_agent = user_agent
        self._slots = asyncio.Semaphore(lim.concurrency)
        self._hosts: dict[str, _Host] = {}
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "Fetcher":
        lim = self.limits
        connector = aiohttp.TCPConnector(limit=lim.concurrency, limit_per_host=lim.per_host,
                                         resolver=VettingResolver(self.allow_nets), ttl_dns_cache=int(lim.dns_ttl_s))
        self._session = aiohttp.ClientSession(
            connector=connector, headers={"User-Agent": self.user_agent}, trust_env=False,
            timeout=aiohttp.ClientTimeout(total=None, connect=lim.connect_timeout_s, sock_read=lim.read_timeout_s))
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def allowed(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return allowed_address(ip, self.allow_nets)

    def _host(self, key: str) -> _Host:
        h = self._hosts.get(key)
        if h is None:
            h = self._hosts[key] = _Host(asyncio.Semaphore(self.limits.per_host))
        return h

    # --- requests --------------------------------------------------------------------------------
    def backoff_s(self, attempt: int) -> float:
        """Capped exponential backoff with jitter for retry ``attempt`` (0-based)."""
        lim = self.limits
        return min(lim.backoff_cap_s, lim.backoff_base_s * 2 ** attempt) * (0.5 + random.random() / 2)

    async def get(self, url: str, params: dict[str, str] | None = None, max_bytes: int = 1 << 20,
                  accept: str | None = None) -> Response:
        """GET ``url``: the final response (any status but the retried ones) with its body.

        Raises :class:`FetchError` with ``reason`` one of ``bad_url``, ``private_address``,
        ``unresolvable``, ``too_large``, ``too_many_redirects``, ``timeout``, ``unreachable``,
        ``http_error``, ``throttled`` (still 429/503 after the retries, or a Retry-After beyond
        ``max_retry_after_s``) or ``server_error`` (still 5xx).
        """
        if self._session is None:
            raise RuntimeError("Fetcher used outside `async with`")
        lim = self.limits
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            try:
                async with asyncio.timeout(lim.total_timeout_s):
                    resp = await self._follow(url, params, max_bytes, accept)
            except TimeoutError:
                err = FetchError("timeout", f"GET {url}: no answer within {lim.total_timeout_s:g}s", True)
            except FetchError as exc:
                err = exc
            else:
                if resp.status not in RETRY_STATUSES:
                    return resp
                throttled = resp.status in (429, 503)
                wait = retry_after_s(resp.headers.get("retry-after")) if throttled else None
                self.stats.throttled += throttled
                reason = "throttled" if throttled else "server_error"
                if wait is not None and wait > lim.max_retry_after_s:
                    raise FetchError(reason, f"GET {url}: {resp.status}, Retry-After {wait:.0f}s is too long")
                wait = self.backoff_s(attempt) if wait is None else wait
                if throttled:  # the whole host waits
                    h = self._host(_host_key(URL(resp.url)))
                    h.resume_at = max(h.resume_at, loop.time() + wait)
                err = FetchError(reason, f"GET {url}: {resp.status} after {attempt + 1} attempt(s)", True)
                if attempt < lim.retries:
                    attempt += 1
                    self.stats.retries += 1
                    if not throttled:
                        self.stats.waited_s += wait
                        await asyncio.sleep(wait)
                    continue
            if not err.retryable or attempt >= lim.retries:
                self.stats.by_reason[err.reason] = self.stats.by_reason.get(err.reason, 0) + 1
                raise err
            wait = self.backoff_s(attempt)
            attempt += 1
            self.stats.retries += 1
            self.stats.waited_s += wait
            await asyncio.sleep(wait)

    async def _follow(self, url: str, params, max_bytes: int, accept: str | None) -> Response:
        try:
            target = URL(url)
            if params:
                target = target.update_query(params)
        except (ValueError, TypeError) as exc:
            raise FetchError("bad_url", f"bad URL {url[:200]!r}: {exc}") from None
        for _ in range(self.limits.max_redirects + 1):
            resp, location = await self._once(target, max_bytes, accept)
            if location is None:
                return resp
            try:
                target = target.join(URL(location))
            except (ValueError, TypeError) as exc:
                raise FetchError("bad_url", f"bad redirect {location[:200]!r}: {exc}") from None
        raise FetchError("too_many_redirects", f"more than {self.limits.max_redirects} redirects from {url}")

    async def _once(self, target: URL, max_bytes: int, accept: str | None) -> tuple[Response, str | None]:
        if target.scheme not in ("http", "https") or not target.host or target.user or target.password:
            raise FetchError("bad_url", f"not an http(s) URL: {str(target)[:200]!r}")
        try:
            literal = ipaddress.ip_address(target.host.strip("[]"))
        except ValueError:
            literal = None
        if literal is not None and not self.allowed(literal):  # names are vetted by the resolver
            self.stats.refused += 1
            raise FetchError("private_address", f"{target.host} is a non-public address")
        h = self._host(_host_key(target))
        loop = asyncio.get_running_loop()
        while (delay := h.resume_at - loop.time()) > 0:  # a 429/503 paused this host
            self.stats.waited_s += delay
            await asyncio.sleep(delay)
        headers = {"Accept": accept} if accept else None
        async with self._slots, h.slots:
            self.stats.requests += 1
            try:
                async with self._session.get(target, headers=headers, allow_redirects=False) as r:
                    if 300 <= r.status < 400 and "location" in r.headers:
                        return Response(r.status, r.headers, b"", str(target)), r.headers["location"]
                    length = r.headers.get("content-length")
                    if length is not None and length.isdigit() and int(length) > max_bytes:
                        raise FetchError("too_large", f"GET {target}: {length} bytes > limit {max_bytes}")
                    body = bytearray()
                    async for chunk in r.content.iter_chunked(1 << 16):  # decoded: a gzip bomb is capped too
                        body += chunk
                        if len(body) > max_bytes:
                            raise FetchError("too_large", f"GET {target}: body over the limit of {max_bytes} bytes")
                    return Response(r.status, r.headers, bytes(body), str(target)), None
            except aiohttp.ClientConnectorError as exc:
                if isinstance(exc.os_error, RefusedAddress):
                    self.stats.refused += 1
                    raise FetchError("private_address", str(exc.os_error)) from None
                if "cannot resolve" in str(exc.os_error):
                    raise FetchError("unresolvable", f"GET {target}: {exc.os_error}", True) from None
                raise FetchError("unreachable", f"GET {target}: cannot connect ({exc.os_error})", True) from None
            except (aiohttp.ServerTimeoutError, TimeoutError) as exc:  # connect / read timeouts
                raise FetchError("timeout", f"GET {target}: timed out ({type(exc).__name__})", True) from None
            except aiohttp.ClientError as exc:
                raise FetchError("http_error", f"GET {target}: {type(exc).__name__}: {exc}", True) from None


def _host_key(url: URL) -> str:
    return f"{url.host}:{url.port}"
