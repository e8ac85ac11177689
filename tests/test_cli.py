"""The `glmkit` command as a user runs it: real subprocesses and a pseudo-terminal."""

import subprocess
import sys

import pexpect
import pytest

from conftest import ARTIFACTS, TINY, glmkit_bin

FRANCE = "What is the capital of France?"


def run(args, env, **kw):
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
