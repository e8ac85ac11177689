"""A throwaway PostgreSQL server for the tests, from Debian's package (apt-get install postgresql).

Started once per run (conftest's `postgres` fixture) in a temporary directory, on a free loopback
port with its unix socket beside its data, trusting every local connection, and without fsync (its
data dies with the run); each test gets a database of its own from `new_database()`.  PostgreSQL
refuses to run as root, so under root it runs as the package's `postgres` user."""

import glob
import importlib.util
import os
import pwd
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

from server_helpers import free_port

INSTALL = "apt-get install postgresql"


def binaries() -> Path | None:
    """The newest installed PostgreSQL's bin directory (Debian keeps them off PATH)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


class PostgresServer:
    def __init__(self, port: int):
        self.port = port
        self.databases = 0

    def url(self, database: str = "postgres", user: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """The URL of a new, empty database."""
        import psycopg
        self.databases += 1
        name = f"t{self.databases}"
        with psycopg.connect(self.url(), autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {name}")
        return self.url(name)


@contextmanager
def postgres_server():
    """Yields a running PostgresServer, or the reason there can be none (a str) for pytest.skip."""
    bindir = binaries()
    if bindir is None:
        yield f"postgresql not installed: {INSTALL}"
        return
    if importlib.util.find_spec("psycopg") is None:
        yield "psycopg not installed: pip install 'psycopg[binary]'"
        return
    run_as: list[str] = []
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            yield f"running as root and there is no `postgres` user to run PostgreSQL as: {INSTALL}"
            return
        run_as = ["runuser", "-u", "postgres", "--"]
    top = Path(tempfile.mkdtemp(prefix="glmkit-pg-"))
    if run_as:
        os.chown(top, user.pw_uid, user.pw_gid)
    data, port = top / "data", free_port()
    pg_ctl = [*run_as, str(bindir / "pg_ctl"), "-D", str(data)]
    try:
        subprocess.run([*run_as, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                        "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"],
                       check=True, capture_output=True, timeout=120)
        options = (f"-p {port} -k {top} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off")
        subprocess.run([*pg_ctl, "-l", str(top / "log"), "-w", "-t", "60", "-o", options, "start"],
                       check=True, capture_output=True, timeout=90)
    except subprocess.CalledProcessError as e:
        log = (top / "log").read_text(errors="replace") if (top / "log").exists() else ""
        shutil.rmtree(top, ignore_errors=True)
        raise RuntimeError(f"PostgreSQL did not start: {e.stderr.decode(errors='replace')}{log}") from None
    try:
        yield PostgresServer(port)
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(top, ignore_errors=True)
