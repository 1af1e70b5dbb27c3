"""Where the database is.

Resolution order (the README documents it):

1. ``DATABASE_URL`` from the environment, if set: always wins.
2. For the test suite only: PostgreSQL on 127.0.0.1:5432 if something listens there
   (the CI machine's server, trust auth).
3. Otherwise an embedded PostgreSQL started with ``pgserver`` with its data under
   ``.data/postgres`` (git-ignored), so a fresh clone runs with nothing installed.

Same engine everywhere: there is no SQLite fallback.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from pathlib import Path
from urllib.parse import quote

BASE_DIR = Path(__file__).resolve().parent.parent
EMBEDDED_DATA_DIR = BASE_DIR / ".data" / "postgres"
EMBEDDED_DATABASE = "billing"
LOCAL_URL = "postgres://postgres@127.0.0.1:5432/billing"


def _listening(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _prepare_embedded() -> None:
    EMBEDDED_DATA_DIR.parent.mkdir(parents=True, exist_ok=True)
    # pgserver keeps its lock under the user's runtime directory; give it one of ours when
    # the environment has none (containers, CI) rather than a shared /tmp fallback.
    if not os.environ.get("XDG_RUNTIME_DIR"):
        runtime = EMBEDDED_DATA_DIR.parent / "run"
        runtime.mkdir(mode=0o700, exist_ok=True)
        os.environ["XDG_RUNTIME_DIR"] = str(runtime)
    logging.getLogger("pgserver").setLevel(logging.WARNING)  # it logs every start and stop at INFO


def embedded_database_url() -> str:
    """Start (or join) the embedded server and return a URL for our database on it.

    pgserver keeps one postmaster per data directory and reference-counts the
    processes using it, so the runserver reloader, a worker and a shell can share it.
    """
    _prepare_embedded()

    import pgserver  # imported lazily: only the zero-configuration path needs it

    server = pgserver.get_server(EMBEDDED_DATA_DIR, cleanup_mode="stop")
    exists = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{EMBEDDED_DATABASE}';")  # noqa: S608 (a constant)
    if "(1 row)" not in exists:
        server.psql(f"CREATE DATABASE {EMBEDDED_DATABASE};")
    # pgserver listens on a Unix socket only; libpq takes the socket directory as the
    # host, which a URL carries percent-encoded.
    socket_dir = quote(str(server.pgdata), safe="")
    return f"postgres://postgres@{socket_dir}/{EMBEDDED_DATABASE}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def embedded_stop() -> str:
    """Stop the embedded server unless a live process still uses it; what ``make demo`` runs
    when it ends, however it ends.

    pgserver stops the server when the last process that joined it exits, but a process
    killed on its way out never leaves pgserver's list (Ctrl-C on runserver: the reloader
    kills its child if it takes more than 0.25 s to exit), and the server then runs on with
    nobody left to stop it. Dead processes are dropped from the list here first."""
    if os.environ.get("DATABASE_URL", "").strip():
        return "DATABASE_URL is set: no embedded PostgreSQL to stop"
    postmaster_pid = EMBEDDED_DATA_DIR / "postmaster.pid"
    if not postmaster_pid.exists():
        return "embedded PostgreSQL: not running"
    users_file = EMBEDDED_DATA_DIR / ".handle_pids.json"
    users = json.loads(users_file.read_text()) if users_file.exists() else []
    alive = [pid for pid in users if pid != os.getpid() and _alive(pid)]
    if alive != users:
        users_file.write_text(json.dumps(alive))
    if alive:
        return f"embedded PostgreSQL: left running, still used by processes {alive}"
    server_pid = int(postmaster_pid.read_text().split()[0])
    if not _alive(server_pid):
        return "embedded PostgreSQL: not running"
    _prepare_embedded()
    import pgserver

    # Joining as the only user and leaving again makes pgserver stop it (as the right OS user).
    pgserver.get_server(EMBEDDED_DATA_DIR, cleanup_mode="stop").cleanup()
    if postmaster_pid.exists():
        return f"embedded PostgreSQL: could not stop it (pid {server_pid}), see {EMBEDDED_DATA_DIR / 'log'}"
    return "embedded PostgreSQL: stopped"


def database_url(*, prefer_local_server: bool = False) -> str:
    url = os.environ.get("DATABASE_URL", "").strip()
    if url:
        return url
    if prefer_local_server and _listening("127.0.0.1", 5432):
        return LOCAL_URL
    return embedded_database_url()


if __name__ == "__main__":
    # python billing_site/database.py stop: as a script, not ``-m``, since importing the
    # billing_site package loads the settings, which start the embedded server.
    if sys.argv[1:] != ["stop"]:
        sys.exit("usage: python billing_site/database.py stop")
    print(embedded_stop())
