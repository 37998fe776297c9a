"""The ``tessera`` command: up, worker, beat, db, keys, train, simulate, restore-state, recorder, bench.

``tessera up`` is the embedded default in one command: it applies migrations, then starts the
gateway API (all four verticals), one Celery worker (with the job sweeper's beat) and any listener
a vertical declares, and stops them all cleanly on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib
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

from shared.config import VERTICALS, get_settings
from shared.queue import QUEUES

REPO_ROOT = Path(__file__).resolve().parents[1]
VERTICAL_PACKAGES = {"fraud": "fraud", "cs": "customer_service", "nodule": "nodule", "iiot": "iiot"}
LISTENERS: tuple[tuple[str, list[str]], ...] = ()
"""Extra long-running processes a vertical adds to ``tessera up`` (name, argv), e.g. a DICOM SCP."""
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
    commands.extend(LISTENERS)
    stop = _StopRequest.on(STOP_SIGNALS)  # before the first child: no signal may leave one behind
    for name, argv in commands:
        _say(f"starting {name}: {' '.join(argv[1:])}")
        processes.append((name, subprocess.Popen(argv, cwd=REPO_ROOT, start_new_session=True,
                                                 preexec_fn=_ended_with_parent(os.getpid()))))
    return _supervise(processes, stop)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
"""Each ends `tessera up` and, first, every process it started (SIGHUP: the terminal was closed)."""
PR_SET_PDEATHSIG = 1


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
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork, not in the child

    def arrange() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return arrange


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


def _vertical_entry(vertical: str, module: str, argv: list[str]) -> int:
    package = VERTICAL_PACKAGES[vertical]
    try:
        target = importlib.import_module(f"services.{package}.{module}")
    except ModuleNotFoundError as exc:
        if exc.name != f"services.{package}.{module}":
            raise
        print(f"tessera: the {vertical} vertical has no {module} yet", file=sys.stderr)
        return 2
    main = getattr(target, "main", None)
    if main is None:
        print(f"tessera: services.{package}.{module} has no main(argv)", file=sys.stderr)
        return 2
    return int(main(argv) or 0)


def cmd_train(args: argparse.Namespace) -> int:
    """Train a vertical's model artifact (``services/<vertical>/training.py:main``)."""
    return _vertical_entry(args.vertical, "training", args.rest)


def cmd_simulate(args: argparse.Namespace) -> int:
    """Run a vertical's data simulator (``services/<vertical>/simulate.py:main``)."""
    return _vertical_entry(args.vertical, "simulate", args.rest)


def cmd_restore_state(args: argparse.Namespace) -> int:
    """Rebuild a vertical's Redis fast state from its database (``services/<vertical>/restore.py:main``)."""
    return _vertical_entry(args.vertical, "restore", args.rest)


def cmd_recorder(args: argparse.Namespace) -> int:
    """Run a vertical's write-behind recorder alone (``services/<vertical>/recorder.py:main``)."""
    return _vertical_entry(args.vertical, "recorder", args.rest)


def cmd_bench(args: argparse.Namespace) -> int:
    """Run ``bench/<name>.py`` with the remaining arguments."""
    script = REPO_ROOT / "bench" / f"{args.name}.py"
    if not script.exists():
        available = sorted(p.stem for p in (REPO_ROOT / "bench").glob("*.py") if not p.stem.startswith("_"))
        print(f"tessera: no benchmark '{args.name}'; available: {', '.join(available)}", file=sys.stderr)
        return 2
    return subprocess.call(_python(str(script), *args.rest), cwd=REPO_ROOT)


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 <= value < 10 * 365 * 86400:
        raise argparse.ArgumentTypeError(f"{text} is not a number of seconds >= 0")
    return value


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
    create.add_argument("--scope", action="append", required=True, choices=[*VERTICALS, "admin"])
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

    entry_points = (("train", cmd_train, "train a model"), ("simulate", cmd_simulate, "simulate data"),
                    ("restore-state", cmd_restore_state, "rebuild Redis fast state from the database"),
                    ("recorder", cmd_recorder, "drain write-behind streams into the database (own process)"))
    for name, handler, what in entry_points:
        cmd = sub.add_parser(name, help=f"{what} for a vertical")
        cmd.add_argument("vertical", choices=list(VERTICAL_PACKAGES))
        cmd.add_argument("rest", nargs=argparse.REMAINDER)
        cmd.set_defaults(handler=handler)

    bench = sub.add_parser("bench", help="run a benchmark from bench/")
    bench.add_argument("name")
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(handler=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tessera`` console script."""
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
