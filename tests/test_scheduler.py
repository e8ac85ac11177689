"""The continuous-batching Scheduler in-process: the one decode loop behind the Python API, the
terminal and the server."""

import threading
import time

import pytest
import torch

import glmkit
from glmkit.engine import GenerationRequest, QueueFull, SamplingParams, Scheduler
from glmkit.errors import ContextLengthError, GlmkitError

from conftest import TINY

GREEDY = SamplingParams(temperature=0)
HELLO = [{"role": "user", "content": "你好"}]


@pytest.fixture(params=["caller", "thread"])
def scheduler(tiny, request):
    """A factory of schedulers over tiny's model, stepped by their callers (the Python API) or by
    their own thread (the server); each is stopped after the test."""
    made = []

    def make(mode=request.param, **kw):
        made.append(Scheduler(tiny.model, **kw))
        return made[-1].start() if mode == "thread" else made[-1]
    yield make
    for s in made:
        s.stop()


def req(prompt, n, **kw):
    return GenerationRequest(list(prompt), GREEDY, n, **kw)


def test_admission_is_first_come_first_served(tiny, scheduler):
    s = scheduler(max_batch=1)
    ids = tiny.encode_chat(HELLO)
    hs = [s.submit(req(ids, 8)) for _ in range(3)]
    outs = [[ev.token for ev in h] for h in hs]
    seqs = [h._seq for h in hs]
    assert outs[0] == outs[1] == outs[2] and len(outs[0]) == 8
    # one slot: each sequence starts only after the one before it finished
    assert seqs[0].last_token_at <= seqs[1].first_token_at and seqs[1].last_token_at <= seqs[2].first_token_at


def test_a_waiting_sequence_gets_the_first_slot_that_frees(tiny, scheduler):
    s = scheduler(max_batch=2)
    ids = tiny.encode_chat(HELLO)
    a, b, c = (s.submit(req(ids, n)) for n in (5, 40, 5))
    for h in (a, b, c):
        list(h)
    A, B, C = a._seq, b._seq, c._seq
    assert A.first_token_at < C.first_token_at and A.last_token_at <= C.first_token_at < B.last_token_at
    assert C.slot == A.slot == 0 and B.slot == 1


def test_chunked_prefill_gives_the_same_tokens_and_keeps_streams_running(tiny, scheduler):
    prompt = tiny.encode_chat([{"role": "user", "content": "tell me a story about a fox and a dog " * 5}])
    assert len(prompt) > 60
    whole = [ev.token for ev in scheduler(prefill_chunk=256).submit(req(prompt, 12, stop_ids=frozenset()))]
    s = scheduler(prefill_chunk=16)
    assert [ev.token for ev in s.submit(req(prompt, 12))] == whole
    # a running stream advances one token per prefill chunk of a newcomer
    a = s.submit(req(tiny.encode_chat(HELLO), 150))
    a.get()
    times = []
    a.on_event(lambda: times.append(time.perf_counter()))
    b = s.submit(req(prompt, 2))
    list(b)
    chunks = -(-len(prompt) // 16)
    assert sum(t < b._seq.first_token_at for t in times) >= chunks - 1
    a.cancel()


def test_cancelling_frees_the_slot(tiny, scheduler):
    s = scheduler(max_batch=1)
    ids = tiny.encode_chat(HELLO)
    long = s.submit(req(ids, 200, stop_ids=frozenset()))
    long.get()
    waiting = s.submit(req(ids, 5))
    cancelled_waiting = s.submit(req(ids, 5))
    cancelled_waiting.cancel()            # never admitted
    long.cancel()
    assert len([ev.token for ev in waiting]) == 5       # it got the freed slot
    assert long._seq.generated < 200 and cancelled_waiting._seq.generated == 0
    deadline = time.time() + 10
    while s.stats.cancelled < 2 and time.time() < deadline:
        time.sleep(0.01)
    assert s.stats.cancelled == 2 and s.running == 0 and s.queue_length == 0


def test_queue_full_when_every_slot_and_the_queue_are_taken(tiny, scheduler):
    s = scheduler(max_batch=1, max_queue=1)
    ids = tiny.encode_chat(HELLO)
    running = s.submit(req(ids, 200, stop_ids=frozenset()))
    running.get()                          # admitted: the one slot is taken
    queued = s.submit(req(ids, 3))
    with pytest.raises(QueueFull, match="already waiting"):
        s.submit(req(ids, 3))
    running.cancel()
    assert len(list(queued)) == 3
    assert len(list(s.submit(req(ids, 3)))) == 3          # room again


def test_one_budget_rule_and_error(tiny, scheduler):
    s = scheduler(max_seq_len=40)
    ids = tiny.encode_chat(HELLO)
    assert len(ids) < 40
    with pytest.raises(ContextLengthError, match=r"the prompt is 40 tokens but the context limit is 40 tokens") as e:
        s.submit(req(list(range(100, 140)), 5))
    assert "shorten the prompt" in str(e.value) and (e.value.prompt_tokens, e.value.limit) == (40, 40)
    # a reply is cut where prompt + reply reach the limit
    evs = list(s.submit(req(ids, 100, stop_ids=frozenset())))
    assert len(evs) == 40 - len(ids) and evs[-1].finish == "length"
    # the Python API's max_length goes through the same rule and says the same
    with pytest.raises(ContextLengthError) as api:
        tiny.generate(ids, max_length=len(ids))
    assert str(api.value) == str(e.value).replace("40", str(len(ids)))
    with pytest.raises(GlmkitError, match="at least 1"):
        s.submit(req(ids, 0))
    with pytest.raises(GlmkitError, match="empty"):
        s.submit(req([], 3))


def test_forced_prefix_is_honoured_then_the_model_goes_on(tiny, scheduler):
    ids = tiny.encode_chat(HELLO)
    free = [ev.token for ev in scheduler().submit(req(ids, 8, stop_ids=frozenset()))]
    forced = [5, 6, 7]
    got = [ev.token for ev in scheduler().submit(req(ids, 8, stop_ids=frozenset(), forced_prefix=forced))]
    assert got[:3] == forced and len(got) == 8 and got != free


def test_sampling_params_are_checked_when_built():
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_k=-1), dict(repetition_penalty=0),
                dict(temperature=float("nan"))):
        with pytest.raises(GlmkitError):
            SamplingParams(**bad)
    with pytest.raises(AttributeError):
        GREEDY.temperature = 1.0          # frozen: a checked object stays checked


