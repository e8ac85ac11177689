"""Bad command-line options are refused up front with one clear line, and nothing is left behind."""

import subprocess

import pytest

from conftest import TINY, glmkit_bin
from server_helpers import running_server


def _glmkit(*args, env, timeout=120):
    return subprocess.run([glmkit_bin(), *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("args", [["chat", "--max-new-tokens", "0"], ["chat", "--max-length", "-5"],
                                  ["serve", "--max-batch", "0"], ["serve", "--max-tokens", "0"],
                                  ["bench", "--new-tokens", "0"], ["chat", "--threads", "two"]])
def test_counts_must_be_positive(clean_env, args):
    """--max-new-tokens 0 used to mean the 1024 default, silently."""
    proc = _glmkit(*args, env=clean_env)
    assert proc.returncode == 2
    assert "must be at least 1" in proc.stderr or "whole number" in proc.stderr


@pytest.mark.parametrize("mode, option", [([], ["--top-p", "0"]), ([], ["--temperature", "-1"]), ([], ["--top-k", "-1"]),
                                          ([], ["--repetition-penalty", "0"]),
                                          (["--tools", "builtin"], ["--top-p", "nan"]),
                                          (["--tools", "builtin"], ["--temperature", "-1"])])
def test_bad_sampling_values_are_one_error(clean_env, mode, option):
    """Checked once, where the CLI makes its SamplingParams: one line, exit 1, nothing generated."""
    proc = _glmkit("chat", "--model", str(TINY), "-p", "hi", *mode, *option, env=clean_env)
    assert proc.returncode == 1 and proc.stdout == ""
    field = option[0][2:].replace("-", "_")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith(f"glmkit: error: {field} must be "), proc.stderr


def test_workspace_must_exist(clean_env, tmp_path):
    missing = tmp_path / "no" / "such" / "dir"
    proc = _glmkit("chat", "--code", "--workspace", str(missing), "-p", "hi", env=clean_env)
    assert proc.returncode == 2 and "no such directory" in proc.stderr
    assert not (tmp_path / "no").exists()


def test_code_chat_removes_its_temporary_workspace(clean_env, tmp_path):
    from glmkit.sandbox import sandbox_available
    if sandbox_available():
        pytest.skip(sandbox_available())
    env = dict(clean_env, TMPDIR=str(tmp_path))
    proc = _glmkit("chat", "--model", str(TINY), "--code", "-p", "hi", "--max-new-tokens", "4", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "removed on exit" in proc.stderr
    assert not list(tmp_path.glob("glmkit-workspace-*"))


def test_serve_code_leaves_no_probe_directory(clean_env, tmp_path):
    from glmkit.sandbox import sandbox_available
    if sandbox_available():
        pytest.skip(sandbox_available())
    env = dict(clean_env, TMPDIR=str(tmp_path))
    with running_server("--model", str(TINY), "--code", "--no-embeddings", "--no-console", env=env):
        assert not list(tmp_path.glob("glmkit-probe-*"))


def test_perplexity_input_checked_before_the_model_loads(clean_env, tmp_path):
    proc = _glmkit("bench", "--model", str(TINY), "--perplexity", str(tmp_path / "missing.txt"), env=clean_env)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"glmkit: error: {tmp_path / 'missing.txt'}: no such file "
                                                "(--perplexity needs a text file)"]
    (tmp_path / "empty.txt").write_text("  \n")
    proc = _glmkit("bench", "--model", str(TINY), "--perplexity", str(tmp_path / "empty.txt"), env=clean_env)
    assert proc.returncode == 1 and "is empty" in proc.stderr


def test_perplexity_of_a_tiny_text_warns(clean_env, tmp_path):
    (tmp_path / "short.txt").write_text("Hello there, world.")
    proc = _glmkit("bench", "--model", str(TINY), "--perplexity", str(tmp_path / "short.txt"), env=clean_env)
    assert proc.returncode == 0, proc.stderr
    assert "says little about the model" in proc.stderr and "perplexity" in proc.stdout


def test_hub_name_explains_that_nothing_is_downloaded(clean_env):
    proc = _glmkit("chat", "--model", "THUDM/chatglm3-6b", "-p", "hi", env=clean_env)
    assert proc.returncode == 1
    assert "never downloads" in proc.stderr and "--local-dir" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
