"""Fine-tuning data (glmkit.finetune): the official ChatGLM3 finetune format read and checked with
line numbers, its loss labels on real token ids of the tiny ChatGLM3 tokenizer, and `glmkit
export` from a real console store with two owners."""

import json
import os
import subprocess
import sys

import pytest
from conftest import TINY

from glmkit.chat.glm3 import GLM3Format
from glmkit.errors import GlmkitError
from glmkit.finetune.data import IGNORE, read_conversations, tokenize_conversation
from glmkit.server.store import Store, owner_of
from glmkit.tokenizers.chatglm3 import ChatGLM3Tokenizer

WEATHER = {"name": "get_weather", "description": "Weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def fmt():
    return GLM3Format(ChatGLM3Tokenizer(TINY / "tokenizer.model"))


def render(tok, ids) -> str:
    """Ids as text, special tokens by name (<eos> for 2), plain pieces as their bytes."""
    names = {v: k for k, v in tok.specials.items()} | {tok.eos_id: "<eos>"}
    out, run = [], []
    for i in ids + [None]:
        if i is None or i in names:
            out.append(b"".join(tok.token_bytes(t) for t in run).decode("utf-8"))
            run = []
            if i is not None:
                out.append(names[i])
        else:
            run.append(i)
    return "".join(out)


def learned_runs(tok, ids, labels) -> list[str]:
    """Each stretch of consecutive learned positions, as text."""
    runs, cur = [], []
    for i, (t, lab) in enumerate(zip(ids, labels)):
        if lab != IGNORE:
            assert lab == t, f"position {i}: the label is not the input token"
            cur.append(t)
        elif cur:
            runs.append(render(tok, cur))
            cur = []
    if cur:
        runs.append(render(tok, cur))
    return runs


CONVERSATION = {"conversations": [
    {"role": "system", "content": "Answer the following questions as best as you can. You have access to the "
                                  "following tools:", "tools": [WEATHER]},
    {"role": "user", "content": "Weather in Paris and Oslo?"},
    {"role": "assistant", "content": "Let me check."},
    # the official demo's tool turn: a call and its result in one
    {"role": "tool", "name": "get_weather", "parameters": {"city": "Paris"}, "observation": {"temp": 20}},
    # the same, in ChatGLM3's own history form: an assistant segment named after the tool, then an observation
    {"role": "assistant", "metadata": "get_weather", "content": ' ```python\ntool_call(city="Oslo")\n```'},
    {"role": "observation", "content": '{"temp": 5}'},
    {"role": "assistant", "content": "Paris 20, Oslo 5."},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "You are welcome."},
]}


def test_loss_mask_only_assistant_tokens_count(fmt):
    tok = fmt.tok
    ids, labels = tokenize_conversation(CONVERSATION, fmt)
    assert len(ids) == len(labels)
    # what is learned, read back from the token ids: each assistant turn's metadata line and content
    # and the one token that ends it (the next segment's <|assistant|>, <|observation|> after a call,
    # <|user|>, the final eos); never the system prompt, the tools, the user's text, an observation,
    # or the <|assistant|> cue that opens a reply
    # (each SentencePiece encoding starts with its dummy-prefix space: " \n" is an empty metadata line)
    assert learned_runs(tok, ids, labels) == [
        ' \n Let me check.<|assistant|> get_weather\n  ```python\ntool_call(city="Paris")\n```<|observation|>',
        ' get_weather\n  ```python\ntool_call(city="Oslo")\n```<|observation|>',
        " \n Paris 20, Oslo 5.<|user|>",
        " \n You are welcome.<eos>",
    ]
    # the whole sequence is glmkit's own ChatGLM3 prompt of the same history (the tool turn as its
    # call and observation), then eos
    history = [m for m in CONVERSATION["conversations"] if m["role"] != "tool"]
    history[3:3] = [{"role": "assistant", "metadata": "get_weather", "content": ' ```python\ntool_call(city="Paris")\n```'},
                    {"role": "observation", "content": '{"temp": 20}'}]
    prompt = fmt.encode(history)
    assert ids == prompt[:-1] + [tok.eos_id]      # encode() ends with the cue for a next reply
    text = render(tok, ids)
    assert text.startswith("[gMASK]sop<|system|> \n Answer the following questions")
    assert '"name": "get_weather"' in text
    assert '<|observation|> \n {"temp": 20}<|assistant|>' in text
    # positions: the first learned one comes right after the first <|assistant|>
    first = labels.index(next(lab for lab in labels if lab != IGNORE))
    assert ids[first - 1] == fmt.role_ids["assistant"]
    assert render(tok, ids[:first]).endswith("Weather in Paris and Oslo?<|assistant|>")


