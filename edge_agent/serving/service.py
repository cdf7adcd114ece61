"""The transport-neutral inference service: what every front end (HTTP, the Open Inference
Protocol, MQTT request/response) calls.

It owns validation, batching, sampling, metrics and the post-update watch hook, and decides
the class of every error at the one place it enters:

- **the caller's mistake** (bad JSON, nested too deep, an empty batch, text that cannot be
  encoded, wrong shapes, too large): a 4xx :class:`RequestError`, raised before the tokenizer or
  onnxruntime sees the input, and never counted against a model version;
- **overload or no model**: 503 (or 504 when a request outlives its timeout), not counted;
- **the model's failure** (onnxruntime raised, NaN outputs...): a 500, counted against the
  version that failed, so the watch window can roll it back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesParser
from http import HTTPStatus
from typing import Any

from edge_agent.config import HttpConfig, ServingConfig
from edge_agent.runtime import (
    ClassificationTask,
    Classifier,
    InputError,
    InputLimits,
    InputTooLarge,
    ModelHolder,
    Result,
    Task,
    task_for,
)
from edge_agent.runtime.task import classification_reply
from edge_agent.sampling import Sampler, prediction_ids
from edge_agent.serving.batcher import Batcher, ModelFailure, NoModel, Overloaded
from edge_agent.serving.kserve import InferenceStats
from edge_agent.serving.metrics import ServingMetrics

log = logging.getLogger(__name__)


class RequestError(Exception):
    """A request that gets an error answer; ``status`` is its HTTP status (MQTT replies carry it too)."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


def loads_json(data: bytes, what: str = "body") -> Any:
    """Parse JSON from a client: not UTF-8, not JSON or nested too deep is a 400 naming the problem."""
    try:
        return json.loads(data)
    except UnicodeDecodeError as exc:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"{what} is not UTF-8: {exc.reason} at byte {exc.start}") from None
    except json.JSONDecodeError as exc:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"{what} is JSON nested too deep") from None


def multipart_images(body: bytes, content_type: str) -> dict[str, Any]:
    """A ``multipart/form-data`` body as ``{"images": [bytes, ...], "top_k": ...}``: every part with a
    file name, or named ``image`` or ``images``, is an image (in order); a part named ``top_k`` is that."""
    if "boundary=" not in content_type.lower():
        raise RequestError(HTTPStatus.BAD_REQUEST, "multipart Content-Type has no boundary")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1", "replace")
    message = BytesParser().parsebytes(head + body)
    if not message.is_multipart() or message.defects:
        raise RequestError(HTTPStatus.BAD_REQUEST, "body is not valid multipart/form-data")
    images: list[bytes] = []
    form: dict[str, Any] = {"images": images}
    for part in message.get_payload():
        assert isinstance(part, Message)
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        content = payload if isinstance(payload, bytes) else b""
        if part.get_filename() is not None or name in ("image", "images"):
            images.append(content)
        elif name == "top_k":
            form["top_k"] = content.decode("ascii", "replace").strip()
    return form


@dataclass(frozen=True)
class PredictRequest:
    """A validated ``/v1/predict`` body: the inputs (encoded images decoded) and how many scores to return."""

    inputs: list[Any]
    top_k: int | None = None


def parse_top_k(value: Any, classes: int) -> int | None:
    """``top_k``: absent or null (every score), or an integer from 1 to the number of classes."""
    if value is None:
        return None
    if isinstance(value, str) and value.isdigit():  # a multipart form field
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= classes:
        raise RequestError(HTTPStatus.BAD_REQUEST, f'"top_k" must be an integer from 1 to {classes}')
    return value


prediction_dicts = classification_reply
"""Predictions as JSON objects (:func:`edge_agent.runtime.task.classification_reply`); a task's own
answer is :meth:`edge_agent.runtime.Task.reply`."""


