"""One engine path: the Python API, `glmkit chat -p`, POST /v1/chat/completions and a console turn
give the same reply to the same conversation under the same settings.

Every edge is driven from outside, as its users drive it: `glmkit.load(...).chat()`, the installed
command as a subprocess, and a real `glmkit serve` (one per model, shared by the module) over
HTTP.  Settings that make the reply deterministic are compared exactly: greedy decoding, a stop
string, a token limit, max_length, a seed with temperature > 0, and repetition_penalty, top_k and
top_p.  An edge that does not offer a setting (the console has no seed, stop strings or
max_length; the API has no max_length) is left out of that comparison, never given a stand-in.

The tiny ChatGLM3 fixtures run in float32 on every edge; the embedded default model runs as
users get it (its int4 kernel, the default dtype), on every edge.  PyTorch uses one thread on
every edge: the same arithmetic, and no oversubscribed cores."""

import json
import subprocess

import httpx
import pytest

import glmkit
from conftest import TINY, TINY_32K, glmkit_bin
from glmkit.chat.reply_stream import Reply
from server_helpers import running_server

N = 16   # max_new_tokens of every reply (short: the point is agreement, not length)

# name -> (checkpoint, what `glmkit chat`/`glmkit serve` are given, what glmkit.load() is given)
MODELS = {
    "chatglm3-tiny": (TINY, ["--model", str(TINY), "--dtype", "float32"], dict(dtype="float32")),
    "chatglm3-tiny-32k": (TINY_32K, ["--model", str(TINY_32K), "--dtype", "float32"], dict(dtype="float32")),
    "default": (None, [], {}),
}
SYSTEM = "You are a helpful assistant. Answer briefly."
QUESTION = "Tell me about the sea."
WITH_SYSTEM = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
NO_SYSTEM = [{"role": "user", "content": QUESTION}]

ALL = ("python", "cli", "api", "console")
NO_CONSOLE = ("python", "cli", "api")      # the console has no seed and no stop strings


