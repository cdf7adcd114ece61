"""``cloud-train collect``, ``cloud-train samples list|show|export|import`` and ``cloud-train sampling set``.

cloud-train collect --fleet plant-7 [--store DIR] [--share-group collectors]
cloud-train samples list --model intents --unlabelled
cloud-train samples export --model intents --out to-label.csv      # or --format label-studio (texts or images)
cloud-train samples import labelled.csv                            # or a Label Studio JSON export
cloud-train samples verify [--fix]                                 # Parquet and the index agree?
cloud-train sampling set --fleet plant-7 --model intents --low-confidence 0.7 --random-rate 0.01
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from cloud_trainer.cli.common import add_connection_arguments, connection_from_args

STORE_HELP = "sample store directory (default: $EDGELOOP_SAMPLES or ~/.edgeloop/samples)"


def _store(args: argparse.Namespace, *, collector: bool = False) -> Any:
    from cloud_trainer.samples.store import SampleStore, default_store

    return SampleStore(args.store or default_store(), collector=collector)


SHARE_ENV = "EDGELOOP_SHARE_GROUP"
GUESSABLE_GROUP = "collectors"


def resolve_share_group(given: str | None, *, mqtt_config: Path | None, secure: bool) -> str:
    """The shared-subscription group a collector joins: ``--share-group``, else ``$EDGELOOP_SHARE_GROUP``,
    else the ``share.env`` that ``cloud-train pki init`` wrote beside the collector's mqtt.toml.

    On a secure broker (TLS or credentials) a guessable group is refused: a device that subscribes
    to it would be handed every other batch, which the broker then drops (it may not read them).
    '' means a plain subscription (one collector).
    """
    from cloud_trainer.errors import CloudTrainError

    if given is not None:
        group, source = given, "--share-group"
    elif os.environ.get(SHARE_ENV):
        group, source = os.environ[SHARE_ENV], f"${SHARE_ENV}"
    else:
        group, source = "", ""
        env_file = mqtt_config.parent / "share.env" if mqtt_config is not None else None
        if env_file is not None and env_file.is_file():
            for line in env_file.read_text().splitlines():
                key, _, value = line.strip().partition("=")
                if key == SHARE_ENV and value.strip():
                    group, source = value.strip().strip('"'), str(env_file)
        if not group:
            if secure:
                raise CloudTrainError(
                    "no share group: give the collector the secret one from `cloud-train pki init` "
                    f"(<pki>/collector/share.env beside its mqtt.toml, ${SHARE_ENV} or --share-group); "
                    f"the guessable default {GUESSABLE_GROUP!r} is refused on a secure broker"
                )
            group, source = GUESSABLE_GROUP, "the default"
    if secure and group == GUESSABLE_GROUP:
        raise CloudTrainError(f"share group {group!r} (from {source}) is guessable; refused on a secure broker")
    return group


def _cmd_collect(args: argparse.Namespace) -> int:
    from cloud_trainer.samples.collect import Collector, CollectorStats

    store = _store(args, collector=True)
    conn = connection_from_args(args)
    share_group = resolve_share_group(args.share_group, mqtt_config=args.mqtt_config, secure=conn.security is not None)
    done = threading.Event()

    def progress(stats: CollectorStats) -> None:
        print(
            f"batches {stats.batches}: {stats.new_records} new samples, {stats.duplicates} duplicates, "
            f"{stats.malformed} malformed",
            flush=True,
        )
        if args.count is not None and stats.new_records >= args.count:
            done.set()

    collector = Collector(
        store=store,
        fleet=args.fleet,
        host=conn.host,
        port=conn.port,
        security=conn.security,
        topic_root=conn.topic_root,
        share_group=share_group or None,
        client_id=args.client_id,
        protocol=args.mqtt_protocol,
        on_batch=progress,
    )
    collector.start()
    print(f"collecting {collector.topic} into {store.root} (Ctrl-C to stop)", flush=True)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: done.set())
    deadline = time.monotonic() + args.timeout if args.timeout else None
    while not done.wait(0.5):
        if deadline is not None and time.monotonic() > deadline:
            break
    collector.stop(end_session=args.end_session)
    stats = collector.stats
    print(
        f"stopped: {stats.new_records} new samples stored, {stats.duplicates} duplicates, {stats.malformed} malformed"
    )
    return 0


def _cmd_samples(args: argparse.Namespace) -> int:
    from cloud_trainer.samples import labelling

    store = _store(args)
    if args.samples_command == "list":
        labelled = True if args.labelled else (False if args.unlabelled else None)
        rows = store.query(model=args.model, labelled=labelled, device=args.device, day=args.day, limit=args.limit)
        for s in rows:
            shown = (s.text or "<image>")[:60]
            print(
                f"{s.prediction_id}  {s.day}  {s.device:<16} v{s.version}  {s.predicted:<16} {s.score:.2f}  "
                f"{s.label or '-':<16} {shown}"
            )
        counts = store.counts()
        print(f"{len(rows)} shown; store: {counts['samples']} samples, {counts['labelled']} labelled")
    elif args.samples_command == "show":
        print(json.dumps(store.get(args.id).as_dict(), indent=2, ensure_ascii=False))
    elif args.samples_command == "export":
        rows = store.query(model=args.model, labelled=None if args.all else False)
        config = labelling.config_path_for(args.out) if args.format == "label-studio" else None
        if config is not None:
            count = labelling.export_label_studio(rows, args.out, config_path=config)
        else:
            count = labelling.export_csv(rows, args.out)
        print(f"exported {count} {'' if args.all else 'unlabelled '}samples to {args.out}")
        if config is not None:
            print(f"labelling config: {config} (paste it into the Label Studio project's Labeling Interface)")
    elif args.samples_command == "import":
        pairs = labelling.read_labels(args.file)
        count = store.set_labels(pairs, source="import")
        print(f"imported {count} labels from {args.file}; store: {store.counts()['labelled']} labelled")
    return 0


SHOWN_PROBLEMS = 50


def _cmd_samples_verify(args: argparse.Namespace) -> int:
    """Exit 0 when the store's Parquet parts and index agree, 1 with the problems otherwise."""
    store = _store(args)
    check = store.verify()
    for problem in check.problems[:SHOWN_PROBLEMS]:
        print(f"problem: {problem}")
    if len(check.problems) > SHOWN_PROBLEMS:
        print(f"... and {len(check.problems) - SHOWN_PROBLEMS} more problems")
    removed = store.remove_orphans() if check.orphans and args.fix else []
    for path in removed:
        print(f"removed orphan part {path}")
    left = [path for path in check.orphans if path not in removed]
    for path in left:
        print(f"orphan part: {path} (written, never indexed: a crash's leftover)")
    summary = f"{check.parts} parts, {check.records} records, {check.samples} samples"
    if not check.problems and not left:
        fixed = f" ({len(removed)} orphan parts removed)" if removed else ""
        print(f"verify: {summary}: Parquet and the index agree{fixed}")
        return 0
    hint = " (--fix removes them)" if left else ""
    print(f"verify: {summary}: {len(check.problems)} problems, {len(left)} orphan parts{hint}")
    return 1


