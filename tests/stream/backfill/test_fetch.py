"""The fetcher's rules on a loopback server: addresses vetted (also through DNS), size caps,
redirects, Retry-After (seconds and HTTP dates), per-host pause."""

from __future__ import annotations

import asyncio
import time
from email.utils import formatdate

import pytest
from aiohttp import web

from stream.backfill.fetch import Fetcher, FetchError, Limits, parse_networks, retry_after_s

LOOPBACK = parse_networks(["127.0.0.0/8", "::1/128"])


async def serve(app: web.Application):
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]


def app_with(**routes) -> web.Application:
    """Routes from plain functions or coroutines; a returned HTTPException (a redirect) is raised."""
    def route(fn):
        async def handler(request):
            r = fn(request)
            r = await r if asyncio.iscoroutine(r) else r
            if isinstance(r, web.HTTPException):
                raise r
            return r
        return handler

    app = web.Application()
    for path, fn in routes.items():
        app.router.add_get("/" + path, route(fn))
    return app


def test_retry_after_forms():
    assert retry_after_s("3") == 3.0 and retry_after_s("0.5") == 0.5
    assert retry_after_s(formatdate(time.time() + 30, usegmt=True)) == pytest.approx(30, abs=2)
    assert retry_after_s("soon") is None and retry_after_s(None) is None and retry_after_s("-5") == 0.0


def test_names_resolving_to_loopback_are_refused_unless_allowed():
    async def main():
        runner, port = await serve(app_with(ok=lambda r: web.Response(text="ok")))
        try:
            async with Fetcher(Limits(retries=0)) as f:  # nothing allowed
                for host in ("localhost", "127.0.0.1"):
                    with pytest.raises(FetchError) as err:
                        await f.get(f"http://{host}:{port}/ok")
                    assert err.value.reason == "private_address"
            async with Fetcher(Limits(retries=0), LOOPBACK) as f:
                r = await f.get(f"http://localhost:{port}/ok")
                assert r.status == 200 and r.body == b"ok"
                with pytest.raises(FetchError) as err:
                    await f.get("http://10.0.0.1/x")  # allowed: loopback only
                assert err.value.reason == "private_address"
                with pytest.raises(FetchError) as err:
                    await f.get("ftp://example.com/x")
                assert err.value.reason == "bad_url"
        finally:
            await runner.cleanup()

    asyncio.run(main())


def test_size_cap_redirect_limit_and_redirect_to_a_private_host():
    async def big(request):
        resp = web.StreamResponse()  # no Content-Length: cut off while streaming
        await resp.prepare(request)
        for _ in range(64):
            await resp.write(b"x" * 65536)
        return resp

    async def main():
        runner, port = await serve(app_with(
            big=big, sized=lambda r: web.Response(body=b"y" * 5000),
            loop=lambda r: web.HTTPFound("/loop"), away=lambda r: web.HTTPFound("http://192.168.1.1/x"),
            once=lambda r: web.HTTPFound("/sized")))
        try:
            async with Fetcher(Limits(retries=0), LOOPBACK) as f:
                base = f"http://127.0.0.1:{port}"
                for path, limit in (("big", 1 << 20), ("sized", 4000)):
                    with pytest.raises(FetchError) as err:
                        await f.get(f"{base}/{path}", max_bytes=limit)
                    assert err.value.reason == "too_large", path
                assert (await f.get(f"{base}/once", max_bytes=5000)).body == b"y" * 5000
                with pytest.raises(FetchError) as err:
                    await f.get(f"{base}/loop")
                assert err.value.reason == "too_many_redirects"
                with pytest.raises(FetchError) as err:
                    await f.get(f"{base}/away")  # the redirect target is vetted too
                assert err.value.reason == "private_address"
        finally:
            await runner.cleanup()

    asyncio.run(main())


def test_429_pauses_the_host_for_retry_after_then_retries():
    seen: list[float] = []

    async def limited(request):
        seen.append(time.monotonic())
        if len(seen) <= 2:
            return web.Response(status=429, headers={"Retry-After": "1"})
        return web.Response(text="ok")

    async def main():
        runner, port = await serve(app_with(r=limited))
        try:
            async with Fetcher(Limits(retries=3), LOOPBACK) as f:
                r = await f.get(f"http://127.0.0.1:{port}/r")
                assert r.status == 200 and f.stats.throttled == 2
        finally:
            await runner.cleanup()

    asyncio.run(main())
    assert len(seen) == 3 and seen[1] - seen[0] >= 0.95 and seen[2] - seen[1] >= 0.95