def test_loss_false_and_truncation(fmt):
    conv = {"conversations": [
        {"role": "user", "content": "Run it"},
        {"role": "assistant", "metadata": "interpreter", "content": "```python\nprint(2)\n```", "loss": False},
        {"role": "observation", "content": "```result\n2\n```"},
        {"role": "assistant", "content": "It printed 2."},
    ]}
    ids, labels = tokenize_conversation(conv, fmt)
    assert learned_runs(fmt.tok, ids, labels) == [" \n It printed 2.<eos>"]
    cut_ids, cut_labels = tokenize_conversation(conv, fmt, max_length=10)
    assert cut_ids == ids[:10] and cut_labels == labels[:10]


BAD = [
    ('{"conversations": [', "not valid JSON"),
    ('{"messages": []}', 'no "conversations" key'),
    ('{"conversations": []}', "non-empty list"),
    ('[1]', "expected an object"),
    ('{"conversations": [{"role": "bot", "content": "x"}]}', "conversations[0]: role 'bot' is not one of"),
    ('{"tools": {"name": "x"}, "conversations": [{"role": "assistant", "content": "x"}]}', '"tools" must be a list'),
    ('{"conversations": [{"role": "system", "content": "s", "tools": "x"}, {"role": "assistant", "content": "x"}]}',
     'conversations[0] (system): "tools" must be a list'),
    ('{"conversations": [{"role": "user", "content": "q"}, {"role": "tool", "parameters": {}, "observation": 1}]}',
     'conversations[1] (tool): a tool call needs a "name"'),
    ('{"conversations": [{"role": "tool", "name": "f", "parameters": [1], "observation": 1}]}',
     '"parameters" must be an object'),
    ('{"conversations": [{"role": "tool", "name": "f", "parameters": {}}]}', 'needs the "observation"'),
    ('{"conversations": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}',
     'conversations[0] (user): "content" must be a string'),
    ('{"conversations": [{"role": "user", "content": "q"}, {"role": "observation", "content": "x"}, '
     '{"role": "assistant", "content": "x"}]}', "an observation must follow an assistant turn that calls a tool"),
    ('{"conversations": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}, '
     '{"role": "assistant", "content": "x"}]}', "a system message may only come first"),
    ('{"conversations": [{"role": "user", "content": "q", "loss": true}, {"role": "assistant", "content": "x"}]}',
     "only assistant and tool turns are learned"),
    ('{"conversations": [{"role": "user", "content": "q"}]}', "nothing to learn"),
    ('{"conversations": [{"role": "assistant", "content": "x", "name": "f"}]}', "'name' belongs on a tool turn"),
]


@pytest.mark.parametrize("line, message", BAD)
def test_a_bad_line_is_named_with_its_number(tmp_path, line, message):
    good = json.dumps(CONVERSATION)
    path = tmp_path / "train.jsonl"
    path.write_text(good + "\n\n" + line + "\n" + good + "\n", encoding="utf-8")
    with pytest.raises(GlmkitError) as e:
        read_conversations(path)
    assert str(e.value).startswith(f"{path}:3: ")
    assert message in str(e.value)


def test_all_errors_are_collected(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join([json.dumps(CONVERSATION), BAD[0][0], json.dumps(CONVERSATION), BAD[4][0]]) + "\n",
                    encoding="utf-8")
    with pytest.raises(GlmkitError) as e:
        read_conversations(path, all_errors=True)
    lines = str(e.value).splitlines()
    assert lines[0] == "2 bad lines:"
    assert lines[1].startswith(f"{path}:2: not valid JSON")
    assert lines[2].startswith(f"{path}:4: conversations[0]: role 'bot'")
    array = tmp_path / "array.json"
    array.write_text(json.dumps([CONVERSATION]), encoding="utf-8")
    with pytest.raises(GlmkitError, match=":1: expected JSON Lines"):
        read_conversations(array)


