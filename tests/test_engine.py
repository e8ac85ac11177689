"""Sampling, stop handling, context limits and streaming detokenization."""

import pytest
import torch

import glmkit
from glmkit.engine import StopStrings
from glmkit.engine.sampling import apply_repetition_penalty, filter_top_k_top_p
from glmkit.tokenizers import IncrementalDecoder

HELLO = [{"role": "user", "content": "你好"}]


def test_seed_makes_sampling_reproducible(tiny):
    ids = tiny.encode_chat(HELLO)
    a = tiny.generate(ids, max_new_tokens=30, temperature=1.0, top_p=1.0, seed=7, stop_ids=())
    b = tiny.generate(ids, max_new_tokens=30, temperature=1.0, top_p=1.0, seed=7, stop_ids=())
    c = tiny.generate(ids, max_new_tokens=30, temperature=1.0, top_p=1.0, seed=8, stop_ids=())
    assert a == b and a != c and len(a) == 30


def test_top_k_1_is_greedy(tiny):
    ids = tiny.encode_chat(HELLO)
    greedy = tiny.generate(ids, max_new_tokens=15, temperature=0, stop_ids=())
    assert tiny.generate(ids, max_new_tokens=15, temperature=1.5, top_k=1, seed=3, stop_ids=()) == greedy


def test_filters():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.0])
    assert torch.isinf(filter_top_k_top_p(logits, 2, 1.0)).tolist() == [True, False, False, True]
    # top_p 0.5: the top token alone already holds > half of the mass
    kept = ~torch.isinf(filter_top_k_top_p(torch.tensor([0.0, 5.0, 1.0]), 0, 0.5))
    assert kept.tolist() == [False, True, False]
    pen = apply_repetition_penalty(torch.tensor([2.0, -2.0, 1.0]), torch.tensor([0, 1]), 2.0)
    assert pen.tolist() == [1.0, -4.0, 1.0]


def test_repetition_penalty_changes_output(tiny):
    ids = tiny.encode_chat(HELLO)
    plain = tiny.generate(ids, max_new_tokens=100, temperature=0, stop_ids=())
    penalised = tiny.generate(ids, max_new_tokens=100, temperature=0, repetition_penalty=50.0, stop_ids=())
    repeats = lambda seq: len(seq) - len(set(seq))  # noqa: E731
    assert repeats(penalised) < repeats(plain)


def test_max_length_counts_prompt_and_reply(tiny):
    ids = tiny.encode_chat(HELLO)
    out = tiny.generate(ids, max_new_tokens=100, max_length=len(ids) + 5, temperature=0, stop_ids=())
    assert len(out) == 5


def test_prompt_longer_than_context_is_an_error(tiny):
    long = [{"role": "user", "content": "你好 " * 400}]
    with pytest.raises(glmkit.ContextLengthError, match="limit is 256"):
        list(tiny.stream_chat(long))


def test_fit_drops_oldest_turns_and_keeps_system(tiny):
    msgs = [{"role": "system", "content": "sys"}]
    for i in range(12):
        msgs += [{"role": "user", "content": f"question {i} " * 3}, {"role": "assistant", "content": f"answer {i} " * 3}]
    msgs.append({"role": "user", "content": "last"})
    fitted, dropped = tiny.fit(msgs, reserve=64)
    assert dropped > 0 and fitted[0]["role"] == "system" and fitted[-1]["content"] == "last"
    assert len(tiny.encode_chat(fitted)) + 64 <= tiny.context_length
    assert fitted == [msgs[0]] + msgs[1 + dropped:]


def test_stop_strings_split_across_pieces():
    s = StopStrings(["END"])
    assert s.feed("abc E") == "abc "
    assert s.feed("N") == ""
    assert s.feed("x") == "ENx"
    assert s.feed("..EN") == ".."
    assert s.feed("D and more") == ""
    assert s.hit and s.flush() == ""


