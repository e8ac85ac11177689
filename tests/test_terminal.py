"""`glmkit chat` as a terminal people use: /commands, multi-line messages and pastes, piped stdin,
the SQLite log and `glmkit logs`, -c/--cid, Markdown at a terminal, --verbose and /run.

Sessions run in a real pseudo-terminal (pexpect), one-shots as real subprocesses; each test logs to
its own GLMKIT_DATA_DIR, and what was sent to the model is checked in that log."""

import json
import os
import re
import sqlite3
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pexpect
import pytest

from conftest import TINY, TINY_32K, glmkit_bin

TINY_ARGS = ["--model", str(TINY), "--temperature", "0", "--max-new-tokens", "8"]


@pytest.fixture
def env(clean_env, tmp_path):
    data = tmp_path / "data"
    return dict(clean_env, GLMKIT_DATA_DIR=str(data), TERM="xterm-256color")


def run(args, env, **kw):
    if "input" not in kw:
        kw["stdin"] = subprocess.DEVNULL      # never the test runner's stdin: it may be a pipe
    return subprocess.run([glmkit_bin(), *args], capture_output=True, text=True, timeout=300, env=env, **kw)


def logged(env) -> list[dict]:
    """The log's rows, straight from SQLite (not through glmkit's own reader)."""
    db = sqlite3.connect(f"{env['GLMKIT_DATA_DIR']}/logs.db")
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute("SELECT * FROM responses ORDER BY id")]
    finally:
        db.close()


def session(env, *extra):
    child = pexpect.spawn(glmkit_bin(), ["chat", *TINY_ARGS, *extra], env=env, encoding="utf-8", timeout=60,
                          dimensions=(40, 200))
    child.expect("You: ")
    return child


def finish(child):
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_slash_commands(env, tmp_path):
    child = session(env)
    child.sendline("/help")
    for command in ("/system", "/set", "/show", "/tools", "/save", "/load", "/clear", "/bye"):
        child.expect_exact(command)
    child.expect("You: ")
    child.sendline("/show")
    child.expect(r"temperature 0\.0, top_p 0\.8")
    child.expect("You: ")
    child.sendline("/set temperature 0.3")
    child.expect_exact("[temperature = 0.3]")
    child.expect("You: ")
    child.sendline("/set top_p 0")                # refused by SamplingParams' own check; the old value stays
    child.expect_exact("[error: top_p must be in (0, 1], got 0.0]")
    child.expect("You: ")
    child.sendline("/set seed two")
    child.expect_exact("[error: seed must be a whole number, got 'two']")
    child.expect("You: ")
    child.sendline("/set max_new_tokens 5")
    child.expect("You: ")
    child.sendline("/system You are terse.")
    child.expect_exact("[system prompt set]")
    child.expect("You: ")
    child.sendline("/show")
    child.expect(r"temperature 0\.3, top_p 0\.8, top_k 0, repetition_penalty 1\.0, seed None, max_new_tokens 5")
    child.expect_exact("system prompt: You are terse.")
    child.expect_exact("tools: none")
    child.expect("You: ")
    child.sendline("/tools")
    child.expect_exact("tools: none")
    child.expect("You: ")
    child.sendline("/foo bar")
    child.expect_exact("unknown command /foo, /help lists them")
    child.expect("You: ")
    child.sendline("hello")
    child.expect("chatglm3-tiny: ")
    child.expect("You: ")
    saved = tmp_path / "conv.json"
    child.sendline(f"/save {saved}")
    child.expect_exact("[saved 2 messages")
    child.expect("You: ")
    child.sendline("/clear")
    child.expect_exact("[conversation cleared]")
    child.expect("You: ")
    child.sendline(f"/load {tmp_path / 'missing.json'}")
    child.expect(r"\[error: .*missing\.json: cannot read")
    child.expect("You: ")
    child.sendline(f"/load {saved}")
    child.expect_exact("[loaded 2 messages")
    child.expect("You: ")
    child.sendline("again")
    child.expect("chatglm3-tiny: ")
    child.expect("You: ")
    finish(child)

    data = json.loads(saved.read_text(encoding="utf-8"))
    assert data["system"] == "You are terse."
    assert [m["role"] for m in data["messages"]] == ["user", "assistant"] and data["messages"][0]["content"] == "hello"
    rows = logged(env)
    # only the two messages reached the model: no /command did
    assert [r["prompt"] for r in rows] == ["hello", "again"]
    assert all(r["system"] == "You are terse." and r["output_tokens"] <= 5 for r in rows)
    assert rows[0]["conversation_id"] != rows[1]["conversation_id"]       # /clear, then /load: a new one
    assert rows[1]["input_tokens"] > rows[0]["input_tokens"]             # the loaded history was sent


