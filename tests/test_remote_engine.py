"""A glmkit server whose tokens come from another server (`glmkit serve --engine URL`), and the
vLLM token-id dialect of /v1/completions that it speaks to that engine.

Real processes on loopback: an engine (`glmkit serve --model <fixture>`) and a gateway
(`glmkit serve --engine <engine> --model <same directory>`), which reads the tokenizer, config and
chat format but never the weights.  Greedy replies through the gateway must be the in-process
model's, token for token; everything above the Backend (reply parser, tool calls, streaming, stop
strings) runs in the gateway unchanged."""

import json
import re
import subprocess
import time

import httpx
import pytest

from conftest import TINY, TINY_32K, glmkit_bin
from server_helpers import free_port, running_server

COMMON = ("--no-console", "--no-embeddings", "--max-tokens", "30000")
TRACK = {"type": "function", "function": {"name": "track", "description": "追踪指定股票的实时价格",
                                           "parameters": {"type": "object",
                                                          "properties": {"symbol": {"type": "string"}}}}}
SCRIPT = {"帮我查询股票10111的价格": 'track\n ```python\ntool_call(symbol="10111")\n```',
          "算一下": 'calculator\n ```python\ntool_call(expression="6 * 7")\n```'}
HI = [{"role": "user", "content": "你好，介绍一下你自己"}]


@pytest.fixture(scope="module", params=[TINY, TINY_32K], ids=["tiny", "tiny32k"])
def servers(request, tmp_path_factory):
    """(engine URL, gateway URL, the fixture directory)."""
    script = tmp_path_factory.mktemp("script") / "script.json"
    script.write_text(json.dumps(SCRIPT, ensure_ascii=False), encoding="utf-8")
    path = str(request.param)
    with running_server("--model", path, "--dtype", "float32", *COMMON) as (engine, _):
        with running_server("--engine", engine, "--engine-kind", "glmkit", "--model", path,
                            "--scripted-replies", str(script), "--tools", "builtin", *COMMON) as (gateway, _):
            yield engine, gateway, request.param


@pytest.fixture
def in_process(servers, tiny, tiny32k):
    return tiny if servers[2] == TINY else tiny32k


def post(base, path, body, timeout=60):
    return httpx.post(base + path, json=body, timeout=timeout)


def events(base, path, body, timeout=60) -> list:
    """Every `data:` event of a streamed answer, decoded ([DONE] as the string)."""
    out = []
    with httpx.stream("POST", base + path, json={**body, "stream": True}, timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.append(line[6:] if line[6:] == "[DONE]" else json.loads(line[6:]))
    return out


def metric(base, name) -> float:
    text = httpx.get(base + "/metrics", timeout=10).text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


# -- chat over the remote engine -------------------------------------------------------------------
def test_greedy_chat_equals_in_process(servers, in_process):
    engine, gateway, _ = servers
    body = {"messages": HI, "max_tokens": 24, "temperature": 0}
    requests_before = metric(engine, "glmkit_requests_total")
    r = post(gateway, "/v1/chat/completions", body).json()
    text, _ = in_process.chat(HI, max_new_tokens=24, temperature=0)
    assert r["choices"][0]["message"]["content"] == text and text
    assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 24
    assert r["usage"]["prompt_tokens"] == len(in_process.encode_chat(HI))
    assert metric(engine, "glmkit_requests_total") == requests_before + 1      # the engine generated it
    # the same request to the engine itself: the same answer
    assert post(engine, "/v1/chat/completions", body).json()["choices"][0]["message"] == r["choices"][0]["message"]
    # streamed through the gateway: the same text, one finish
    chunks = events(gateway, "/v1/chat/completions", body)
    assert chunks[-1] == "[DONE]"
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1]) == text
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1] if c["choices"][0]["finish_reason"]] == ["length"]


def test_sampled_chat_with_seed_equals_engine(servers):
    engine, gateway, _ = servers
    body = {"messages": HI, "max_tokens": 16, "temperature": 0.9, "top_p": 0.9, "top_k": 40, "seed": 7}
    there = post(engine, "/v1/chat/completions", body).json()["choices"][0]["message"]["content"]
    assert post(gateway, "/v1/chat/completions", body).json()["choices"][0]["message"]["content"] == there
    other = post(gateway, "/v1/chat/completions", {**body, "seed": 8}).json()["choices"][0]["message"]["content"]
    assert other != there           # the seed reached the engine


