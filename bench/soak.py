"""Soak: a real agent under mixed load for ``--minutes``; do its memory, fds and threads stay flat?

Starts a Mosquitto and an ``edge-agent`` process, trains two versions of the int8 MiniLM bundle,
pushes v1 (the agent fetches it over MQTT like a device), and then, until the time is up, drives:

- valid ``POST /v1/predict`` requests (one text) from ``--http-clients`` keep-alive connections,
  back to back;
- invalid HTTP requests, each on a new connection, cycling through :data:`BAD_HTTP` (bad JSON,
  empty and wrong-typed lists, invalid UTF-8, a lone surrogate ``"\\ud800"``, deeply nested JSON,
  too many texts, a huge text, a huge declared or sent body, wrong, missing and non-numeric
  Content-Length, a garbage request line);
- MQTT 5 requests at QoS 0 and 1, valid and malformed (:data:`BAD_MQTT`; one without a response
  topic, which the agent drops);
- idle connections: one every ``--idle-every-s``, silent or stopped mid-request, each left open
  for ``--idle-hold-s`` and then closed by the client;
- at ``--update-at`` of the run, a push of v2 (``cloud_trainer.releases.publish.push_bundle``, a full
  fine-tune with another seed: every chunk of the model changes); with ``--updates N``, then v1,
  v2, ... again, evenly over the rest of the run.

Every ``--sample-s`` it records the agent's RSS, peak RSS, open fds and threads (``/proc/<pid>``),
the idle connections held, and the requests by outcome. At the end it prints a table over time,
the outcomes per kind of request, the RSS growth and the fd and thread range after warm-up (the
first 20 % of the run), the RSS between updates and its step across each, and PASS/FAIL lines; the
samples go to ``<workdir>/soak-samples.csv`` and everything to ``<workdir>/soak.json``.

    .venv/bin/python bench/soak.py [--minutes 30] [--sample-s 10] [--epochs 8] [--workdir runs/bench-soak]
    .venv/bin/python bench/soak.py --minutes 2 --epochs 2     # a check that it works
    .venv/bin/python bench/soak.py --reuse-bundles            # the two versions of the last run, no training
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import http.client
import json
import os
import shutil
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agent_harness import (
    MqttRequester,
    free_port,
    process_stats,
    start_agent,
    stop_agent,
    train_bundle,
    wait_serving,
    write_agent_config,
)

WARM_UP = 0.2  # share of the run excluded from the growth and range checks
RSS_GROWTH_PCT = 5.0


def _head(length: int | str | None, extra: str = "") -> bytes:
    lines = ["POST /v1/predict HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


def _request(body: bytes) -> bytes:
    return _head(len(body)) + body


_NESTED = b'{"texts": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
_HUGE_TEXT = json.dumps({"texts": ["turn on the lights " * 45_000]}).encode()  # 855 kB: under the body limit
_TOO_BIG = b'{"texts": ["' + b"a" * 1_500_000 + b'"]}'  # over the 1 MiB body limit, sent in full

ANY_4XX = frozenset({"4xx"})  # any 4xx status counts as right: the exact code is printed, not judged

BAD_HTTP: dict[str, tuple[bytes, bool, frozenset[str]]] = {
    # name: (bytes sent, then shut the write side, outcomes that count as right)
    "bad JSON": (_request(b'{"texts": ["turn on'), False, ANY_4XX),
    "empty list": (_request(b'{"texts": []}'), False, ANY_4XX),
    "texts not a list": (_request(b'{"texts": "turn on the lights"}'), False, ANY_4XX),
    "invalid UTF-8": (_request(b'{"texts": ["\xff\xfe lights"]}'), False, ANY_4XX),
    "lone surrogate": (_request(b'{"texts": ["\\ud800"]}'), False, ANY_4XX),
    "nested JSON": (_request(_NESTED), False, ANY_4XX),
    "65 texts": (_request(json.dumps({"texts": ["on"] * 65}).encode()), False, ANY_4XX),
    "huge text": (_request(_HUGE_TEXT), False, ANY_4XX),
    "huge Content-Length": (_head(50_000_000), False, ANY_4XX),
    # the agent answers before reading the body and closes with bytes unread: the kernel may reset
    "huge body sent": (_request(_TOO_BIG), False, ANY_4XX | {"reset"}),
    # the client ends the connection mid-body: an answer or a plain close are both right
    "body shorter than Content-Length": (_head(100) + b'{"texts": ["on"]}', True, ANY_4XX | {"closed"}),
    "body longer than Content-Length": (_head(10) + b'{"texts": ["turn on the lights"]}', True, ANY_4XX),
    "Content-Length not a number": (_head("ten") + b'{"texts": ["on"]}', False, ANY_4XX),
    "no Content-Length": (_head(None) + b'{"texts": ["on"]}', True, ANY_4XX),
    "garbage request line": (b"HELLO\r\n\r\n", False, ANY_4XX),
}

BAD_MQTT: dict[str, bytes] = {
    "bad JSON": b'{"texts": ["turn on',
    "empty list": b'{"texts": []}',
    "lone surrogate": b'{"texts": ["\\ud800"]}',
    "nested JSON": _NESTED,
    "huge text": _HUGE_TEXT,
}

_IDLE_OPENINGS = [b"", b"POST /v1/predict HTTP/1.1\r\nContent-Le", _head(100) + b'{"texts": ']


def raw_exchange(port: int, data: bytes, *, shut_write: bool, timeout_s: float = 15.0) -> str:
    """Send ``data`` on a new connection; the answer's status code, or ``closed``, ``reset``, ``timeout``."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # answered before all was sent
            sock.sendall(data)
            if shut_write:
                sock.shutdown(socket.SHUT_WR)
        received = b""
        try:
            while b"\r\n" not in received:
                chunk = sock.recv(4096)
                if not chunk:
                    return "closed"
                received += chunk
        except ConnectionResetError:
            return "reset"
        except TimeoutError:
            return "timeout"
        return received.split(b" ", 2)[1].decode("latin-1")