class InferenceService:
    """Validation, batching, sampling, metrics and the watch hook, for every front end.

    Args:
        limits: request size limits (the ``[http]`` section applies to every front end).
        serving: batching and timeouts.
        holder: the serving model.
        model_name: the model's name, for URLs and replies.
        metrics: where requests are counted.
        on_result: called with ``(version, ok)`` after each inference (the watch window listens);
            ``ok`` is false only for the model's own failures.
        sampler: sees every prediction, gives it an id and keeps the hard ones; takes feedback.
    """

    def __init__(
        self,
        *,
        limits: HttpConfig,
        holder: ModelHolder,
        model_name: str,
        serving: ServingConfig | None = None,
        metrics: ServingMetrics | None = None,
        on_result: Callable[[int, bool], None] | None = None,
        sampler: Sampler | None = None,
    ) -> None:
        self.limits = limits
        self.serving = serving or ServingConfig()
        self.holder = holder
        self.model_name = model_name
        self.metrics = metrics or ServingMetrics()
        self.on_result = on_result or (lambda _version, _ok: None)
        self.sampler = sampler
        self.batcher = Batcher(
            model=holder.get,
            max_batch=self.serving.max_batch,
            max_delay_ms=self.serving.max_queue_delay_ms,
            queue_size=self.serving.queue_size,
            on_batch=self.metrics.batch_size.observe,
            workers=self.serving.workers,
        )
        self._input_limits = InputLimits(max_text_chars=limits.max_text_chars, max_tensor_bytes=limits.max_body_bytes)
        self.loop: asyncio.AbstractEventLoop | None = None  # the one loop infer() runs on, once known
        self._loops: set[asyncio.AbstractEventLoop] = set()
        self.stats = InferenceStats()  # Triton's statistics extension

    def start(self) -> None:
        self.batcher.start()

    def stop(self) -> None:
        self.batcher.stop()

    # -- validation -------------------------------------------------------------------------------
    def model(self) -> Classifier:
        model = self.holder.get()
        if model is None:
            raise RequestError(HTTPStatus.SERVICE_UNAVAILABLE, "no verified model is active yet")
        return model

    def task(self, model: Classifier) -> Task:
        """The model's task: how its requests are decoded, checked, answered and sampled."""
        return task_for(model.manifest.task)

    def parse_predict(self, body: bytes, model: Classifier, *, content_type: str | None = None) -> PredictRequest:
        """Validate a ``/v1/predict`` body for ``model``: a JSON object with the task's list
        (``{"texts": [...]}``, or ``{"images": [...]}`` of raw pixel arrays or base64 JPEG/PNG) and an
        optional ``"top_k"``; or, for a task that takes files (images), ``multipart/form-data`` whose
        file parts are the inputs (and a ``top_k`` field). A tensor model takes one request's named
        tensors, ``{"inputs": {"name": nested lists, ...}}``, and no ``top_k``."""
        if len(body) > self.limits.max_body_bytes:
            raise RequestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"request of {len(body)} bytes; the limit is {self.limits.max_body_bytes}",
            )
        task = self.task(model)
        key = task.field
        if content_type is not None and content_type.lower().startswith("multipart/"):
            if not task.multipart:
                raise RequestError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "multipart bodies are for image models")
            data: Any = multipart_images(body, content_type)
            data[key] = data.pop("images")
        else:
            data = loads_json(body)
        if not isinstance(data, dict) or key not in data:
            what = f'an "{key}" object' if task.raw_tensors else f'a "{key}" list'
            raise RequestError(HTTPStatus.BAD_REQUEST, f"body must be a JSON object with {what}")
        items = data[key]
        if not task.items_valid(items):
            what = task.item_kinds if task.raw_tensors else f"a list of {task.item_kinds}"
            raise RequestError(HTTPStatus.BAD_REQUEST, f'"{key}" must be {what}')
        if not model.labels and data.get("top_k") is not None:
            raise RequestError(HTTPStatus.BAD_REQUEST, '"top_k" is for classifiers; this model answers tensors')
        top_k = parse_top_k(data.get("top_k"), len(model.labels))
        return PredictRequest(self.check_inputs(task.request_items(items), model), top_k)

    def check_inputs(self, items: list[Any], model: Classifier) -> list[Any]:
        """What every front end's inputs must pass before a batch: not empty, not too many, valid
        for the model's task. Returns the inputs to run (encoded images decoded)."""
        task = self.task(model)
        noun = task.field
        if not items:
            raise RequestError(HTTPStatus.BAD_REQUEST, f'"{noun}" is empty: nothing to classify')
        if len(items) > self.limits.max_texts:
            raise RequestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"{len(items)} {noun} in one request; the limit is {self.limits.max_texts}",
            )
        try:
            return task.prepare(items, model, self._input_limits)
        except InputTooLarge as exc:
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, str(exc)) from None
        except InputError as exc:
            raise RequestError(HTTPStatus.BAD_REQUEST, str(exc)) from None

    # -- running ----------------------------------------------------------------------------------
    def submit(self, inputs: list[Any]) -> Future[tuple[int, list[Result]]]:
        """Queue validated inputs (from any thread); overload is a 503 :class:`RequestError`."""
        try:
            return self.batcher.submit(inputs)
        except Overloaded as exc:
            raise RequestError(HTTPStatus.SERVICE_UNAVAILABLE, str(exc)) from None

    async def infer(self, inputs: list[Any], *, alone: bool = False) -> tuple[int, list[Result]]:
        """Run validated inputs on the event loop's thread; every failure is a classified :class:`RequestError`.

        ``alone``: the front end has no other request open (read, not yet answered), so this one runs
        at once on the loop's thread, sparing it two thread hand-offs, unless the batcher is busy
        with others (MQTT's). With company, every request goes to the batcher's workers, the loop
        stays free to read more, and batches form. All requests that one turn of the loop reads are
        counted before any of them gets here, so a burst is never run one by one on the loop.
        """
        loop = self._running_loop()
        start = time.perf_counter()
        try:
            inline = self.batcher.try_inline(inputs) if alone else None
            if inline is not None:
                version, predictions = inline
            else:
                future = asyncio.wrap_future(self.submit(inputs), loop=loop)
                version, predictions = await asyncio.wait_for(future, self.serving.request_timeout_s)
        except RequestError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status; the server goes on
            raise self.failed(exc, inputs=len(inputs), seconds=time.perf_counter() - start) from None
        # counted on the loop's next turn, after the reply is written (the watch window sees it then)
        loop.call_soon(self.succeeded, version, len(inputs), time.perf_counter() - start)
        return version, predictions

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """An HTTP front end's loop, on which it will call :meth:`infer`. With one, infer() uses it;
        with loops of two front ends it looks up the running one at each call."""
        self._loops.add(loop)
        self.loop = loop if len(self._loops) == 1 else None

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        """The loop :meth:`infer` runs on: the one its front end named (the HTTP server's), else the
        running one (``asyncio.get_running_loop`` makes a system call each time)."""
        return self.loop if self.loop is not None else asyncio.get_running_loop()

    def succeeded(self, version: int, inputs: int, seconds: float) -> None:
        """Count a successful inference (any front end)."""
        self.stats.record(ok=True, seconds=seconds, inputs=inputs)
        self.on_result(version, True)

    def failed(self, exc: BaseException, *, inputs: int, seconds: float) -> RequestError:
        """Count a failed inference (any front end) and classify it (see :meth:`failure`)."""
        self.stats.record(ok=False, seconds=seconds, inputs=inputs)
        return self.failure(exc)

    def failure(self, exc: BaseException) -> RequestError:
        """Classify a failed inference; only the model's own failures count against its version."""
        if isinstance(exc, RequestError):
            return exc
        if isinstance(exc, (Overloaded, NoModel)):
            return RequestError(HTTPStatus.SERVICE_UNAVAILABLE, str(exc))
        if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
            return RequestError(HTTPStatus.GATEWAY_TIMEOUT, "inference did not finish in time")
        if isinstance(exc, InputError):  # validation should have caught it; still the caller's input
            return RequestError(HTTPStatus.BAD_REQUEST, str(exc))
        if isinstance(exc, ModelFailure):
            self.on_result(exc.version, False)
            log.warning("inference failed in v%s: %s", exc.version, exc)
            return RequestError(HTTPStatus.INTERNAL_SERVER_ERROR, f"inference failed: {exc}")
        log.exception("inference failed outside the model", exc_info=exc)
        return RequestError(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {type(exc).__name__}")

    def samples(self, task: str) -> bool:
        """Whether predictions of ``task`` models go to the sampler: a classifier's do (its rules
        judge scores); a tensor model's are not sampled, and get no ids."""
        return self.sampler is not None and isinstance(task_for(task), ClassificationTask)

    def observe_after_reply(
        self, inputs: list[Any], version: int, predictions: list[Result], task: str
    ) -> list[str] | None:
        """The predictions' ids now; the sampler sees them on the event loop's next turn, after the
        reply is written, so its bookkeeping is not part of the request's latency. Call it on the
        event loop: a request the client sends after reading the reply (feedback naming these ids)
        is read on a later turn, so it always finds them."""
        if not self.samples(task):
            return None
        ids = prediction_ids(len(predictions))
        self._running_loop().call_soon(self.observe, inputs, version, predictions, task, ids)
        return ids

    def observe(
        self, inputs: list[Any], version: int, predictions: list[Result], task: str, ids: list[str] | None = None
    ) -> list[str] | None:
        """Show a request's predictions to the sampler; their ids, or None without one (or for a
        model that is not sampled). Never raises."""
        if self.sampler is None or not self.samples(task):
            return None
        try:
            return self.sampler.observe(inputs, predictions, version, task=task, ids=ids)
        except Exception:  # sampling must never fail a request
            log.exception("sampling failed")
            return None
