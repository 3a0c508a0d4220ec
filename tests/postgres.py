"""A throwaway PostgreSQL for the tests: initdb in a temporary folder (as an unprivileged user when
the tests run as root: initdb refuses root), started with pg_ctl on a free loopback port, one new
database per test, stopped by the postmaster's PID. Debian puts the programs in a versioned folder
under /usr/lib/postgresql; `install.sh --dev` installs them when they are missing."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

from agent.comfy.launch import free_port

USER = "gpugate"


def program(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    return versions[-1] if versions else None


class Cluster:
    """``fsync``: flush to disk as a production server does (benchmarks); tests run without. Commits
    are not waited for either way, like the SQLite store's WAL with synchronous=NORMAL: durable
    across a crash of the server process, not across a power cut."""

    def __init__(self, folder: Path, fsync: bool = False) -> None:
        self.folder, self.data, self.fsync = folder, folder / "data", fsync
        self.port = free_port("127.0.0.1")
        self.pid: int | None = None

    def _as_owner(self, command: list[str]) -> list[str]:
        return ["runuser", "-u", "nobody", "--", *command] if os.geteuid() == 0 else command

    def start(self) -> None:
        initdb, pg_ctl = program("initdb"), program("pg_ctl")
        assert initdb and pg_ctl, "the PostgreSQL tests need initdb and pg_ctl: install.sh --dev installs postgresql"
        self.folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.folder, "nobody", "nogroup")
        subprocess.run(self._as_owner([initdb, "-D", str(self.data), "-A", "trust", "-U", USER, "--no-sync", "-E", "UTF8"]),
                       check=True, capture_output=True, timeout=120)
        options = (f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync={'on' if self.fsync else 'off'} "
                   "-c synchronous_commit=off -c max_connections=300")
        subprocess.run(self._as_owner([pg_ctl, "-D", str(self.data), "-o", options, "-l", str(self.folder / "log"),
                                       "-w", "-t", "60", "start"]), check=True, capture_output=True, timeout=90)
        self.pid = int((self.data / "postmaster.pid").read_text().split()[0])

    def stop(self) -> None:
        """A fast shutdown by the postmaster's PID; killed if it takes more than 30 s."""
        if self.pid is None:
            return
        os.kill(self.pid, signal.SIGINT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            os.kill(self.pid, signal.SIGKILL)
        self.pid = None

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """The URL of a new, empty database."""
        import psycopg

        name = f"test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as db:
            db.execute(f"CREATE DATABASE {name}")
        return self.url(name)
