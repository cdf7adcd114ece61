"""``cloud-train rollout status|promote|pause|resume|withdraw|revert`` and ``device pin|unpin``.

    cloud-train rollout status --fleet plant-7                              # every release and its progress
    cloud-train rollout promote --fleet plant-7 --key keys/release.key      # the fleet's canary to 100 %
    cloud-train rollout pause --fleet plant-7 --group line-3                # stop it; resume re-signs it
    cloud-train rollout resume --fleet plant-7 --group line-3 --key keys/release.key
    cloud-train rollout withdraw --fleet plant-7                            # for good
    cloud-train rollout revert --fleet plant-7 --to 3 --key keys/release.key
    cloud-train device pin cam-12 intents:3 --fleet plant-7 --key keys/release.key
    cloud-train device unpin cam-12 --fleet plant-7

Each prints what it did, then follows what the targeted devices report (``--wait`` seconds,
0 not at all): active, pending (offline ones counted), failed.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from cloud_trainer.cli.common import add_connection_arguments, connection_from_args

if TYPE_CHECKING:
    from cloud_trainer.fleet.rollout import CurrentRelease, Level, RolloutSession


def _session(args: argparse.Namespace, model: str) -> RolloutSession:
    from cloud_trainer.fleet.rollout import RolloutSession

    conn = connection_from_args(args)
    return RolloutSession(
        host=conn.host, port=conn.port, fleet=args.fleet, model=model, security=conn.security,
        protocol=args.mqtt_protocol, topic_root=conn.topic_root,
    )  # fmt: skip


def _level(args: argparse.Namespace) -> tuple[Level, str]:
    if getattr(args, "device", None):
        return "device", args.device
    if getattr(args, "group", None):
        return "group", args.group
    return "fleet", args.fleet


def _registry_root(args: argparse.Namespace) -> Any:
    from cloud_trainer.releases.registry import default_registry

    return args.registry or default_registry()


def _follow(session: RolloutSession, current: CurrentRelease, args: argparse.Namespace) -> int:
    if args.wait <= 0:
        return 0
    state = session.follow(current, wait_s=args.wait, on_line=lambda line: print(f"  {line}", flush=True))
    version = current.release.version if current.release else "?"
    if state.failed:
        print(f"{len(state.failed)} device(s) refused or rolled back v{version}")
        return 1
    if not state.done:
        print(f"still pending after {args.wait:g}s: {', '.join(state.pending)} (see `cloud-train rollout status`)")
    return 0


def _cmd_rollout(args: argparse.Namespace) -> int:
    from cloud_trainer.fleet.rollout import RolloutError, dump_progress, load_paused, progress, save_paused

    command = args.rollout_command
    if command == "revert":
        return _push(args, f"{args.model}:{args.to}", *_level(args))
    with _session(args, args.model) as session:
        if command == "status":
            releases = session.releases()
            rows = session.rows()
            if not releases:
                print(f"no release of {args.model} on fleet {args.fleet}")
            for current in releases:
                state = progress(current, releases, rows)
                print(dump_progress(current, state) if args.json else f"{current.describe()}: {state.line()}")
            return 0
        level, name = _level(args)
        if command == "resume":
            path, release = load_paused(_registry_root(args), session.topic(level, name))
            current = session.publish(release, args.key)
            path.unlink()
            print(f"resumed {current.describe()}")
            return _follow(session, current, args)
        current = session.release_on(level, name)
        if command == "promote":
            if current.release is None:
                raise RolloutError(f"{current.topic} holds no readable release ({current.problem})")
            if current.release.canary_percent is None:
                print(f"{current.describe()} is not a canary: nothing to promote")
                return 0
            promoted = session.publish(current.release.model_copy(update={"canary_percent": None}), args.key)
            print(f"promoted {current.describe()} to every targeted device: {promoted.describe()}")
            return _follow(session, promoted, args)
        session.withdraw(current)
        if command == "pause" and current.release is not None:
            path = save_paused(_registry_root(args), current)
            print(f"paused {current.describe()}: withdrawn, kept in {path} for `rollout resume`")
        else:
            print(f"withdrew {current.describe()}")
        return 0


def _push(args: argparse.Namespace, ref: str, level: Level, name: str) -> int:
    """Publish a registered version as a new release on the target (revert, pin), then follow it.

    ``push`` opens its connection, then the following opens another: one at a time, as a broker
    that binds client ids to identities allows."""
    from cloud_trainer.fleet.rollout import CurrentRelease, target_of
    from cloud_trainer.releases.publish import push_bundle
    from cloud_trainer.releases.registry import Registry, parse_ref

    model, version = parse_ref(ref)
    entry = Registry(_registry_root(args)).verified(model, version)
    conn = connection_from_args(args)
    result = push_bundle(
        entry.bundle_dir, host=conn.host, port=conn.port, fleet=args.fleet, key_path=args.key,
        target=target_of(level, name), protocol=args.mqtt_protocol, security=conn.security,
        topic_root=conn.topic_root,
    )  # fmt: skip
    current = CurrentRelease(result.topic, level, name, result.release)
    print(f"published {current.describe()}")
    if args.wait <= 0:
        return 0
    with _session(args, model) as follow:
        return _follow(follow, current, args)


def _cmd_pin(args: argparse.Namespace) -> int:
    from cloud_trainer.releases.registry import parse_ref

    parse_ref(args.ref)  # a bad reference fails before anything is published
    return _push(args, args.ref, "device", args.name)


def _cmd_unpin(args: argparse.Namespace) -> int:
    with _session(args, args.model) as session:
        current = session.release_on("device", args.name)
        session.withdraw(current)
        print(f"unpinned {args.name}: withdrew {current.describe()}; the device follows its group or fleet again")
    return 0


def _common(p: argparse.ArgumentParser, *, key: bool, target: bool = True, wait: bool = True) -> None:
    from pathlib import Path

    p.add_argument("--fleet", required=True)
    if target:
        where = p.add_mutually_exclusive_group()
        where.add_argument("--group", help="the group's release (default: the fleet's)")
        where.add_argument("--device", help="the device's release (default: the fleet's)")
    if key:
        p.add_argument("--key", type=Path, required=True, help="ed25519 signing key (PEM)")
    if wait:
        p.add_argument("--wait", type=float, default=60.0, help="seconds to follow the devices' progress (0: none)")
    p.add_argument("--registry", type=Path, help="registry directory (revert, pin; pause keeps releases there)")
    add_connection_arguments(p)
    p.add_argument("--mqtt-protocol", choices=["5", "3.1.1"], default="5", help="MQTT version")


def add_rollout_commands(sub: Any) -> None:
    p = sub.add_parser("rollout", help="releases as operations: status, promote, pause, resume, withdraw, revert")
    ops = p.add_subparsers(dest="rollout_command", required=True)
    st = ops.add_parser("status", help="every release of a model on a fleet, and its devices' progress")
    _common(st, key=False, target=False, wait=False)
    st.add_argument("--json", action="store_true", help="one JSON line per release")
    for name, text, key in (
        ("promote", "a canary release to every device it targets (new sequence)", True),
        ("pause", "withdraw a release and keep it for resume", False),
        ("resume", "re-sign a paused release (new sequence)", True),
        ("withdraw", "withdraw a release for good (an empty retained message)", False),
        ("revert", "publish a registered older version as a new release (new sequence)", True),
    ):
        op = ops.add_parser(name, help=text)
        _common(op, key=key)
        if name == "revert":
            op.add_argument("--to", type=int, required=True, metavar="VERSION", help="the version to go back to")
    for op in ops.choices.values():
        op.add_argument("--model", default="intents", help="the model slot")
    p.set_defaults(func=_cmd_rollout)


def add_pin_commands(dev: Any) -> None:
    """``device pin|unpin`` (under ``cloud-train device``)."""
    pin = dev.add_parser("pin", help="hold one device on a registered version (a device release)")
    pin.add_argument("name", help="the device")
    pin.add_argument("ref", help="MODEL:VERSION from the registry")
    _common(pin, key=True, target=False)
    pin.set_defaults(func=_cmd_pin)
    unpin = dev.add_parser("unpin", help="withdraw a device's own release: it follows its group or fleet again")
    unpin.add_argument("name", help="the device")
    unpin.add_argument("--model", default="intents", help="the model slot")
    _common(unpin, key=False, target=False, wait=False)
    unpin.set_defaults(func=_cmd_unpin)
