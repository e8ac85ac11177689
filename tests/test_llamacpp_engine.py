"""A remote engine glmkit did not write: llama.cpp's `llama-server`, on the default GGUF model.

Real processes on loopback: llama-server (built from the llama.cpp source that PyPI's
llama-cpp-python sdist vendors: `bash tests/build_llama_server.sh`; these tests skip, saying so,
where it is not built) serving the SmolLM2 GGUF that glmkit embeds, and a gateway
(`glmkit serve --engine URL --engine-kind llamacpp --model <the same GGUF>`), which reads the
tokenizer and chat template from the file but never its weights.  The gateway sends prompt ids
to llama-server's /completion and reads ids back (engine/llamacpp.py's LlamaCppStream)."""

import os
import shutil
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from conftest import glmkit_bin
from server_helpers import free_port, running_process, running_server

COMMON = ("--no-console", "--no-embeddings")


def llama_server_bin() -> str | None:
    """$GLMKIT_LLAMA_SERVER, else what tests/build_llama_server.sh built, else one on PATH."""
    for candidate in (os.environ.get("GLMKIT_LLAMA_SERVER"),
                      Path(os.environ.get("GLMKIT_LLAMA_DIR", Path.home() / ".cache/glmkit-test/llama.cpp"))
                      / "bin/llama-server",
                      shutil.which("llama-server")):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


NOT_BUILT = ("llama.cpp's llama-server is not built: run `bash tests/build_llama_server.sh` (builds it "
             "from PyPI's llama-cpp-python sdist into ~/.cache/glmkit-test; or set GLMKIT_LLAMA_SERVER)")


# on every test that needs the server, so that none loads the in-process model only to skip
needs_server = pytest.mark.skipif(llama_server_bin() is None, reason=NOT_BUILT)


def gguf() -> str:
    from glmkit.models.loader import default_model_path
    return str(default_model_path())


@contextmanager
def llama_server(ctx: int = 4096):
    """llama-server on the default GGUF, on a free loopback port: (URL, process)."""
    binary = llama_server_bin()
    if binary is None:
        pytest.skip(NOT_BUILT)
    port = free_port()
    # one slot (-np 1): its whole context is ours; --slots and --metrics: what the tests watch.
    # One thread: ggml's threads spin at each step's barrier, and on a box busy with other tests
    # two of them ran 25 times slower than one (1 token/s).  --no-repack: the AMX kernels that
    # repacking picks where the CPU reports AMX crashed (SIGSEGV in ggml_backend_amx_mul_mat) on
    # the VMs this was built on.
    with running_process([binary, "-m", gguf(), "--host", "127.0.0.1", "--port", str(port), "-c", str(ctx),
                          "-np", "1", "-t", "1", "--no-repack", "--no-webui", "--slots", "--metrics",
                          "--no-warmup"], port, "llama-server", timeout=60, merge_stdout=True) as served:
        yield served


@pytest.fixture(scope="module")
def engine():
    with llama_server() as (url, _):
        yield url


@pytest.fixture(scope="module")
def gateway(engine):
    with running_server("--engine", engine, "--engine-kind", "llamacpp", "--model", gguf(), *COMMON) as (url, _):
        yield url


@pytest.fixture(scope="module")
def remote(engine, smol):
    from glmkit.engine.llamacpp import LlamaCppBackend
    backend = LlamaCppBackend(engine, "llamacpp", smol.tokenizer, smol.format, "smol", smol.context_length)
    backend.check()
    yield backend
    backend.close()


def busy(engine) -> bool:
    return any(s["is_processing"] for s in httpx.get(engine + "/slots", timeout=5).json())