def test_tool_call_over_remote_engine(servers):
    """A scripted reply is a forced prefix: over a remote engine it is sent as part of the prompt
    and the reply is parsed in the gateway, as for a local model."""
    _, gateway, _ = servers
    body = {"messages": [{"role": "user", "content": "帮我查询股票10111的价格"}], "tools": [TRACK], "temperature": 0}
    r = post(gateway, "/v1/chat/completions", body).json()
    c = r["choices"][0]
    assert c["finish_reason"] == "tool_calls"
    [call] = c["message"]["tool_calls"]
    assert call["function"]["name"] == "track" and json.loads(call["function"]["arguments"]) == {"symbol": "10111"}
    chunks = events(gateway, "/v1/chat/completions", body)
    calls = [t for ch in chunks[:-1] for t in ch["choices"][0]["delta"].get("tool_calls") or []]
    assert [(t["function"]["name"], t["function"]["arguments"]) for t in calls] == \
        [("track", call["function"]["arguments"])]


def test_agent_runs_over_remote_engine(servers):
    """glmkit_run_tools: the gateway runs the tool, then the engine answers after its observation."""
    engine, gateway, path = servers
    if path != TINY_32K:
        pytest.skip("the builtin tools' system prompt is longer than tiny's 256-token context")
    before = metric(engine, "glmkit_requests_total")
    r = post(gateway, "/v1/chat/completions", {"messages": [{"role": "user", "content": "算一下"}], "temperature": 0,
                                               "max_tokens": 48, "glmkit_run_tools": True})
    assert r.status_code == 200, r.text
    step = r.json()["glmkit_steps"][0]
    assert step == {"type": "tool", "name": "calculator", "arguments": {"expression": "6 * 7"}, "ok": True,
                    "observation": json.dumps({"expression": "6 * 7", "result": 42})}
    # the scripted call is forced whole (it ends at its stop id) and needs no engine; the answer
    # after the observation is the engine's
    assert metric(engine, "glmkit_requests_total") == before + 1
    assert r.json()["usage"]["completion_tokens"] > 0


def test_stop_string_and_stop_ids(servers, in_process):
    engine, gateway, _ = servers
    text, _ = in_process.chat(HI, max_new_tokens=24, temperature=0)
    stop = text[5:7]
    r = post(gateway, "/v1/chat/completions", {"messages": HI, "max_tokens": 24, "temperature": 0, "stop": [stop]})
    c = r.json()["choices"][0]
    assert c["finish_reason"] == "stop" and c["message"]["content"] == text[:text.index(stop)]
    # a stop token id (vLLM's stop_token_ids) ends the sequence at that token on the engine
    ids = in_process.encode_chat(HI)
    out = in_process.generate(ids, max_new_tokens=12, temperature=0)
    at = 4
    while out[at] in out[:at]:      # stop at the token's first appearance
        at += 1
    r = post(engine, "/v1/completions", {"prompt": ids, "max_tokens": 12, "temperature": 0, "logprobs": 0,
                                         "return_tokens_as_token_ids": True, "stop_token_ids": [out[at]]}).json()
    c = r["choices"][0]
    assert c["finish_reason"] == "stop" and c["stop_reason"] == out[at]
    assert c["logprobs"]["tokens"] == [f"token_id:{t}" for t in out[:at + 1]]   # the stop id is the last token


