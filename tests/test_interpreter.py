"""The sandboxed code interpreter, with real subprocesses under bubblewrap."""

import os
import time

import pytest
from conftest import scripted

from glmkit.sandbox import CellResult, Interpreter, Limits, sandbox_available
from glmkit.chat.tool_calls import extract_code
from glmkit.errors import GlmkitError

REASON = sandbox_available()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"no sandbox here: {REASON}")


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    os.environ["GLMKIT_TEST_SECRET"] = "sk-do-not-leak"
    secret = os.path.expanduser("~/.glmkit-test-secret")
    with open(secret, "w") as f:
        f.write("host secret")
    ws = tmp_path_factory.mktemp("workspace")
    (ws / "input.csv").write_text("a,b\n1,2\n")
    with Interpreter(ws, Limits(wall_seconds=6, memory_mb=1024, max_output=5000)) as k:
        yield k, ws
    os.unlink(secret)


def test_state_output_and_last_expression(kernel):
    k, _ = kernel
    assert k.run("x = 20\nprint('hello')").text == "hello\n"
    assert k.run("x + 22").text == "42\n"
    r = k.run("1/0")
    assert r.error and "ZeroDivisionError" in r.text and "\x1b[" not in r.text
    assert CellResult("5050\n").observation() == "```result\n5050\n```"


def test_workspace_is_mnt_data(kernel):
    k, ws = kernel
    assert "a,b" in k.run("print(open('/mnt/data/input.csv').read())").text
    k.run("open('/mnt/data/out.txt', 'w').write('written')")
    assert (ws / "out.txt").read_text() == "written"


@pytest.mark.parametrize("code", [
    "open('/etc/shadow').read()",
    f"open({os.path.abspath(__file__)!r}).read()",                     # the project's files
    f"open({os.path.expanduser('~/.glmkit-test-secret')!r}).read()",   # a file in $HOME
    "open('/usr/evil', 'w')",                                          # outside the workspace
    "open('/etc/evil', 'w')",
    "import socket; socket.create_connection(('1.1.1.1', 80), timeout=3)",
    "import socket; socket.create_connection(('127.0.0.1', 22), timeout=3)",
])
def test_isolation(kernel, code):
    k, _ = kernel
    r = k.run(code)
    assert r.error, r.text


def test_no_host_environment(kernel):
    k, _ = kernel
    r = k.run("import os; print(dict(os.environ))")
    assert "sk-do-not-leak" not in r.text and "GLMKIT_TEST_SECRET" not in r.text


def test_plot_comes_back_as_png(kernel):
    k, _ = kernel
    r = k.run("import matplotlib.pyplot as plt\nplt.plot([1, 4, 9])\nplt.title('squares')\nprint('done')")
    assert not r.error and len(r.images) == 1 and r.images[0].startswith(b"\x89PNG")
    assert r.observation().endswith("[Image]\n```")


def test_infinite_loop_is_stopped_and_kernel_restarts(kernel):
    k, _ = kernel
    t0 = time.monotonic()
    r = k.run("while True:\n    pass")
    assert r.timed_out and r.restarted and time.monotonic() - t0 < 10
    assert k.run("print('next cell runs')").text == "next cell runs\n"


def test_memory_bomb(kernel):
    k, _ = kernel
    r = k.run("blob = bytearray(8 * 1024**3)")
    assert r.error and "MemoryError" in r.text
    assert k.run("print(1)").text == "1\n"