class Outcomes:
    """Requests counted by ``(channel, kind, outcome)``, from many threads; and which were unexpected."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[tuple[str, str, str]] = Counter()
        self.unexpected: Counter[tuple[str, str, str]] = Counter()

    def add(self, channel: str, kind: str, outcome: str, expected: frozenset[str]) -> None:
        with self._lock:
            self.counts[channel, kind, outcome] += 1
            if outcome not in expected and not (outcome.startswith("4") and "4xx" in expected):
                self.unexpected[channel, kind, outcome] += 1

    def totals(self) -> dict[str, int]:
        """Counts by class: ``ok`` (200), ``4xx``, ``5xx``, ``no answer`` (closed, reset, timeout, no
        reply), ``dropped`` (MQTT without a response topic)."""
        out = dict.fromkeys(("ok", "4xx", "5xx", "no answer", "dropped"), 0)
        with self._lock:
            for (_channel, _kind, outcome), n in self.counts.items():
                if outcome == "200":
                    out["ok"] += n
                elif outcome.startswith("4"):
                    out["4xx"] += n
                elif outcome.startswith("5"):
                    out["5xx"] += n
                elif outcome == "dropped":
                    out["dropped"] += n
                else:
                    out["no answer"] += n
        return out


@dataclass
class Sample:
    t_s: float
    rss_mb: float
    peak_rss_mb: float
    fds: int
    threads: int
    idle_held: int
    version: int
    ok: int
    err_4xx: int
    err_5xx: int
    no_answer: int
    dropped: int


class Soak:
    """The load generators (one thread each) and what they saw."""

    def __init__(self, *, port: int, texts: list[str], requesters: dict[int, MqttRequester], args: Any) -> None:
        self.port = port
        self.texts = texts
        self.requesters = requesters
        self.args = args
        self.outcomes = Outcomes()
        self.stop = threading.Event()
        self.version = 0
        self.version_changes: list[tuple[float, int]] = []  # (t s, version) whenever the served version changes
        self.idle_held = 0
        self.idle_closed_by_agent = 0
        self.updates: list[dict[str, float]] = []
        self.start = time.monotonic()
        self._threads: list[threading.Thread] = []

    def run_in_thread(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def join(self) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _paced(self, per_s: float) -> Callable[[], bool]:
        """A ticker for a loop at ``per_s`` iterations a second: True while the soak goes on."""
        state = {"next": time.monotonic()}

        def tick() -> bool:
            state["next"] += 1 / per_s
            return not self.stop.wait(max(0.0, state["next"] - time.monotonic()))

        return tick

    def valid_http(self, offset: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        i = offset
        while not self.stop.is_set():
            text = self.texts[i % len(self.texts)]
            i += 1
            try:
                conn.request("POST", "/v1/predict", body=json.dumps({"texts": [text]}),
                             headers={"Content-Type": "application/json"})  # fmt: skip
                response = conn.getresponse()
                body = response.read()
                outcome = str(response.status)
                if response.status == 200:
                    self._saw_version(json.loads(body)["version"])
            except (OSError, http.client.HTTPException) as exc:
                outcome = type(exc).__name__
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            self.outcomes.add("http", "valid", outcome, frozenset({"200"}))
        conn.close()

    def _saw_version(self, version: int) -> None:
        if version != self.version:
            self.version_changes.append((time.monotonic() - self.start, version))
        self.version = version

    def push_updates(self, push: Callable[[Path], None], bundles: list[tuple[int, Path]], at: list[float]) -> None:
        """Push ``bundles[k]`` at ``at[k]`` seconds into the run; record each push in :attr:`updates`."""
        for (version, bundle), when in zip(bundles, at, strict=True):
            if self.stop.wait(max(0.0, self.start + when - time.monotonic())):
                return
            record = {"version": version, "push_started_s": time.monotonic() - self.start}
            self.updates.append(record)
            push(bundle)
            record["push_done_s"] = time.monotonic() - self.start
            while not self.stop.is_set() and self.version != version:
                time.sleep(0.05)
            if self.version == version:
                record["served_s"] = next(t for t, v in reversed(self.version_changes) if v == version)

    def bad_http(self) -> None:
        tick = self._paced(self.args.bad_http_per_s)
        cases = list(BAD_HTTP.items())
        i = 0
        while tick():
            kind, (data, shut_write, expected) = cases[i % len(cases)]
            i += 1
            try:
                outcome = raw_exchange(self.port, data, shut_write=shut_write)
            except OSError as exc:
                outcome = type(exc).__name__
            self.outcomes.add("http", kind, outcome, expected)

    def mqtt(self) -> None:
        """Per cycle: a valid request at QoS 1 and at QoS 0 each ``--mqtt-valid`` times, then one malformed
        one (in turn from :data:`BAD_MQTT`, or one without a response topic)."""
        tick = self._paced(self.args.mqtt_per_s)
        cases: list[tuple[str, bytes | None, frozenset[str]]] = []
        for n in range(len(BAD_MQTT) + 1):
            cases += [("valid", None, frozenset({"200"}))] * self.args.mqtt_valid
            if n < len(BAD_MQTT):
                name, bad = list(BAD_MQTT.items())[n]
                cases.append((name, bad, ANY_4XX))
            else:
                cases.append(("no response topic", b'{"texts": ["on"]}', frozenset({"dropped"})))
        i = 0
        while tick():
            kind, fixed, expected = cases[i % len(cases)]
            requester = self.requesters[(i + i // len(cases)) % 2]  # each case at QoS 0 and 1 in turn
            i += 1
            payload = fixed if fixed is not None else json.dumps({"texts": [self.texts[i % len(self.texts)]]}).encode()
            if kind == "no response topic":
                requester.ask(payload, response_topic=False)
                outcome = "dropped"
            else:
                reply = requester.ask(payload, timeout_s=15)
                outcome = "no reply" if reply is None else str(json.loads(reply)["status"])
            self.outcomes.add(f"mqtt qos{requester.qos}", kind, outcome, expected)

    def idle(self) -> None:
        held: list[tuple[float, socket.socket]] = []
        tick = self._paced(1 / self.args.idle_every_s)
        i = 0
        while tick():
            now = time.monotonic()
            while held and now - held[0][0] >= self.args.idle_hold_s:
                self._close_idle(held.pop(0)[1])
            try:
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
                sock.sendall(_IDLE_OPENINGS[i % len(_IDLE_OPENINGS)])
                held.append((now, sock))
                outcome = "opened"
            except OSError as exc:
                outcome = type(exc).__name__
            self.outcomes.add("http", "idle connection", outcome, frozenset({"opened"}))
            i += 1
            self.idle_held = len(held)
        for _, sock in held:
            self._close_idle(sock)
        self.idle_held = 0

    def _close_idle(self, sock: socket.socket) -> None:
        """Close a held connection, noting whether the agent had already ended it (closed, reset or
        answered, as with a 408: a server answers a timed-out request and closes)."""
        sock.setblocking(False)
        try:
            sock.recv(4096)  # b"" (closed) or an answer
            self.idle_closed_by_agent += 1
        except BlockingIOError:  # still open, silent
            pass
        except OSError:  # reset
            self.idle_closed_by_agent += 1
        sock.close()


def prepare_bundles(work: Path, *, epochs: float, reuse: bool) -> tuple[Path, Path]:
    """v1 and v2 (a full fine-tune with another seed) in ``work/registry``, trained now or kept from the last run."""
    bundles = [work / "registry" / "intents" / str(v) / "bundle" for v in (1, 2)]
    if reuse and all((b / "manifest.json").exists() for b in bundles):
        for path in work.iterdir():  # keep the registry and v1's run (its validation texts)
            if path.is_dir() and path.name not in ("registry", "run-v1", "run-v2"):
                shutil.rmtree(path)
            elif path.is_file():
                path.unlink()
        v1, v2 = bundles
        print(f"reusing v1 and v2 from {work / 'registry'}")
    else:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        t0 = time.monotonic()
        v1 = train_bundle(work, run="run-v1", epochs=epochs)
        v2 = train_bundle(work, run="run-v2", epochs=epochs, seed=7)
        print(f"trained and exported v1 and v2 in {time.monotonic() - t0:.0f} s")
    return v1, v2


def soak_main(args: argparse.Namespace) -> None:
    from cloud_trainer.demo.localbroker import start_local_broker
    from cloud_trainer.releases.publish import push_bundle
    from cloud_trainer.releases.signing import generate_keypair
    from cloud_trainer.training.data import load_labelled
    from edge_agent.protocol import Topics

    work = args.workdir.resolve()
    v1, v2 = prepare_bundles(work, epochs=args.epochs, reuse=args.reuse_bundles)
    texts = load_labelled(work / "run-v1" / "val.csv").texts
    private, public = generate_keypair(work / "keys")
    broker = start_local_broker(prefer="mosquitto", workdir=work / "broker")
    fleet = device = "soak"
    push_bundle(v1, host=broker.host, port=broker.port, fleet=fleet, key_path=private)
    port = free_port()
    config = work / "agent.toml"
    write_agent_config(config, state=work / "agent-state", http_port=port, mqtt_port=broker.port, public_key=public,
                       device=device, fleet=fleet, telemetry_s=30)  # fmt: skip
    agent = start_agent(config, log=work / "agent.log", env=dict(item.split("=", 1) for item in args.agent_env))
    requesters: dict[int, MqttRequester] = {}
    samples: list[Sample] = []
    duration = args.minutes * 60
    soak: Soak | None = None
    try:
        wait_serving(port, texts[0], version=1)
        topics = Topics(fleet=fleet)
        for qos in (1, 0):
            requesters[qos] = MqttRequester(
                host=broker.host, port=broker.port, infer_topic=topics.device_infer(device),
                reply_topic=f"{topics.device_replies(device)}/soak-qos{qos}", qos=qos, client_id=f"soak-qos{qos}",
            )  # fmt: skip
            requesters[qos].wait_agent(texts[0])
        soak = Soak(port=port, texts=texts, requesters=requesters, args=args)
        for i in range(args.http_clients):
            soak.run_in_thread(soak.valid_http, i * 11)
        soak.run_in_thread(soak.bad_http)
        soak.run_in_thread(soak.mqtt)
        soak.run_in_thread(soak.idle)

        # v2 at --update-at of the run; with --updates N, then v1, v2, ... evenly over the rest
        spacing = (1 - args.update_at) * duration / args.updates
        at = [duration * args.update_at + k * spacing for k in range(args.updates)]
        order = [(2, v2) if k % 2 == 0 else (1, v1) for k in range(args.updates)]
        push = lambda bundle: push_bundle(bundle, host=broker.host, port=broker.port, fleet=fleet, key_path=private)  # noqa: E731
        soak.run_in_thread(soak.push_updates, push, order, at)
        print(f"soaking for {args.minutes:g} min (agent pid {agent.pid}, log {work / 'agent.log'})")
        next_sample = soak.start
        while True:
            try:
                stats = process_stats(agent.pid)
            except FileNotFoundError:  # gone between two samples
                stats = None
            if stats is None or agent.poll() is not None:
                print(f"the agent exited with code {agent.wait()}")
                break
            totals = soak.outcomes.totals()
            samples.append(Sample(
                t_s=round(time.monotonic() - soak.start, 1), rss_mb=round(stats.rss_mb, 1),
                peak_rss_mb=round(stats.peak_rss_mb, 1), fds=stats.fds, threads=stats.threads,
                idle_held=soak.idle_held, version=soak.version, ok=totals["ok"], err_4xx=totals["4xx"],
                err_5xx=totals["5xx"], no_answer=totals["no answer"], dropped=totals["dropped"],
            ))  # fmt: skip
            if samples[-1].t_s >= duration:
                break
            next_sample += args.sample_s
            time.sleep(max(0.0, min(next_sample, soak.start + duration) - time.monotonic()))
    finally:
        if soak is not None:
            soak.join()
        exit_code = agent.poll()  # None: it ran to the end
        for requester in requesters.values():
            requester.close()
        stop_agent(agent)
        broker.stop()
    if not samples:
        raise SystemExit("no samples: the agent exited at once (see its log)")
    report(work, args, samples, soak, duration=duration, exit_code=exit_code)


def report(work: Path, args: Any, samples: list[Sample], soak: Soak, *, duration: float, exit_code: int | None) -> None:
    with (work / "soak-samples.csv").open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(asdict(samples[0])))
        writer.writeheader()
        writer.writerows(asdict(s) for s in samples)
    print_table(samples)
    print(f"\n{'channel':<10} {'request':<34} outcomes")
    by_kind: dict[tuple[str, str], list[str]] = {}
    for (channel, kind, outcome), n in sorted(soak.outcomes.counts.items()):
        by_kind.setdefault((channel, kind), []).append(f"{outcome}: {n}")
    for (channel, kind), outcomes in by_kind.items():
        print(f"{channel:<10} {kind:<34} {', '.join(outcomes)}")
    closed = soak.idle_closed_by_agent
    print(f"idle connections the agent had ended (closed or answered) before the client closed them: {closed}")
    for u in soak.updates:
        when = f"served from {u['served_s']:.1f} s" if "served_s" in u else "never served"
        print(f"push of v{u['version']:.0f}: started at {u['push_started_s']:.1f} s, done at "
              f"{u.get('push_done_s', 0):.1f} s, {when}")  # fmt: skip

    after = [s for s in samples if s.t_s >= WARM_UP * duration]
    checks = []
    if len(after) < 2:
        print("too few samples after warm-up for the checks: run longer or sample more often")
    else:
        first, last = after[0], after[-1]
        growth = (last.rss_mb - first.rss_mb) / first.rss_mb * 100
        fds = [s.fds for s in after]
        threads = [s.threads for s in after]
        print(f"\nafter warm-up ({first.t_s:.0f}-{last.t_s:.0f} s, {len(after)} samples): RSS {first.rss_mb:.1f} -> "
              f"{last.rss_mb:.1f} MB ({growth:+.1f} %), max {max(s.rss_mb for s in after):.1f} MB; "
              f"fds {min(fds)}-{max(fds)}; threads {min(threads)}-{max(threads)}")  # fmt: skip
        rss_between_updates(after, soak.updates, settle_s=2 * args.sample_s)
        checks.append(check(growth < RSS_GROWTH_PCT, f"RSS growth after warm-up under {RSS_GROWTH_PCT:g} %: "
                            f"{growth:+.1f} % ({first.rss_mb:.1f} -> {last.rss_mb:.1f} MB)"))  # fmt: skip
        checks.append(check(max(fds) - min(fds) <= args.fd_tolerance, f"fds flat after warm-up (max - min <= "
                            f"{args.fd_tolerance}): {min(fds)}-{max(fds)}"))  # fmt: skip
    ended = "" if exit_code is None else f": it exited with {exit_code}"
    checks.append(check(exit_code is None, f"the agent ran to the end{ended}"))
    unexpected = sum(soak.outcomes.unexpected.values())
    detail = ", ".join(f"{c} {k} -> {o}: {n}" for (c, k, o), n in soak.outcomes.unexpected.most_common(5))
    checks.append(check(unexpected == 0, f"every request answered as expected: {unexpected} not"
                        + (f" ({detail})" if detail else "")))  # fmt: skip
    pushed = [u for u in soak.updates if "served_s" in u]
    delays = ", ".join(f"v{u['version']:.0f} {u['served_s'] - u['push_started_s']:.1f} s" for u in pushed)
    checks.append(check(len(pushed) == args.updates, f"the agent served every pushed version: {len(pushed)} of "
                        f"{args.updates}" + (f" (from the push's start: {delays})" if delays else "")))  # fmt: skip
    log = (work / "agent.log").read_text(errors="replace").splitlines()
    levels = Counter(word for line in log for word in line.split()[2:3] if word in ("WARNING", "ERROR", "CRITICAL"))
    print(f"agent log: {len(log)} lines, " + (", ".join(f"{n} {k}" for k, n in levels.items()) or "no warnings"))
    (work / "soak.json").write_text(json.dumps({
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "samples": [asdict(s) for s in samples], "updates": soak.updates, "checks": checks,
        "outcomes": [{"channel": c, "request": k, "outcome": o, "count": n}
                     for (c, k, o), n in sorted(soak.outcomes.counts.items())],
        "idle_closed_by_agent": closed,
    }, indent=2))  # fmt: skip
    print(f"samples: {work / 'soak-samples.csv'}; everything: {work / 'soak.json'}")


def print_table(samples: list[Sample]) -> None:
    """At most about 30 rows (every n-th sample, and the last); ok/s over the time since the row before."""
    step = max(1, len(samples) // 30)
    shown = samples[::step] if samples[-1] in samples[::step] else [*samples[::step], samples[-1]]
    print(f"\n{'t s':>7} {'RSS MB':>7} {'peak MB':>8} {'fds':>5} {'thr':>4} {'idle':>5} {'ver':>4} "
          f"{'ok/s':>6} {'4xx':>6} {'5xx':>5} {'no answer':>9}")  # fmt: skip
    previous = None
    for s in shown:
        rate = (s.ok - previous.ok) / max(s.t_s - previous.t_s, 1e-9) if previous else 0.0
        print(f"{s.t_s:>7.0f} {s.rss_mb:>7.1f} {s.peak_rss_mb:>8.1f} {s.fds:>5} {s.threads:>4} {s.idle_held:>5} "
              f"{s.version:>4} {rate:>6.0f} {s.err_4xx:>6} {s.err_5xx:>5} {s.no_answer:>9}")  # fmt: skip
        previous = s


def rss_between_updates(after: list[Sample], updates: list[dict[str, float]], *, settle_s: float) -> None:
    """RSS in each stretch between pushes (from ``settle_s`` after the last version began serving), and its
    step across each update: a step per update and a slope within stretches are different findings."""
    bounds = [(float("-inf"), float("-inf"))]
    bounds += [(u["push_started_s"], u.get("served_s", u["push_started_s"]) + settle_s) for u in updates]
    bounds.append((float("inf"), float("inf")))
    stretches = [[s for s in after if bounds[k][1] <= s.t_s < bounds[k + 1][0]] for k in range(len(bounds) - 1)]
    for k, part in enumerate(stretches):
        if len(part) >= 2:
            change = (part[-1].rss_mb - part[0].rss_mb) / part[0].rss_mb * 100
            label = "before the first push" if k == 0 else f"after push {k} (v{updates[k - 1]['version']:.0f})"
            print(f"  RSS {label}, {part[0].t_s:.0f}-{part[-1].t_s:.0f} s: {part[0].rss_mb:.1f} -> "
                  f"{part[-1].rss_mb:.1f} MB ({change:+.1f} %)")  # fmt: skip
        if k and part and stretches[k - 1]:
            print(f"  RSS step across push {k}: {part[0].rss_mb - stretches[k - 1][-1].rss_mb:+.1f} MB")


def check(passed: bool, text: str) -> dict[str, Any]:
    print(f"{'PASS' if passed else 'FAIL'}  {text}")
    return {"check": text, "pass": passed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--sample-s", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--epochs", type=float, default=8.0, help="for each of the two versions")
    parser.add_argument("--reuse-bundles", action="store_true", help="keep v1 and v2 from an earlier run's workdir")
    parser.add_argument("--http-clients", type=int, default=3, help="keep-alive clients sending valid requests")
    parser.add_argument("--bad-http-per-s", type=float, default=5.0, help="invalid HTTP requests a second")
    parser.add_argument("--mqtt-per-s", type=float, default=10.0, help="MQTT requests a second")
    parser.add_argument("--mqtt-valid", type=int, default=3, help="valid MQTT requests between malformed ones")
    parser.add_argument("--idle-every-s", type=float, default=5.0, help="a new idle connection this often")
    parser.add_argument("--idle-hold-s", type=float, default=60.0, help="how long the client keeps each open")
    parser.add_argument("--update-at", type=float, default=0.5, help="share of the run at which v2 is pushed")
    parser.add_argument("--updates", type=int, default=1, help="pushes: v2, then v1, v2, ... spread over the rest")
    parser.add_argument("--agent-env", action="append", default=[], metavar="NAME=VALUE",
                        help="added to the agent's environment, e.g. MALLOC_MMAP_THRESHOLD_=65536")  # fmt: skip
    parser.add_argument("--fd-tolerance", type=int, default=5, help="fds max - min after warm-up that is flat")
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-soak"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    soak_main(args)


if __name__ == "__main__":
    main()
