"""`glmkit serve --ray`: the engine as Ray Serve replicas, the gateway routing to them.

A real local Ray cluster (`ray start --head` in a temporary directory, its process group killed
at the end), a gateway `glmkit serve --ray --replicas 2 --ray-address ...` joining it as a real
process on loopback, 2 replicas of the tiny fixture model.  Which replica answered is observable
on the gateway's /metrics (glmkit_replica_*_total, labelled with Serve's replica id and its pid);
this process joins the cluster too, to ask the replicas themselves (their schedulers' counts)."""

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import TINY_32K, glmkit_bin
from server_helpers import free_port, running_server

pytestmark = pytest.mark.ray
HAVE_RAY = importlib.util.find_spec("ray") is not None
SRC = str(Path(__file__).resolve().parent.parent / "src")
COMMON = ("--no-console", "--no-embeddings", "--max-tokens", "30000", "--max-batch", "8")
HI = [{"role": "user", "content": "你好，介绍一下你自己"}]


def ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def cluster():
    """The head's address; the cluster's processes (and the replicas) end with the module."""
    if not HAVE_RAY:
        pytest.skip("Ray Serve is not installed (pip install 'glmkit[cluster]')")
    # a short path: Ray's unix sockets live under it
    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    port = free_port()
    # loopback only, so no token authentication (a real cluster keeps it: README)
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", GLMKIT_NO_COMPILE="1", RAY_AUTH_MODE="disabled",
               # the replicas import this checkout's glmkit, as the test process does
               PYTHONPATH=os.pathsep.join(filter(None, (SRC, os.environ.get("PYTHONPATH")))))
    head = subprocess.Popen([ray_bin(), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                             f"--temp-dir={tmp}", "--include-dashboard=false", "--disable-usage-stats"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        yield address, env
    finally:
        try:
            os.killpg(head.pid, signal.SIGKILL)        # the head's session: raylet, GCS and the workers
        except ProcessLookupError:
            pass
        head.wait()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def gateway(cluster):
    address, env = cluster
    t = time.time()
    with running_server("--ray", "--replicas", "2", "--ray-address", address, "--model", str(TINY_32K),
                        "--ray-chunk-ms", "20", *COMMON, env=env, timeout=240) as (url, proc):
        print(f"cluster and gateway up in {time.time() - t:.1f} s", file=sys.stderr)
        yield url, proc


@pytest.fixture(scope="module")
def replicas(cluster, gateway):
    """Ask the replicas themselves, from this process joined to the cluster: f() -> {replica: stats}
    of every replica that answered one of 24 calls (the router spreads them over all)."""
    import ray
    from ray import serve
    ray.init(address=cluster[0], logging_level="ERROR", log_to_driver=False)
    handle = serve.get_deployment_handle("glmkit-engine", app_name="glmkit-engine")

    def stats():
        answers = [handle.stats.remote() for _ in range(24)]
        return {s["replica"]: s for s in (a.result(timeout_s=30) for a in answers)}
    yield stats
    ray.shutdown()


def counts(url) -> dict[str, tuple[int, int]]:
    """{replica: (requests, tokens)} from the gateway's /metrics."""
    text = httpx.get(url + "/metrics", timeout=10).text
    out = {}
    for kind in ("requests", "tokens"):
        for name, n in re.findall(rf'^glmkit_replica_{kind}_total{{replica="([^"]+)"}} (\d+)$', text, re.M):
            out.setdefault(name, [0, 0])[kind == "tokens"] = int(n)
    return {k: tuple(v) for k, v in out.items()}


def pid_of(replica: str) -> int:
    return int(replica.rsplit(" pid ", 1)[1])


def chat(url, max_tokens=24, stream=False, **extra):
    body = {"messages": HI, "max_tokens": max_tokens, "temperature": 0.8, **extra}
    if not stream:
        return httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
    out = []
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.append(line[6:])
    return out


def concurrently(n, fn):
    results = [None] * n

    def run(i):
        try:
            results[i] = fn(i)
        except Exception as e:       # noqa: BLE001 - the test looks at each
            results[i] = e
    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    return results


def test_both_replicas_answer_concurrent_requests(gateway):
    url, _ = gateway
    before = counts(url)
    replies = concurrently(8, lambda i: chat(url, max_tokens=40, seed=i))
    assert all(r.status_code == 200 for r in replies), [getattr(r, "text", r) for r in replies]
    assert all(r.json()["choices"][0]["finish_reason"] in ("stop", "length") for r in replies)
    after = counts(url)
    grew = {k: (v[0] - before.get(k, (0, 0))[0], v[1] - before.get(k, (0, 0))[1]) for k, v in after.items()}
    served = {k: v for k, v in grew.items() if v[0] > 0}
    assert len(served) == 2, after                        # two replicas, two processes
    assert len({pid_of(k) for k in served}) == 2
    assert sum(v[0] for v in served.values()) == 8
    assert sum(v[1] for v in served.values()) == sum(r.json()["usage"]["completion_tokens"] for r in replies)
    assert all(v[1] > 0 for v in served.values())


def test_streamed_chat_and_seeded_replies_agree(gateway):
    """A seeded reply is the same whichever replica makes it; streamed as whole."""
    url, _ = gateway
    texts = {chat(url, max_tokens=16, seed=5).json()["choices"][0]["message"]["content"] for _ in range(4)}
    assert len(texts) == 1 and texts.pop()
    events = chat(url, max_tokens=16, seed=5, stream=True)
    assert events[-1] == "[DONE]"
    streamed = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    assert streamed == chat(url, max_tokens=16, seed=5).json()["choices"][0]["message"]["content"]


def test_cancel_reaches_the_replica(gateway, replicas):
    url, _ = gateway
    before = {}
    for _ in range(10):        # the router may send a round of quick calls all to one replica
        before.update(replicas())
        if len(before) == 2:
            break
    cancelled = sum(s["cancelled"] for s in before.values())
    body = {"messages": HI, "max_tokens": 29000, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(4):
            next(lines)
    deadline = time.time() + 20

    def settled(stats):
        return len(stats) == 2 and sum(s["running"] for s in stats.values()) == 0 and \
            sum(s["cancelled"] for s in stats.values()) == cancelled + 1
    while not settled(stats := replicas()) and time.time() < deadline:
        time.sleep(0.3)
    assert settled(stats), (cancelled, stats)


def test_killed_replica_is_replaced(gateway, replicas):
    """A replica killed while streams run: its streams end with an error event naming the engine,
    the other replica's finish; requests sent after the kill (not streaming yet) all succeed; Ray
    starts a replacement, which then answers."""
    url, proc = gateway
    old = set()
    for _ in range(10):        # the router may send a round of quick calls all to one replica
        old |= set(replicas())
        if len(old) == 2:
            break
    assert len(old) == 2
    victim = sorted(old)[0]
    started = threading.Barrier(9)

    def long_stream(i):
        body = {"messages": HI, "max_tokens": 3000, "temperature": 0.8, "seed": i, "stream": True}
        got = []
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    got.append(line[6:])
                    if len(got) == 3:
                        started.wait(timeout=60)
        return got

    results = [None] * 8
    streams = [threading.Thread(target=lambda i=i: results.__setitem__(i, long_stream(i))) for i in range(8)]
    for t in streams:
        t.start()
    started.wait(timeout=60)              # every stream has its first tokens
    before = counts(url)
    assert before[victim][0] > 0
    os.kill(pid_of(victim), signal.SIGKILL)
    t = time.time()
    after_kill = concurrently(8, lambda i: chat(url, max_tokens=20, seed=100 + i))
    for s in streams:
        s.join(timeout=180)
    assert all(not isinstance(r, Exception) and r.status_code == 200 for r in after_kill), \
        [getattr(r, "text", r) for r in after_kill]
    print(f"8 requests after the kill answered in {time.time() - t:.1f} s", file=sys.stderr)
    failed = [g for g in results if "error" in json.loads(g[-2])]
    finished = [g for g in results if "error" not in json.loads(g[-2])]
    assert failed and finished and all(g[-1] == "[DONE]" for g in results)
    for g in failed:
        err = json.loads(g[-2])["error"]
        assert err["code"] == "engine_unavailable" and "ray:glmkit-engine" in err["message"]
    # a replacement comes up (a new pid) and answers; the killed one answers nothing more
    deadline = time.time() + 90
    while time.time() < deadline:
        now = set(replicas())
        if len(now) == 2 and victim not in now:
            break
        time.sleep(1)
    assert len(now) == 2 and victim not in now and len(now - old) == 1, (old, now)
    [new] = now - old
    while new not in counts(url) and time.time() < deadline:
        concurrently(4, lambda i: chat(url, max_tokens=8, seed=i))
    assert counts(url)[new][0] > 0
    assert counts(url)[victim][0] == before[victim][0]     # nothing went to the dead replica
    assert proc.poll() is None and httpx.get(url + "/health", timeout=5).status_code == 200


def test_ray_options_are_checked_before_anything_loads(tmp_path):
    for args, message in ((["--replicas", "2"], "--replicas and --ray-address go with --ray"),
                          (["--ray", "--engine", "http://127.0.0.1:1"], "leave out --models and --engine")):
        p = subprocess.run([glmkit_bin(), "serve", "--model", str(TINY_32K), "--port", str(free_port()), *args],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode != 0 and message in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_without_ray_one_clear_error(tmp_path):
    """Ray is an optional extra: without it, --ray is one line saying what to install."""
    fake = tmp_path / "ray"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (str(tmp_path), SRC, os.environ.get("PYTHONPATH")))))
    p = subprocess.run([glmkit_bin(), "serve", "--ray", "--model", str(TINY_32K), "--port", str(free_port())],
                       capture_output=True, text=True, timeout=60, env=env)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
    assert "pip install 'glmkit[cluster]'" in lines[-1], p.stderr
