"""Constrained decoding (issue 14, item 1): a JSON schema becomes a per-row token mask in the one
decode loop, so the reply always parses and matches, at any temperature, for every vocabulary."""

import json

import jsonschema
import pytest

import glmkit
from glmkit.errors import GrammarError

PERSON = {      # nested: an object in an object, an array, enums, numbers, a pattern, required fields;
    "type": "object",  # short keys and bounds keep a reply near 25 tokens (100 of them run in the suite)
    "properties": {
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "r": {"enum": ["admin", "user"]},
        "t": {"type": "array", "items": {"enum": ["red", "blue"]}, "maxItems": 2},
        "o": {"type": "object", "properties": {"z": {"type": "string", "pattern": "^[0-9]{2}$"},
                                               "k": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["z", "k"], "additionalProperties": False},
    },
    "required": ["n", "r", "t", "o"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe a made-up person as JSON."}]


def test_a_hundred_replies_at_temperature_one_all_match(smol):
    from glmkit.engine import Scheduler
    grammar = smol.json_grammar(PERSON)
    prompt = smol.encode_chat(ASK)
    params = smol.params(temperature=1.0, top_p=1.0, grammar=grammar)
    # 32 rows a step (the fixture's scheduler takes 8): the same replies, in half the time
    smol.serve_with(Scheduler(smol.model, max_batch=32, max_seq_len=256, max_queue=None))
    try:
        texts = [smol.tokenizer.decode(o) for o in smol.generate_batch([prompt] * 100, max_new_tokens=80,
                                                                        params=params)]
    finally:
        smol.serve_with(Scheduler(smol.model, max_queue=None))      # as the fixture's was
    assert len(texts) == 100
    for t in texts:
        jsonschema.validate(json.loads(t), PERSON)
    assert len(set(texts)) > 10         # sampled, not one reply repeated


def test_constrained_and_free_rows_in_one_batch_equal_their_solo_runs(smol):
    grammar = smol.json_grammar(PERSON)
    prompts = [smol.encode_chat(ASK), smol.encode_chat([{"role": "user", "content": "Say hi."}])]
    # greedy: a sampled draw near a boundary would flip on rounding differences between batch sizes
    constrained = smol.params(temperature=0, grammar=grammar)
    free = smol.params(temperature=0)
    backend = smol.backend
    solo = [[e.token for e in backend.submit(prompts[0], constrained, smol.format.stop_ids, 60)],
            [e.token for e in backend.submit(prompts[1], free, smol.format.stop_ids, 60)]]
    handles = [backend.submit(prompts[0], constrained, smol.format.stop_ids, 60),
               backend.submit(prompts[1], free, smol.format.stop_ids, 60)]
    together = [[e.token for e in h] for h in handles]
    assert together == solo
    jsonschema.validate(json.loads(smol.tokenizer.decode(solo[0][:-1])), PERSON)


def test_a_schema_the_library_cannot_compile_is_a_clear_error(smol):
    with pytest.raises(GrammarError, match="cannot be used to constrain"):
        smol.json_grammar({"type": "object", "properties": {"a": {"$ref": "#/definitions/missing"}}})
    with pytest.raises(GrammarError, match="cannot be used to constrain"):
        smol.json_grammar({"type": "string", "pattern": "(?<=a)b"})


def test_sentencepiece_vocabulary_of_chatglm3(tiny):
    """ChatGLM3: the JSON answer is a plain segment (an empty metadata line first); 100 replies at
    temperature 1 from the tiny random model, every one valid."""
    grammar = tiny.json_grammar(PERSON)
    prompt = tiny.encode_chat(ASK)
    params = tiny.params(temperature=1.0, top_p=1.0, grammar=grammar)
    outs = []
    for _ in range(4):
        outs += tiny.generate_batch([prompt] * 25, max_new_tokens=200, params=params)
    assert len(outs) == 100
    for out in outs:
        parser = tiny.format.reply_parser()
        for t in out:
            parser.feed(t)
        parser.finish()
        [msg] = parser.messages()
        assert msg["metadata"] == ""
        jsonschema.validate(json.loads(msg["content"]), PERSON)


def test_glm4_tiktoken_vocabulary(glm4_model):
    grammar = glm4_model.json_grammar({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
                                       "additionalProperties": False})
    params = glm4_model.params(temperature=1.0, top_p=1.0, seed=1, grammar=grammar)
    [out] = glm4_model.generate_batch([glm4_model.encode_chat(ASK)], max_new_tokens=40, params=params)
    assert set(json.loads(glmkit_text(glm4_model, out))) == {"n"}


def glmkit_text(m, ids):
    parser = m.format.reply_parser()
    for t in ids:
        parser.feed(t)
    parser.finish()
    return parser.messages()[0]["content"]


@pytest.fixture(scope="module")
def glm4_model(tmp_path_factory):
    from test_glm4 import glm4 as make          # the tiny GLM-4 of test_glm4.py, original layout
    gen = make.__wrapped__(tmp_path_factory)
    orig = next(gen)[0]
    return glmkit.load(orig, dtype="float32")


def test_tokenizer_json_vocabulary(tmp_path):
    """A transformers directory's tokenizer.json (byte-level BPE, Qwen2.5's shape)."""
    pytest.importorskip("transformers")
    from test_hf_families import write_family
    write_family("qwen2.5", tmp_path, max_position_embeddings=1024)
    m = glmkit.load(tmp_path, dtype="float32")
    params = m.params(temperature=1.0, top_p=1.0, grammar=m.json_grammar(PERSON))
    for out in m.generate_batch([m.encode_chat(ASK)] * 8, max_new_tokens=200, params=params):
        jsonschema.validate(json.loads(m.tokenizer.decode(out)), PERSON)
