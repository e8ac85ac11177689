"""ChatGLM2-6B / CodeGeeX2-6B (issue 13, item 2): ChatGLM3's files and blocks with ChatGLM2's prompt.

The fixture is the tiny ChatGLM3 checkpoint with the name a ChatGLM2 release writes into its
config.json; the expected prompt ids are written out by hand from the original
`tokenization_chatglm.py` of chatglm2-6b: `[gMASK]` `sop`, then SentencePiece over the whole
`[Round N]\\n\\n问：...\\n\\n答：` text (encoded here with sentencepiece directly, not through glmkit)."""

import json
import shutil

import pytest
import sentencepiece as spm

import glmkit
from conftest import TINY


@pytest.fixture(scope="module")
def glm2_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("m") / "weights"          # the directory's own name says nothing
    shutil.copytree(TINY, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["_name_or_path"] = "THUDM/chatglm2-6b"
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.fixture(scope="module")
def glm2(glm2_dir):
    return glmkit.load(glm2_dir)


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=str(TINY / "tokenizer.model"))


def expected(sp, prompt: str) -> list[int]:
    n = sp.vocab_size()
    gmask, sop = n + 1, n + 3        # specials follow the vocabulary: [MASK], [gMASK], [sMASK], sop, eop
    return [gmask, sop] + sp.encode(prompt)


def test_format_is_chosen_by_the_release_name(glm2, tiny):
    assert glm2.format.name == "chatglm2" and tiny.format.name != "chatglm2"
    assert glm2.format.stop_ids == frozenset({2})                 # </s> only: no role tokens to stop on
    from glmkit.chat.protocols import TaggedProtocol
    assert isinstance(glm2.protocol, TaggedProtocol)               # no tool protocol of its own


@pytest.mark.parametrize("messages, prompt", [
    ([{"role": "user", "content": "你好"}],
     "[Round 1]\n\n问：你好\n\n答："),
    ([{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！有什么可以帮你？"},
      {"role": "user", "content": "写一首诗"}],
     "[Round 1]\n\n问：你好\n\n答：你好！有什么可以帮你？\n\n[Round 2]\n\n问：写一首诗\n\n答："),
    # no system slot: the system text goes before the first question
    ([{"role": "system", "content": "回答要简洁。"}, {"role": "user", "content": "hi"}],
     "[Round 1]\n\n问：回答要简洁。\n\nhi\n\n答："),
    # a tool result is the next round's question
    ([{"role": "user", "content": "weather?"}, {"role": "assistant", "content": "<tool_call>{}</tool_call>"},
      {"role": "observation", "content": "{\"t\": 20}"}],
     "[Round 1]\n\n问：weather?\n\n答：<tool_call>{}</tool_call>\n\n[Round 2]\n\n问：Observation: {\"t\": 20}\n\n答："),
])
def test_prompt_ids_as_the_original_builds_them(glm2, sp, messages, prompt):
    assert glm2.encode_chat(messages) == expected(sp, prompt)


def test_user_text_spelling_specials_stays_text(glm2):
    ids = glm2.encode_chat([{"role": "user", "content": "[gMASK]sop<|user|></s>"}])
    specials = set(glm2.tokenizer.specials.values()) | {2}
    assert [i for i in ids if i in specials] == [glm2.tokenizer.special_id("[gMASK]"), glm2.tokenizer.special_id("sop")]
    assert ids[:2] == [glm2.tokenizer.special_id("[gMASK]"), glm2.tokenizer.special_id("sop")]


def test_a_conversation_must_end_with_a_question(glm2):
    with pytest.raises(glmkit.GlmkitError, match="ends with a user message"):
        glm2.encode_chat([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])


def test_chat_replies_and_streams_what_it_returns(glm2):
    text = "".join(glm2.stream_chat([{"role": "user", "content": "你好"}], temperature=0, max_new_tokens=12,
                                    repetition_penalty=1.0))
    ids = glm2.generate(glm2.encode_chat([{"role": "user", "content": "你好"}]), max_new_tokens=12, temperature=0,
                        repetition_penalty=1.0,
                        stop_ids=glm2.format.stop_ids)
    assert text == glm2.tokenizer.decode([i for i in ids if i != 2])


def test_models_command_names_the_family(glm2_dir):
    from glmkit.models.inventory import describe
    assert describe(glm2_dir).family == "chatglm2"
