"""The local HTTP API: the Open Inference Protocol (KServe v2) plus a JSON convenience endpoint.

    GET  /v2                                  server metadata
    GET  /v2/health/live | /v2/health/ready   liveness; readiness once a verified model serves (400 until then)
    GET  /v2/models/{name}[/versions/{v}]     model metadata (inputs, outputs, labels)
    GET  /v2/models/{name}/ready              model readiness
    GET  /v2/models/{name}/config             Triton model configuration
    GET  /v2/models[/{name}]/stats            Triton inference statistics
    POST /v2/models/{name}[/versions/{v}]/infer   inference (JSON or binary tensor extension)
    POST /v1/predict                          {"texts": [...]} or {"images": [...]} (pixel arrays, or base64
                                              JPEG/PNG; or multipart/form-data), "top_k" -> labels, scores, ids
    POST /v1/feedback                         {"id": "<prediction id>", "label": "<true label>"} (or a list)
    GET  /v1/model                            the active model, its metrics
    GET  /metrics                             Prometheus exposition

HEAD works wherever GET does; query strings are ignored by the routes. Request bodies may be
``Content-Length`` or chunked, and ``Content-Encoding: gzip`` or ``deflate`` (bounded while they
inflate). Every bad request gets a 4xx with ``{"error": "..."}`` naming the problem, a full queue
a 503 with ``Retry-After``, an unexpected fault a 500; the server stays up.

The server is one asyncio event loop on its own thread. Framing is llhttp's (through
``httptools``, the parser uvicorn uses): a request with both ``Content-Length`` and
``Transfer-Encoding``, or any other malformed framing, gets a 400 and the connection is closed,
so nothing after it can be read as another request. Each connection has a header timeout, a body
timeout and a keep-alive idle timeout; past ``max_connections`` a new connection gets a 503 and is
closed. Inference runs in the :class:`Batcher`'s worker, awaited through its future, so the loop
keeps reading other requests while onnxruntime works; a request that finds nothing queued runs
at once on the loop.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import os
import re
import threading
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, cast

import httptools

from edge_agent import __version__
from edge_agent.config import HttpConfig, ServingConfig
from edge_agent.runtime import Classifier, ModelHolder
from edge_agent.runtime.text import encodable
from edge_agent.sampling import Sampler, UnknownPrediction
from edge_agent.serving import kserve
from edge_agent.serving.batcher import Batcher
from edge_agent.serving.metrics import ServingMetrics
from edge_agent.serving.service import InferenceService, RequestError, loads_json

log = logging.getLogger(__name__)

__all__ = ["InferenceServer", "RequestError", "Response"]

_MODEL_PATH = re.compile(
    r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<rest>/ready|/infer|/config|/stats)?$"
)
MAX_HEADER_BYTES = 16 * 1024
MAX_HEADERS = 100
MAX_URL_BYTES = 8 * 1024
LINGER_S = 2.0
READ_BUFFER_BYTES = 64 * 1024


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # names lower-case
    body: bytes = b""
    keep_alive: bool = True


@dataclass
class Response:
    status: HTTPStatus
    payload: dict[str, Any] | bytes
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"

    def encode(self, *, keep_alive: bool, head: bool = False) -> bytes:
        body = self.payload if isinstance(self.payload, bytes) else _JSON.encode(self.payload).encode()
        headers = "".join(f"{k}: {v}\r\n" for k, v in self.headers.items())
        if self.status == HTTPStatus.SERVICE_UNAVAILABLE and "Retry-After" not in self.headers:
            headers += "Retry-After: 1\r\n"
        head_bytes = (
            f"{_STATUS_LINES[self.status]}Date: {_http_date()}\r\n{_SERVER}Content-Type: {self.content_type}\r\n"
            f"Content-Length: {len(body)}\r\n{_KEEP_ALIVE if keep_alive else _CLOSE}{headers}\r\n"
        ).encode("latin-1")
        return head_bytes if head else head_bytes + body


_JSON = json.JSONEncoder(check_circular=False)  # replies are built here, never cyclic
_STATUS_LINES = {status: f"HTTP/1.1 {status.value} {status.phrase}\r\n" for status in HTTPStatus}
_SERVER = f"Server: edge-agent/{__version__}\r\n"
_KEEP_ALIVE = "Connection: keep-alive\r\n"
_CLOSE = "Connection: close\r\n"


_date_cache: tuple[int, str] = (0, "")


def _http_date() -> str:
    global _date_cache  # noqa: PLW0603 - one formatted date per second, shared by every response
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, email.utils.formatdate(now, usegmt=True))
    return _date_cache[1]


def _error(exc: RequestError) -> Response:
    headers = {"Allow": "GET, HEAD, POST"} if exc.status == HTTPStatus.METHOD_NOT_ALLOWED else {}
    return Response(exc.status, {"error": str(exc)}, headers)


_PREDICTION_ID = re.compile(r"^[0-9a-f]{32}$")
_LABEL = re.compile(r"^[^\x00-\x1f]{1,100}$")


def parse_feedback_body(body: bytes) -> list[tuple[str, str]]:
    """Validate a ``/v1/feedback`` body: one ``{"id", "label"}`` object or ``{"feedback": [...]}`` of them."""
    data = loads_json(body)
    items = data.get("feedback") if isinstance(data, dict) and "feedback" in data else [data]
    if not isinstance(items, list) or not items:
        raise RequestError(HTTPStatus.BAD_REQUEST, '"feedback" must be a non-empty list of {"id", "label"} objects')
    if len(items) > 1000:
        raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"{len(items)} feedback items; the limit is 1000")
    parsed = []
    for index, item in enumerate(items):
        where = f"feedback[{index}]" if len(items) > 1 else "body"
        if not isinstance(item, dict) or set(item) != {"id", "label"}:
            raise RequestError(HTTPStatus.BAD_REQUEST, f'{where} must be an object with exactly "id" and "label"')
        prediction_id, label = item["id"], item["label"]
        if not isinstance(prediction_id, str) or not _PREDICTION_ID.fullmatch(prediction_id):
            raise RequestError(HTTPStatus.BAD_REQUEST, f'{where}: "id" must be a prediction id (32 hex characters)')
        if not isinstance(label, str) or not _LABEL.fullmatch(label) or not encodable(label):
            raise RequestError(HTTPStatus.BAD_REQUEST, f'{where}: "label" must be a string of 1-100 characters')
        parsed.append((prediction_id, label))
    return parsed


def decode_body(request: Request, limit: int) -> bytes:
    """The body with its ``Content-Encoding`` (gzip, deflate) undone, at most ``limit`` bytes inflated."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return request.body
    if encoding not in ("gzip", "deflate"):
        raise RequestError(
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"Content-Encoding {encoding!r} is not supported (gzip, deflate)"
        )
    # gzip: a gzip header; deflate: zlib-wrapped as HTTP says, or raw as some clients send it.
    wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else (zlib.MAX_WBITS if request.body[:1] == b"\x78" else -15)
    inflater = zlib.decompressobj(wbits)
    try:
        data = inflater.decompress(request.body, limit + 1)
    except zlib.error as exc:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"body is not valid {encoding}: {exc}") from None
    if len(data) > limit or inflater.unconsumed_tail:
        raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body inflates past the limit of {limit} bytes")
    if not inflater.eof:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"body is truncated {encoding}")
    return data


