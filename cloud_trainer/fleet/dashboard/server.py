"""The dashboard's HTTP front end (aiohttp) over :class:`~cloud_trainer.fleet.dashboard.service.DashboardService`.

    GET  /                       the page (static/index.html; its script and style beside it, no CDN)
    GET  /static/{file}
    GET  /api/snapshot           everything the page shows, as one JSON document
    GET  /api/devices/{device}   one device's row and telemetry history (latency, throughput)
    GET  /api/events             Server-Sent Events: ``snapshot`` first, then ``update`` events
                                 (changed rows, removed devices, summary, releases, errors)
    POST /api/actions/{action}   promote, pause, withdraw ``{"topic": ...}``; 403 when read-only

Changes are coalesced: at most one ``update`` per ``update_interval_s`` (0.2 s), so 1,000 devices
reporting telemetry cost the browser a handful of small events a second. A client that falls
``queue_size`` events behind is closed; its browser reconnects and starts again from a snapshot.

Bound to a loopback address (the default), the server answers only requests whose Host header
names it (no DNS rebinding), and an action must carry the page's token in ``X-Dashboard-Token``
(a header another site's page cannot send without a CORS preflight, which is never allowed).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from cloud_trainer.errors import BrokerError, CloudTrainError
from cloud_trainer.fleet.dashboard.actions import ACTIONS
from cloud_trainer.fleet.dashboard.errors import NoSuchRelease, ReadOnly
from cloud_trainer.fleet.dashboard.service import DashboardService

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
TOKEN_HEADER = "X-Dashboard-Token"
KEEPALIVE_S = 15.0  # an SSE comment this often keeps proxies and the browser from timing out
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def sse(event: str, data: dict[str, Any]) -> bytes:
    """One Server-Sent Event (JSON has no newlines when compact: one ``data:`` line)."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class Broadcaster:
    """Turns the service's change notes (MQTT thread) into ``update`` events for every SSE client.

    Args:
        service: the data plane.
        interval_s: the coalescing window: changes within it go out as one event.
        queue_size: events a client may fall behind before it is closed.
    """

    def __init__(self, service: DashboardService, *, interval_s: float = 0.2, queue_size: int = 64) -> None:
        self._service = service
        self._interval_s = interval_s
        self._queue_size = queue_size
        self._clients: set[asyncio.Queue[bytes | None]] = set()
        self._lock = threading.Lock()
        self._dirty: set[str] = set()
        self._pending = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run())
        self._service.add_listener(self.note)

    async def close(self) -> None:
        """Stop, and end every client's stream."""
        self._service.remove_listener(self.note)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for queue in list(self._clients):
            self._end(queue)

    def subscribe(self) -> asyncio.Queue[bytes | None]:
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=self._queue_size)
        self._clients.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[bytes | None]) -> None:
        self._clients.discard(queue)

    def note(self, device: str | None) -> None:
        """A device changed (``None``: a release did); any thread."""
        with self._lock:
            if device is not None:
                self._dirty.add(device)
            wake, self._pending = not self._pending, True
        if wake and self._loop is not None and self._wake is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(self._interval_s)
            with self._lock:
                devices, self._dirty, self._pending = self._dirty, set(), False
            if not self._clients:
                continue
            event = sse("update", self._update(devices))
            for queue in list(self._clients):
                try:
                    queue.put_nowait(event)
                except asyncio.QueueFull:
                    log.warning(
                        "an event stream fell %d events behind; closing it (the page reconnects)", queue.qsize()
                    )
                    self._end(queue)

    def _update(self, devices: set[str]) -> dict[str, Any]:
        rows = self._service.rows()
        by_device = {r.device: r for r in rows}
        return {
            "rows": [self._service.row_json(by_device[d]) for d in sorted(devices) if d in by_device],
            "removed": sorted(d for d in devices if d not in by_device),
            **self._service.overview(rows),
        }

    def _end(self, queue: asyncio.Queue[bytes | None]) -> None:
        self._clients.discard(queue)
        while not queue.empty():
            queue.get_nowait()
        queue.put_nowait(None)


SERVICE = web.AppKey("service", DashboardService)
BROADCASTER = web.AppKey("broadcaster", Broadcaster)
ALLOWED_HOSTS: web.AppKey[set[str]] = web.AppKey("allowed_hosts")


# -- handlers -------------------------------------------------------------------------------------------
def _snapshot(service: DashboardService) -> dict[str, Any]:
    data = service.snapshot()
    data["token"] = service.token if service.actions.writable else None
    return data


async def _index(_request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC_DIR / "index.html")


async def _snapshot_handler(request: web.Request) -> web.StreamResponse:
    return web.json_response(_snapshot(request.app[SERVICE]))


async def _device(request: web.Request) -> web.StreamResponse:
    found = request.app[SERVICE].device(request.match_info["device"])
    if found is None:
        raise web.HTTPNotFound(text=json.dumps({"error": "no such device"}), content_type="application/json")
    return web.json_response(found)