def test_multi_line_block_and_paste_are_one_message_each(env):
    child = session(env)
    child.sendline('"""')
    child.expect_exact("... ")
    child.sendline("/first line, not a command")
    child.sendline("second line")
    child.sendline('"""')
    child.expect("chatglm3-tiny: ")
    child.expect("You: ")
    child.sendline('"""inline start')
    child.sendline('and end"""')
    child.expect("chatglm3-tiny: ")
    child.expect("You: ")
    # a terminal's bracketed paste of three lines: readline keeps it as one line
    child.send("\x1b[200~pasted one\npasted two\npasted three\x1b[201~\r")
    child.expect("chatglm3-tiny: ")
    child.expect("You: ")
    finish(child)
    assert [r["prompt"] for r in logged(env)] == ["/first line, not a command\nsecond line", "inline start\nand end",
                                                  "pasted one\npasted two\npasted three"]


def test_piped_stdin_with_and_without_prompt(env, tiny):
    notes = "Line one of the notes.\nLine two.\n"
    proc = run(["chat", *TINY_ARGS, "-p", "Summarize"], env, input=notes)
    assert proc.returncode == 0, proc.stderr
    message = "Summarize\n\nLine one of the notes.\nLine two."
    expected = "".join(tiny.stream_chat([{"role": "user", "content": message}], temperature=0, max_new_tokens=8))
    assert proc.stdout == expected + "\n"        # piped out: plain text, exactly the reply
    proc = run(["chat", *TINY_ARGS], env, input=notes)          # no -p: what is piped in is the prompt
    assert proc.returncode == 0, proc.stderr
    assert [r["prompt"] for r in logged(env)] == [message, notes.strip("\n")]
    proc = run(["chat", *TINY_ARGS], env, input="")
    assert proc.returncode == 1 and proc.stderr.strip() == (
        "glmkit: error: nothing to answer: the prompt (and what was piped in) is empty")


def test_continue_and_cid_feed_the_logged_conversation_back(env, tiny):
    first = run(["chat", *TINY_ARGS, "-s", "Be brief.", "-p", "My name is Ada."], env)
    second = run(["chat", *TINY_ARGS, "-c", "-p", "What is my name?"], env)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "My name is Ada."},
               {"role": "assistant", "content": first.stdout[:-1]}, {"role": "user", "content": "What is my name?"}]
    assert second.stdout == "".join(tiny.stream_chat(history, temperature=0, max_new_tokens=8)) + "\n"
    other = run(["chat", *TINY_ARGS, "-p", "Unrelated."], env)
    assert other.returncode == 0
    rows = logged(env)
    assert rows[0]["conversation_id"] == rows[1]["conversation_id"] != rows[2]["conversation_id"]
    assert rows[1]["system"] == "Be brief."                  # the logged system prompt came back too
    # --cid with the start of an id: the first conversation, though another is newer
    third = run(["chat", *TINY_ARGS, "--cid", rows[0]["conversation_id"][:14], "-p", "And again?"], env)
    assert third.returncode == 0, third.stderr
    assert logged(env)[3]["conversation_id"] == rows[0]["conversation_id"]
    assert logged(env)[3]["input_tokens"] > rows[1]["input_tokens"]
    bad = run(["chat", *TINY_ARGS, "--cid", "nope", "-p", "x"], env)
    assert bad.returncode == 1 and "no conversation 'nope'" in bad.stderr and bad.stdout == ""


