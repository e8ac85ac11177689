"""Start a real `glmkit serve` process on a free loopback port for a test module (running_server),
or any other server process that answers GET /health (running_process)."""

import os
import socket
import subprocess
import tempfile
import time
import urllib.request
from contextlib import contextmanager

from conftest import glmkit_bin


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(*args, env=None, timeout=180):
    port = free_port()
    env = dict(env or os.environ)
    env.pop("MODEL_PATH", None)
    env["PYTHONUNBUFFERED"] = "1"
    with running_process([glmkit_bin(), "serve", "--port", str(port), *args], port, env=env,
                         timeout=timeout) as served:
        yield served


@contextmanager
def running_process(argv, port: int, name="server", env=None, timeout=180, merge_stdout=False):
    """Start `argv`, a server listening on loopback `port`, wait until its GET /health answers 200,
    and yield (its URL, the process); it is stopped on leaving.  Its stderr (and its stdout with
    `merge_stdout`; else stdout is dropped) is kept for the error when it exits before that."""
    log = open(os.devnull, "w")
    # stderr to a file, not a pipe nobody reads while the server runs: a server that logs a lot
    # (a request line each) would fill a pipe and stall
    errors = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(argv, env=env, stdout=errors if merge_stdout else log,
                            stderr=subprocess.STDOUT if merge_stdout else errors, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    try:
        while True:
            if proc.poll() is not None:
                errors.seek(0)
                raise RuntimeError(f"{name} exited: " + errors.read())
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"{name} did not start in time")
            time.sleep(0.3)
        yield base, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        errors.close()
