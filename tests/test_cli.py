"""The `glmkit` command as a user runs it: real subprocesses and a pseudo-terminal (and one test in
process, where a scripted model writes the code whose cell Ctrl-C stops)."""

import os
import signal
import subprocess
import sys
import threading
import time

import pexpect
import pytest

from conftest import ARTIFACTS, TINY, TINY_32K, glmkit_bin

FRANCE = "What is the capital of France?"
# The tools chat's system prompt (the builtin tools' schemas, about 850 tokens) needs more than
# tiny's 256-token context: its tests use the 32k flavour.
SUM = "What is 2+3?"


def run(args, env, **kw):
    if "input" not in kw:
        kw["stdin"] = subprocess.DEVNULL      # `glmkit chat` reads piped stdin: never the test runner's
    return subprocess.run([glmkit_bin(), *args], capture_output=True, text=True, timeout=300, env=env, **kw)


def test_help_explains_every_option(clean_env):
    top = run(["--help"], clean_env)
    assert top.returncode == 0 and "chat" in top.stdout
    chat = run(["chat", "--help"], clean_env)
    for opt in ("--prompt", "--system", "--model", "--device", "--dtype", "--temperature", "--top-p", "--top-k",
                "--repetition-penalty", "--max-length", "--max-new-tokens", "--seed", "--stop", "--threads"):
        assert opt in chat.stdout, opt


def test_one_shot_prints_only_the_reply(clean_env, smol):
    proc = run(["chat", "-p", FRANCE, "--temperature", "0"], clean_env)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    expected = "".join(smol.stream_chat([{"role": "user", "content": FRANCE}], temperature=0, max_new_tokens=1024))
    assert proc.stdout == expected + "\n"


def test_model_path_env_and_system_prompt(clean_env, tiny):
    env = dict(clean_env, MODEL_PATH=str(TINY))
    proc = run(["chat", "-p", "你好", "--temperature", "0", "--max-new-tokens", "20", "-s", "You are ChatGLM3."], env)
    assert proc.returncode == 0, proc.stderr
    msgs = [{"role": "system", "content": "You are ChatGLM3."}, {"role": "user", "content": "你好"}]
    assert proc.stdout == "".join(tiny.stream_chat(msgs, temperature=0, max_new_tokens=20)) + "\n"


def test_interactive_session_clear_interrupt_stop(clean_env):
    ARTIFACTS.mkdir(exist_ok=True)
    log = open(ARTIFACTS / "cli_session.txt", "w", encoding="utf-8")
    child = pexpect.spawn(glmkit_bin(), ["chat", "--temperature", "0.7", "--seed", "1", "--max-new-tokens", "3000"],
                          env=clean_env, encoding="utf-8", timeout=120, dimensions=(40, 200))
    child.logfile_read = log
    try:
        child.expect("You: ")
        child.sendline("Write a very long story about a dragon who learns to cook, with many chapters.")
        child.expect(r"SmolLM2-135M-Instruct\S*: ")
        child.expect(r"\w+ \w+ \w+ \w+ \w+")       # the answer is streaming
        child.sendintr()                          # Ctrl-C during the answer
        child.expect(r"\[interrupted\]")
        child.expect("You: ")                     # the session goes on
        child.sendline(FRANCE)
        child.expect("Paris")
        child.expect("You: ")
        child.sendline("clear")
        child.expect(r"\[conversation cleared\]")
        child.expect("You: ")
        child.sendline("stop")
        child.expect(pexpect.EOF)
    finally:
        child.close()
        log.close()
    assert child.exitstatus == 0