def test_continue_in_a_session(env):
    assert run(["chat", *TINY_ARGS, "-p", "Remember the word pelican."], env).returncode == 0
    child = session(env, "-c")
    assert re.search(r"continuing conversation \w+: 2 messages", child.before), child.before
    child.sendline("/show")
    child.expect(r"conversation: \w+")
    child.expect("You: ")
    child.sendline("Which word?")
    child.expect("chatglm3-tiny: ")
    child.expect("You: ")
    finish(child)
    rows = logged(env)
    assert len(rows) == 2 and rows[0]["conversation_id"] == rows[1]["conversation_id"]


def test_logs_list_search_json_and_no_log(env, tmp_path):
    empty = run(["logs"], env)
    assert empty.returncode == 0 and empty.stdout == "" and "no chats logged yet" in empty.stderr
    assert run(["logs", "--json"], env).stdout.strip() == "[]"
    for prompt in ("Tell me about zebras.", "Tell me about giraffes.", "And about okapis?"):
        assert run(["chat", *TINY_ARGS, "-p", prompt], env).returncode == 0
    assert run(["chat", *TINY_ARGS, "--no-log", "-p", "A secret about zebras."], env).returncode == 0
    rows = logged(env)
    assert [r["prompt"] for r in rows] == ["Tell me about zebras.", "Tell me about giraffes.", "And about okapis?"]

    found = run(["logs", "-q", "zebras"], env)
    assert found.returncode == 0 and "Tell me about zebras." in found.stdout and "giraffes" not in found.stdout
    assert "secret" not in found.stdout
    # query syntax is not FTS5's: quotes, a dash and a bare AND are searched as words, never an error
    odd = run(["logs", "-q", 'zeb"ras AND -x'], env)
    assert odd.returncode == 0 and odd.stdout == "" and "no logged exchange matches" in odd.stderr
    listed = json.loads(run(["logs", "--json", "-n", "2"], env).stdout)
    assert [r["prompt"] for r in listed] == ["Tell me about giraffes.", "And about okapis?"]
    assert {"model", "system", "reply", "finish_reason", "input_tokens", "output_tokens", "duration_ms",
            "datetime_utc", "conversation_id"} <= set(listed[0])
    assert listed[0]["model"] == "chatglm3-tiny" and 0 < listed[0]["output_tokens"] <= 8
    one = json.loads(run(["logs", "--json", "--cid", rows[0]["conversation_id"]], env).stdout)
    assert [r["prompt"] for r in one] == ["Tell me about zebras."]

    nolog_env = dict(env, GLMKIT_DATA_DIR=str(tmp_path / "never"))
    assert run(["chat", *TINY_ARGS, "--no-log", "-p", "hi"], nolog_env).returncode == 0
    assert not (tmp_path / "never").exists()


def test_migrations_upgrade_an_older_log(tmp_path):
    """A log left at schema 1 (no search index) opens at the latest schema, its rows searchable."""
    from glmkit.cli.chat_log import MIGRATIONS, ChatLog
    path = tmp_path / "logs.db"
    db = sqlite3.connect(path)
    MIGRATIONS[0](db)
    db.execute("INSERT INTO conversations VALUES ('c1', 'old', 'm', '2025-01-01T00:00:00+00:00')")
    db.execute("INSERT INTO responses (conversation_id, model, prompt, reply, datetime_utc) "
               "VALUES ('c1', 'm', 'an old walrus question', 'an answer', '2025-01-01T00:00:00+00:00')")
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    log = ChatLog(path)
    try:
        assert log.version == len(MIGRATIONS) == 2
        assert [r["prompt"] for r in log.search("walrus", 5)] == ["an old walrus question"]
    finally:
        log.close()