def test_fork_bomb_is_contained(kernel):
    """Processes are capped (a pids cgroup).  Written so that even a failed cap leaves at most
    300 sleeping processes, never an exponential bomb on the test machine."""
    k, _ = kernel
    t0 = time.monotonic()
    r = k.run("import os, time\nmade = 0\nfor i in range(300):\n    try:\n        if os.fork() == 0:\n"
              "            time.sleep(120)\n            os._exit(0)\n        made += 1\n    except OSError:\n"
              "        pass\nprint('forked', made)")
    assert time.monotonic() - t0 < 12, r.text
    made = int(r.text.split()[-1])
    assert made < k.limits.max_procs
    k.restart()                       # the sleeping children die with the kernel
    assert k.run("print('alive')").text == "alive\n"
    if "pids" in k._cg.dirs:
        assert len(k._cg.procs()) <= 3    # bwrap, the kernel's supervisor and its worker


def test_huge_print_is_truncated(kernel):
    k, _ = kernel
    r = k.run("print('x' * 100_000_000)")
    assert len(r.text) < 6000 and "truncated" in r.text
    assert k.run("print('ok')").text == "ok\n"


def test_kernel_outlives_the_thread_that_started_it(tmp_path):
    """The server runs each turn in a worker thread that then exits; bwrap's --die-with-parent
    follows the spawning thread, so the kernel (and its variables) must not die with it."""
    import threading
    it = Interpreter(tmp_path, Limits(wall_seconds=10))
    try:
        t = threading.Thread(target=it.run, args=("x = 41",))   # starts the kernel in that thread
        t.start()
        t.join()
        time.sleep(0.5)
        assert it.run("print(x + 1)").text == "42\n"
    finally:
        it.close(final=True)


def test_interrupt_stops_only_a_running_cell(tmp_path):
    import threading
    with Interpreter(tmp_path, Limits(wall_seconds=60)) as it:
        it.run("x = 1")
        assert it.interrupt() is False                     # idle: nothing to stop, variables kept
        assert it.run("print(x)").text == "1\n"
        t = threading.Timer(1.0, it.interrupt)
        t.start()
        t0 = time.monotonic()
        r = it.run("import time\ntime.sleep(50)")
        assert time.monotonic() - t0 < 15 and r.error and r.restarted and r.text.startswith("Stopped")
        assert it.run("print(2)").text == "2\n"            # a fresh kernel, ready for the next cell


def test_refuses_without_sandbox_unless_unsafe(monkeypatch, tmp_path):
    import glmkit.sandbox.interpreter as interp
    monkeypatch.setattr(interp, "sandbox_available", lambda: "bubblewrap is not installed")
    with pytest.raises(GlmkitError, match="unsafe-interpreter"):
        Interpreter(tmp_path)
    unsafe = Interpreter(tmp_path, unsafe=True)
    assert not unsafe.sandboxed


def test_extract_code():
    assert extract_code("```python\nprint(1)\n```") == "print(1)"
    assert extract_code(" ```\nx = 1\n```") == "x = 1"


def test_agent_runs_interpreter_segments(tiny32k, tmp_path):
    """interpreter segment -> sandboxed run -> ```result observation -> answer (decoding scripted)."""
    from glmkit.chat.agent import Agent, CodeStep, Observation, TextDelta

    from glmkit.chat.scripted import scripted_reply_ids

    def script(*segs):
        return scripted_reply_ids(tiny32k.tokenizer, "<|assistant|>".join(segs))

    with Interpreter(tmp_path, Limits(wall_seconds=10)) as it:
        steps = [script("interpreter\n```python\nprint(sum(range(1, 101)))\n```"), script("\n结果是5050。")]
        agent = Agent(scripted(tiny32k, *steps), interpreter=it, max_steps=3)
        events = list(agent.run("计算1到100的和", temperature=0, max_new_tokens=60))
    assert agent.messages[0]["content"].startswith("你是一位智能AI助手")
    code = next(e for e in events if isinstance(e, CodeStep))
    assert code.call.code == "print(sum(range(1, 101)))"
    result = next(e for e in events if isinstance(e, Observation))
    assert result.call == code.call and result.result.ok and result.result.value.text == "5050\n"
    assert agent.messages[3] == {"role": "observation", "content": "```result\n5050\n```"}
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "结果是5050。"