def test_stop_string_ends_chat_reply(smol):
    full = "".join(smol.stream_chat(HELLO, temperature=0, max_new_tokens=30))
    word = full.split()[2]
    reply = glmkit.Reply()
    cut = "".join(e.text for e in smol.reply(HELLO, temperature=0, max_new_tokens=30, stop=[word], reply=reply)
                  if e.kind == "text")
    assert word not in cut and full.startswith(cut) and reply.finish_reason == "stop"
    assert reply.messages[0]["content"] == cut


def test_stream_holds_back_partial_utf8(tiny):
    tok = tiny.tokenizer
    ids = tok.encode("🙂")  # byte-fallback: several byte tokens
    assert len(ids) > 2
    dec = IncrementalDecoder(tok, strip_leading_space=True)
    pieces = [dec.feed(i) for i in ids]
    assert all(p == "" for p in pieces[:-1]) and pieces[-1] == "🙂"
    dec = IncrementalDecoder(tok, strip_leading_space=True)
    assert [dec.feed(i) for i in ids[:-1]] == [""] * (len(ids) - 1)  # ends mid-character: nothing shown
    assert dec.flush() == "\ufffd" * 3


def test_streamed_text_equals_history_and_never_shows_specials(tiny):
    reply = glmkit.Reply()
    pieces = [e.text for e in tiny.reply(HELLO, temperature=1.0, seed=1, max_new_tokens=60, reply=reply)
              if e.kind == "text"]
    text = "".join(pieces)
    assert len(text) > 0
    for special in ("<|user|>", "<|assistant|>", "<|observation|>", "[gMASK]"):
        assert special not in text
    # streaming assembled exactly the text a one-shot decode gives for the same tokens
    tok = tiny.tokenizer
    segments, cur = [], []
    for t in reply.token_ids:
        if t == tok.special_id("<|assistant|>"):
            segments.append(cur)
            cur = []
        elif t not in tiny.format.stop_ids:
            cur.append(t)
    segments.append(cur)
    first = tok.decode(segments[0])
    assert first.split("\n", 1)[-1].strip() == reply.messages[0]["content"]
    if len(reply.messages) == 1 and not reply.messages[0]["metadata"].strip():
        assert text == reply.messages[0]["content"]


def test_fast_nucleus_matches_the_full_sort_distribution():
    """The candidate-set sampler keeps exactly the tokens the full-sort filter keeps."""
    from glmkit.engine.sampling import SamplingParams, filter_top_k_top_p, sample_row
    g = torch.Generator().manual_seed(0)
    for temp, top_p, top_k in ((0.7, 0.9, 0), (1.0, 0.5, 0), (1.0, 0.99, 0), (0.8, 0.8, 20), (1.0, 1.0, 5)):
        logits = torch.randn(500, generator=g) * 3
        allowed = set(torch.nonzero(~torch.isinf(filter_top_k_top_p(logits / temp, top_k, top_p))).flatten().tolist())
        params = SamplingParams(temperature=temp, top_p=top_p, top_k=top_k)
        drawn = {sample_row(logits, params, torch.tensor([], dtype=torch.long), g) for _ in range(300)}
        assert drawn <= allowed, (temp, top_p, top_k)
        if len(allowed) <= 5:
            assert drawn == allowed
    # frequencies follow the probabilities
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    counts = torch.zeros(3)
    for _ in range(3000):
        counts[sample_row(logits, SamplingParams(temperature=1.0, top_p=1.0), torch.tensor([], dtype=torch.long), g)] += 1
    assert torch.allclose(counts / 3000, torch.tensor([0.5, 0.3, 0.2]), atol=0.04)


def test_a_filter_that_keeps_one_token_picks_greedys_token_among_ties():
    """bf16 logits tie often; top_k=1 or a tiny top_p must pick the token argmax picks (the lowest id)."""
    from glmkit.engine.sampling import SamplingParams, sample_row
    logits = torch.zeros(1000)
    logits[[700, 5, 300]] = 4.0                  # three-way tie at the top
    none = torch.tensor([], dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    assert int(logits.argmax()) == 5
    for params in (SamplingParams(temperature=1.5, top_p=1e-4), SamplingParams(temperature=1.0, top_k=1)):
        assert {sample_row(logits, params, none, g) for _ in range(20)} == {5}
