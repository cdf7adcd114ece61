"""The local HTTP API: the Open Inference Protocol (KServe v2) plus a JSON convenience endpoint.

    GET  /v2                                  server metadata
    GET  /v2/health/live | /v2/health/ready   liveness; readiness once a verified model serves
    GET  /v2/models/{name}[/versions/{v}]     model metadata (inputs, outputs, labels)
    GET  /v2/models/{name}/ready              model readiness
    POST /v2/models/{name}[/versions/{v}]/infer   inference (JSON or binary tensor extension)
    POST /v1/predict                          {"texts": [...]} or {"images": [...]} -> labels, scores, ids
    POST /v1/feedback                         {"id": "<prediction id>", "label": "<true label>"} (or a list)
    GET  /v1/model                            the active model, its metrics
    GET  /metrics                             Prometheus exposition

Every bad request gets a 4xx with ``{"error": "..."}`` naming the problem; a full queue a 503
with ``Retry-After``; the server stays up. It listens on localhost, or a Unix socket.

The server is one asyncio event loop on its own thread (HTTP/1.1 with keep-alive, parsed here:
a thread per connection and the stdlib's header parser cost more CPU than the model on a
two-core device). Inference runs in the :class:`Batcher`'s worker, awaited through its future,
so the loop keeps reading other requests while onnxruntime works; a request that finds nothing
queued runs at once on the loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from edge_agent import __version__
from edge_agent.config import HttpConfig, ServingConfig
from edge_agent.runtime import Classifier, InputError, ModelHolder, Prediction
from edge_agent.sampling import Sampler, UnknownPrediction
from edge_agent.serving import kserve
from edge_agent.serving.batcher import Batcher, NoModel, Overloaded
from edge_agent.serving.metrics import ServingMetrics

log = logging.getLogger(__name__)

_MODEL_PATH = re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<rest>/ready|/infer)?$")
MAX_HEADER_BYTES = 16 * 1024
MAX_HEADERS = 100


class RequestError(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # names lower-case
    body: bytes = b""


@dataclass
class Response:
    status: HTTPStatus
    payload: dict[str, Any] | bytes
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"

    def encode(self, *, keep_alive: bool) -> bytes:
        body = self.payload if isinstance(self.payload, bytes) else json.dumps(self.payload).encode()
        lines = [
            f"HTTP/1.1 {self.status.value} {self.status.phrase}",
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(body)}",
            "Connection: keep-alive" if keep_alive else "Connection: close",
        ]
        lines += [f"{k}: {v}" for k, v in self.headers.items()]
        if self.status == HTTPStatus.SERVICE_UNAVAILABLE:
            lines.append("Retry-After: 1")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _error(exc: RequestError) -> Response:
    return Response(exc.status, {"error": str(exc)})


def parse_predict_body(body: bytes, config: HttpConfig, *, task: str = "text-classification") -> list[Any]:
    """Validate a ``/v1/predict`` body and return its texts or images, or raise ``RequestError``."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"body is not valid JSON: {exc}") from None
    key = "images" if task == "image-classification" else "texts"
    if not isinstance(data, dict) or key not in data:
        raise RequestError(HTTPStatus.BAD_REQUEST, f'body must be a JSON object with a "{key}" list')
    items = data[key]
    kind = "strings" if key == "texts" else "pixel arrays"
    if not isinstance(items, list) or (key == "texts" and not all(isinstance(t, str) for t in items)):
        raise RequestError(HTTPStatus.BAD_REQUEST, f'"{key}" must be a list of {kind}')
    if not items:
        raise RequestError(HTTPStatus.BAD_REQUEST, f'"{key}" is empty')
    if len(items) > config.max_texts:
        raise RequestError(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"{len(items)} {key} in one request; the limit is {config.max_texts}"
        )
    check_texts(items if key == "texts" else [], config)
    return items


def prediction_dicts(predictions: list[Prediction], ids: list[str] | None) -> list[dict[str, Any]]:
    """Predictions as JSON objects; each with its ``id`` when the sampler gave one (feedback names it)."""
    out: list[dict[str, Any]] = [{"label": p.label, "score": p.score, "scores": p.scores} for p in predictions]
    for item, prediction_id in zip(out, ids or [], strict=False):
        item["id"] = prediction_id
    return out


