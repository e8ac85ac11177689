"""The interpreter's sandbox against hostile cells, with real kernels under bubblewrap (no mocks).

Each test is a regression test for one defect of the security review (D1: host environment and
paths readable in /proc; D2: the reply pipe reachable from cells; D9: limits per process, not per
sandbox; D13: hardening) and failed before its fix."""

import ast
import os
import resource
import subprocess
import time

import pytest

from glmkit.sandbox import Interpreter, Limits, sandbox_available

REASON = sandbox_available()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"no sandbox here: {REASON}")
MB = 1024 * 1024


@pytest.fixture
def sandbox(tmp_path):
    """sandbox(**limits): a started kernel with those Limits, closed after the test."""
    made = []

    def make(**limits):
        made.append(Interpreter(tmp_path / "ws", Limits(**{"wall_seconds": 15, **limits})))
        made[-1].start()
        return made[-1]
    yield make
    for it in made:
        it.close(final=True)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="limits for the whole sandbox need cgroups (root)")


def write_everywhere(payload: str, then: str = "") -> str:
    """Cell code writing `payload` (an expression, evaluated in the sandbox) to every descriptor the
    cell can name: the reply_fd in argv (where the kernel used to announce it), its own descriptors,
    and every /proc/*/fd/* it may open."""
    return f"""
import glob, json, os, sys
payload = {payload}
def put(fd):
    view = memoryview(payload)
    while view:
        view = view[os.write(fd, view):]
fds = set()
try:
    fds.add(json.loads(sys.argv[1])['reply_fd'])
except Exception:
    pass
fds.update(int(f) for f in os.listdir('/proc/self/fd'))
for fd in sorted(fds - {{0, 1, 2}}):
    try:
        put(fd)
    except OSError:
        pass
for path in glob.glob('/proc/[0-9]*/fd/*'):
    if not path.startswith(f'/proc/{{os.getpid()}}/'):
        try:
            put(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
{then}
"""


# -- D1: the host's environment and paths ---------------------------------------------------
def test_no_host_secret_or_path_in_proc(tmp_path, monkeypatch):
    monkeypatch.setenv("GLMKIT_CANARY", "canary-7f3a91")
    ws = tmp_path / "ws-host-path-canary"
    with Interpreter(ws, Limits(wall_seconds=15)) as it:
        # the reproduction, then every environ and cmdline the sandbox can read
        assert it.run("print(b'canary-7f3a91' in open('/proc/1/environ','rb').read())").text != "True\n"
        r = it.run("import os\nseen = []\nfor p in ['self', *[p for p in os.listdir('/proc') if p.isdigit()]]:\n"
                   "    for f in ('environ', 'cmdline'):\n        try:\n"
                   "            seen.append(f'{p}/{f}=' + open(f'/proc/{p}/{f}', 'rb').read().decode('latin-1'))\n"
                   "        except OSError as e:\n            seen.append(f'{p}/{f}: {e.strerror}')\n"
                   "print('\\n'.join(seen))\nprint(dict(os.environ))")
        assert not r.error and "self/cmdline=" in r.text and "1/cmdline=" in r.text, r.text
        assert "canary-7f3a91" not in r.text and "GLMKIT_CANARY" not in r.text
        assert str(ws) not in r.text and "ws-host-path-canary" not in r.text
        # mountinfo shows each bind mount's source path within its file system (see the report):
        # the workspace is mounted at /mnt/data, and no environment is in it
        info = it.run("print(open('/proc/self/mountinfo').read())").text
        assert " /mnt/data " in info and "canary-7f3a91" not in info


# -- D2: the reply channel ------------------------------------------------------------------
def test_malformed_reply_is_a_restart_not_an_exception(sandbox):
    it = sandbox()
    r = it.run("import os,sys,json; os.write(json.loads(sys.argv[1])['reply_fd'], b'not json\\n')")
    assert r.error                                  # the reproduction: that descriptor is not open here
    r = it.run(write_everywhere("b'not json\\n'", "print('wrote')"))
    assert r.error or r.text == "wrote\n"          # a broken kernel is restarted, never an exception
    assert it.run("print(6 * 7)").text == "42\n"


def test_partial_reply_cannot_outlast_the_wall_limit(sandbox):
    it = sandbox(wall_seconds=3)
    t0 = time.monotonic()
    r = it.run(write_everywhere("b'{'", "import time\ntime.sleep(30)"))
    assert time.monotonic() - t0 < 5.5 and r.timed_out and r.restarted
    assert it.run("print('after')").text == "after\n"