def test_ctrl_d_quits(clean_env):
    child = pexpect.spawn(glmkit_bin(), ["chat", "--model", str(TINY)], env=clean_env, encoding="utf-8", timeout=60)
    child.expect("You: ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_context_overflow_drops_oldest_turns(clean_env):
    # tiny has a 256-token context: a few long turns overflow it
    child = pexpect.spawn(glmkit_bin(), ["chat", "--model", str(TINY), "--max-new-tokens", "16",
                                         "--temperature", "0"], env=clean_env, encoding="utf-8", timeout=60)
    child.expect("You: ")
    for i in range(6):
        child.sendline("tell me more about that " * 6)
        idx = child.expect([r"dropped the \d+ oldest", "You: "])
        if idx == 0:
            break
    else:
        pytest.fail("the chat never reported dropping old turns")
    child.expect("You: ")
    child.sendline("stop")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_module_entry_point(clean_env):
    proc = subprocess.run([sys.executable, "-m", "glmkit.cli", "--version"], capture_output=True, text=True,
                          env=clean_env, timeout=60)
    assert proc.returncode == 0 and "glmkit" in proc.stdout


def _agent_text(model, prompt, **gen):
    """The answer that the Python API's Agent gives with the builtin tools: what the CLI prints."""
    import glmkit
    from glmkit.chat.agent import TextDelta
    from glmkit.chat.tools import load_tools
    agent = glmkit.Agent(model, load_tools("builtin"))
    return "".join(ev.text for ev in agent.run(prompt, **gen) if isinstance(ev, TextDelta))


def _tools_prompt_tokens(model, prompt):
    import glmkit
    from glmkit.chat.tools import load_tools
    agent = glmkit.Agent(model, load_tools("builtin"))
    return len(model.encode_chat(agent.messages + [{"role": "user", "content": prompt}]))


def test_tools_chat_honours_stop_and_max_length(clean_env, tiny32k):
    """--stop used to be dropped with --tools; both limits now act as in the plain chat."""
    full = _agent_text(tiny32k, SUM, params=tiny32k.params(temperature=0), max_new_tokens=40)
    # a piece from the middle of the answer (not a partly decoded character) as the stop string
    at = next(i for i in range(len(full) // 3, len(full) - 2) if "\ufffd" not in full[i:i + 2] and full[i:i + 2].strip())
    stop = full[at:at + 2]
    cut = full.index(stop)
    assert 0 < cut < len(full) - 2
    base = ["chat", "--model", str(TINY_32K), "--tools", "builtin", "-p", SUM, "--temperature", "0",
            "--max-new-tokens", "40"]
    proc = run([*base, "--stop", stop], clean_env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == full[:cut] + "\n"

    prompt_tokens = _tools_prompt_tokens(tiny32k, SUM)
    limited = _agent_text(tiny32k, SUM, params=tiny32k.params(temperature=0), max_new_tokens=40,
                          max_length=prompt_tokens + 10)
    assert limited and full.startswith(limited) and len(limited) < len(full)
    proc = run([*base, "--max-length", str(prompt_tokens + 10)], clean_env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == limited + "\n"

    proc = run([*base, "--max-length", str(prompt_tokens - 5)], clean_env)    # no room for the prompt
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"glmkit: error: the prompt is {prompt_tokens} tokens but the context limit is {prompt_tokens - 5} tokens "
        "(prompt and reply together); shorten the prompt or drop earlier turns"]


@pytest.mark.parametrize("tools", [False, True], ids=["plain", "tools"])
def test_seed_and_max_new_tokens_as_in_the_python_api(clean_env, tiny32k, tools):
    def api(seed, max_new):
        gen = dict(params=tiny32k.params(temperature=0.9, seed=seed), max_new_tokens=max_new)
        if tools:
            return _agent_text(tiny32k, SUM, **gen)
        return "".join(tiny32k.stream_chat([{"role": "user", "content": SUM}], **gen))
    expected = api(7, 12)
    assert expected != api(8, 12)                  # the seed decides the text: the equality below is no luck
    assert len(api(7, 64)) > len(expected)         # and the 12-token limit is what ended it
    proc = run(["chat", "--model", str(TINY_32K), "-p", SUM, "--temperature", "0.9", "--seed", "7",
                "--max-new-tokens", "12", *(["--tools", "builtin"] if tools else [])], clean_env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected + "\n"


def test_tools_chat_ctrl_c_interrupts_and_the_session_goes_on(clean_env):
    ARTIFACTS.mkdir(exist_ok=True)
    log = open(ARTIFACTS / "cli_tools_session.txt", "w", encoding="utf-8")
    child = pexpect.spawn(glmkit_bin(), ["chat", "--model", str(TINY_32K), "--tools", "builtin", "--temperature", "0",
                                         "--max-new-tokens", "3000"],
                          env=clean_env, encoding="utf-8", timeout=120, dimensions=(40, 200))
    child.logfile_read = log
    try:
        child.expect("You: ")
        for _ in range(2):        # an interrupted answer leaves a session that answers, and interrupts, again
            child.sendline("Tell me a long story.")
            child.expect("chatglm3-tiny-32k: ")
            child.expect(r".{20}")                    # the answer is streaming (3000 tokens would take minutes)
            child.sendintr()
            child.expect(r"\[interrupted\]")
            child.expect("You: ")
        child.sendline("clear")
        child.expect(r"\[conversation cleared\]")
        child.expect("You: ")
        child.sendline("stop")
        child.expect(pexpect.EOF)
    finally:
        child.close()
        log.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_a_running_cell_and_the_next_answer_runs_code(tiny32k, tmp_path, monkeypatch, capsys):
    """In-process: only a scripted model writes code.  Ctrl-C during a cell stops the cell (not
    its 30 s time limit) and the answer; the next answer gets a working kernel."""
    from glmkit.chat.scripted import ScriptedBackend
    from glmkit.cli import build_parser, tools_chat
    from glmkit.sandbox import sandbox_available
    if sandbox_available():
        pytest.skip(sandbox_available())
    model = tiny32k.with_backend(ScriptedBackend(tiny32k.backend, by_message={
        "loop": "interpreter\n```python\nopen('/mnt/data/started', 'w').close()\nwhile True:\n    pass\n```",
        "add": "interpreter\n```python\nprint(40 + 2)\n```"}))
    args = build_parser().parse_args(["chat", "--code", "--workspace", str(tmp_path), "--max-new-tokens", "64"])
    lines = iter(["loop", "add", "stop"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))

    def ctrl_c_once_the_cell_runs():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if (tmp_path / "started").exists():
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.05)
    threading.Thread(target=ctrl_c_once_the_cell_runs, daemon=True).start()
    assert tools_chat.run(model, args, model.params(temperature=0)) == 0
    out, err = capsys.readouterr()
    assert "[failed] ```result\nStopped; the kernel was restarted" in err      # not "Timed out after 30 s"
    assert "[interrupted]" in out
    assert "[result] ```result\n42\n```" in err


def test_help_and_argument_errors_import_nothing_heavy():
    """`glmkit --help` and a bad argument load neither torch, the server, jsonschema nor jinja2
    (they take seconds to import; a user asking for help should not wait)."""
    import subprocess
    import sys
    probe = ("import sys, contextlib, io\n"
             "from glmkit.cli import main\n"
             "for argv in (['--help'], ['chat', '--threads', 'two'], ['serve', '--help']):\n"
             "    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
             "        try:\n"
             "            main(argv)\n"
             "        except SystemExit:\n"
             "            pass\n"
             "heavy = [m for m in ('torch', 'jsonschema', 'jinja2', 'fastapi', 'glmkit.server', 'glmkit.chat_model')\n"
             "         if m in sys.modules]\n"
             "print(heavy)\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_serve_banner_names_the_api_and_the_console(clean_env, tmp_path):
    """What `glmkit serve` prints once it is up: where the API is and where to open the console
    (and no console URL with --no-console)."""
    from server_helpers import free_port
    for extra, console in (([], True), (["--no-console"], False)):
        port = free_port()
        proc = subprocess.Popen([glmkit_bin(), "serve", "--model", str(TINY), "--port", str(port), "--no-embeddings",
                                 "--data-dir", str(tmp_path / "data"), *extra],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=clean_env)
        try:
            banner = next(line for line in proc.stderr if "serving" in line)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        assert f"on http://127.0.0.1:{port}/v1 " in banner
        assert (f"web console on http://127.0.0.1:{port}/" in banner) == console, banner
