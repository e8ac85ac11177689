"""The compiled decode step (engine/compiled_step.py) against the eager one: same greedy tokens on
both tiny ChatGLM3 fixtures and on the default model, across batch buckets, with sequences joining
and leaving mid-run, and no compilation at all once a bucket is warm (PyTorch's compile counters).

Compile time is what these tests cost: the tiny models compile in seconds once Inductor's cache
(~/.cache/glmkit/inductor) is warm, the default model in about a minute the first time; each
compiled step is made once per module and reused."""

import threading
from collections import defaultdict

import pytest
import torch
from torch._dynamo.utils import counters

import glmkit
from glmkit.engine import GenerationRequest, SamplingParams, Scheduler
from glmkit.engine.compiled_step import CompiledDecode, buckets_for

GREEDY = SamplingParams(temperature=0)


def req(prompt, n):
    return GenerationRequest(list(prompt), GREEDY, n)


def script(s: Scheduler, prompts: list[list[int]]) -> dict:
    """Sequences join and leave mid-run: A alone (1 row), B joins (2 rows), C and D join (4 rows, then
    3 with a padding row), B finishes, E starts from B's kept prefix in B's row, C is cancelled.
    Returns every sequence's tokens.  The steps depend only on this order, so eager and compiled
    runs see the same batches."""
    hs, out = {}, defaultdict(list)

    def take(name, n=None):
        for ev in hs[name] if n is None else (hs[name].get() for _ in range(n)):
            out[name].append(ev.token)

    hs["A"] = s.submit(req(prompts[0], 70))
    take("A", 6)
    hs["B"] = s.submit(req(prompts[1], 12))
    take("B", 5)
    hs["C"] = s.submit(req(prompts[2], 40))
    hs["D"] = s.submit(req(prompts[3], 25))
    take("D", 4)
    take("B")                                   # B runs to its end: row 1 is free, rows 0, 2, 3 run
    take("A", 4)
    hs["E"] = s.submit(req(prompts[1] + out["B"][:6] + prompts[0][:3], 15))
    take("E", 3)
    take("C", 6)
    hs["C"].cancel()
    for name in ("A", "D", "E"):
        take(name)
    return dict(out)


def prompts_for(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(10, vocab, (n,), generator=g).tolist() for n in (5, 17, 9, 30)]


def compare(model, compiled: CompiledDecode, max_batch: int):
    """Eager and compiled runs of the script: same tokens, compiled steps in every bucket, and no
    compilation during the compiled run (fullgraph=True makes a recompile beyond the limit raise; the
    scheduler then marks the bucket failed and runs it eagerly)."""
    prompts = prompts_for(model.cfg.vocab_size)
    eager = Scheduler(model, max_batch=max_batch)
    expected = script(eager, prompts)
    eager.stop()
    s = Scheduler(model, max_batch=max_batch, compile=compiled)
    graphs, calls = counters["stats"]["unique_graphs"], dict(compiled.calls)
    got = script(s, prompts)
    s.stop()
    assert got == expected and not compiled.failed
    assert counters["stats"]["unique_graphs"] == graphs, "the compiled step compiled again after warm-up"
    assert all(compiled.calls[b] > calls[b] for b in compiled.buckets), (calls, compiled.calls)
    return got


@pytest.fixture(scope="module", params=["tiny", "tiny32k"])
def tiny_compiled(request):
    """A tiny fixture's model with its compiled steps for max_batch 4 (buckets 1, 2, 4), compiled now."""
    model = request.getfixturevalue(request.param).model
    compiled = CompiledDecode(model, 4)
    Scheduler(model, max_batch=4, compile=compiled)        # reserves the cache's rows
    graphs = counters["stats"]["unique_graphs"]
    compiled.compile()
    assert not compiled.failed and compiled.ready == {1, 2, 4}
    assert counters["stats"]["unique_graphs"] == graphs + 3   # one graph per bucket
    return model, compiled


def test_buckets():
    assert buckets_for(1) == (1,)
    assert buckets_for(4) == (1, 2, 4)
    assert buckets_for(6) == (1, 2, 4, 6)
    assert buckets_for(64) == (1, 2, 4, 8, 16, 32, 64)


def test_compiled_and_eager_give_the_same_greedy_tokens(tiny_compiled):
    model, compiled = tiny_compiled
    out = compare(model, compiled, 4)
    assert len(out["A"]) == 70 and len(out["C"]) == 6