def _cmd_sampling(args: argparse.Namespace) -> int:
    from cloud_trainer.errors import CloudTrainError
    from cloud_trainer.releases.publish import Publisher
    from edge_agent.protocol import Topics
    from edge_agent.protocol.samples import SamplingPolicy
    from edge_agent.protocol.topics import DEFAULT_ROOT

    conn = connection_from_args(args)
    try:
        topics = Topics(fleet=args.fleet, root=conn.topic_root or DEFAULT_ROOT)
        topic = topics.device_sampling(args.device) if args.device else topics.fleet_sampling(args.model)
    except ValueError as exc:
        raise CloudTrainError(str(exc)) from None
    if args.clear:
        payload = b""
    else:
        fields = {
            k: getattr(args, k)
            for k in ("low_confidence", "min_margin", "max_entropy", "random_rate", "per_class_per_hour", "per_hour")
            if getattr(args, k) is not None
        }
        from pydantic import ValidationError

        try:
            policy = SamplingPolicy(enabled=not args.disable, **fields)
        except ValidationError as exc:
            raise CloudTrainError(f"sampling policy: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}") from None
        payload = policy.to_bytes()
    with Publisher(host=conn.host, port=conn.port, security=conn.security, protocol=args.mqtt_protocol) as pub:
        pub.publish(topic, payload, retain=True)
    print(f"{'cleared' if args.clear else 'published'} sampling policy on {topic}")
    return 0


