"""Several LoRA adapters served at once, unmerged, each sequence choosing one (models/lora.py,
`glmkit serve --adapter NAME=DIR`).

Two adapters are written in peft's layout by glmkit's own writer (models/adapters.save_adapter),
with random A and B large enough to change the tiny model's greedy output (checked): "a" adapts all
four ChatGLM3 matrices at r=8, "b" two of them at r=4, so ranks and targets differ between rows of
one batch.  The reference for an adapter's output is the adapter merged into the weights at load
(W + (alpha/r)·B·A, tests/test_finetune_lora.py checks that merge against the files): unmerged per
row must compute the same logits, alone and batched with base rows and the other adapter's."""

import httpx
import openai
import pytest
import torch
from conftest import TINY
from server_helpers import running_server

import glmkit
from glmkit.engine import GenerationRequest, SamplingParams, Scheduler
from glmkit.errors import CheckpointError, GlmkitError
from glmkit.models.loader import load_checkpoint
from glmkit.models.lora import DEFAULT_MODE, MODES

GREEDY = SamplingParams(temperature=0)
ADAPTERS = {"a": dict(r=8, alpha=16.0, seed=1, targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")),
            "b": dict(r=4, alpha=8.0, seed=2, targets=("query_key_value", "dense_4h_to_h"))}
HI = [{"role": "user", "content": "你好，介绍一下你自己"}]


def write_random_adapter(out, r, alpha, seed, targets):
    """A peft-layout adapter for TINY with random A and B (peft starts B at zero, which would
    change nothing), written by the same code `glmkit finetune` saves with."""
    from glmkit.finetune.train import TrainConfig, lora_model
    from glmkit.models.adapters import save_adapter
    model = load_checkpoint(TINY).model
    lora_model(model, TrainConfig(r=r, alpha=alpha, dropout=0.0, targets=targets, seed=seed).check())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return save_adapter(model, out, targets=targets, r=r, alpha=alpha, dropout=0.0, base=TINY)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return {name: write_random_adapter(root / name, **spec) for name, spec in ADAPTERS.items()}


@pytest.fixture(scope="module")
def served(dirs):
    """The tiny model with both adapters unmerged (float32)."""
    return glmkit.load(TINY, adapters=dirs)


@pytest.fixture(scope="module")
def merged(dirs):
    """Per model id, the reference: the base, and each adapter merged into the weights."""
    return {"": glmkit.load(TINY), **{n: glmkit.load(TINY, adapter=d) for n, d in dirs.items()}}


def prompts(n, length=12, seed=0):
    return torch.randint(3, 2000, (n, length), generator=torch.Generator().manual_seed(seed))


def all_logits(model, tokens, adapters=None):
    """Logits at every position of `tokens` [B, T], each row in its cache row from position 0."""
    model.setup_caches(max(model.cache_batch, tokens.shape[0]), 64)
    with torch.no_grad():
        return model(tokens, torch.zeros(tokens.shape[0], dtype=torch.long), all_logits=True, adapters=adapters)


@pytest.mark.parametrize("mode", MODES)
def test_unmerged_rows_compute_the_merged_models_logits(served, merged, mode):
    """One forward of three rows (base, a, b): each row's logits are those of its own model with
    the adapter merged (float32, within 1e-5 of the logits' scale), and each adapter changes them."""
    model = served.model
    model.lora.mode = mode
    try:
        tokens = prompts(3)
        got = all_logits(model, tokens, adapters=[0, 1, 2])
        for row, name in enumerate(["", "a", "b"]):
            want = all_logits(merged[name].model, tokens[row:row + 1])[0]
            # 1e-5 of the logits' scale: float32 rounds (W + s·B·A)·x and W·x + s·B·(A·x) differently
            # (~2e-6 relative here), while the adapters move the logits by ~10
            err = (got[row] - want).abs().max()
            assert err <= 1e-5 * want.abs().max(), (mode, name, err)
            if name:
                assert not torch.allclose(want, all_logits(merged[""].model, tokens[row:row + 1])[0], atol=1e-2)
        # the same row with no adapter (adapters=None: the base model's path, nothing added)
        assert torch.allclose(all_logits(model, tokens)[1], all_logits(merged[""].model, tokens[1:2])[0], atol=1e-5)
    finally:
        model.lora.mode = DEFAULT_MODE


def run(scheduler, reqs):
    """Submit every request, then read them all: (tokens, top logprobs per token) per request."""
    handles = [scheduler.submit(r) for r in reqs]
    out = []
    for h in handles:
        events = list(h)
        out.append(([e.token for e in events], [[lp for _, lp in e.top_logprobs] for e in events]))
    return out


def request(prompt, adapter=0, n=10):
    return GenerationRequest(list(prompt), GREEDY, max_new_tokens=n, logprobs=5, adapter=adapter)


def test_base_and_two_adapters_batched_in_one_step_equal_their_solo_runs(served, merged):
    model = served.model
    steps = []                       # the adapters of each batched decode call
    forward = model.forward

    def spy(*args, **kwargs):
        if args[0].shape[1] == 1:
            steps.append(tuple(kwargs.get("adapters") or ()))
        return forward(*args, **kwargs)

    ps = prompts(3, seed=5).tolist()
    model.forward = spy
    try:
        together = run(Scheduler(model, max_batch=4, prefix_cache=False), [request(ps[0]), request(ps[1], 1),
                                                                        request(ps[2], 2)])
    finally:
        del model.forward
    assert any(set(s) == {0, 1, 2} for s in steps), steps        # they did run in one batch
    solo = [run(Scheduler(merged[name].model, max_batch=1, prefix_cache=False), [request(p)])[0]
            for name, p in zip(["", "a", "b"], ps)]
    for (tokens, lps), (want_tokens, want_lps) in zip(together, solo):
        assert tokens == want_tokens
        assert torch.allclose(torch.tensor(lps), torch.tensor(want_lps), atol=1e-4)
    # each adapter's tokens differ from the base model's on the same prompt
    base_on = run(Scheduler(merged[""].model, max_batch=1, prefix_cache=False), [request(ps[1]), request(ps[2])])
    assert together[1][0] != base_on[0][0] and together[2][0] != base_on[1][0]


def test_prefix_cache_never_crosses_adapters(served, merged):
    """A kept (or running) row's keys and values serve only sequences of its own adapter."""
    model = served.model
    s = Scheduler(model, max_batch=4)
    prompt = prompts(1, length=40, seed=9)[0].tolist()
    solo = {name: run(Scheduler(merged[name].model, max_batch=1, prefix_cache=False), [request(prompt)])[0][0]
            for name in ("", "a", "b")}
    assert len(set(map(tuple, solo.values()))) == 3
    assert run(s, [request(prompt)])[0][0] == solo[""]
    assert s.stats.prefix_hits == 0
    assert run(s, [request(prompt, 1)])[0][0] == solo["a"]        # the base row is kept: not for "a"
    assert s.stats.prefix_hits == 0
    assert run(s, [request(prompt)])[0][0] == solo[""]            # the base model's own: reused
    assert s.stats.prefix_hits == 1
    assert run(s, [request(prompt, 1)])[0][0] == solo["a"]        # and "a"'s own
    assert s.stats.prefix_hits == 2
    # running donors: with a base and an "a" sequence running (prefilled), a new "a" sequence
    # starts from the running "a" row, and a "b" one from neither
    fresh = Scheduler(model, max_batch=4, prefix_cache=True)
    running = [fresh.submit(request(prompt)), fresh.submit(request(prompt, 1))]
    firsts = [h.get() for h in running]
    late = [fresh.submit(request(prompt, 1)), fresh.submit(request(prompt, 2))]
    got = [[ev.token for ev in h] for h in late]
    rest = [[first.token] + [ev.token for ev in h] for first, h in zip(firsts, running)]
    assert rest == [solo[""], solo["a"]] and got == [solo["a"], solo["b"]]
    assert fresh.stats.prefix_hits == 1 and fresh.stats.prefix_hit_tokens == len(prompt) - 1


class RecordingStep:
    """Stands in for engine/compiled_step.CompiledDecode with every bucket "compiled": it records
    each call and raises, which the scheduler answers as it answers a failed guard (that bucket
    goes eager, this step too)."""
    static = False

    def __init__(self):
        self.ready, self.calls = {1, 2}, []

    def bucket(self, rows):
        return 1 if rows == 1 else 2

    def request(self, bucket):
        pass

    def fail(self, bucket, e):
        self.ready.discard(bucket)

    def __call__(self, *args):
        self.calls.append(args)
        raise RuntimeError("not compiled")


def test_a_step_with_an_adapter_row_is_never_run_compiled(served, merged):
    """The compiled step has no LoRA path: a decode batch holding an adapter's row runs eagerly
    (its tokens still the merged model's); a batch of base rows only takes the compiled step."""
    step = RecordingStep()
    s = Scheduler(served.model, max_batch=2, prefix_cache=False, compile=step)
    p = prompts(1, seed=4)[0].tolist()
    got = run(s, [request(p, 1)])[0][0]
    assert step.calls == []
    assert got == run(Scheduler(merged["a"].model, max_batch=1, prefix_cache=False), [request(p)])[0][0]
    run(s, [request(p)])
    assert len(step.calls) == 1             # the base row's first decode step went to it (then eager)


def test_chat_model_with_adapter_and_errors(served, merged, dirs, tmp_path):
    assert served.adapters == ["a", "b"]
    a = served.with_adapter("a")
    assert a.name == "chatglm3-tiny:a" and a.backend.scheduler is served.backend.scheduler
    assert a.chat(HI, max_new_tokens=16, temperature=0)[0] == merged["a"].chat(HI, max_new_tokens=16, temperature=0)[0]
    with pytest.raises(GlmkitError, match="no adapter 'nope'"):
        served.with_adapter("nope")
    with pytest.raises(GlmkitError, match="serves 2"):
        served.backend.scheduler.submit(request([5, 6], adapter=3))
    with pytest.raises(CheckpointError, match="name"):
        glmkit.load(TINY, adapters={"a:b": dirs["a"]})
    # a P-tuning v2 checkpoint changes every row's KV prefix: never per request
    (tmp_path / "pt").mkdir()
    (tmp_path / "pt" / "config.json").write_text('{"pre_seq_len": 4}')
    with pytest.raises(CheckpointError, match="P-tuning v2.*per request"):
        glmkit.load(TINY, adapters={"pt": tmp_path / "pt"})


def test_adapters_on_an_int8_base(dirs, merged):
    """QLoRA-style serving: the base matmuls int8, the adapter's A and B beside them in the
    activation dtype; the adapter still moves the logits to (close to) the merged float model's."""
    q = glmkit.load(TINY, adapters=dirs, quantize="int8")
    from glmkit.models.quantize import Int8Linear
    assert isinstance(q.model.layers[0].attention.wqkv, Int8Linear)
    tokens = prompts(2, seed=3)
    got = all_logits(q.model, tokens, adapters=[1, 0]).float()
    want = all_logits(merged["a"].model, tokens[:1])[0]
    base = all_logits(merged[""].model, tokens[:1])[0]
    err, moved = (got[0] - want).abs().mean(), (base - want).abs().mean()
    assert err < moved / 5, (err, moved)


def test_serve_lists_and_answers_each_adapter(dirs, merged):
    """`glmkit serve --adapter a=DIR --adapter b=DIR`: /v1/models lists the base and each
    `<base>:<name>` (with parent and root), each id answers with its own model's greedy reply,
    and an adapter the server does not have is the API's 404 model_not_found."""
    want = {name: m.chat(HI, max_new_tokens=16, temperature=0)[0] for name, m in merged.items()}
    assert len(set(want.values())) == 3, want       # a request answered by the wrong model would fail
    with running_server("--model", str(TINY), "--dtype", "float32", "--no-embeddings", "--no-console",
                        "--adapter", f"a={dirs['a']}", "--adapter", f"b={dirs['b']}") as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        cards = {m.id: m for m in client.models.list().data}
        assert list(cards) == ["chatglm3-tiny", "chatglm3-tiny:a", "chatglm3-tiny:b"]
        assert cards["chatglm3-tiny:a"].model_extra["parent"] == "chatglm3-tiny"
        assert cards["chatglm3-tiny:b"].model_extra["root"] == "chatglm3-tiny"
        assert cards["chatglm3-tiny:b"].model_extra["adapter"] == "b"
        assert cards["chatglm3-tiny"].model_extra["parent"] is None
        for name, model in [("", "chatglm3-tiny"), ("a", "chatglm3-tiny:a"), ("b", "chatglm3-tiny:b")]:
            r = client.chat.completions.create(model=model, messages=HI, max_tokens=16, temperature=0)
            assert r.choices[0].message.content == want[name], model
            assert r.model == model
        with pytest.raises(openai.NotFoundError) as e:
            client.chat.completions.create(model="chatglm3-tiny:nope", messages=HI, max_tokens=4)
        assert e.value.code == "model_not_found"
        # Ollama's API: "<model>:<tag>" is the adapter (":latest" stays the base model), an unknown one a 404
        ask = dict(messages=HI, stream=False, options={"temperature": 0, "num_predict": 16})
        for model, name in [("chatglm3-tiny:b", "b"), ("chatglm3-tiny:latest", "")]:
            r = httpx.post(url + "/api/chat", json={"model": model, **ask}, timeout=60)
            assert r.status_code == 200 and r.json()["message"]["content"] == want[name], (model, r.text)
        for model, name in [("chatglm3-tiny:b:latest", "b")]:     # an adapter's id with Ollama's tag
            r = httpx.post(url + "/api/chat", json={"model": model, **ask}, timeout=60)
            assert r.status_code == 200 and r.json()["message"]["content"] == want[name], (model, r.text)
        # unknown, and ids that merely start with a served one ("…:bee" is not the adapter "…:b")
        for model in ["chatglm3-tiny:nope", "chatglm3-tiny:bee", "chatglm3-tinyx", "chatglm3-tiny:b:v2"]:
            assert httpx.post(url + "/api/chat", json={"model": model, **ask}, timeout=60).status_code == 404, model


def test_adapter_options():
    """--adapter's values: one plain DIR is merged; NAME=DIR entries are served per request."""
    from glmkit.cli.options import split_adapters
    assert split_adapters([]) == (None, {})
    assert split_adapters(["x/dir"]) == ("x/dir", {})
    assert split_adapters(["a=x/1", "b=x/2"]) == (None, {"a": "x/1", "b": "x/2"})
    assert split_adapters(["./odd=name"]) == ("./odd=name", {})        # a path, not a name
    for bad, match in [(["x/1", "x/2"], "name each"), (["x/1", "a=x/2"], "name it too"),
                       (["a=x/1", "a=x/2"], "twice")]:
        with pytest.raises(GlmkitError, match=match):
            split_adapters(bad)
    with pytest.raises(GlmkitError, match="glmkit serve"):
        split_adapters(["a=x/1"], named_ok=False)


@pytest.mark.parametrize("args, says", [
    (["--random-like", "chatglm3-6b", "--adapter", "some/dir"], "needs a real model"),
    (["--adapter", "a=some/dir"], "glmkit serve"),
])
def test_bench_takes_one_merged_adapter(args, says):
    """`glmkit bench --adapter`: one DIR, merged; a named adapter or --random-like is one clear line."""
    import subprocess

    from conftest import glmkit_bin
    out = subprocess.run([glmkit_bin(), "bench", *args], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and says in out.stderr and "Traceback" not in out.stderr, out.stderr
