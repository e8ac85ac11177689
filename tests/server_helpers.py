"""Start a real `glmkit serve` process on a free loopback port for a test module."""

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
    log = open(os.devnull, "w")
    # stderr to a file, not a pipe nobody reads while the server runs: a server that logs a lot
    # (a request line each) would fill a pipe and stall
    errors = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen([glmkit_bin(), "serve", "--port", str(port), *args], env=env,
                            stdout=log, stderr=errors, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    try:
        while True:
            if proc.poll() is not None:
                errors.seek(0)
                raise RuntimeError("server exited: " + errors.read())
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError("server did not start in time")
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
