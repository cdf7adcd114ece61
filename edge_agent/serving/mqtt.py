"""Inference over MQTT 5 request/response, for callers that speak only MQTT.

A request on ``.../devices/{device}/infer`` carries the same JSON body as ``POST /v1/predict``
and the MQTT 5 ``ResponseTopic`` and ``CorrelationData`` properties; the reply
(``InferenceReply``) goes to the response topic with the same correlation data. The network
thread only queues the work: the reply is published when the batcher's future completes.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from http import HTTPStatus

from edge_agent.protocol.telemetry import InferenceReply
from edge_agent.runtime import Prediction
from edge_agent.serving.http import InferenceServer, RequestError, parse_predict_body, prediction_dicts
from edge_agent.transport import MqttTransport

log = logging.getLogger(__name__)


class MqttInference:
    """Answers MQTT inference requests through the HTTP server's batcher, limits and metrics."""

    def __init__(self, *, server: InferenceServer, transport: MqttTransport, topic: str) -> None:
        self._server = server
        self._transport = transport
        self._topic = topic

    def start(self) -> None:
        self._transport.subscribe_requests(self._topic, self._on_request)

    def _on_request(self, payload: bytes, response_topic: str | None, correlation: bytes | None) -> None:
        if not response_topic:
            log.warning("inference request without an MQTT 5 response topic on %s: dropped", self._topic)
            return
        start = time.perf_counter()
        srv = self._server

        def reply(status: HTTPStatus, *, version: int | None = None, predictions: list[Prediction] | None = None,
                  error: str | None = None, ids: list[str] | None = None) -> None:  # fmt: skip
            body = InferenceReply(
                status=int(status), model=srv.model_name, version=version, error=error,
                predictions=prediction_dicts(predictions or [], ids),
            )  # fmt: skip
            self._transport.publish_response(
                response_topic, body.model_dump_json().encode(), correlation_data=correlation
            )
            failed = status == HTTPStatus.INTERNAL_SERVER_ERROR
            srv.metrics.observe("mqtt", int(status), time.perf_counter() - start, inference_failed=failed)

        if len(payload) > srv.config.max_body_bytes:
            reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, error=f"request of {len(payload)} bytes; the limit is "
                  f"{srv.config.max_body_bytes}")  # fmt: skip
            return
        model = srv.holder.get()
        if model is None:
            reply(HTTPStatus.SERVICE_UNAVAILABLE, error="no verified model is active yet")
            return
        try:
            task = model.manifest.task
            inputs = parse_predict_body(payload, srv.config, task=task)
            future = srv.batcher.submit(inputs)
        except RequestError as exc:
            reply(exc.status, error=str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - Overloaded and friends: answered, not raised
            status, message = srv.failure_status(exc)
            reply(status, error=message)
            return

        def done(result: Future[tuple[int, list[Prediction]]]) -> None:
            try:
                version, predictions = result.result()
            except Exception as exc:  # noqa: BLE001
                status, message = srv.failure_status(exc)
                reply(status, error=message)
                return
            srv.on_result(version, True)
            ids = srv.observe(inputs, version, predictions, task)
            reply(HTTPStatus.OK, version=version, predictions=predictions, ids=ids)

        future.add_done_callback(done)
