"""Prefix caching in the scheduler (engine/prefix_cache.py): a kept prefix gives exactly the tokens
a cold run gives, conversations reuse their history, eviction under a full pool loses nothing, and
a cache written behind the scheduler's back is never trusted.

Each scenario is played twice on the same model, cold (prefix_cache=False) and warm, with greedy
float32 decoding; prompts of later turns are built from the scenario's own earlier replies."""

import glmkit
import pytest
import torch

from conftest import TINY, TINY_32K
from glmkit.engine import GenerationRequest, SamplingParams, Scheduler

GREEDY = SamplingParams(temperature=0)
SYSTEM = "你是一个乐于助人的助手，回答要简洁。" * 3      # a shared system prompt (the tiny fixture has 256 positions)


@pytest.fixture(scope="module", params=[TINY, TINY_32K], ids=["tiny", "tiny32k"])
def model(request):
    return glmkit.load(request.param, dtype="float32")


def generate(model, sched, messages, n=16):
    h = sched.submit(GenerationRequest(model.encode_chat(messages), GREEDY, n, model.format.stop_ids))
    return [e.token for e in h if e.finish != "stop"]


def conversation(model, sched, user_turns, n=16):
    """A chat of several turns; each reply becomes history for the next."""
    messages, replies = [{"role": "system", "content": SYSTEM}], []
    for text in user_turns:
        messages.append({"role": "user", "content": text})
        out = generate(model, sched, messages, n)
        replies.append(out)
        messages.append({"role": "assistant", "content": model.tokenizer.decode(out)})
    return replies


def cold_and_warm(model, play, **kwargs):
    """(cold results, warm results, warm scheduler)."""
    cold = play(Scheduler(model.model, prefix_cache=False, max_queue=None, **kwargs))
    warm_sched = Scheduler(model.model, max_queue=None, **kwargs)
    return cold, play(warm_sched), warm_sched


def check_history_reuse(model):
    turns = ["你好", "再说一遍", "谢谢"]
    cold, warm, sched = cold_and_warm(model, lambda s: conversation(model, s, turns), max_batch=2)
    assert warm == cold
    first_prompt = len(model.encode_chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": "你好"}]))
    assert sched.stats.prefix_hits == 2            # turns 2 and 3
    assert sched.stats.prefix_hit_tokens >= 2 * first_prompt


def test_a_conversation_reuses_its_history(model):
    check_history_reuse(model)


def test_the_default_model_reuses_its_history(smol_float):
    check_history_reuse(smol_float)


def test_eviction_under_a_full_pool_loses_nothing(model):
    """Two rows, four conversations interleaved: kept prefixes move to the least recently used
    free row and are evicted from there; every reply equals the cold run's."""
    def play(s):
        out = []
        for rnd in range(2):
            for who in "ABCD":
                out.append(conversation(model, s, [f"{who}{rnd}"] if rnd == 0 else [f"{who}0", f"{who}1"]))
        return out
    cold, warm, sched = cold_and_warm(model, play, max_batch=2)
    assert warm == cold
    assert sched.stats.prefix_hits > 0


def test_sequences_running_together_share_a_prefix(model):
    """Three streams admitted at once into three rows, then a fourth: the shared system prompt is
    copied between rows while others decode."""
    def play(s):
        msgs = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": u}] for u in ("一", "二", "三", "四")]
        first = s.submit(GenerationRequest(model.encode_chat(msgs[0]), GREEDY, 8, model.format.stop_ids))
        first_out = [e.token for e in first]
        handles = [s.submit(GenerationRequest(model.encode_chat(m), GREEDY, 12, model.format.stop_ids)) for m in msgs[1:]]
        return [first_out] + [[e.token for e in h] for h in handles]
    cold, warm, sched = cold_and_warm(model, play, max_batch=4)
    assert warm == cold
    assert sched.stats.prefix_hits >= 3


def test_a_cancelled_sequence_keeps_what_it_computed(model):
    def play(s):
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "你好"}]
        h = s.submit(GenerationRequest(model.encode_chat(messages), GREEDY, 16, model.format.stop_ids))
        got = [h.get().token for _ in range(3)]
        h.cancel()
        messages += [{"role": "assistant", "content": model.tokenizer.decode(got)}, {"role": "user", "content": "继续"}]
        return [got, generate(model, s, messages)]
    cold, warm, sched = cold_and_warm(model, play, max_batch=2)
    assert warm == cold and sched.stats.prefix_hits == 1


def test_a_cache_written_behind_the_schedulers_back_is_not_reused(model):
    sched = Scheduler(model.model, max_batch=2, max_queue=None)
    turns = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "你好"}]
    generate(model, sched, turns)
    # someone runs the model directly, overwriting row 0
    with torch.inference_mode():
        model.model(torch.randint(0, 100, (1, 40)), torch.tensor([0]))
    again = generate(model, sched, turns)
    assert sched.stats.prefix_hits == 0
    cold = generate(model, Scheduler(model.model, max_batch=2, max_queue=None, prefix_cache=False), turns)
    assert again == cold


def test_a_sequence_cancelled_before_another_scheduler_writes_is_not_reused(model):
    """A cancelled sequence leaves at the scheduler's next admission; if another scheduler of the
    same model wrote the cache in between, what it computed is gone and must not be kept."""
    turns = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "你好"}]
    sched = Scheduler(model.model, max_batch=2, max_queue=None)
    h = sched.submit(GenerationRequest(model.encode_chat(turns), GREEDY, 16, model.format.stop_ids))
    h.get(), h.get()
    h.cancel()                                   # still in its slot until the next admission
    other = Scheduler(model.model, max_batch=2, max_queue=None, prefix_cache=False)
    generate(model, other, [{"role": "user", "content": "别的话题，完全不同的内容" * 4}])
    again = generate(model, sched, turns)
    assert sched.stats.prefix_hits == 0
    assert again == generate(model, other, turns)