_PREDICTION_ID = re.compile(r"^[0-9a-f]{32}$")
_LABEL = re.compile(r"^[^\x00-\x1f]{1,100}$")


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a "\\ud800" escape
        return False
    return True


def parse_feedback_body(body: bytes) -> list[tuple[str, str]]:
    """Validate a ``/v1/feedback`` body: one ``{"id", "label"}`` object or ``{"feedback": [...]}`` of them."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"body is not valid JSON: {exc}") from None
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
        if not isinstance(label, str) or not _LABEL.fullmatch(label) or not _encodable(label):
            raise RequestError(HTTPStatus.BAD_REQUEST, f'{where}: "label" must be a string of 1-100 characters')
        parsed.append((prediction_id, label))
    return parsed


def check_texts(texts: list[str], config: HttpConfig) -> None:
    for index, text in enumerate(texts):
        if len(text) > config.max_text_chars:
            raise RequestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"texts[{index}] has {len(text)} characters; the limit is {config.max_text_chars}",
            )


class InferenceServer:
    """An asyncio HTTP server over a :class:`Batcher`, on its own thread.

    Args:
        config: listen address and request limits.
        serving: batching and timeouts.
        holder: the serving model.
        model_name: the model's name, for URLs and responses.
        metrics: where requests are counted.
        on_result: called with ``(version, ok)`` after each inference (the watch window listens).
        sampler: sees every prediction, gives it an id and keeps the hard ones; takes feedback.
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
    ) -> None:
        self.config = config
        self.sampler = sampler
        self.serving = serving or ServingConfig()
        self.holder = holder
        self.model_name = model_name
        self.metrics = metrics or ServingMetrics()
        self.on_result = on_result or (lambda _version, _ok: None)
        self.batcher = Batcher(
            model=holder.get,
            max_batch=self.serving.max_batch,
            max_delay_ms=self.serving.max_queue_delay_ms,
            queue_size=self.serving.queue_size,
            on_batch=self.metrics.batch_size.observe,
            workers=self.serving.workers,
        )
        self._in_flight = 0  # requests inside infer(); touched only on the loop's thread
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="http", daemon=True)
        self._address: tuple[str, int] = ("", 0)
        self._bind()  # bind now, so a taken port fails at start-up with a clear error

    def _bind(self) -> None:
        limit = MAX_HEADER_BYTES
        if self.config.unix_socket is not None:
            if self.config.unix_socket.exists():
                self.config.unix_socket.unlink()
            start: Awaitable[asyncio.Server] = asyncio.start_unix_server(
                self._connection, path=str(self.config.unix_socket), limit=limit
            )
        else:
            start = asyncio.start_server(self._connection, self.config.host, self.config.port, limit=limit)
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
        self.batcher.start()
        self._thread.start()
        where = self.config.unix_socket or "http://{}:{}".format(*self._address)
        log.info("inference API on %s", where)

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
                await self._server.wait_closed()

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        self.batcher.stop()

    # -- inference --------------------------------------------------------------------------------
    async def infer(self, inputs: list[Any]) -> tuple[int, list[Prediction]]:
        """Run ``inputs`` through the batcher; map failures to HTTP errors and count them."""
        self._in_flight += 1
        try:
            # Let the other connections whose requests are already readable reach this point too:
            # a request alone runs inline on the loop (no thread hand-off); with company, every one
            # goes to the batcher's workers, the loop stays free to read more, and batches form.
            await asyncio.sleep(0)
            inline = self.batcher.try_inline(inputs) if self._in_flight == 1 else None
            if inline is not None:
                version, predictions = inline
            else:
                future = asyncio.wrap_future(self.batcher.submit(inputs))
                version, predictions = await asyncio.wait_for(future, self.serving.request_timeout_s)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status; the server goes on
            raise RequestError(*self.failure_status(exc)) from None
        finally:
            self._in_flight -= 1
        self.on_result(version, True)
        return version, predictions

    def observe(self, inputs: list[Any], version: int, predictions: list[Prediction], task: str) -> list[str] | None:
        """Show a request's predictions to the sampler; their ids, or None without one. Never raises."""
        if self.sampler is None:
            return None
        try:
            return self.sampler.observe(inputs, predictions, version, text=task == "text-classification")
        except Exception:  # sampling must never fail a request
            log.exception("sampling failed")
            return None

    def failure_status(self, exc: BaseException) -> tuple[HTTPStatus, str]:
        """The HTTP status and message for a failed inference; model failures count against the watch window."""
        if isinstance(exc, (Overloaded, NoModel)):
            return HTTPStatus.SERVICE_UNAVAILABLE, str(exc)
        if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
            return HTTPStatus.GATEWAY_TIMEOUT, "inference did not finish in time"
        if isinstance(exc, InputError):
            return HTTPStatus.BAD_REQUEST, str(exc)
        model = self.holder.get()
        if model is not None:
            self.on_result(model.version, False)
        log.warning("inference failed: %s", exc)
        return HTTPStatus.INTERNAL_SERVER_ERROR, f"inference failed: {exc}"

    # -- HTTP/1.1 ---------------------------------------------------------------------------------
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                except asyncio.LimitOverrunError:
                    too_large = RequestError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request headers too large")
                    writer.write(_error(too_large).encode(keep_alive=False))
                    return
                try:
                    request, keep_alive = self._parse_head(head)
                    request.body = await self._read_body(reader, writer, request)
                except RequestError as exc:
                    writer.write(_error(exc).encode(keep_alive=False))
                    return
                response = await self._dispatch(request)
                writer.write(response.encode(keep_alive=keep_alive))
                await writer.drain()
                if not keep_alive:
                    return
        except ConnectionError:
            return
        finally:
            writer.close()

    @staticmethod
    def _parse_head(head: bytes) -> tuple[Request, bool]:
        lines = head.decode("latin-1").split("\r\n")
        words = lines[0].split()
        if len(words) != 3 or words[2] not in ("HTTP/1.1", "HTTP/1.0"):
            raise RequestError(HTTPStatus.BAD_REQUEST, f"bad request line {lines[0][:100]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep or not name.strip():
                raise RequestError(HTTPStatus.BAD_REQUEST, f"bad header line {line[:100]!r}")
            headers[name.strip().lower()] = value.strip()
        if len(headers) > MAX_HEADERS:
            raise RequestError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, f"more than {MAX_HEADERS} headers")
        connection = headers.get("connection", "").lower()
        keep_alive = connection != "close" and (words[2] == "HTTP/1.1" or connection == "keep-alive")
        return Request(words[0], words[1], headers), keep_alive

    async def _read_body(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: Request) -> bytes:
        length_header = request.headers.get("content-length")
        if length_header is None:
            if request.method == "POST":
                raise RequestError(HTTPStatus.LENGTH_REQUIRED, "Content-Length header is required")
            return b""
        try:
            length = int(length_header)
        except ValueError:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"Content-Length {length_header!r} is not a number") from None
        limit = self.config.max_body_bytes
        if length < 0 or length > limit:
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body of {length} bytes; the limit is {limit}")
        if request.headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            return await reader.readexactly(length)
        except asyncio.IncompleteReadError:
            raise RequestError(HTTPStatus.BAD_REQUEST, "body is shorter than its Content-Length") from None

    async def _dispatch(self, request: Request) -> Response:
        start = time.perf_counter()
        endpoint = None
        try:
            if request.method == "GET":
                return self._get(request)
            if request.method != "POST":
                raise RequestError(HTTPStatus.METHOD_NOT_ALLOWED, f"method {request.method} is not supported")
            match = _MODEL_PATH.match(request.path)
            if request.path == "/v1/predict":
                endpoint = "predict"
                response = await self._predict(request)
            elif request.path == "/v1/feedback":
                endpoint = "feedback"
                response = self._feedback(request)
            elif match and match["rest"] == "/infer":
                endpoint = "infer"
                response = await self._infer(request, match)
            else:
                raise RequestError(HTTPStatus.NOT_FOUND, f"no such endpoint: POST {request.path}")
        except RequestError as exc:
            response = _error(exc)
        if endpoint is not None:
            failed = response.status == HTTPStatus.INTERNAL_SERVER_ERROR
            self.metrics.observe(endpoint, int(response.status), time.perf_counter() - start, inference_failed=failed)
        return response

    # -- routes -----------------------------------------------------------------------------------
    def _model(self) -> Classifier:
        model = self.holder.get()
        if model is None:
            raise RequestError(HTTPStatus.SERVICE_UNAVAILABLE, "no verified model is active yet")
        return model

    def _matching_model(self, match: re.Match[str]) -> Classifier:
        if match["name"] != self.model_name:
            raise RequestError(
                HTTPStatus.NOT_FOUND, f"no model {match['name']!r}; this agent serves {self.model_name!r}"
            )
        model = self._model()
        if match["version"] is not None and match["version"] != str(model.version):
            raise RequestError(
                HTTPStatus.NOT_FOUND, f"version {match['version']} is not loaded (serving {model.version})"
            )
        return model

    def _get(self, request: Request) -> Response:
        model = self.holder.get()
        path = request.path
        if path == "/metrics":
            self.metrics.queue_depth.set(self.batcher.depth)
            self.metrics.active_version.set(model.version if model else 0)
            return Response(HTTPStatus.OK, self.metrics.exposition(), content_type="text/plain; version=0.0.4")
        if path == "/v2":
            return Response(HTTPStatus.OK, {"name": "edge-agent", "version": __version__,
                                            "extensions": ["binary_tensor_data"]})  # fmt: skip
        if path == "/v2/health/live":
            return Response(HTTPStatus.OK, {"live": True})
        if path == "/v2/health/ready":
            status = HTTPStatus.OK if model else HTTPStatus.SERVICE_UNAVAILABLE
            return Response(status, {"ready": model is not None, "version": model.version if model else None})
        if path == "/v1/model":
            m = self._model()
            return Response(HTTPStatus.OK, {
                "model": self.model_name, "version": m.version, "labels": m.labels,
                "quantization": m.manifest.quantization, "metrics": m.manifest.metrics,
            })  # fmt: skip
        return self._get_model(path)

    def _get_model(self, path: str) -> Response:
        match = _MODEL_PATH.match(path)
        if match is None:
            raise RequestError(HTTPStatus.NOT_FOUND, f"no such endpoint: GET {path}")
        m = self._matching_model(match)
        if match["rest"] == "/ready":
            return Response(HTTPStatus.OK, {"name": self.model_name, "ready": True})
        if match["rest"] == "/infer":
            raise RequestError(HTTPStatus.METHOD_NOT_ALLOWED, "infer takes POST")
        return Response(HTTPStatus.OK, kserve.model_metadata(self.model_name, m.manifest))

    async def _predict(self, request: Request) -> Response:
        model = self._model()
        inputs = parse_predict_body(request.body, self.config, task=model.manifest.task)
        start = time.perf_counter()
        version, predictions = await self.infer(inputs)
        elapsed_ms = round((time.perf_counter() - start) * 1000, 3)
        ids = self.observe(inputs, version, predictions, model.manifest.task)
        return Response(HTTPStatus.OK, {
            "model": self.model_name,
            "version": version,
            "inference_ms": elapsed_ms,
            "predictions": prediction_dicts(predictions, ids),
        })  # fmt: skip

    def _feedback(self, request: Request) -> Response:
        if self.sampler is None:
            raise RequestError(HTTPStatus.NOT_FOUND, "feedback is not enabled on this agent")
        items = parse_feedback_body(request.body)
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
        try:
            decoded = kserve.decode_request(
                request.body, request.headers.get(kserve.HEADER_LENGTH.lower()), model.manifest,
                max_items=self.config.max_texts,
            )  # fmt: skip
        except kserve.ProtocolViolation as exc:
            raise RequestError(exc.status, str(exc)) from None
        if model.manifest.task == "text-classification":
            check_texts(decoded.inputs, self.config)
        version, predictions = await self.infer(decoded.inputs)
        self.observe(decoded.inputs, version, predictions, model.manifest.task)
        payload, headers = kserve.encode_response(
            decoded, predictions, model=self.model_name, version=version, labels=model.labels
        )
        return Response(
            HTTPStatus.OK, payload, headers, "application/json" if not headers else "application/octet-stream"
        )
