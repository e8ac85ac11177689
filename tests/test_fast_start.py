"""A start that shows it is working and a second start that is quick: the spinner on a terminal,
the GGUF start cache seen from the command line, and an eager start that never imports the
compiler (bench/first_token.py measures the time; these check the behaviour)."""

import subprocess
import sys

import pexpect

from conftest import TINY, glmkit_bin

FRANCE = "What is the capital of France?"


def test_a_spinner_shows_while_the_model_loads_on_a_terminal(clean_env):
    child = pexpect.spawn(glmkit_bin(), ["chat", "--model", str(TINY)], env=clean_env, encoding="utf-8", timeout=120)
    try:
        child.expect(r"[⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏] loading chatglm3-tiny \d+ s")
        child.expect("You: ")
        child.sendline("stop")
        child.expect(pexpect.EOF)
    finally:
        child.close()


def test_piped_output_has_no_spinner(clean_env):
    out = subprocess.run([glmkit_bin(), "chat", "--model", str(TINY), "-p", "hi", "--max-new-tokens", "4"],
                         capture_output=True, text=True, timeout=120, env=clean_env)
    assert out.returncode == 0, out.stderr
    assert "loading" not in out.stderr and "\r" not in out.stderr + out.stdout


def test_second_run_reads_the_cache_and_answers_the_same(clean_env, tmp_path):
    env = dict(clean_env, GLMKIT_CACHE_DIR=str(tmp_path / "cache"))
    args = [glmkit_bin(), "chat", "-p", FRANCE, "--temperature", "0", "--max-new-tokens", "12"]
    first = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    second = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert "first load of SmolLM2-135M-Instruct" in first.stderr
    assert "first load" not in second.stderr and second.stderr.strip() == ""
    assert second.stdout == first.stdout and "Paris" in first.stdout


def test_an_eager_one_shot_never_imports_the_compiler(clean_env):
    """torch._dynamo costs seconds to import; `chat -p` decodes eagerly and must not load it."""
    probe = ("import sys, contextlib, io\n"
             "from glmkit.cli import main\n"
             "try:\n"
             "    with contextlib.redirect_stdout(io.StringIO()):\n"
             f"        main(['chat', '--model', {str(TINY)!r}, '-p', 'hi', '--max-new-tokens', '3'])\n"
             "except SystemExit:\n"
             "    pass\n"
             "print(sorted(m for m in ('torch._dynamo', 'torch._inductor') if m in sys.modules))\n")
    env = dict(clean_env)
    env.pop("GLMKIT_NO_COMPILE", None)          # as a user runs it
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_quitting_while_the_step_still_compiles_exits_cleanly(clean_env, tmp_path):
    """A session compiles its decode step in the background for about a minute; quitting before
    that ends used to abort in PyTorch's teardown (SIGABRT, "terminate called ...")."""
    env = dict(clean_env, GLMKIT_DATA_DIR=str(tmp_path))
    env.pop("GLMKIT_NO_COMPILE", None)
    child = pexpect.spawn(glmkit_bin(), ["chat", "--model", str(TINY), "--max-new-tokens", "4"], env=env,
                          encoding="utf-8", timeout=120)
    try:
        child.expect("You: ")
        child.sendline("hi")             # a reply while the compilation runs
        child.expect("You: ")
        child.sendline("/bye")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert (child.exitstatus, child.signalstatus) == (0, None), child.before
    assert "terminate called" not in child.before