def test_good_records_read_back(tmp_path):
    path = tmp_path / "train.jsonl"
    official = {"tools": [WEATHER], "conversations": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "tool", "name": "get_weather", "parameters": {"city": "Paris"}, "observation": "sunny"},
        {"role": "assistant", "content": "Sunny."}]}
    path.write_text(json.dumps(CONVERSATION) + "\n" + json.dumps(official, ensure_ascii=False) + "\n", encoding="utf-8")
    records = read_conversations(path)
    assert len(records) == 2 and records[1]["tools"] == [WEATHER]
    assert records[1]["conversations"][1]["loss"] is True


# -- glmkit export -----------------------------------------------------------------------------
PARIS_CALL = ' ```python\ntool_call(city="Paris")\n```'


def fill_store(data_dir):
    """Conversations written as the console writes them (server/console.py, console_turns.py)."""
    store = Store(data_dir / "conversations.db")
    a, b = owner_of("key-a"), owner_of("key-b")
    usage = {"usage": {"prompt_tokens": 5, "completion_tokens": 3}, "tokens_per_second": 1.0,
             "finish_reason": "stop"}
    # A: a chat with a system prompt, and a reply stopped mid-way
    chat = store.create(a, "Greeting", "chat", {"system": "You are terse."})["id"]
    store.append(a, chat, "user", "Hello there")
    store.append(a, chat, "assistant", "Hi.", "", usage)
    store.append(a, chat, "user", "Tell me a long story")
    store.append(a, chat, "assistant", "Once upon a", "", {"stopped": True, **usage})
    # A: a tool conversation (the agent's call segment, its observation with what the browser saw)
    tool = store.create(a, "Weather", "tool")["id"]
    store.append(a, tool, "user", "Weather in Paris?")
    store.append(a, tool, "assistant", PARIS_CALL, "get_weather")
    store.append(a, tool, "observation", '{"temp": 20}', "",
                 {"name": "get_weather", "ok": True, "output": '{"temp": 20}', "images": []})
    store.append(a, tool, "assistant", "It is 20 degrees.", "", usage)
    # A: a code conversation: the model's code step, and a cell the person ran (extras.by = user)
    code = store.create(a, "Sums", "code")["id"]
    store.append(a, code, "user", "What is 1+1?")
    store.append(a, code, "assistant", "```python\nprint(1 + 1)\n```", "interpreter")
    store.append(a, code, "observation", "```result\n2\n```", "",
                 {"name": "interpreter", "ok": True, "output": "2\n", "images": []})
    store.append(a, code, "assistant", "It is 2.", "", usage)
    store.append(a, code, "assistant", "```python\nprint(3)\n```", "interpreter", {"by": "user"})
    store.append(a, code, "observation", "```result\n3\n```", "",
                 {"name": "interpreter", "ok": True, "output": "3\n", "images": [], "by": "user", "seconds": 0.1})
    # A: answered by a template model: its calls are not ChatGLM3 segments
    other = store.create(a, "Other", "tool")["id"]
    store.append(a, other, "user", "Weather?")
    store.append(a, other, "assistant", '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>')
    store.append(a, other, "observation", "{}")
    # A: nothing answered yet
    store.create(a, "Empty", "chat")
    # B: another key's conversations
    for i in range(3):
        cid = store.create(b, f"B {i}", "chat")["id"]
        store.append(b, cid, "user", f"SECRET-B question {i}")
        store.append(b, cid, "assistant", f"SECRET-B answer {i}")
    store.close()
    return {"chat": chat, "tool": tool, "code": code}