class InferenceServer:
    """An asyncio HTTP server over an :class:`InferenceService`, on its own thread.

    Args:
        config: listen address, request limits and connection timeouts.
        holder: the serving model.
        model_name: the model's name, for URLs and responses.
        serving: batching and timeouts.
        metrics: where requests are counted.
        on_result: called with ``(version, ok)`` after each inference (the watch window listens).
        sampler: sees every prediction, gives it an id and keeps the hard ones; takes feedback.
        service: the inference service to use (shared with other front ends); built from the
            arguments above when not given.
    """

    def __init__(
        self,
        *,
        config: HttpConfig,
        holder: ModelHolder,
        model_name: str,
        serving: ServingConfig | None = None,
        metrics: ServingMetrics | None = None,
        on_result: Callable[[int, bool], None] | None = None,
        sampler: Sampler | None = None,
        service: InferenceService | None = None,
    ) -> None:
        self.config = config
        self.service = service or InferenceService(
            limits=config, holder=holder, model_name=model_name, serving=serving, metrics=metrics,
            on_result=on_result, sampler=sampler,
        )  # fmt: skip
        self.holder = self.service.holder
        self.model_name = model_name
        self.metrics = self.service.metrics
        self.sampler = self.service.sampler
        self.live: set[_Connection] = set()  # open connections (loop thread): the cap and the timeout sweep
        self.open_requests = 0  # requests read and not yet answered, on every connection (loop thread)
        self.read_buffer = memoryview(bytearray(READ_BUFFER_BYTES))  # every connection reads into it in turn
        timeouts = (config.header_timeout_s, config.body_timeout_s, config.idle_timeout_s)
        self._tick_s = min(1.0, min(timeouts) / 4)  # the loop's heartbeat, and how often timeouts are swept
        self.heartbeat = time.monotonic()  # the loop turned (the systemd watchdog checks it)
        self.loop = self._loop = asyncio.new_event_loop()
        self.service.bind_loop(self._loop)
        self._server: asyncio.base_events.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="http", daemon=True)
        self._address: tuple[str, int] = ("", 0)
        self._bind()  # bind now, so a taken port fails at start-up with a clear error

    @property
    def connections(self) -> int:
        """Open connections (those past the cap are refused and not counted)."""
        return len(self.live)

    @property
    def batcher(self) -> Batcher:
        return self.service.batcher

    def _bind(self) -> None:
        factory = lambda: _Connection(self)  # noqa: E731
        if self.config.unix_socket is not None:
            if self.config.unix_socket.exists():
                self.config.unix_socket.unlink()
            start: Awaitable[asyncio.base_events.Server] = self._loop.create_unix_server(
                factory, path=str(self.config.unix_socket)
            )
        else:
            start = self._loop.create_server(factory, self.config.host, self.config.port, backlog=128)
        self._server = self._loop.run_until_complete(start)
        if self.config.unix_socket is not None:
            os.chmod(self.config.unix_socket, 0o660)
            self._address = (str(self.config.unix_socket), 0)
        else:
            host, port = self._server.sockets[0].getsockname()[:2]
            self._address = (str(host), int(port))

    @property
    def address(self) -> tuple[str, int]:
        return self._address

    def start(self) -> None:
        self.service.start()
        self._loop.call_soon_threadsafe(self._beat)
        self._thread.start()
        where = self.config.unix_socket or "http://{}:{}".format(*self._address)
        log.info("inference API on %s", where)

    def _beat(self) -> None:
        """Every tick: mark the loop alive (the watchdog reads it) and time out the connections whose
        phase (headers, body, keep-alive idle) has passed its deadline."""
        self.heartbeat = time.monotonic()
        now = self._loop.time()
        try:
            for connection in [c for c in self.live if c.deadline <= now]:
                connection.expire()
        finally:
            self._loop.call_later(self._tick_s, self._beat)

    def loop_problem(self, *, max_stall_s: float) -> str | None:
        """Why the HTTP loop looks stuck (for the systemd watchdog), or None."""
        if not self._thread.is_alive():
            return "the HTTP loop thread has died"
        idle = time.monotonic() - self.heartbeat
        if idle > max_stall_s:
            return f"the HTTP loop has not turned for {idle:.0f}s"
        return None

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
                await self._server.wait_closed()

        if self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=5)
            except TimeoutError:
                log.warning("HTTP connections did not close within 5 s")
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        self.service.stop()

    # -- requests ---------------------------------------------------------------------------------
    async def handle(self, request: Request) -> Response:
        """Answer one request; never raises (a fault is a 500 and the server goes on)."""
        start = time.perf_counter()
        endpoint = None
        try:
            if request.method in ("GET", "HEAD"):
                response = self._get(request)
            elif request.method == "POST":
                endpoint = {"/v1/predict": "predict", "/v1/feedback": "feedback"}.get(request.path, "infer")
                response = await self._post(request)
            else:
                raise RequestError(HTTPStatus.METHOD_NOT_ALLOWED, f"method {request.method} is not supported")
        except RequestError as exc:
            response = _error(exc)
        except Exception:
            log.exception("request %s %s failed", request.method, request.path[:200])
            response = Response(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error; see the agent's log"})
        if endpoint is not None and response.status != HTTPStatus.NOT_FOUND:
            # counted on the loop's next turn, after the reply is written (as the sampler is)
            failed = response.status == HTTPStatus.INTERNAL_SERVER_ERROR
            self._loop.call_soon(self._count, endpoint, int(response.status), time.perf_counter() - start, failed)
        return response

    def _count(self, endpoint: str, status: int, seconds: float, failed: bool) -> None:
        self.metrics.observe(endpoint, status, seconds, inference_failed=failed)

    async def _post(self, request: Request) -> Response:
        path = request.path
        if path == "/v1/predict":
            return await self._predict(request)
        if path == "/v1/feedback":
            return self._feedback(request)
        match = _MODEL_PATH.match(path)
        if match and match["rest"] == "/infer":
            return await self._infer(request, match)
        raise RequestError(HTTPStatus.NOT_FOUND, f"no such endpoint: POST {path}")

    def _matching_model(self, match: re.Match[str]) -> Classifier:
        if match["name"] != self.model_name:
            raise RequestError(
                HTTPStatus.NOT_FOUND, f"no model {match['name']!r}; this agent serves {self.model_name!r}"
            )
        model = self.service.model()
        if match["version"] is not None and match["version"] != str(model.version):
            raise RequestError(
                HTTPStatus.NOT_FOUND, f"version {match['version']} is not loaded (serving {model.version})"
            )
        return model

    def _get(self, request: Request) -> Response:  # noqa: PLR0911 - one return per route
        model = self.holder.get()
        path = request.path
        if path == "/metrics":
            self.metrics.queue_depth.set(self.batcher.depth)
            self.metrics.active_version.set(model.version if model else 0)
            return Response(HTTPStatus.OK, self.metrics.exposition(), content_type="text/plain; version=0.0.4")
        if path == "/v2":
            return Response(HTTPStatus.OK, {"name": "edge-agent", "version": __version__,
                                            "extensions": kserve.EXTENSIONS})  # fmt: skip
        if path == "/v2/health/live":
            return Response(HTTPStatus.OK, {"live": True})
        if path == "/v2/health/ready":  # the v2 protocol: 200 ready, 4xx not
            status = HTTPStatus.OK if model else HTTPStatus.BAD_REQUEST
            return Response(status, {"ready": model is not None, "version": model.version if model else None})
        if path == "/v1/model":
            m = self.service.model()
            return Response(HTTPStatus.OK, {
                "model": self.model_name, "version": m.version, "labels": m.labels,
                "quantization": m.manifest.quantization, "metrics": m.manifest.metrics,
            })  # fmt: skip
        if path == "/v2/models/stats":
            return Response(HTTPStatus.OK, kserve.statistics(self.model_name, model, self.service.stats))
        return self._get_model(path)

    def _get_model(self, path: str) -> Response:
        match = _MODEL_PATH.match(path)
        if match is None:
            raise RequestError(HTTPStatus.NOT_FOUND, f"no such endpoint: GET {path}")
        if match["rest"] == "/ready":
            ready = match["name"] == self.model_name and self.holder.get() is not None
            try:
                self._matching_model(match)
            except RequestError:
                ready = False
            status = HTTPStatus.OK if ready else HTTPStatus.BAD_REQUEST
            return Response(status, {"name": match["name"], "ready": ready})
        m = self._matching_model(match)
        if match["rest"] == "/infer":
            raise RequestError(HTTPStatus.METHOD_NOT_ALLOWED, "infer takes POST")
        if match["rest"] == "/config":
            return Response(HTTPStatus.OK, kserve.model_config(self.model_name, m.manifest, self.config.max_texts))
        if match["rest"] == "/stats":
            return Response(HTTPStatus.OK, kserve.statistics(self.model_name, m, self.service.stats))
        return Response(HTTPStatus.OK, kserve.model_metadata(self.model_name, m.manifest))

    async def _predict(self, request: Request) -> Response:
        model = self.service.model()
        body = decode_body(request, self.config.max_body_bytes)
        parsed = self.service.parse_predict(body, model, content_type=request.headers.get("content-type"))
        start = time.perf_counter()
        version, predictions = await self.service.infer(parsed.inputs, alone=self.open_requests == 1)
        elapsed_ms = round((time.perf_counter() - start) * 1000, 3)
        ids = self.service.observe_after_reply(parsed.inputs, version, predictions, model.manifest.task)
        return Response(HTTPStatus.OK, {
            "model": self.model_name,
            "version": version,
            "inference_ms": elapsed_ms,
            "predictions": self.service.task(model).reply(predictions, ids, top_k=parsed.top_k),
        })  # fmt: skip

    def _feedback(self, request: Request) -> Response:
        if self.sampler is None:
            raise RequestError(HTTPStatus.NOT_FOUND, "feedback is not enabled on this agent")
        items = parse_feedback_body(decode_body(request, self.config.max_body_bytes))
        for index, (prediction_id, _label) in enumerate(items):  # all known, or none is taken
            if not self.sampler.remembers(prediction_id):
                where = f"feedback[{index}]: " if len(items) > 1 else ""
                raise RequestError(HTTPStatus.NOT_FOUND, f"{where}{UnknownPrediction.message(prediction_id)}")
        accepted = []
        for prediction_id, label in items:
            try:
                accepted.append(self.sampler.feedback(prediction_id, label).id)
            except UnknownPrediction as exc:  # forgotten in between: a flood of new predictions
                raise RequestError(HTTPStatus.NOT_FOUND, str(exc)) from None
        return Response(HTTPStatus.ACCEPTED, {"accepted": len(accepted), "ids": accepted})

    async def _infer(self, request: Request, match: re.Match[str]) -> Response:
        model = self._matching_model(match)
        body = decode_body(request, self.config.max_body_bytes)
        try:
            decoded = kserve.decode_request(
                body, request.headers.get(kserve.HEADER_LENGTH.lower()), model.manifest,
                max_items=self.config.max_texts,
            )  # fmt: skip
        except kserve.ProtocolViolation as exc:
            raise RequestError(exc.status, str(exc)) from None
        inputs = self.service.check_inputs(decoded.inputs, model)
        version, predictions = await self.service.infer(inputs, alone=self.open_requests == 1)
        self.service.observe_after_reply(inputs, version, predictions, model.manifest.task)
        payload, headers = kserve.encode_response(
            decoded, predictions, model=self.model_name, version=version, labels=model.labels
        )
        return Response(
            HTTPStatus.OK, payload, headers, "application/json" if not headers else "application/octet-stream"
        )


class _Connection(asyncio.BufferedProtocol):
    """One HTTP/1.1 connection: llhttp framing, per-phase timeouts, pipelined requests in order.

    Reads go into the server's one read buffer (``recv_into``, no allocation per read; the parser
    copies what it keeps). Each phase's timeout is a deadline that the server's once-a-tick sweep
    enforces, not a timer per phase per request."""

    def __init__(self, server: InferenceServer) -> None:
        self.server = server
        self.config = server.config
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.pending: deque[Request] = deque()
        self.busy = False
        self.closing = False
        self.writable = asyncio.Event()
        self.writable.set()
        self.deadline = math.inf  # when the current phase times out (loop time); inf: no timeout
        self.deadline_message: str | None = None  # its error; None: an idle keep-alive connection
        self.linger: asyncio.TimerHandle | None = None
        self._url = b""
        self._headers: dict[str, str] = {}
        self._header_bytes = 0
        self._body: list[bytes] = []
        self._body_size = 0

    # -- transport events -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (uvloop's are not asyncio.Transport subclasses, but have its methods)
        self.transport = cast(asyncio.Transport, transport)
        if self.server.connections >= self.config.max_connections:
            log.warning("refused a connection: %d open, the limit is %d", self.server.connections,
                        self.config.max_connections)  # fmt: skip
            self._fail(RequestError(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections; try again"))
            return
        self.server.live.add(self)
        self._arm(self.config.idle_timeout_s, None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.live.discard(self)  # absent if it was refused at the cap
        self.closing = True
        self.writable.set()
        self._clear_deadline()
        if self.linger is not None:
            self.linger.cancel()
            self.linger = None

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.server.read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        if self.closing:
            return  # lingering after an error: read and dropped
        try:
            self.parser.feed_data(self.server.read_buffer[:nbytes])
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, RequestError):
                self._fail(cause)
            else:
                log.error("HTTP parser callback failed: %r", cause)
                self._fail(RequestError(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error"))
        except httptools.HttpParserUpgrade:
            self._fail(RequestError(HTTPStatus.BAD_REQUEST, "protocol upgrades are not supported"))
        except httptools.HttpParserError as exc:
            self._fail(RequestError(HTTPStatus.BAD_REQUEST, f"malformed HTTP request: {exc}"))

    # -- llhttp callbacks -------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url, self._headers, self._header_bytes = b"", {}, 0
        self._body, self._body_size = [], 0
        self._arm(self.config.header_timeout_s, "request headers did not arrive in time")

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_URL_BYTES:
            raise RequestError(HTTPStatus.REQUEST_URI_TOO_LONG, f"URL longer than {MAX_URL_BYTES} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > MAX_HEADER_BYTES:
            raise RequestError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request headers too large")
        key = name.decode("latin-1").lower()
        if key in self._headers:
            if key in ("content-length", "host", "content-encoding", "content-type"):
                raise RequestError(HTTPStatus.BAD_REQUEST, f"header {key} given twice")
            self._headers[key] += ", " + value.decode("latin-1")
        else:
            self._headers[key] = value.decode("latin-1")
        if len(self._headers) > MAX_HEADERS:
            raise RequestError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, f"more than {MAX_HEADERS} headers")

    def on_headers_complete(self) -> None:
        self._arm(self.config.body_timeout_s, "request body did not arrive in time")
        length = self._headers.get("content-length")
        if length is None and "transfer-encoding" not in self._headers and self.parser.get_method() == b"POST":
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "POST needs a Content-Length or a chunked body")
        limit = self.config.max_body_bytes
        if length is not None and length.isdigit() and int(length) > limit:
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body of {length} bytes; the limit is {limit}")
        if self._headers.get("expect", "").lower() == "100-continue" and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self.config.max_body_bytes:
            raise RequestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over the limit of {self.config.max_body_bytes} bytes"
            )
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._clear_deadline()
        url = httptools.parse_url(self._url) if self._url else None
        path = url.path.decode("latin-1") if url is not None and url.path else "/"
        method = self.parser.get_method().decode("latin-1")
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        request = Request(method, path, self._headers, body, self.parser.should_keep_alive())
        self.pending.append(request)
        self.server.open_requests += 1
        if len(self.pending) > 1 and self.transport is not None:
            self.transport.pause_reading()  # pipelining: read no further until the backlog is answered
        if not self.busy:
            self.busy = True
            self.loop.create_task(self._serve())

    # -- answering --------------------------------------------------------------------------------
    async def _serve(self) -> None:
        try:
            while self.pending and not self.closing and self.transport is not None:
                request = self.pending.popleft()
                try:
                    response = await self.server.handle(request)
                finally:
                    self.server.open_requests -= 1
                keep_alive = request.keep_alive and not self.closing
                self.transport.write(response.encode(keep_alive=keep_alive, head=request.method == "HEAD"))
                if not keep_alive:
                    self.closing = True
                    self.transport.close()
                    return
                if not self.writable.is_set():  # the client does not read its answers: not forever
                    try:
                        await asyncio.wait_for(self.writable.wait(), self.config.idle_timeout_s)
                    except TimeoutError:
                        self.closing = True
                        self.transport.abort()
                        return
                if len(self.pending) <= 1 and not self.transport.is_closing():
                    self.transport.resume_reading()
        finally:
            self.busy = False
            self.server.open_requests -= len(self.pending)  # never to be answered: the connection ends
            self.pending.clear()
        if not self.closing:
            self._arm(self.config.idle_timeout_s, None)

    def _fail(self, exc: RequestError) -> None:
        """Answer an error that ends the connection (framing, limits, timeouts), and close it.

        A lingering close: the write side is shut, what the client still sends is read and
        dropped for a moment, so the kernel does not answer it with a reset that would destroy the
        error response before the client has read it."""
        self.closing = True
        self._clear_deadline()
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(_error(exc).encode(keep_alive=False))
        if transport.can_write_eof():
            transport.write_eof()
            self.linger = self.loop.call_later(LINGER_S, transport.close)
        else:
            transport.close()

    def eof_received(self) -> bool:
        return False  # the client is done sending: close

    def _arm(self, seconds: float, message: str | None) -> None:
        """A timeout for the phase that starts now; ``message`` None: an idle keep-alive connection."""
        self.deadline = self.loop.time() + seconds
        self.deadline_message = message

    def _clear_deadline(self) -> None:
        self.deadline = math.inf

    def expire(self) -> None:
        """The current phase's deadline has passed (the server's sweep calls it)."""
        message = self.deadline_message
        self.deadline = math.inf
        if self.busy or self.closing or self.transport is None:
            return
        if message is None:
            self.closing = True
            self.transport.close()  # an idle keep-alive connection: closed without a word, as usual
        else:
            self._fail(RequestError(HTTPStatus.REQUEST_TIMEOUT, message))