def test_huge_reply_is_refused_without_growing_the_host(sandbox):
    it = sandbox(wall_seconds=20)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.monotonic()
    r = it.run(write_everywhere("b'x' * 300 * 2**20 + b'\\n'"))
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - peak
    assert grown < 64 * MB, f"the host grew by {grown / MB:.0f} MB"
    assert r.error and r.restarted and time.monotonic() - t0 < 15, r.text
    assert it.run("print('after')").text == "after\n"


def test_forged_reply_does_not_shift_later_results(sandbox):
    it = sandbox()
    forged = b"".join(b'{"seq": %d, "nonce": "%d", "text": "forged\\n", "images": [], "error": false}\n' % (i, i)
                      for i in range(8)) + b'{"text": "forged\\n", "images": [], "error": false}\n'
    it.run(write_everywhere(repr(forged), "print('one')"))
    assert [it.run(f"print({i!r})").text for i in ("two", "three", "four")] == ["two\n", "three\n", "four\n"]


def test_stdout_and_stdin_cannot_forge_or_steal(sandbox):
    it = sandbox()
    line = '{"seq": 2, "text": "forged\\n", "images": [], "error": false}'
    r = it.run(f"import os, sys, threading\nline = {line!r}\nprint(line)\nos.write(1, line.encode() + b'\\n')\n"
               "sys.__stdout__.write(line + '\\n'); sys.__stdout__.flush()\nstolen = []\n"
               "t = threading.Thread(target=lambda: stolen.append(os.read(0, 1 << 20)), daemon=True)\n"
               "t.start()\nt.join(1)")
    assert not r.error
    assert it.run("print('two')").text == "two\n"     # the next cell arrived, not to the thread
    assert it.run("print(stolen)").text == "[b'']\n"  # stdin is /dev/null


# -- D9: limits for the sandbox as a whole --------------------------------------------------
@needs_root
def test_memory_is_bounded_across_processes(sandbox):
    it = sandbox(memory_mb=256, wall_seconds=30)
    host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    r = it.run("import os, time\npids = []\nfor i in range(4):\n    pid = os.fork()\n    if pid == 0:\n"
                   "        try:\n            blob = b'x' * (100 * 2**20)   # 40% of the limit each\n"
                   "            time.sleep(3)\n            os._exit(0)\n        except BaseException:\n"
                   "            os._exit(1)\n    pids.append(pid)\n"
                   "print([os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids])")
    if not r.restarted:                        # else the OOM killer took the worker too
        codes = ast.literal_eval(r.text.splitlines()[0])
        assert codes.count(0) < 4 and -9 in codes and "ran out of memory" in r.text, r.text   # not all held 100 MB
    peak = it._cg.dirs["memory"] / "memory.max_usage_in_bytes"     # cgroup v1
    if peak.exists():
        assert int(peak.read_text()) <= 256 * MB
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - host < 32 * 1024   # KiB
    assert it.run("print('alive')").text == "alive\n"


def test_tmpfs_is_size_limited_and_the_rest_read_only(sandbox):
    it = sandbox(tmpfs_mb=16)
    r = it.run("import os\ndef fill(path):\n    n = 0\n    try:\n        fd = os.open(path, os.O_WRONLY | os.O_CREAT)\n"
                   "        for _ in range(48):\n            os.write(fd, b'x' * 2**20)\n            n += 1\n"
                   "    except OSError:\n        pass\n    return n\n"
                   "print(fill('/tmp/f'), fill('/dev/shm/f'), [fill(p) for p in ('/f', '/dev/f', '/mnt/f')])")
    tmp, shm, rest = r.text.split(" ", 2)
    assert int(tmp) <= 16 and int(shm) <= 16 and rest == "[0, 0, 0]\n", r.text