def _add_verify_command(samples: Any) -> None:
    v = samples.add_parser(
        "verify", help="check that the Parquet parts and the index agree (exit 0) or list the problems (exit 1)"
    )
    v.add_argument("--store", type=Path, default=argparse.SUPPRESS, help=STORE_HELP)  # after verify too
    v.add_argument("--fix", action="store_true", help="remove orphan parts (a crashed batch's, never indexed)")
    v.set_defaults(func=_cmd_samples_verify)


def add_sample_commands(sub: Any) -> None:
    c = sub.add_parser("collect", help="collect the fleet's samples into the sample store (runs until stopped)")
    c.add_argument("--fleet", required=True)
    c.add_argument("--store", type=Path, help=STORE_HELP)
    c.add_argument(
        "--share-group",
        default=None,
        help="MQTT 5 shared-subscription group; collectors in one group split the load "
        "(default: $EDGELOOP_SHARE_GROUP, else the share.env beside --mqtt-config that `pki init` wrote, "
        "else 'collectors' on an open broker; '' for a plain subscription)",
    )
    c.add_argument("--client-id", help="fixed, so the broker keeps the session (default: cloud-train-collect-<host>)")
    c.add_argument("--mqtt-protocol", choices=["5", "3.1.1"], default="5", help="MQTT version")
    c.add_argument(
        "--end-session",
        action="store_true",
        help="on exit, end the broker session (a collector retired for good; else the broker keeps its share)",
    )
    c.add_argument("--count", type=int, help="stop after this many new samples")
    c.add_argument("--timeout", type=float, help="stop after this many seconds")
    add_connection_arguments(c)
    c.set_defaults(func=_cmd_collect)

    s = sub.add_parser("samples", help="collected samples: list, show, export, import labels, verify")
    s.add_argument("--store", type=Path, help=STORE_HELP)
    ss = s.add_subparsers(dest="samples_command", required=True)
    ls = ss.add_parser("list", help="samples in the store")
    ls.add_argument("--model")
    ls.add_argument("--device")
    ls.add_argument("--day", help="YYYY-MM-DD")
    which = ls.add_mutually_exclusive_group()
    which.add_argument("--labelled", action="store_true")
    which.add_argument("--unlabelled", action="store_true")
    ls.add_argument("--limit", type=int, default=50, help="most rows shown")
    show = ss.add_parser("show", help="one sample, as JSON")
    show.add_argument("id")
    ex = ss.add_parser(
        "export",
        help="write samples for labelling (unlabelled ones unless --all); label-studio also writes "
        "OUT's stem + .label-config.xml, the project's labelling config (Text or Image, and the labels)",
    )
    ex.add_argument("--out", type=Path, required=True)
    ex.add_argument("--format", choices=["csv", "label-studio"], default="csv", help="file format")
    ex.add_argument("--model")
    ex.add_argument("--all", action="store_true", help="labelled ones too")
    im = ss.add_parser("import", help="read labels back: a CSV with id,label columns or a Label Studio JSON export")
    im.add_argument("file", type=Path)
    _add_verify_command(ss)
    s.set_defaults(func=_cmd_samples)

    p = sub.add_parser("sampling", help="change the devices' sampling policy remotely (retained on the broker)")
    ps = p.add_subparsers(dest="sampling_command", required=True)
    st = ps.add_parser("set", help="publish a sampling policy for a fleet's model, or for one device")
    st.add_argument("--fleet", required=True)
    st.add_argument("--model", default="intents", help="model name in the fleet")
    st.add_argument("--device", help="only this device (its policy wins over the fleet's)")
    st.add_argument("--low-confidence", type=float, help="keep when the top score is below (default 0.6)")
    st.add_argument("--min-margin", type=float, help="keep when top-1 minus top-2 is below")
    st.add_argument("--max-entropy", type=float, help="keep when the normalised entropy is above (0..1)")
    st.add_argument("--random-rate", type=float, help="keep this share of all predictions")
    st.add_argument("--per-class-per-hour", type=int)
    st.add_argument("--per-hour", type=int)
    st.add_argument("--disable", action="store_true", help="stop sampling")
    st.add_argument("--clear", action="store_true", help="remove the retained policy (devices fall back)")
    st.add_argument("--mqtt-protocol", choices=["5", "3.1.1"], default="5", help="MQTT version")
    add_connection_arguments(st)
    p.set_defaults(func=_cmd_sampling)
