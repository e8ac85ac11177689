"""The `glmkit serve` a benchmark runs against: started on loopback, used once /health answers.

    with serve(["--threads", "2", ...], port) as (url, proc):
        ...

The server is the installed command of this checkout's .venv.  Waiting ends when /health answers
200; a server that exits first, or does not answer within `timeout` seconds, ends the benchmark
with what went wrong instead of a run against nothing.  On leaving the block the server is
terminated (killed if it does not exit within 30 s)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
GLMKIT = ROOT / ".venv" / "bin" / "glmkit"


@contextmanager
def serve(args: list[str], port: int, timeout: float = 150, wrap: list[str] = ()) -> Iterator[tuple[str, subprocess.Popen]]:
    """Run `glmkit serve --port PORT ARGS...` (after `wrap`, e.g. taskset's pinning); yields (base
    URL, the server process)."""
    proc = subprocess.Popen([*wrap, str(GLMKIT), "serve", "--port", str(port), *args],
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_healthy(url, proc, timeout)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_until_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"glmkit serve exited with status {proc.returncode} before answering /health")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"glmkit serve did not answer {url}/health within {timeout:g} s")
        time.sleep(0.5)
