"""An HTTP proxy in front of the emulated API server that injects the failures a real one has.

Why a proxy instead of hooks in the server: the operator must survive 409s, 5xx, refused
connections and dropped watch streams exactly as the `kubernetes` client and kopf see them on the
wire, and the emulated API server must stay a faithful server. So tests point the operator at this
proxy; rules say which requests fail, how, and how many times; everything else passes through
unchanged, watch streams chunk by chunk. Every request is recorded, with what was done to it.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "host"}


@dataclass
class FaultRule:
    """Fail `times` requests matching method and path regex (and `watch` if set) with `status`.

    status 0 closes the connection without an answer, None passes it on; `delay_s` stalls before answering or
    passing on. `body` replaces the injected answer's Status body (e.g. garbage for a Prometheus client);
    `transform` rewrites the body of an answer passed on (e.g. every sample turned NaN).
    """

    method: str = "*"
    path: str = ".*"
    status: int | None = 503
    times: int = 1
    watch: bool | None = None
    delay_s: float = 0.0
    body: bytes | None = None
    transform: Callable[[bytes], bytes] | None = None
    hits: int = 0

    def matches(self, method: str, path: str, is_watch: bool) -> bool:
        if self.hits >= self.times:
            return False
        if self.method != "*" and self.method.upper() != method.upper():
            return False
        if self.watch is not None and self.watch != is_watch:
            return False
        return re.search(self.path, path) is not None


@dataclass
class ProxiedRequest:
    method: str
    path: str
    query: str
    user_agent: str
    injected: int | None
    status: int | None = None


_REASONS = {403: "Forbidden", 404: "NotFound", 409: "Conflict", 429: "TooManyRequests", 500: "InternalError", 502: "BadGateway",
            503: "ServiceUnavailable", 504: "Timeout"}


def status_body(code: int) -> bytes:
    reason = _REASONS.get(code, "InternalError")
    message = ("Operation cannot be fulfilled: the object has been modified; please apply your changes to the "
               "latest version and try again" if code == 409 else f"injected fault: {reason}")
    return json.dumps({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                       "message": message, "reason": reason, "code": code}).encode()


@dataclass
class FaultProxy:
    upstream: str
    host: str = "127.0.0.1"
    port: int = 0
    rules: list[FaultRule] = field(default_factory=list)
    log: list[ProxiedRequest] = field(default_factory=list)
    url: str = ""

    def __post_init__(self) -> None:
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._streams: set[web.StreamResponse] = set()

    async def start(self) -> FaultProxy:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://{self.host}:{self.port}"
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        return self

    async def stop(self) -> None:
        await self.drop_watches()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def add(self, rule: FaultRule) -> FaultRule:
        self.rules.append(rule)
        return rule

    async def drop_watches(self) -> int:
        """Cut every open watch stream mid-way (as a restarting API server does)."""
        streams = list(self._streams)
        for resp in streams:
            transport = resp._req.transport if resp._req is not None else None  # noqa: SLF001
            if transport is not None:
                transport.close()
        self._streams.clear()
        return len(streams)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        is_watch = request.query.get("watch") in ("true", "1")
        rule = next((r for r in self.rules if r.matches(request.method, request.path, is_watch)), None)
        record = ProxiedRequest(request.method, request.path, request.query_string,
                                request.headers.get("User-Agent", ""), rule.status if rule else None)
        self.log.append(record)
        body = await request.read() if request.can_read_body else b""
        if rule is not None:
            rule.hits += 1
            if rule.delay_s:
                await asyncio.sleep(rule.delay_s)
            if rule.status == 0:
                if request.transport is not None:
                    request.transport.close()
                raise ConnectionResetError("injected connection drop")
            if rule.status:
                record.status = rule.status
                return web.Response(status=rule.status, body=status_body(rule.status) if rule.body is None
                                    else rule.body, content_type="application/json")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        # a body without Content-Type goes on without one: aiohttp would label it octet-stream, which the
        # API server refuses (415), while it reads an unlabelled body as JSON
        skip = () if "Content-Type" in request.headers else ("Content-Type",)
        async with self._session.request(request.method, self.upstream.rstrip("/") + request.path_qs,
                                         headers=headers, data=body or None, allow_redirects=False,
                                         skip_auto_headers=skip) as up:
            record.status = up.status
            out_headers = {k: v for k, v in up.headers.items() if k.lower() not in HOP_HEADERS}
            if not is_watch:
                answer = await up.read()
                if rule is not None and rule.transform is not None:
                    answer = rule.transform(answer)
                return web.Response(status=up.status, body=answer, headers=out_headers)
            resp = web.StreamResponse(status=up.status, headers=out_headers)
            await resp.prepare(request)
            self._streams.add(resp)
            try:
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
            except (ConnectionResetError, aiohttp.ClientError, asyncio.CancelledError):
                pass
            finally:
                self._streams.discard(resp)
            return resp