def test_workspace_quota(sandbox):
    it = sandbox(workspace_mb=8)
    r = it.run("for i in range(12):\n    open(f'/mnt/data/f{i}', 'wb').write(b'x' * 2**20)\nprint('wrote')")
    assert r.error and "quota of 8 MB" in r.text and not r.restarted, r.text
    assert not it.run("import os\nfor i in range(12):\n    os.remove(f'/mnt/data/f{i}')").error
    # a cell that keeps writing is stopped while it runs, not only when it ends
    t0 = time.monotonic()
    r = it.run("import time\nfor i in range(400):\n    open(f'/mnt/data/g{i}', 'wb').write(b'x' * 2**20)\n"
                   "    time.sleep(0.02)")
    used = sum(f.stat().st_size for f in it.workspace.iterdir())
    assert r.restarted and "quota" in r.text and time.monotonic() - t0 < 8 and used < 100 * MB, r.text


def test_processes_of_a_cell_end_with_it(sandbox):
    it = sandbox()
    r = it.run("import os, threading, time\ndef sleeper():\n    pid = os.fork()\n    if pid == 0:\n"
                   "        while True:\n            pass\n    return pid\n"
                   "pids = [sleeper() for _ in range(3)]\n"
                   "if os.fork() == 0:                     # a daemon, orphaned to the sandbox's init\n"
                   "    os.setsid()\n    if os.fork() == 0:\n        time.sleep(600)\n    os._exit(0)\n"
                   "late = []                              # and one started by a thread after the cell\n"
                   "threading.Thread(target=lambda: (time.sleep(1), late.append(sleeper())), daemon=True).start()\n"
                   "print(len(pids))")
    assert r.text == "3\n"
    time.sleep(2.5)
    procs = it._cg.procs() if getattr(it, "_cg", None) else []
    r = it.run("alive = []\nfor pid in pids + late:\n    try:\n        os.kill(pid, 0)\n        alive.append(pid)\n"
                   "    except ProcessLookupError:\n        pass\nprint(len(late), alive, len(os.listdir('/proc')) - "
                   "len([p for p in os.listdir('/proc') if not p.isdigit()]))")
    assert r.text == "1 [] 2\n", r.text              # only the kernel's own two processes are left
    assert len(procs) <= 3                            # bwrap, the supervisor and the worker


@needs_root
def test_cpu_budget_across_processes(sandbox):
    it = sandbox(cpu_seconds=3, wall_seconds=30)
    t0 = time.monotonic()
    r = it.run("import os\npids = []\nfor _ in range(4):\n    pid = os.fork()\n    if pid == 0:\n"
                   "        while True:\n            pass\n    pids.append(pid)\nfor p in pids:\n    os.waitpid(p, 0)")
    assert r.restarted and "CPU time (3 s for all its processes together)" in r.text, r.text
    assert time.monotonic() - t0 < 12
    assert it.run("print('fresh budget')").text == "fresh budget\n"
    # a thread left behind by a cell spends the budget between cells: the next cell gets a new kernel
    it.run("import threading\ndef spin():\n    while True:\n        pass\nthreading.Thread(target=spin, daemon=True).start()")
    deadline = time.monotonic() + 30                  # the machine may be busy: wait for the CPU time itself
    while it._cg.cpu_seconds() - it._cpu_base <= 3.2 and time.monotonic() < deadline:
        time.sleep(0.2)
    r = it.run("print('next')")
    assert r.restarted and r.text == "(The kernel used up its CPU time (3 s) and was restarted; earlier variables " \
        "are gone.)\nnext\n", r.text


# -- D13: hardening -------------------------------------------------------------------------
def test_no_nested_user_namespaces(sandbox):
    it = sandbox()
    r = it.run("import ctypes, subprocess\nprint(ctypes.CDLL(None).unshare(0x10000000))   # CLONE_NEWUSER\n"
                   "print(subprocess.run(['unshare', '-U', 'true'], capture_output=True).returncode)")
    assert r.text.split() == ["-1", "1"], r.text


def test_stale_cgroups_of_a_killed_server_are_removed(tmp_path):
    it = Interpreter(tmp_path / "a")
    mine = getattr(getattr(it, "_cg", None), "dirs", {}).get("pids") or getattr(it._cap, "path", None)
    if mine is None:
        pytest.skip("no pids cgroup here")
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale, live = mine.parent / f"glmkit-interpreter-{dead.pid}-1", mine.parent / f"glmkit-interpreter-{os.getppid()}-1"
    stale.mkdir()
    live.mkdir()
    try:
        Interpreter(tmp_path / "b").close(final=True)
        assert not stale.exists() and live.exists()
    finally:
        for d in (stale, live):
            if d.exists():
                d.rmdir()
        it.close(final=True)