def test_cancel_reaches_the_engine(servers):
    """A client that closes its stream ends the generation on the engine too."""
    engine, gateway, path = servers
    if path != TINY_32K:
        pytest.skip("a reply on tiny's 256-token context may end before the cancel arrives")
    cancelled = metric(engine, "glmkit_cancelled_total")
    body = {"messages": HI, "max_tokens": 29000, "temperature": 0, "stream": True}
    with httpx.stream("POST", gateway + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
    deadline = time.time() + 15
    while httpx.get(engine + "/health", timeout=5).json()["running"] and time.time() < deadline:
        time.sleep(0.1)
    assert httpx.get(engine + "/health", timeout=5).json()["running"] == 0
    assert metric(engine, "glmkit_cancelled_total") == cancelled + 1
    while httpx.get(gateway + "/health", timeout=5).json()["running"] and time.time() < deadline:
        time.sleep(0.1)             # the gateway's side ends with its reader thread, a moment later
    assert httpx.get(gateway + "/health", timeout=5).json()["running"] == 0


def test_remote_backend_python_api(servers, in_process):
    """RemoteBackend as the chat layer uses it: events equal the local engine's, forced prefix and
    logprobs included; what only a local model can do is one clear error naming the engine."""
    from glmkit.chat_model import ChatModel
    from glmkit.engine import SamplingParams
    from glmkit.engine.remote import RemoteBackend
    from glmkit.errors import GlmkitError
    from glmkit.models.loader import without_weights
    engine, _, path = servers
    fmt = in_process.format
    remote = RemoteBackend(engine, "glmkit", in_process.tokenizer, fmt, "m", in_process.context_length)
    assert remote.check()["id"] == in_process.name
    ids, greedy = in_process.encode_chat(HI), SamplingParams(temperature=0)
    forced = in_process.tokenizer.encode("好的")
    for prefix in ((), forced):
        local = list(in_process.backend.submit(ids, greedy, fmt.stop_ids, 8, 2, prefix))
        there = list(remote.submit(ids, greedy, fmt.stop_ids, 8, 2, prefix))
        assert [e.token for e in there] == [e.token for e in local] and there[-1].finish == local[-1].finish
        for a, b in zip(there[len(prefix):], local[len(prefix):]):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
            assert [t for t, _ in a.top_logprobs] == [t for t, _ in b.top_logprobs]
    stream = remote.submit(ids, greedy, fmt.stop_ids, 8)
    assert stream.get(timeout=30).logprob is None      # not asked for
    stream.cancel()
    stream.cancel()                                    # a no-op the second time
    with pytest.raises(GlmkitError, match="constrained decoding"):
        remote.submit(ids, SamplingParams(grammar=object()), fmt.stop_ids, 8)
    model = ChatModel.over(without_weights(path), remote)
    assert model.chat(HI, max_new_tokens=8, temperature=0) == in_process.chat(HI, max_new_tokens=8, temperature=0)
    with pytest.raises(GlmkitError, match=f"engine at {engine}"):
        model.model
    with pytest.raises(GlmkitError, match=f"engine at {engine}"):
        model.serve_with(None)
    assert model.json_grammar({"type": "object"}) is None     # the reply is validated instead
    remote.close()


def test_remote_backend_loads_without_torch():
    import subprocess
    import sys
    code = "import sys, glmkit.engine.remote; print(any(m == 'torch' or m.startswith('torch.') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


# -- an engine that is not there -------------------------------------------------------------------
def test_unreachable_engine_at_start():
    url = f"http://127.0.0.1:{free_port()}"
    t = time.time()
    p = subprocess.run([glmkit_bin(), "serve", "--engine", url, "--model", str(TINY), "--port", str(free_port()),
                        *COMMON], capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and time.time() - t < 30
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in p.stderr and url in lines[-1] and "cannot reach the engine" in lines[-1]


def test_engine_killed_mid_stream_and_gone():
    """The engine dies while the gateway streams from it: one error event naming the engine, then
    [DONE]; later requests get a 502 naming it; the gateway stays up."""
    with running_server("--model", str(TINY_32K), "--dtype", "float32", *COMMON) as (engine, proc):
        with running_server("--engine", engine, "--model", str(TINY_32K), *COMMON) as (gateway, _):
            body = {"messages": HI, "max_tokens": 29000, "temperature": 0, "stream": True}
            got, t = [], time.time()
            with httpx.stream("POST", gateway + "/v1/chat/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    got.append(line[6:])
                    if len(got) == 5:
                        proc.kill()
            assert time.time() - t < 30
            assert got[-1] == "[DONE]"
            error = json.loads(got[-2])["error"]
            assert engine in error["message"] and error["code"] == "engine_unavailable"
            assert all("error" not in json.loads(g) for g in got[:-2])
            r = post(gateway, "/v1/chat/completions", {"messages": HI, "max_tokens": 4})
            assert r.status_code == 502 and engine in r.json()["error"]["message"]
            # every API blames the engine, not the request: Anthropic's and Ollama's too
            r = post(gateway, "/v1/messages", {"model": "m", "max_tokens": 4, "messages": HI})
            assert r.status_code == 502 and engine in r.text, r.text
            served = httpx.get(gateway + "/v1/models", timeout=5).json()["data"][0]["id"]
            r = post(gateway, "/api/chat", {"model": served, "messages": HI, "stream": False})
            assert r.status_code == 502 and engine in r.text, r.text
            assert httpx.get(gateway + "/health", timeout=5).status_code == 200


# -- vLLM's token-id completions, on glmkit's own server ------------------------------------------
def test_token_id_prompt_in_vllms_shape(servers, in_process):
    engine, _, _ = servers
    ids = in_process.encode_chat(HI)
    out = in_process.generate(ids, max_new_tokens=6, temperature=0, stop_ids=())
    r = post(engine, "/v1/completions", {"prompt": ids, "max_tokens": 6,
                                         "temperature": 0, "logprobs": 2, "return_tokens_as_token_ids": True,
                                         "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"id", "object", "created", "model", "choices", "usage"} and body["object"] == "text_completion"
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 6, "total_tokens": len(ids) + 6}
    [c] = body["choices"]
    assert set(c) == {"index", "text", "logprobs", "finish_reason", "stop_reason"}
    assert (c["index"], c["finish_reason"], c["stop_reason"]) == (0, "length", None)
    assert c["text"] == in_process.tokenizer.decode(out)
    lp = c["logprobs"]
    assert set(lp) == {"text_offset", "token_logprobs", "tokens", "top_logprobs"}
    assert lp["tokens"] == [f"token_id:{t}" for t in out]
    # vLLM's text_offset: each token starts where the names before it end
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(6)]
    for name, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert value <= 0 and name in top and top[name] == value          # the chosen token and the top 2
        assert 2 <= len(top) <= 3 and all(re.fullmatch(r"token_id:\d+", k) for k in top)
        assert value == max(top.values())                                 # greedy chose the best
    # streamed: the same tokens, a chunk per token, the finish reason on the last
    chunks = events(engine, "/v1/completions", {"prompt": ids, "max_tokens": 6, "temperature": 0, "logprobs": 0,
                                                "return_tokens_as_token_ids": True, "ignore_eos": True})
    assert chunks[-1] == "[DONE]" and len(chunks) == 7
    assert [t for ch in chunks[:-1] for t in ch["choices"][0]["logprobs"]["tokens"]] == lp["tokens"]
    assert [ch["choices"][0]["finish_reason"] for ch in chunks[:-1]] == [None] * 5 + ["length"]
    assert "".join(ch["choices"][0]["text"] for ch in chunks[:-1]) == c["text"]


def test_token_id_batch_and_refusals(servers, in_process):
    engine, _, _ = servers
    a = in_process.encode_chat(HI)
    b = in_process.encode_chat([{"role": "user", "content": "hello"}])
    body = {"max_tokens": 4, "temperature": 0, "logprobs": 0, "return_tokens_as_token_ids": True}
    batch = post(engine, "/v1/completions", {**body, "prompt": [a, b], "n": 2}).json()
    assert [c["index"] for c in batch["choices"]] == [0, 1, 2, 3]        # prompt k, choice i: k * n + i
    alone = post(engine, "/v1/completions", {**body, "prompt": b}).json()["choices"][0]
    assert batch["choices"][2]["logprobs"]["tokens"] == alone["logprobs"]["tokens"]
    assert batch["usage"]["prompt_tokens"] == len(a) + len(b)
    vocab = in_process.tokenizer.vocab_size
    for prompt, param in (([1, vocab], "prompt"), ([-1], "prompt"), ([[1], [2, 10**30]], "prompt[1]"),
                          ([], "prompt")):
        r = post(engine, "/v1/completions", {**body, "prompt": prompt})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    r = post(engine, "/v1/completions", {**body, "prompt": a, "stop_token_ids": [vocab]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop_token_ids"
    # a prompt of ids is not text: ids of special tokens pass as they are (a user's text never could)
    assert post(engine, "/v1/completions", {**body, "prompt": [in_process.tokenizer.special_id("<|user|>")]}
                ).status_code == 200
