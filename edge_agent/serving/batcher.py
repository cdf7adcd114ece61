"""Dynamic batching: concurrent requests share one onnxruntime run.

Requests wait in a bounded queue; a worker takes the first, then its share of whatever else is
queued (all of it with one worker, up to ``max_batch`` items, waiting at most ``max_delay_ms``
for more), runs the model once, and hands each request its slice. With several workers a burst is
split between them, so several cores run the model at once. A lone request can run inline on the
caller's thread (:meth:`Batcher.try_inline`), so sequential latency does not grow; under load,
batches form by themselves while the previous ones run. A full queue refuses new work with
:class:`Overloaded` rather than growing without bound.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from edge_agent.runtime import Classifier, InputError, Result

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """The request queue is full; the caller should retry later."""


class ModelFailure(Exception):
    """The model itself failed on valid input (onnxruntime raised, outputs not finite): counted
    against ``version`` by the watch window."""

    def __init__(self, version: int, cause: BaseException) -> None:
        super().__init__(str(cause) or type(cause).__name__)
        self.version = version


class NoModel(Exception):
    """No verified model is active yet."""


@dataclass
class _Job:
    inputs: list[Any]
    future: Future[tuple[int, list[Result]]]


class Batcher:
    """Runs inference for many callers through one worker thread.

    Args:
        model: returns the model that serves now (it may be swapped at any time).
        max_batch: the most inputs one run takes.
        max_delay_ms: how long the worker may wait to fill a batch (0: take only what is queued).
        queue_size: the most requests waiting; beyond it, :class:`Overloaded`.
        on_batch: told the size of each batch run (metrics).
        workers: batches that may run at once (one thread each); a burst is split between them.
    """

    def __init__(
        self,
        *,
        model: Callable[[], Classifier | None],
        max_batch: int,
        max_delay_ms: float,
        queue_size: int,
        on_batch: Callable[[int], None] = lambda _size: None,
        workers: int = 1,
    ) -> None:
        self._model = model
        self._max_batch = max_batch
        self._max_delay_s = max_delay_ms / 1000
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=queue_size)
        self._on_batch = on_batch
        self._inline = threading.Lock()
        self._workers = max(1, workers)
        self._threads = [
            threading.Thread(target=self._run, name=f"inference-{i}", daemon=True) for i in range(self._workers)
        ]
        self.heartbeat = time.monotonic()  # the workers' last sign of life (the systemd watchdog reads it)
        self._runs_lock = threading.Lock()
        self._runs: dict[int, float] = {}  # model runs in progress (worker and inline): id -> start
        self._next_run = 0

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    @property
    def worker_alive(self) -> bool:
        return all(thread.is_alive() for thread in self._threads)

    def longest_run_s(self) -> float:
        """How long the oldest model run still in progress (worker or inline) has lasted; 0 if none."""
        with self._runs_lock:
            oldest = min(self._runs.values(), default=None)
        return 0.0 if oldest is None else time.monotonic() - oldest

    def _predict(self, model: Classifier, inputs: list[Any]) -> list[Result]:
        """One model run over ``inputs`` (:meth:`Classifier.run`): a result per input."""
        with self._runs_lock:
            run = self._next_run
            self._next_run += 1
            self._runs[run] = time.monotonic()
        try:
            return list(model.run(inputs))
        except InputError:
            raise
        except Exception as exc:
            raise ModelFailure(model.version, exc) from exc
        finally:
            with self._runs_lock:
                del self._runs[run]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout=5)

    def submit(self, inputs: list[Any]) -> Future[tuple[int, list[Result]]]:
        """Queue ``inputs``; the future gives ``(model version, results)`` or raises."""
        job = _Job(inputs, Future())
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise Overloaded(f"inference queue is full ({self._queue.maxsize} requests waiting)") from None
        return job.future

    def try_inline(self, inputs: list[Any]) -> tuple[int, list[Result]] | None:
        """Run ``inputs`` on the caller's thread if nothing is queued or running there; else ``None``.

        The inline path spares a lone request two thread hand-offs; under load the worker
        batches what queues up while an inline run goes on beside it (sessions are thread-safe).
        """
        if not self._queue.empty() or not self._inline.acquire(blocking=False):
            return None
        try:
            model = self._model()
            if model is None:
                raise NoModel("no verified model is active yet")
            self._on_batch(len(inputs))
            return model.version, self._predict(model, inputs)
        finally:
            self._inline.release()

    def predict(self, inputs: list[Any], timeout_s: float = 30.0) -> tuple[int, list[Result]]:
        """Inline when possible, else through the queue; blocks until done."""
        inline = self.try_inline(inputs)
        return inline if inline is not None else self.submit(inputs).result(timeout=timeout_s)

    def _run(self) -> None:
        while True:
            self.heartbeat = time.monotonic()
            try:
                first = self._queue.get(timeout=1.0)
            except queue.Empty:
                continue
            if first is None:
                return
            jobs = [first]
            size = len(first.inputs)
            deadline = time.monotonic() + self._max_delay_s
            # With several workers, take a fair share of what waits, so a burst runs on all of them.
            share = max(1, -(-(1 + self._queue.qsize()) // self._workers)) if self._workers > 1 else self._max_batch
            while size < self._max_batch and len(jobs) < share:
                try:
                    remaining = deadline - time.monotonic()
                    job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self._queue.put(None)
                    break
                if size + len(job.inputs) > self._max_batch:
                    self._run_batch([job])  # too big to join: it runs on its own, right after
                    continue
                jobs.append(job)
                size += len(job.inputs)
            self._run_batch(jobs)

    def _run_batch(self, jobs: list[_Job]) -> None:
        # A caller that gave up (request timeout) cancelled its future: skip it; setting a result
        # on it would raise and kill this worker.
        jobs = [job for job in jobs if job.future.set_running_or_notify_cancel()]
        if not jobs:
            return
        model = self._model()
        if model is None:
            for job in jobs:
                job.future.set_exception(NoModel("no verified model is active yet"))
            return
        inputs = [item for job in jobs for item in job.inputs]
        self._on_batch(len(inputs))
        try:
            predictions = self._predict(model, inputs)
        except Exception as exc:  # noqa: BLE001 - handed to each caller, who answers it
            if len(jobs) > 1:  # one caller's bad input must not fail the others: retry each alone
                for job in jobs:
                    self._run_alone(model, job)
                return
            jobs[0].future.set_exception(exc)
            return
        start = 0
        for job in jobs:
            job.future.set_result((model.version, predictions[start : start + len(job.inputs)]))
            start += len(job.inputs)

    def _run_alone(self, model: Classifier, job: _Job) -> None:
        try:
            job.future.set_result((model.version, self._predict(model, job.inputs)))
        except Exception as exc:  # noqa: BLE001 - handed to the caller, who answers it
            job.future.set_exception(exc)