def test_markdown_at_a_terminal(tmp_path):
    """At a terminal the reply is drawn by rich: headings, emphasis and fences become styled text."""
    script = tmp_path / "draw.py"
    script.write_text(textwrap.dedent("""
        from glmkit.cli.render import renderer
        out = renderer()
        out.start("model")
        for piece in ["# Ti", "tle\\n\\nSome **bold", "** words.\\n\\n```python\\nx = 1\\n", "```\\n\\nEnd."]:
            out.write(piece)
        out.end()
        print("DONE")
    """), encoding="utf-8")
    child = pexpect.spawn(sys.executable, [str(script)], encoding="utf-8", timeout=60, dimensions=(40, 100),
                          env=dict(os.environ, TERM="xterm-256color"))
    child.expect("DONE")
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", child.before)
    child.close()
    assert "Title" in shown and "# Title" not in shown
    assert "Some bold words." in shown and "**" not in shown
    assert "x = 1" in shown and "```" not in shown
    assert "End." in shown


def test_stable_end_keeps_fences_and_list_items_together():
    from glmkit.cli.render import stable_end
    assert stable_end("para one\n\npara two") == len("para one\n\n")
    assert stable_end("```\ncode\n\nmore code\n") == 0            # a blank line inside an open fence
    assert stable_end("- item\n\n  continued") == 0                # an indented line may belong to the item
    assert stable_end("```\na\n```\n\nnext") == len("```\na\n```\n\n")


def test_small_model_note_rule(tiny):
    from glmkit.chat.capabilities import small_model_note
    assert small_model_note(tiny) is None              # ChatGLM3's own tool protocol

    def fake(native, n_layer, dim):
        from glmkit.models.config import ModelConfig
        config = ModelConfig(family="llama", n_layer=n_layer, dim=dim, n_head=dim // 64, n_kv_head=dim // 64,
                             head_dim=64, ffn_dim=4 * dim, vocab_size=32000, context_length=2048)
        return SimpleNamespace(name="m", config=config, protocol=SimpleNamespace(native=native))
    assert "small model" in small_model_note(fake(False, 12, 768))        # ~160M
    assert small_model_note(fake(False, 32, 4096)) is None                 # ~7B
    assert small_model_note(fake(True, 12, 768)) is None