class Edges:
    """The four ways to get a reply from one model, each given settings in its own terms."""

    def __init__(self, name, model, cli_args, base, http):
        self.name, self.model, self.cli_args, self.base, self.http = name, model, cli_args, base, http
        self._greedy = {}

    # (a) the Python API
    def python(self, messages, **settings) -> str:
        text, history = self.model.chat(messages, **settings)
        assert history[:len(messages)] == messages
        return text

    def python_reply(self, messages, **settings) -> tuple[str, Reply]:
        """The same call as chat() makes, keeping the Reply (finish reason, token counts)."""
        r = Reply()
        text = "".join(self.model.stream_chat(messages, reply=r, **settings))
        return text, r

    # (b) the command line
    def cli(self, messages, **settings) -> str:
        return self.cli_start(messages, **settings)()

    def cli_start(self, messages, temperature=None, top_p=None, top_k=None, repetition_penalty=None, seed=None,
                  max_new_tokens=None, max_length=None, stop=None):
        """Start `glmkit chat -p`; returns a function that waits for it and gives its reply (the
        command loads the model for seconds: other edges can answer meanwhile)."""
        *system, user = messages
        cmd = [glmkit_bin(), "chat", "-p", user["content"], "--threads", "1", *self.cli_args]
        if system:
            cmd += ["--system", system[0]["content"]]
        for flag, value in (("--temperature", temperature), ("--top-p", top_p), ("--top-k", top_k),
                            ("--repetition-penalty", repetition_penalty), ("--seed", seed),
                            ("--max-new-tokens", max_new_tokens), ("--max-length", max_length)):
            if value is not None:
                cmd += [flag, str(value)]
        for s in stop or ():
            cmd += ["--stop", s]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())

        def reply() -> str:
            try:
                out, err = proc.communicate(timeout=600)
            finally:
                proc.kill()
            assert proc.returncode == 0, err.decode(errors="replace")
            text = out.decode("utf-8")     # bytes: text mode would turn a "\r" in a reply into "\n"
            assert text.endswith("\n"), text   # the reply, then one newline
            return text[:-1]
        reply.kill = proc.kill
        return reply

    # (c) the OpenAI-compatible API
    def api(self, messages, max_new_tokens=None, **settings) -> tuple[str, dict]:
        body = {"model": "default", "messages": messages, **settings}
        if max_new_tokens is not None:
            body["max_tokens"] = max_new_tokens
        r = self.http.post(self.base + "/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        [choice] = out["choices"]
        assert choice["message"].get("tool_calls") is None, out
        return choice["message"]["content"], {"finish_reason": choice["finish_reason"], **out["usage"]}

    # (d) a console turn: a conversation created with these settings, one message sent
    def console(self, messages, **settings) -> str:
        *system, user = messages
        if system:
            settings["system"] = system[0]["content"]
        conv = self.http.post(self.base + "/api/conversations", json={"settings": settings})
        assert conv.status_code == 200, conv.text
        cid = conv.json()["id"]
        assert conv.json()["settings"] == settings
        r = self.http.post(f"{self.base}/api/conversations/{cid}/messages", json={"content": user["content"]})
        assert r.status_code == 200, r.text
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
        assert [e["type"] for e in events if e["type"] != "text"] == ["done"], events
        shown = "".join(e["text"] for e in events if e["type"] == "text")
        stored = self.http.get(f"{self.base}/api/conversations/{cid}").json()["messages"]
        assert [(m["role"], m["content"]) for m in stored[:1]] == [("user", user["content"])]
        assert {m["role"] for m in stored[1:]} == {"assistant"}
        # the answer stored is the text streamed: each segment's content, in order, a named one
        # under its `[name]` (stored with its name as metadata)
        at = 0
        for m in stored[1:]:
            piece = (f"[{m['metadata']}]\n" if m["metadata"] else "") + m["content"]
            found = shown.find(piece, at)
            assert found >= 0 and not shown[at:found].strip(), (shown, stored)
            at = found + len(piece)
        assert not shown[at:].strip(), (shown, stored)
        return shown

    def greedy(self, messages) -> str:
        """The Python API's greedy reply of N tokens (a reference several cases derive from)."""
        key = json.dumps(messages)
        if key not in self._greedy:
            self._greedy[key] = self.python(messages, temperature=0, max_new_tokens=N)
        return self._greedy[key]

    def every(self, edges, messages, **settings) -> dict[str, str]:
        """The reply from each of `edges`, by edge name."""
        cli = self.cli_start(messages, **settings) if "cli" in edges else None
        try:
            got = {edge: None if edge == "cli" else self.api(messages, **settings)[0] if edge == "api"
                   else getattr(self, edge)(messages, **settings) for edge in edges}
            if cli is not None:
                got["cli"] = cli()
                cli = None
            return got
        finally:
            if cli is not None:        # another edge failed first
                cli.kill()


def _env():
    import os
    env = dict(os.environ)
    env.pop("MODEL_PATH", None)
    return env


@pytest.fixture(scope="module", params=list(MODELS))
def edges(request, tmp_path_factory):
    import threading

    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    path, cli_args, load_args = MODELS[request.param]
    loaded = {}
    # the model loads here while the server loads its own
    loading = threading.Thread(target=lambda: loaded.update(model=glmkit.load(path, **load_args)))
    loading.start()
    try:
        data = tmp_path_factory.mktemp("console")
        with running_server(*cli_args, "--threads", "1", "--data-dir", str(data), "--no-embeddings") as (base, _), \
                httpx.Client(timeout=600) as http:
            loading.join()
            assert "model" in loaded, "glmkit.load() failed (its traceback is above)"
            yield Edges(request.param, loaded["model"], cli_args, base, http)
    finally:
        loading.join()
        torch.set_num_threads(threads)


def assert_all_equal(got: dict[str, str], expected: str | None = None):
    """Every edge gave the same text (and `expected`, when given), with each one shown if not."""
    want = got["python"] if expected is None else expected
    assert all(text == want for text in got.values()), \
        "the edges disagree:\n" + "\n".join(f"  {edge:8} {text!r}" for edge, text in
                                           ({"expected": want, **got} if expected is not None else got).items())


# -- greedy decoding and token limits -------------------------------------------------------------

@pytest.mark.parametrize("messages", [WITH_SYSTEM, NO_SYSTEM], ids=["system", "no-system"])
def test_greedy_reply_is_the_same_on_every_edge(edges, messages):
    got = edges.every(ALL, messages, temperature=0, max_new_tokens=N)
    assert_all_equal(got)
    assert got["python"].strip(), "an empty reply would agree trivially"
    # the same prompt and the same N tokens: the API's usage is the Python API's count, and both
    # edges that report why a reply ended say "length" (no model here ends this reply sooner)
    text, reply = edges.python_reply(messages, temperature=0, max_new_tokens=N)
    api_text, usage = edges.api(messages, temperature=0, max_new_tokens=N)
    assert text == api_text == got["python"]
    assert reply.prompt_tokens == usage["prompt_tokens"] == len(edges.model.encode_chat(messages))
    assert (reply.finish_reason, reply.completion_tokens) == ("length", N)
    assert (usage["finish_reason"], usage["completion_tokens"]) == ("length", N)


def test_max_new_tokens_and_max_length_cut_the_same_reply(edges):
    """max_new_tokens=5, or max_length = prompt + 5 tokens (the Python API and the command line
    have max_length; the API and the console do not), give the first 5 tokens of the greedy reply."""
    prompt = len(edges.model.encode_chat(WITH_SYSTEM))
    cli = edges.cli_start(WITH_SYSTEM, temperature=0, max_new_tokens=N, max_length=prompt + 5)
    try:
        got = edges.every(("python", "api", "console"), WITH_SYSTEM, temperature=0, max_new_tokens=5)
        text, reply = edges.python_reply(WITH_SYSTEM, temperature=0, max_new_tokens=N, max_length=prompt + 5)
        got = {"python max_length": text, **got, "cli max_length": cli()}
    finally:
        cli.kill()
    assert_all_equal(got)
    assert (reply.finish_reason, reply.completion_tokens) == ("length", 5)
    full = edges.greedy(WITH_SYSTEM)
    assert full.startswith(text) and text != full


# -- stop strings ----------------------------------------------------------------------------------

def _stop_string(text: str) -> str:
    """Two characters from the middle of `text` that a command line can carry and that are not a
    replacement for undecodable bytes."""
    for start in sorted(range(2, len(text) - 2), key=lambda i: abs(i - len(text) // 2)):
        s = text[start:start + 2]
        if all(c.isprintable() and not c.isspace() and c != "\ufffd" for c in s):
            return s
    raise AssertionError(f"no usable stop string in {text!r}")


def test_a_stop_string_cuts_the_reply_the_same_way_on_every_edge(edges):
    full = edges.greedy(WITH_SYSTEM)
    stop = _stop_string(full)
    expected = full[:full.index(stop)]      # everything before the stop string's first occurrence
    assert expected and len(expected) < len(full)
    got = edges.every(NO_CONSOLE, WITH_SYSTEM, temperature=0, max_new_tokens=N, stop=[stop])
    assert_all_equal(got, expected)
    _, reply = edges.python_reply(WITH_SYSTEM, temperature=0, max_new_tokens=N, stop=[stop])
    _, usage = edges.api(WITH_SYSTEM, temperature=0, max_new_tokens=N, stop=[stop])
    assert reply.messages[-1]["content"] == expected     # the history keeps what was shown
    assert usage["finish_reason"] == "stop"
    assert reply.finish_reason == "stop"


# -- sampling --------------------------------------------------------------------------------------

SEEDED = {
    "seed": dict(temperature=1.0, seed=1234),
    "seed+filters": dict(temperature=0.9, top_k=20, top_p=0.8, repetition_penalty=1.2, seed=7),
}


@pytest.mark.parametrize("settings", SEEDED.values(), ids=SEEDED.keys())
def test_a_seed_gives_the_same_sampled_reply_on_every_edge(edges, settings):
    got = edges.every(NO_CONSOLE, WITH_SYSTEM, max_new_tokens=N, **settings)
    assert_all_equal(got)
    assert got["python"] != edges.greedy(WITH_SYSTEM), "sampled, not greedy"
    other = edges.python(WITH_SYSTEM, max_new_tokens=N, **{**settings, "seed": settings["seed"] + 1})
    assert other != got["python"], "the seed decides the sample"


# Settings that leave one choice per step although temperature > 0: the greedy reply, whatever
# the temperature, on an edge that applies them (one that ignored them would sample instead).
ARGMAX = {
    "top_k=1": dict(temperature=1.5, top_k=1),
    "top_p=1e-4": dict(temperature=1.5, top_p=1e-4),
}


@pytest.mark.parametrize("settings", ARGMAX.values(), ids=ARGMAX.keys())
def test_top_k_and_top_p_reach_the_sampler_on_every_edge(edges, settings):
    got = edges.every(ALL, WITH_SYSTEM, max_new_tokens=N, **settings)
    assert_all_equal(got, edges.greedy(WITH_SYSTEM))
    sampled = edges.python(WITH_SYSTEM, max_new_tokens=N, temperature=1.5, seed=1)
    assert sampled != edges.greedy(WITH_SYSTEM), "at this temperature, unfiltered sampling differs"


def test_repetition_penalty_is_applied_on_every_edge(edges):
    # below 1 the penalty favours tokens already seen: every model's reply here changes with it
    # (1.2 to 5 leave the 32k fixture's 16 greedy tokens as they are; 0.5 makes it write a named segment)
    got = edges.every(ALL, WITH_SYSTEM, temperature=0, repetition_penalty=0.7, max_new_tokens=N)
    assert_all_equal(got)
    assert got["python"] != edges.greedy(WITH_SYSTEM), "the penalty changes this reply"