def glmkit(*args, env=None):
    return subprocess.run([sys.executable, "-m", "glmkit.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=env)


def test_export_round_trip_is_owner_scoped(tmp_path, fmt):
    fill_store(tmp_path)
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([WEATHER]), encoding="utf-8")
    out = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if k != "GLMKIT_API_KEY"}
    r = glmkit("export", "--data-dir", tmp_path, "--api-key", "key-a", "--format", "chatglm3-finetune",
               "--tools", tools, "--out", out, "--dev-fraction", "0.3", "--seed", "7", env=env)
    assert r.returncode == 0, r.stderr
    assert "exported 3 conversations" in r.stdout
    assert "left out 2" in r.stdout and "not in ChatGLM3's form" in r.stdout and "nothing to learn" in r.stdout
    train, dev = read_conversations(out / "train.jsonl"), read_conversations(out / "dev.jsonl")
    assert (len(train), len(dev)) == (2, 1)
    raw = (out / "train.jsonl").read_text(encoding="utf-8") + (out / "dev.jsonl").read_text(encoding="utf-8")
    assert "SECRET-B" not in raw                      # another key's conversations never appear
    by_first_user = {next(m["content"] for m in r["conversations"] if m["role"] == "user"): r for r in train + dev}
    assert set(by_first_user) == {"Hello there", "Weather in Paris?", "What is 1+1?"}

    chat = by_first_user["Hello there"]["conversations"]
    assert chat[0] == {"role": "system", "content": "You are terse."}
    assert chat[-1] == {"role": "assistant", "content": "Once upon a", "loss": False}    # stopped: not learned

    tool = by_first_user["Weather in Paris?"]
    assert tool["tools"] == [WEATHER]
    assert tool["conversations"][1] == {"role": "tool", "name": "get_weather", "parameters": {"city": "Paris"},
                                        "observation": '{"temp": 20}', "loss": True}

    code = by_first_user["What is 1+1?"]["conversations"]
    assert code[0]["role"] == "system" and "/mnt/data/" in code[0]["content"]
    assert [(m["role"], m.get("metadata", ""), m.get("loss")) for m in code[1:]] == [
        ("user", "", None), ("assistant", "interpreter", True), ("observation", "", None),
        ("assistant", "", True), ("assistant", "interpreter", False), ("observation", "", None)]

    # what was exported tokenizes; the call is learned as the model wrote it
    ids, labels = tokenize_conversation(by_first_user["Weather in Paris?"], fmt)
    assert learned_runs(fmt.tok, ids, labels)[0] == ' get_weather\n  ```python\ntool_call(city="Paris")\n```<|observation|>'

    # the same store, seed and fraction: the same files
    again = tmp_path / "again"
    r = glmkit("export", "--data-dir", tmp_path, "--api-key", "key-a", "--tools", tools, "--out", again,
               "--dev-fraction", "0.3", "--seed", "7", env=env)
    assert r.returncode == 0, r.stderr
    for name in ("train.jsonl", "dev.jsonl"):
        assert (again / name).read_bytes() == (out / name).read_bytes()

    # B sees only B's; without --tools, A's tool conversation is left out, saying why
    r = glmkit("export", "--data-dir", tmp_path, "--api-key", "key-b", "--out", tmp_path / "b", env=env)
    assert r.returncode == 0, r.stderr
    b_raw = (tmp_path / "b" / "train.jsonl").read_text(encoding="utf-8") + \
        (tmp_path / "b" / "dev.jsonl").read_text(encoding="utf-8")
    assert b_raw.count("SECRET-B answer") == 3 and "Paris" not in b_raw and "Hello there" not in b_raw
    r = glmkit("export", "--data-dir", tmp_path, "--api-key", "key-a", "--out", tmp_path / "a2", env=env)
    assert "exported 2 conversations" in r.stdout and "pass --tools" in r.stdout
    # the owner without a key ("local") has none here
    r = glmkit("export", "--data-dir", tmp_path, "--out", tmp_path / "local", env=env)
    assert r.returncode == 0 and "exported 0 conversations" in r.stdout


def test_export_needs_a_store(tmp_path):
    r = glmkit("export", "--data-dir", tmp_path, "--out", tmp_path / "out")
    assert r.returncode == 1 and "conversations.db does not exist" in r.stderr
    assert not (tmp_path / "conversations.db").exists()     # looking did not create one
    r = glmkit("export", "--data-dir", tmp_path, "--out", tmp_path / "out", "--dev-fraction", "1")
    assert r.returncode == 1 and "--dev-fraction" in r.stderr