def test_tools_chat_small_model_note_once_and_verbose(env):
    proc = run(["chat", "--tools", "builtin", "-p", "What is 2+2?", "--temperature", "0", "--max-new-tokens", "8",
                "-v"], env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("is a small model") == 1
    assert "glmkit chat -m PATH/TO/chatglm3-6b --tools builtin" in proc.stderr
    assert re.search(r"^\[\d+ tokens, \d+\.\d tokens/s, prompt \d+ tokens\]$", proc.stderr, re.M), proc.stderr
    assert logged(env)[0]["prompt"] == "What is 2+2?"


def test_verbose_and_token_limit_note_for_a_one_shot(env):
    proc = run(["chat", *TINY_ARGS, "-v", "-p", "hello"], env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0] == "[the reply reached the token limit (max_new_tokens 8)]"
    assert re.fullmatch(r"\[8 tokens, \d+\.\d tokens/s, prompt \d+ tokens\]", lines[1]), lines
    assert logged(env)[0]["finish_reason"] == "length"


def test_run_executes_the_last_code_block_but_not_a_cut_one(tiny32k, tmp_path, monkeypatch, capsys):
    """In-process: a scripted model writes the code blocks.  /run runs the newest complete Python
    block, the person's or the model's, in the chat's kernel; a reply cut at the token limit is
    refused, with the reason."""
    from glmkit.chat.scripted import ScriptedBackend
    from glmkit.cli import build_parser, tools_chat
    from glmkit.sandbox import sandbox_available
    if sandbox_available():
        pytest.skip(sandbox_available())
    block = "```python\nprint(2 + 2)\n```"
    model = tiny32k.with_backend(ScriptedBackend(tiny32k.backend, by_message={
        "cut": "\n```python\nprint('never')\n```\n" + "and more words " * 40,
        "add": "\nHere:\n```python\nprint(40 + 2)\n```\nRun it.",
        block: "\nSure.",
    }))
    args = build_parser().parse_args(["chat", "--code", "--workspace", str(tmp_path), "--max-new-tokens", "40"])
    lines = iter(["/run", "cut", "/run", "add", "/run", '"""', "```python", "print(2 + 2)", "```", '"""', "/run",
                  "stop"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert tools_chat.run(model, args, model.params(temperature=0)) == 0
    out, err = capsys.readouterr()
    assert "[error: no complete ```python block in the conversation to run]" in err
    assert "[the reply reached the token limit (max_new_tokens 40)]" in err
    assert "[error: the last code block is in a reply that was cut at the token limit" in err
    assert "never" not in err.split("cut at the token limit")[-1].split("[running code]")[0]
    assert "[running code]\nprint('never')" not in err
    # run by /run alone (the agent runs only the interpreter's own segments), after the refusal
    assert err.count("[running code]\nprint(40 + 2)") == 1 and "[result] ```result\n42\n```" in err
    assert err.index("cut at the token limit, so") < err.index("[running code]\nprint(40 + 2)")
    assert "[running code]\nprint(2 + 2)" in err and "[result] ```result\n4\n```" in err


def test_last_code_block_rules():
    from glmkit.cli.tools_chat import code_blocks, last_code_block
    assert code_blocks("a\n```python\nx\n```\n```bash\nls\n```\n```\ny\n```\n```python\nopen") == ["x", "y"]
    msgs = [{"role": "user", "content": "```python\nu = 1\n```"}, {"role": "assistant", "content": "no code"},
            {"role": "observation", "content": "```result\n1\n```"}]
    assert last_code_block(msgs, {}) == ("u = 1", None)
    cut = "```python\nm = 2\n```\nand then"
    assert last_code_block(msgs + [{"role": "assistant", "content": cut}], {cut: "was cut"}) == ("m = 2", "was cut")
    assert last_code_block([], {}) is None


def test_chat_through_a_running_server(env, tiny):
    """--server: the same greedy reply as the local model, from `glmkit serve`'s streaming API."""
    import socket
    import time
    import urllib.request
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([glmkit_bin(), "serve", "--model", str(TINY), "--port", str(port), "--no-embeddings",
                               "--no-console"], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "glmkit serve did not start"
                time.sleep(0.5)
        url = f"http://127.0.0.1:{port}"
        proc = run(["chat", "--server", url, "-p", "hello", "--temperature", "0", "--max-new-tokens", "8", "-v"], env)
        assert proc.returncode == 0, proc.stderr
        expected = "".join(tiny.stream_chat([{"role": "user", "content": "hello"}], temperature=0, max_new_tokens=8))
        assert proc.stdout == expected + "\n"
        assert re.search(r"^\[\d+ tokens, [\d.]+ tokens/s, prompt \d+ tokens\]$", proc.stderr, re.M), proc.stderr
        row = logged(env)[0]
        assert row["prompt"] == "hello" and row["model"] == "chatglm3-tiny" and row["reply"] == expected
        bad = run(["chat", "--server", url, "-p", "hello", "--top-p", "0"], env)
        assert bad.returncode == 1 and bad.stderr.strip() == "glmkit: error: top_p must be in (0, 1], got 0.0"
    finally:
        server.terminate()
        server.wait(timeout=60)


def test_tools_session_commands_and_log(env):
    child = pexpect.spawn(glmkit_bin(), ["chat", "--model", str(TINY_32K), "--tools", "builtin", "--temperature", "0",
                                         "--max-new-tokens", "6"], env=env, encoding="utf-8", timeout=60,
                          dimensions=(40, 200))
    child.expect("You: ")
    child.sendline("/tools")
    child.expect_exact("tools: calculator, current_time, convert_units, random_number")
    child.expect("You: ")
    child.sendline("/set top_k 5")
    child.expect_exact("[top_k = 5]")
    child.expect("You: ")
    child.sendline("/run")            # only with --code
    child.expect_exact("unknown command /run, /help lists them")
    child.expect("You: ")
    child.sendline("hello there")
    child.expect("chatglm3-tiny-32k: ")
    child.expect("You: ")
    finish(child)
    rows = logged(env)
    assert [r["prompt"] for r in rows] == ["hello there"] and rows[0]["input_tokens"] > 500   # the tools' schemas