def metric(engine, name) -> float:
    for line in httpx.get(engine + "/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def greedy_chat(base, messages, max_tokens=32, **extra):
    r = httpx.post(base + "/v1/chat/completions", json={"messages": messages, "max_tokens": max_tokens,
                                                        "temperature": 0, **extra}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


# -- greedy replies, glmkit's and llama.cpp's ---------------------------------------------------------
# Greedy ids agree with glmkit's own as long as the two kernels agree on the best token: llama.cpp
# multiplies the Q4_1 weights with activations quantized to 8 bits (Q8_1), glmkit with float ones,
# and their logprobs differ by up to ~0.25 (measured).  Where the top two are closer than that the
# choice can flip: "What is the capital of France?" starts "The" in glmkit (-1.88, against "L" at
# -2.00) and "L" in llama.cpp; with the model's default repetition_penalty 1.1, "What is 2+2?"
# parts after ~28 tokens.  These prompts' margins are wide: without a penalty their replies were
# measured equal over 32 tokens.  The Chinese one: SmolLM2 spells each character in 2-3 byte
# tokens, which llama-server holds back until the character is whole (LlamaCppStream).
REPLIES = {"What is 2+2?": ("stop", 16), "Count from 1 to 10.": ("length", 16),
           "Translate 'good morning' to Chinese.": ("length", 16)}


@pytest.fixture(scope="module")
def local(smol):
    """{prompt: (prompt ids, the in-process greedy events with top-2 logprobs)}, made once."""
    from glmkit.engine import SamplingParams
    out = {}
    for prompt, (_, n) in REPLIES.items():
        ids = smol.encode_chat([{"role": "user", "content": prompt}])
        out[prompt] = ids, list(smol.backend.submit(ids, SamplingParams(temperature=0), smol.format.stop_ids, n, 2))
    return out


@needs_server
@pytest.mark.parametrize("prompt", ["What is 2+2?", "Count from 1 to 10."])
def test_greedy_chat_equals_in_process(gateway, smol, local, prompt):
    finish, n = REPLIES[prompt]
    events = local[prompt][1]
    choice = greedy_chat(gateway, [{"role": "user", "content": prompt}], max_tokens=n, repetition_penalty=1.0)
    assert choice["message"]["content"] == smol.tokenizer.decode([e.token for e in events]).strip()
    assert choice["finish_reason"] == finish == events[-1].finish


@needs_server
def test_ids_and_logprobs_equal_in_process(remote, smol, local):
    """The Backend's events, id for id, through llama-server's /completion."""
    from glmkit.engine import SamplingParams
    for prompt, (finish, n) in REPLIES.items():
        ids, here = local[prompt]
        there = list(remote.submit(ids, SamplingParams(temperature=0), smol.format.stop_ids, n, 2))
        assert [e.token for e in there] == [e.token for e in here]
        assert [e.finish for e in there] == [None] * (len(there) - 1) + [finish] == [e.finish for e in here]
        for a, b in zip(there, here):
            if a.logprob is not None:       # none for the tokens llama-server held back
                assert a.logprob == pytest.approx(b.logprob, abs=0.5)
                assert a.top_logprobs[0][0] == a.token and len(a.top_logprobs) == 2
        held = sum(e.logprob is None for e in there)
        assert held > 5 if "Chinese" in prompt else held == 0
    with pytest.raises(Exception, match="constrained decoding"):
        remote.submit(ids, SamplingParams(grammar=object()), smol.format.stop_ids, 8)


@needs_server
def test_streaming_with_the_openai_client(gateway):
    import openai
    client = openai.OpenAI(base_url=gateway + "/v1", api_key="none")
    messages = [{"role": "user", "content": "Count from 1 to 10."}]
    whole = greedy_chat(gateway, messages, max_tokens=24)
    chunks = list(client.chat.completions.create(model="default", messages=messages, max_tokens=24,
                                                 temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole["message"]["content"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    # a plain completion, streamed: the same engine, the prompt as glmkit renders it
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="default", prompt="1, 2, 3, 4,", max_tokens=8, temperature=0, stream=True))
    assert text == client.completions.create(model="default", prompt="1, 2, 3, 4,", max_tokens=8,
                                             temperature=0).choices[0].text and text


@needs_server
def test_sampling_with_a_seed(gateway):
    body = {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 16,
            "temperature": 0.9, "top_p": 0.9, "top_k": 40, "seed": 7}
    first = httpx.post(gateway + "/v1/chat/completions", json=body, timeout=60).json()
    again = httpx.post(gateway + "/v1/chat/completions", json=body, timeout=60).json()
    other = httpx.post(gateway + "/v1/chat/completions", json={**body, "seed": 8}, timeout=60).json()
    text = first["choices"][0]["message"]["content"]
    assert again["choices"][0]["message"]["content"] == text != other["choices"][0]["message"]["content"]


@needs_server
def test_stop_ids_end_the_reply_and_the_request(remote, smol, local, engine):
    """llama-server takes no stop ids: the stream stops at the first one here, reports it last with
    finish "stop", and closes the request, which frees the engine's slot."""
    from glmkit.engine import SamplingParams
    ids, events = local["Count from 1 to 10."]
    out = [e.token for e in events]                                  # "1. 1\n2. 2\n3. 3..."
    at = out.index(smol.tokenizer.encode("3")[0])
    events = list(remote.submit(ids, SamplingParams(temperature=0), frozenset({out[at]}), 400))
    assert [e.token for e in events] == out[:at + 1] and events[-1].finish == "stop"
    deadline = time.time() + 10
    while busy(engine) and time.time() < deadline:
        time.sleep(0.05)
    assert not busy(engine)             # not 400 tokens later


@needs_server
def test_cancel_closes_the_upstream_request(gateway, engine):
    """A client that leaves mid-stream: the gateway closes its request to llama-server, whose slot
    stops generating at once (a reply of 2000 tokens would take it a minute)."""
    predicted = metric(engine, "llamacpp:tokens_predicted_total")
    body = {"messages": [{"role": "user", "content": "Count from 1 to 1000."}], "max_tokens": 2000,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", gateway + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = (ln for ln in r.iter_lines() if ln.startswith("data: "))
        for _ in range(6):
            next(lines)
        assert busy(engine)
    deadline = time.time() + 10
    while busy(engine) and time.time() < deadline:
        time.sleep(0.05)
    assert not busy(engine)
    assert metric(engine, "llamacpp:tokens_predicted_total") - predicted < 200
    while httpx.get(gateway + "/health", timeout=5).json()["running"] and time.time() < deadline:
        time.sleep(0.05)
    assert httpx.get(gateway + "/health", timeout=5).json()["running"] == 0


# -- an engine that fails ----------------------------------------------------------------------------
@needs_server
def test_engine_killed_mid_stream(smol):
    """llama-server dies while a sequence streams from it: the reader gets one error naming the
    engine, at once, not a hang; a new request is refused naming it too."""
    from glmkit.engine import SamplingParams
    from glmkit.engine.llamacpp import LlamaCppBackend
    from glmkit.engine.remote import EngineUnavailable
    ids = smol.encode_chat([{"role": "user", "content": "Count from 1 to 1000."}])
    with llama_server() as (url, proc):
        backend = LlamaCppBackend(url, "llamacpp", smol.tokenizer, smol.format, "smol", smol.context_length)
        backend.check()
        stream = backend.submit(ids, SamplingParams(temperature=0), smol.format.stop_ids, 2000)
        got = [stream.get(timeout=30) for _ in range(5)]
        proc.kill()
        t = time.time()
        with pytest.raises(EngineUnavailable, match=f"engine at {url}"):
            while True:
                got.append(stream.get(timeout=30))
        assert time.time() - t < 10 and not any(e.finish for e in got)
        proc.wait()
        with pytest.raises(EngineUnavailable, match=f"cannot reach the engine at {url}"):
            list(backend.submit(ids, SamplingParams(temperature=0), smol.format.stop_ids, 4))
        backend.close()


@needs_server
def test_the_wrong_kind_is_named(engine, smol):
    """llama-server's /v1/completions takes ids but answers in text: as a vLLM-kind engine it is
    refused at startup, saying which kind to use."""
    from glmkit.engine.remote import EngineUnavailable, RemoteBackend
    backend = RemoteBackend(engine, "vllm", smol.tokenizer, smol.format, "smol", smol.context_length)
    with pytest.raises(EngineUnavailable, match="llama-server.*--engine-kind llamacpp"):
        backend.check()


def test_unreachable_engine_at_start():
    url = f"http://127.0.0.1:{free_port()}"
    p = subprocess.run([glmkit_bin(), "serve", "--engine", url, "--engine-kind", "llamacpp", "--model", gguf(),
                        "--port", str(free_port()), *COMMON], capture_output=True, text=True, timeout=120)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert url in lines[-1] and "cannot reach the engine" in lines[-1]


def test_the_models_file_takes_the_kind(tmp_path):
    from glmkit.cli import models_file
    f = tmp_path / "models.yaml"
    f.write_text(f"models:\n  cpp: {{engine: http://127.0.0.1:8080, kind: llamacpp, path: {gguf()}}}\n")
    assert models_file.read(str(f)).models["cpp"].kind == "llamacpp"


# -- the held-back ids, without a server ------------------------------------------------------------
def test_withheld_ids_are_named_only_when_their_bytes_allow_one_reading():
    from glmkit.engine.llamacpp import _only_split
    pieces = {b"\xe8": 10, b"\x89": 11, b"\xbe": 12, b"\xe8\x89": 13, b"a": 14, b"ab": 15, b"b": 16}
    assert _only_split(b"\xe8\x89", 1, pieces, 2) == [13]
    assert _only_split(b"\xe8\x89", 2, pieces, 2) == [10, 11]
    assert _only_split(b"\xe8\x89\xbe", 3, pieces, 2) == [10, 11, 12]
    assert _only_split(b"ab", 1, pieces, 2) == [15]
    assert _only_split(b"\xe8\x89\xbe", 2, pieces, 2) == [13, 12]
    assert _only_split(b"\xe8\x89", 3, pieces, 2) is None             # no such reading
    assert _only_split(b"abab", 3, pieces, 2) is None                  # two readings: a|b|ab, ab|a|b
    assert _only_split(b"\xe8", 1, {b"\xe8": -1}, 1) is None           # two ids with these bytes
