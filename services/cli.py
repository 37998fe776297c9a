"""The ``tessera`` command: up, worker, beat, db, keys, verticals, listen, train, simulate,
restore-state, recorder, bench.

``tessera up`` is the embedded default in one command: it applies migrations, then starts the
gateway API (every registered vertical), one Celery worker (with the job sweeper's beat) and every
enabled listener a vertical declares, and stops them all cleanly on Ctrl-C / SIGTERM. Verticals and
what they offer come from their declarations (:mod:`shared.verticals`), never from a list here.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shared.config import get_settings
from shared.processes import end_with_parent, with_allocator_env
from shared.queue import QUEUES
from shared.verticals import COMMANDS, Vertical, api_key_scopes, get_vertical, verticals

REPO_ROOT = Path(__file__).resolve().parents[1]
STOP_GRACE_S = 20.0


def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


def gateway_command(host: str, port: int, workers: int) -> list[str]:
    """argv of the API server process."""
    return _python("-m", "uvicorn", "services.gateway:app", "--host", host, "--port", str(port),
                   "--workers", str(workers), "--loop", "uvloop", "--http", "httptools",
                   "--no-access-log", "--timeout-graceful-shutdown", "10")


def worker_command(queues: Sequence[str], concurrency: int, beat: bool,
                   hostname: str | None = None) -> list[str]:
    """argv of a Celery worker on ``queues`` (``beat`` embeds the scheduler: one per deployment)."""
    argv = _python("-m", "celery", "-A", "shared.queue:celery_app", "worker", "-Q", ",".join(queues),
                   "--concurrency", str(concurrency), "--loglevel", "INFO", "--without-gossip",
                   "--without-mingle")
    if beat:
        argv += ["-B", "--schedule", str(get_settings().data_dir / "celerybeat-schedule")]
    if hostname:
        argv += ["--hostname", hostname]
    return argv


def listener_commands() -> list[tuple[str, list[str]]]:
    """(name, argv) of every enabled listener of every vertical, as ``tessera up`` starts them."""
    return [(f"{vertical.name}:{listener.name}", _python("-m", "services.cli", "listen", vertical.name, listener.name))
            for vertical in verticals() for listener in vertical.listeners if listener.enabled()]


def db_upgrade(revision: str = "head") -> None:
    """Apply migrations up to ``revision``."""
    from alembic import command

    command.upgrade(_alembic_config(), revision)


def _display_url(url: str) -> str:
    """A database URL without its password, for printing."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _alembic_config():  # type: ignore[no-untyped-def]
    from alembic.config import Config

    config = Config(str(REPO_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(REPO_ROOT / "migrations"))
    return config


def cmd_up(args: argparse.Namespace) -> int:
    """Migrate, then run API + worker + listeners until interrupted."""
    settings = get_settings()
    print(f"tessera up: migrating the database ({_display_url(settings.sqlalchemy_url)})", flush=True)
    db_upgrade()
    print("tessera up: database schema is current", flush=True)
    processes: list[tuple[str, subprocess.Popen[bytes]]] = []
    commands = [("api", gateway_command(args.host or settings.host, args.port or settings.port,
                                        args.workers or settings.workers))]
    if not args.no_worker:
        commands.append(("worker", worker_command(QUEUES, args.concurrency, beat=True)))
    commands.extend(listener_commands())
    stop = _StopRequest.on(STOP_SIGNALS)  # before the first child: no signal may leave one behind
    for name, argv in commands:
        _say(f"starting {name}: {' '.join(argv[1:])}")
        processes.append((name, subprocess.Popen(argv, cwd=REPO_ROOT, start_new_session=True,
                                                 env=with_allocator_env(os.environ),
                                                 preexec_fn=_ended_with_parent(os.getpid()))))
    return _supervise(processes, stop)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
"""Each ends `tessera up` and, first, every process it started (SIGHUP: the terminal was closed)."""


class _StopRequest:
    """Set by the first stop signal; the supervisor loop looks at it."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    @classmethod
    def on(cls, signals: Sequence[signal.Signals]) -> _StopRequest:
        request = cls()
        for signum in signals:
            signal.signal(signum, request._record)
        return request

    def _record(self, signum: int, _frame: object) -> None:
        self.signal_name = self.signal_name or signal.Signals(signum).name


def _ended_with_parent(parent_pid: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes Linux send the child SIGTERM when `tessera up` dies, however it
    dies (SIGKILL, a crash): no server outlives its supervisor. None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    return functools.partial(end_with_parent, parent_pid, signal.SIGTERM)


def _say(message: str) -> None:
    """A status line; after SIGHUP the terminal may be gone, which must not stop the shutdown."""
    with contextlib.suppress(OSError):
        print(f"tessera up: {message}", flush=True)


def _supervise(processes: list[tuple[str, subprocess.Popen[bytes]]], stop: _StopRequest) -> int:
    exit_code = 0
    while stop.signal_name is None and exit_code == 0:
        for name, process in processes:
            if process.poll() is not None:
                _say(f"{name} exited with {process.returncode}; stopping the rest")
                exit_code = process.returncode or 1
                break
        else:
            time.sleep(0.2)
    if stop.signal_name is not None:
        _say(f"{stop.signal_name} received; stopping")
    _stop_all(processes)
    return exit_code


def _stop_all(processes: list[tuple[str, subprocess.Popen[bytes]]]) -> None:
    for _name, process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # the leader stops its own children gracefully
    deadline = time.monotonic() + STOP_GRACE_S
    for name, process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _say(f"{name} did not stop in {STOP_GRACE_S:.0f}s; killing it")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    _say("all stopped")


def cmd_worker(args: argparse.Namespace) -> int:
    """Run one Celery worker in the foreground."""
    queues = args.queues.split(",") if args.queues else list(QUEUES)
    os.execv(sys.executable, worker_command(queues, args.concurrency, args.beat, args.hostname))
    return 0  # pragma: no cover - execv does not return


def cmd_beat(_args: argparse.Namespace) -> int:
    """Run the Celery beat scheduler alone (one per deployment, when workers run without -B)."""
    argv = _python("-m", "celery", "-A", "shared.queue:celery_app", "beat", "--loglevel", "INFO",
                   "--schedule", str(get_settings().data_dir / "celerybeat-schedule"))
    os.execv(sys.executable, argv)
    return 0  # pragma: no cover


def cmd_db(args: argparse.Namespace) -> int:
    """Migrations: upgrade, downgrade, current."""
    from alembic import command

    config = _alembic_config()
    if args.action == "upgrade":
        command.upgrade(config, args.revision or "head")
    elif args.action == "downgrade":
        command.downgrade(config, args.revision or "-1")
    else:
        command.current(config, verbose=True)
    return 0


def cmd_keys_create(args: argparse.Namespace) -> int:
    """Create an API key; print it once, with the tenant's webhook signing secret, as export lines."""
    from shared.db import session_scope
    from shared.security import create_api_key, ensure_tenant

    try:
        with session_scope() as session:
            plaintext = create_api_key(session, tenant_id=args.tenant, name=args.name, scopes=args.scope)
            secret = ensure_tenant(session, args.tenant).webhook_secret
    except ValueError as exc:
        print(f"tessera keys create: {exc}", file=sys.stderr)
        return 2
    print(f"# API key {_key_id(plaintext)} of tenant {args.tenant} ({','.join(sorted(set(args.scope)))}) and the "
          "tenant's webhook signing secret.\n# Shown once: store both now. Paste into a shell to use them:")
    print(_export_lines(API_KEY=plaintext, WEBHOOK_SECRET=secret))
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    """List API keys (never the key or its hash): id, tenant, name, scopes, created, revoked."""
    from shared.db import session_scope
    from shared.security import list_api_keys

    with session_scope() as session:
        rows = [{"id": key.id, "tenant": key.tenant_id, "name": key.name, "scopes": key.scopes,
                 "created": _iso(key.created_at), "revoked": _iso(key.revoked_at) if key.revoked_at else None}
                for key in list_api_keys(session, args.tenant)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    columns = ("id", "tenant", "name", "scopes", "created", "revoked")
    table = [columns, *((*(str(row[c]) for c in columns[:-1]), row["revoked"] or "-") for row in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    """Revoke a key: every API process refuses it within a second."""
    from shared.db import session_scope
    from shared.security import API_KEY_MAX_AGE_S, revoke_api_key

    with session_scope() as session:
        key = revoke_api_key(session, args.key_id)
        revoked_at = key.revoked_at if key is not None else None
    if revoked_at is None:
        print(f"tessera keys revoke: no API key {args.key_id!r} (see `tessera keys list`)", file=sys.stderr)
        return 1
    print(f"revoked {args.key_id} at {_iso(revoked_at)}; refused by every API process within "
          f"{API_KEY_MAX_AGE_S:g} s")
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    """Replace a key by a new one with the same tenant and scopes; the old one is revoked after the grace."""
    from shared.db import session_scope
    from shared.security import rotate_api_key

    try:
        with session_scope() as session:
            old, plaintext = rotate_api_key(session, args.key_id, grace_s=args.grace_seconds)
            tenant_id, scopes, revoked_at = old.tenant_id, old.scopes, old.revoked_at
    except LookupError as exc:
        print(f"tessera keys rotate: {exc} (see `tessera keys list`)", file=sys.stderr)
        return 1
    assert revoked_at is not None
    print(f"# API key {_key_id(plaintext)} of tenant {tenant_id} ({scopes}) replaces {args.key_id}, which is "
          f"revoked at {_iso(revoked_at)}.\n# Shown once: store it now. Paste into a shell to use it:")
    print(_export_lines(API_KEY=plaintext))
    return 0


def _key_id(plaintext: str) -> str:
    return plaintext.split("_", 2)[1]


def _export_lines(**values: str) -> str:
    return "\n".join(f"export {name}={shlex.quote(value)}" for name, value in values.items())


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def cmd_vertical_command(args: argparse.Namespace) -> int:
    """``tessera <verb> <vertical> [args...]``: the vertical's declared ``main(argv)`` for the verb."""
    vertical = get_vertical(args.vertical)
    reference = vertical.commands.get(args.command)
    if reference is None:
        offering = sorted(v.name for v in verticals() if args.command in v.commands) or ["none yet"]
        print(f"tessera {args.command}: the {vertical.name} vertical does not offer it (offered by: "
              f"{', '.join(offering)})", file=sys.stderr)
        return 2
    return int(vertical.resolve(reference)(args.rest) or 0)


def cmd_listen(args: argparse.Namespace) -> int:
    """Run one of a vertical's listeners in the foreground until SIGTERM/SIGINT (as `tessera up` does)."""
    from shared.listeners import run_listener
    from shared.observability import configure_logging

    configure_logging()
    vertical = get_vertical(args.vertical)
    try:
        listener = vertical.listener(args.listener)
    except LookupError as exc:
        print(f"tessera listen: {exc}", file=sys.stderr)
        return 2
    return run_listener(f"{vertical.name}:{listener.name}", vertical.resolve(listener.target))


def cmd_verticals(args: argparse.Namespace) -> int:
    """List the registered verticals and what each declares."""
    rows = [_vertical_summary(vertical) for vertical in verticals()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        print(f"{row['name']:<8} {row['prefix']:<9} {row['title']}  ({row['package']})")
        for key in ("queues", "commands", "listeners", "benchmarks"):
            print(f"{'':8} {key + ':':<11} {', '.join(row[key]) or '-'}")
    return 0


def _vertical_summary(vertical: Vertical) -> dict[str, Any]:
    return {"name": vertical.name, "prefix": vertical.prefix, "title": vertical.title, "package": vertical.package,
            "queues": list(vertical.queue_names), "commands": sorted(vertical.commands),
            "listeners": [f"{listener.name}{'' if listener.enabled() else ' (off)'}"
                          for listener in vertical.listeners],
            "benchmarks": list(vertical.benchmarks)}


def cmd_bench(args: argparse.Namespace) -> int:
    """Run ``bench/<name>.py`` with the remaining arguments; without a name, list them by vertical."""
    script = REPO_ROOT / "bench" / f"{args.name}.py" if args.name else None
    if script is None or not script.exists():
        declared = {name: v.name for v in verticals() for name in v.benchmarks}
        available = sorted(p.stem for p in (REPO_ROOT / "bench").glob("*.py") if not p.stem.startswith("_"))
        listing = ", ".join(f"{name} ({declared.get(name, 'platform')})" for name in available)
        if args.name:
            print(f"tessera: no benchmark '{args.name}'", file=sys.stderr)
        print(f"benchmarks: {listing}", file=sys.stderr if args.name else sys.stdout)
        return 2 if args.name else 0
    return subprocess.call(_python(str(script), *args.rest), cwd=REPO_ROOT)


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 <= value < 10 * 365 * 86400:
        raise argparse.ArgumentTypeError(f"{text} is not a number of seconds >= 0")
    return value


COMMAND_HELP = {"train": "train a model", "simulate": "simulate data",
                "restore-state": "rebuild Redis fast state from the database",
                "recorder": "drain write-behind streams into the database (own process)",
                "edge": "run an edge gateway (local MQTT in, on-device scores upstream)"}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``tessera`` command."""
    parser = argparse.ArgumentParser(prog="tessera", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="migrate and run API + worker + listeners (Ctrl-C stops all)")
    up.add_argument("--host")
    up.add_argument("--port", type=int)
    up.add_argument("--workers", type=int, help="API processes")
    up.add_argument("--concurrency", type=int, default=1, help="Celery pool processes")
    up.add_argument("--no-worker", action="store_true", help="API only")
    up.set_defaults(handler=cmd_up)

    worker = sub.add_parser("worker", help="run a Celery worker")
    worker.add_argument("--queues", help=f"comma-separated, default all: {','.join(QUEUES)}")
    worker.add_argument("--concurrency", type=int, default=1)
    worker.add_argument("--beat", action="store_true", help="embed the scheduler (one per deployment)")
    worker.add_argument("--hostname")
    worker.set_defaults(handler=cmd_worker)

    sub.add_parser("beat", help="run the scheduler alone").set_defaults(handler=cmd_beat)

    db = sub.add_parser("db", help="database migrations")
    db.add_argument("action", choices=["upgrade", "downgrade", "current"])
    db.add_argument("revision", nargs="?")
    db.set_defaults(handler=cmd_db)

    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="keys_command", required=True)
    create = keys.add_parser("create", help="create an API key for a tenant")
    create.add_argument("--tenant", required=True)
    create.add_argument("--name", default="default")
    create.add_argument("--scope", action="append", required=True, choices=api_key_scopes())
    create.set_defaults(handler=cmd_keys_create)
    listing = keys.add_parser("list", help="list API keys (never the key itself)")
    listing.add_argument("--tenant", help="only this tenant's keys")
    listing.add_argument("--json", action="store_true", help="a JSON array instead of a table")
    listing.set_defaults(handler=cmd_keys_list)
    revoke = keys.add_parser("revoke", help="revoke an API key (refused everywhere within a second)")
    revoke.add_argument("key_id", help="the id shown by `keys list` (tsk_<id>_...)")
    revoke.set_defaults(handler=cmd_keys_revoke)
    rotate = keys.add_parser("rotate", help="a new key with the same tenant and scopes; the old one revoked")
    rotate.add_argument("key_id")
    rotate.add_argument("--grace-seconds", type=_seconds, default=0.0,
                        help="keep the old key working this long (default: revoke it now)")
    rotate.set_defaults(handler=cmd_keys_rotate)

    listing = sub.add_parser("verticals", help="list the registered verticals and what each declares")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=cmd_verticals)

    listen = sub.add_parser("listen", help="run a vertical's listener (non-HTTP server) in the foreground")
    listen.add_argument("vertical", choices=[v.name for v in verticals()])
    listen.add_argument("listener")
    listen.set_defaults(handler=cmd_listen)

    for verb in COMMANDS:
        cmd = sub.add_parser(verb, help=f"{COMMAND_HELP[verb]} for a vertical")
        cmd.add_argument("vertical", choices=[v.name for v in verticals()])
        cmd.add_argument("rest", nargs=argparse.REMAINDER)
        cmd.set_defaults(handler=cmd_vertical_command)

    bench = sub.add_parser("bench", help="run a benchmark from bench/ (no name: list them)")
    bench.add_argument("name", nargs="?")
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(handler=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tessera`` console script."""
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
