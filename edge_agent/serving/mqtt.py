"""Inference over MQTT 5 request/response, for callers that speak only MQTT.

A request on ``.../devices/{device}/infer`` carries the same JSON body as ``POST /v1/predict``
(``{"texts": [...]}``, ``{"images": [...]}``, or a tensor model's ``{"inputs": {...}}``) and the
MQTT 5 ``ResponseTopic`` and ``CorrelationData`` properties; the reply
(``InferenceReply``) goes to the response topic with the same correlation data. The network
thread only validates and queues the work: the reply is published when the batcher's future
completes. Errors are classified by the same :class:`InferenceService` as over HTTP: a caller's
mistake is a 4xx reply and never counts against the model.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from http import HTTPStatus

from edge_agent.protocol.telemetry import InferenceReply
from edge_agent.runtime import Result, Task
from edge_agent.serving.service import InferenceService, RequestError
from edge_agent.transport import MqttTransport, TransportError, filter_problem

log = logging.getLogger(__name__)


def response_topic_problem(topic: str) -> str | None:
    """Why a request's response topic cannot be replied to, or None (a publish takes no wildcard)."""
    if not topic or "+" in topic or "#" in topic or "\x00" in topic:
        return "it is empty or holds a wildcard"
    return filter_problem(topic)


class MqttInference:
    """Answers MQTT inference requests through the shared inference service."""

    def __init__(self, *, service: InferenceService, transport: MqttTransport, topic: str) -> None:
        self._service = service
        self._transport = transport
        self._topic = topic
        self._dropped = 0

    def start(self) -> None:
        self._transport.subscribe_requests(self._topic, self._on_request)

    def _drop(self, why: str) -> None:
        self._dropped += 1
        if self._dropped <= 10 or self._dropped % 1000 == 0:  # a flood must not flood the log
            log.warning("MQTT inference request on %s dropped (%d so far): %s", self._topic, self._dropped, why)

    def _on_request(self, payload: bytes, response_topic: str | None, correlation: bytes | None) -> None:
        if not response_topic:
            self._drop("no MQTT 5 response topic")
            return
        problem = response_topic_problem(response_topic)
        if problem is not None:
            self._drop(f"response topic {response_topic[:100]!r} cannot be answered: {problem}")
            return
        start = time.perf_counter()
        service = self._service

        top_k: int | None = None
        task: Task | None = None

        def reply(status: HTTPStatus, *, version: int | None = None, predictions: list[Result] | None = None,
                  error: str | None = None, ids: list[str] | None = None) -> None:  # fmt: skip
            body = InferenceReply(
                status=int(status), model=service.model_name, version=version, error=error,
                predictions=task.reply(predictions, ids, top_k=top_k) if task and predictions else [],
            )  # fmt: skip
            try:
                self._transport.publish_response(
                    response_topic, body.model_dump_json().encode(), correlation_data=correlation
                )
            except (TransportError, ValueError) as exc:
                self._drop(f"reply not sent: {exc}")
            failed = status == HTTPStatus.INTERNAL_SERVER_ERROR
            service.metrics.observe("mqtt", int(status), time.perf_counter() - start, inference_failed=failed)

        try:
            model = service.model()
            task = service.task(model)
            parsed = service.parse_predict(payload, model)
            inputs, top_k = parsed.inputs, parsed.top_k
            future = service.submit(inputs)
        except RequestError as exc:  # the caller's input, or overload: answered, never counted
            reply(exc.status, error=str(exc))
            return

        def done(result: Future[tuple[int, list[Result]]]) -> None:
            try:
                version, predictions = result.result()
            except Exception as exc:  # noqa: BLE001 - classified: only the model's own failure counts
                error = service.failed(exc, inputs=len(inputs), seconds=time.perf_counter() - start)
                reply(error.status, error=str(error))
                return
            service.succeeded(version, len(inputs), time.perf_counter() - start)
            ids = service.observe(inputs, version, predictions, model.manifest.task)
            reply(HTTPStatus.OK, version=version, predictions=predictions, ids=ids)

        future.add_done_callback(done)