def test_stop_fails_what_is_left_instead_of_hanging(tiny, scheduler):
    s = scheduler(max_batch=1)
    ids = tiny.encode_chat(HELLO)
    running = s.submit(req(ids, 200, stop_ids=frozenset()))
    running.get()
    waiting = s.submit(req(ids, 3))
    s.stop()
    with pytest.raises(GlmkitError, match="engine stopped"):
        list(waiting)
    assert len(list(s.submit(req(ids, 3)))) == 3     # still usable


def test_from_memory_sizes_the_cache_from_its_budget():
    fresh = glmkit.load(TINY)          # the session's shared `tiny` may hold a larger cache from other tests
    cfg = fresh.model.cfg
    per_token = cfg.n_layer * 2 * cfg.n_kv_head * cfg.head_dim * fresh.model.dtype.itemsize
    s = Scheduler.from_memory(fresh.model, 1, 2)
    try:
        assert s.max_seq_len == max(256, min(cfg.context_length, 2**20 // (2 * per_token)))
        assert (fresh.model.cache_batch, fresh.model.cache_length) == (2, s.max_seq_len)   # allocated up front
    finally:
        s.stop()


# -- the Python API is the scheduler -----------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny", "tiny32k", "smol", "smol_float"])
def test_python_api_and_scheduler_give_identical_greedy_tokens(name, request):
    model = request.getfixturevalue(name)
    ids = model.encode_chat(HELLO)
    others = [model.encode_chat([{"role": "user", "content": t}]) for t in ("What is 2+2?", "Write a haiku.")]
    s = Scheduler(model.model, max_batch=3)
    try:
        alone = [ev.token for ev in s.submit(req(ids, 16))]
        with_stop = [ev.token for ev in s.submit(req(ids, 16, stop_ids=model.format.stop_ids))]
        # batched with other sequences, as a server runs it
        hs = [s.submit(req(p, 16)) for p in (others[0], ids, others[1])]
        served = [[ev.token for ev in h] for h in hs]
    finally:
        s.stop()
    assert model.generate(ids, max_new_tokens=16, temperature=0, repetition_penalty=1.0, stop_ids=()) == alone
    if model.model.dtype == torch.float32:
        # float32 kernels give a row the same result whatever it is batched with; bfloat16's
        # accumulate differently for different numbers of rows, so only float32 is batch-invariant
        assert served[1] == alone
        assert model.generate_batch(others, max_new_tokens=16, temperature=0, repetition_penalty=1.0,
                                    stop_ids=()) == [served[0], served[2]]
    reply = glmkit.Reply()
    shown = "".join(e.text for e in model.reply(HELLO, max_new_tokens=16, temperature=0, repetition_penalty=1.0,
                                                 reply=reply) if e.kind == "text")
    assert reply.token_ids == with_stop
    text, history = model.chat(HELLO, max_new_tokens=16, temperature=0, repetition_penalty=1.0)
    assert text == shown and history == HELLO + reply.messages


def test_the_python_api_needs_no_thread_and_the_server_mode_one_daemon(tiny):
    before = set(threading.enumerate())
    tiny.generate(tiny.encode_chat(HELLO), max_new_tokens=3, temperature=0)
    assert set(threading.enumerate()) == before          # the caller's thread ran the steps
    s = Scheduler(tiny.model).start()
    thread = s._thread
    assert thread.daemon and thread.name == "glmkit-scheduler"
    assert len(list(s.submit(req(tiny.encode_chat(HELLO), 3)))) == 3
    s.stop()
    assert not thread.is_alive()


def test_one_reply_driver_for_the_python_api_and_the_server(smol):
    from glmkit.chat.reply_stream import Cancelled
    from glmkit.server.scheduled_model import ScheduledModel
    sampling = dict(temperature=0.7, top_p=0.9, repetition_penalty=1.2)
    full = "".join(smol.stream_chat(HELLO, max_new_tokens=30, seed=5, **sampling))
    stop = [full.split()[3]]
    limit = len(smol.encode_chat(HELLO)) + 30
    api, served = glmkit.Reply(), glmkit.Reply()
    a = list(smol.reply(HELLO, max_new_tokens=40, max_length=limit, stop=stop, reply=api, seed=5, **sampling))
    model = ScheduledModel(smol, threading.Event(), max_new_tokens=40, params=smol.params(seed=5))
    b = list(model.reply(HELLO, reply=served, max_length=limit, stop=stop, **sampling))
    assert a == b and api == served and api.finish_reason == "stop" and stop[0] not in api.messages[0]["content"]
    assert (model.prompt_tokens, model.completion_tokens, model.finish_reason) == (
        api.prompt_tokens, api.completion_tokens, "stop")
    # max_length counts prompt + reply in both
    cut = glmkit.Reply()
    list(model.reply(HELLO, reply=cut, max_length=limit - 25, **sampling))
    assert cut.completion_tokens == 5 and cut.finish_reason == "length"
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        list(ScheduledModel(smol, cancel, max_new_tokens=40).reply(HELLO))