async def _events(request: web.Request) -> web.StreamResponse:
    broadcaster = request.app[BROADCASTER]
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "X-Accel-Buffering": "no"})
    queue = broadcaster.subscribe()  # before the snapshot: a change after it comes as an update
    try:
        await response.prepare(request)
        await response.write(b"retry: 1000\n" + sse("snapshot", _snapshot(request.app[SERVICE])))
        while True:
            try:
                event = await asyncio.wait_for(queue.get(), timeout=KEEPALIVE_S)
            except asyncio.TimeoutError:
                await response.write(b": keep-alive\n\n")
                continue
            if event is None:
                break
            await response.write(event)
    except ConnectionResetError:
        pass  # the browser went away
    finally:
        broadcaster.unsubscribe(queue)
    return response


def _error(status: type[web.HTTPException], message: str) -> web.HTTPException:
    return status(text=json.dumps({"error": message}), content_type="application/json")


async def _action(request: web.Request) -> web.StreamResponse:
    service = request.app[SERVICE]
    if not service.actions.writable:
        raise _error(web.HTTPForbidden, "this dashboard is read-only: start it with --key to change rollouts")
    if not hmac.compare_digest(request.headers.get(TOKEN_HEADER, ""), service.token):
        raise _error(web.HTTPForbidden, f"missing or wrong {TOKEN_HEADER}")
    action = request.match_info["action"]
    if action not in ACTIONS:
        raise _error(web.HTTPNotFound, f"no action {action!r}")
    try:
        body = await request.json()
    except ValueError:
        raise _error(web.HTTPBadRequest, 'the body must be JSON: {"topic": ...}') from None
    topic = body.get("topic") if isinstance(body, dict) else None
    if not isinstance(topic, str):
        raise _error(web.HTTPBadRequest, 'the body must name the release\'s topic: {"topic": ...}')
    try:
        message = await asyncio.to_thread(service.actions.run, action, topic)
    except ReadOnly as exc:
        raise _error(web.HTTPForbidden, str(exc)) from None
    except NoSuchRelease as exc:
        raise _error(web.HTTPNotFound, str(exc)) from None
    except BrokerError as exc:
        raise _error(web.HTTPBadGateway, str(exc)) from None
    except CloudTrainError as exc:
        raise _error(web.HTTPConflict, str(exc)) from None
    log.warning("dashboard action: %s", message)
    return web.json_response({"message": message})


@web.middleware
async def _host_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    allowed = request.app[ALLOWED_HOSTS]
    if allowed and request.host not in allowed:
        raise web.HTTPMisdirectedRequest(text=f"this dashboard answers to {', '.join(sorted(allowed))}")
    return await handler(request)


async def _security_headers(_request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(SECURITY_HEADERS)


def make_app(service: DashboardService, *, update_interval_s: float = 0.2) -> web.Application:
    app = web.Application(middlewares=[_host_guard])
    app[SERVICE] = service
    app[BROADCASTER] = Broadcaster(service, interval_s=update_interval_s)
    app[ALLOWED_HOSTS] = set()  # filled in when the port is known (DashboardServer.start)
    app.router.add_get("/", _index)
    app.router.add_static("/static/", STATIC_DIR)
    app.router.add_get("/api/snapshot", _snapshot_handler)
    app.router.add_get("/api/devices/{device}", _device)
    app.router.add_get("/api/events", _events)
    app.router.add_post("/api/actions/{action}", _action)
    app.on_response_prepare.append(_security_headers)

    async def start_broadcaster(app: web.Application) -> None:
        await app[BROADCASTER].start()

    async def end_streams(app: web.Application) -> None:
        await app[BROADCASTER].close()

    app.on_startup.append(start_broadcaster)
    app.on_shutdown.append(end_streams)
    return app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class DashboardServer:
    """The app on a TCP port; :meth:`start` returns the URL (port 0: a free port, read back).

    Args:
        service: the data plane (started by the caller, before or after).
        host: the address to bind (default loopback only).
        port: the port; 0 for any free one.
        update_interval_s: the coalescing window of live updates.
    """

    def __init__(
        self, service: DashboardService, *, host: str = "127.0.0.1", port: int = 0, update_interval_s: float = 0.2
    ) -> None:
        self._app = make_app(service, update_interval_s=update_interval_s)
        self._host, self._port = host, port
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> str:
        self._runner = web.AppRunner(self._app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        port = self._runner.addresses[0][1]
        if is_loopback(self._host):
            names = {self._host, "127.0.0.1", "localhost", "[::1]"}
            self._app[ALLOWED_HOSTS].update(
                f"[{n}]:{port}" if ":" in n and not n.startswith("[") else f"{n}:{port}" for n in names
            )
        shown = f"[{self._host}]" if ":" in self._host else self._host
        self.url = f"http://{shown}:{port}/"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