def test_background_compile_switches_mid_run_without_touching_the_cache(tiny_compiled):
    """A scheduler that compiles in the background: the eager step serves until the bucket is
    ready, then the compiled one; the warm-up, run while sequences hold keys in the cache, writes
    only the scratch slot, so the tokens are the eager run's."""
    model, warm = tiny_compiled
    prompts = prompts_for(model.cfg.vocab_size)
    eager = Scheduler(model, max_batch=2)
    expected = [[ev.token for ev in eager.submit(req(p, 40))] for p in prompts[:2]]
    eager.stop()
    told, go = [], threading.Event()

    def progress(line):                        # the compile thread says it starts, then waits for us
        told.append(line)
        go.wait(timeout=600)
    s = Scheduler(model, max_batch=2, compile=True, progress=progress)
    a, b = s.submit(req(prompts[0], 40)), s.submit(req(prompts[1], 40))
    first = [[a.get().token for _ in range(5)], [b.get().token for _ in range(5)]]
    assert s.compiled.calls[2] == 0 and 2 not in s.compiled.ready   # eager so far
    assert told and "batch 1" in told[0]                            # compiling was asked for
    go.set()
    assert s.compiled.wait(timeout=600) and 2 in s.compiled.ready
    got = [first[0] + [ev.token for ev in a], first[1] + [ev.token for ev in b]]
    s.stop()
    assert got == expected
    assert s.compiled.calls[2] > 0 and any("batch 2" in line for line in told)


def test_static_full_length_variant_gives_the_same_tokens(tiny):
    """The CUDA-graph layout (whole cache allocated up front, attention over all of it), on CPU."""
    model = tiny.model
    compiled = CompiledDecode(model, 2, static=True)
    s = Scheduler(model, max_batch=2, compile=compiled)
    assert model.cache_length == s.max_seq_len               # allocated whole
    compiled.compile()
    prompts = prompts_for(model.cfg.vocab_size)
    eager = Scheduler(model, max_batch=2)
    expected = [[ev.token for ev in eager.submit(req(p, 30))] for p in prompts[:2]]
    eager.stop()
    graphs = counters["stats"]["unique_graphs"]
    hs = [s.submit(req(p, 30)) for p in prompts[:2]]
    got = [[ev.token for ev in h] for h in hs]
    s.stop()
    assert got == expected and compiled.calls[2] > 0 and not compiled.failed
    assert counters["stats"]["unique_graphs"] == graphs


def test_default_model_compiled_matches_eager_as_the_cache_grows(smol):
    """The embedded default model as shipped (int4 kernel, bfloat16 activations; the compiled step
    emulates eager rounding, see compiled_step.py): one bucket, a sequence that outgrows the first
    cache allocation (256 tokens) while decoding, and no compilation after warm-up."""
    model = smol.model
    prompt = smol.encode_chat([{"role": "user", "content": "Write a long story about a lighthouse keeper."}])
    prompt = prompt + prompt[3:] * (190 // len(prompt))                  # ~190 tokens
    with torch.inference_mode(False):
        model.setup_caches(1, 256)      # the session's model may have a larger cache from earlier tests
    compiled = CompiledDecode(model, 1)
    s = Scheduler(model, max_batch=1, compile=compiled)
    compiled.compile()
    start_len = model.cache_length
    graphs = counters["stats"]["unique_graphs"]
    got = [ev.token for ev in s.submit(req(prompt, 110))]
    s.stop()
    assert not compiled.failed
    assert len(prompt) + 110 > start_len and model.cache_length > start_len   # grew mid-run
    assert compiled.calls[1] >= 100
    assert counters["stats"]["unique_graphs"] == graphs
    eager = Scheduler(model, max_batch=1)
    expected = [ev.token for ev in eager.submit(req(prompt, 110))]
    eager.stop()
    assert got == expected


def test_a_failing_compiled_step_falls_back_to_eager_for_good(tiny):
    """A compiled step that raises (a guard failing beyond the recompile limit does, with fullgraph)
    costs that bucket its compiled step, not the sequences: the step runs eagerly, same tokens."""
    model = tiny.model
    prompt = prompts_for(model.cfg.vocab_size)[0]
    eager = Scheduler(model, max_batch=1)
    expected = [ev.token for ev in eager.submit(req(prompt, 12))]
    eager.stop()
    compiled = CompiledDecode(model, 1, background=False)
    attempts = []

    def broken(*args):
        attempts.append(1)
        raise RuntimeError("recompile limit")
    compiled._fns[1] = broken
    compiled.ready.add(1)                      # as if compiled
    s = Scheduler(model, max_batch=1, compile=compiled)
    got = [ev.token for ev in s.submit(req(prompt, 12))]
    s.stop()
    assert got == expected
    assert len(attempts) == 1 and "recompile limit" in compiled.failed[1] and compiled.calls[1] == 0


@pytest.mark.parametrize("argv, env, expected", [
    (["chat"], {}, True), (["chat", "--no-compile"], {}, False), (["chat"], {"GLMKIT_NO_COMPILE": "1"}, False),
    (["chat", "-p", "hi"], {}, False), (["serve"], {}, True), (["serve", "--no-compile"], {}, False)])
def test_the_commands_compile_unless_told_not_to(argv, env, expected, monkeypatch):
    """chat (a session) and serve compile by default; --no-compile or GLMKIT_NO_COMPILE=1 keep the
    eager step; a one-shot -p never compiles."""
    from glmkit.cli import build_parser
    from glmkit.cli.options import load_model
    monkeypatch.delenv("GLMKIT_NO_COMPILE", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    seen = {}
    monkeypatch.setattr(glmkit, "load", lambda *a, **kw: seen.update(kw))
    args = build_parser().parse_args(argv)
    load_model(args, progress=False, compile=getattr(args, "prompt", None) is None)
    assert seen["compile"] is expected
