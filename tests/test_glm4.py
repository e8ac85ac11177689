"""GLM-4-9B-chat in both layouts its publisher ships (issue 13, item 1).

The fixture is a tiny GLM written by the test: transformers' own `GlmForCausalLM` (random
weights, float32), saved twice:
- the transformers-native layout (`save_pretrained`, a tokenizer.json converted from the ranks by
  transformers' TikTokenConverter, and GLM-4's chat template in tokenizer_config.json);
- the original layout (ChatGLMModel tensor names, config.json fields as glm-4-9b-chat writes
  them, a tiktoken ranks file as tokenizer.model, added_tokens_decoder, and a modeling file
  that must never run).
The ranks are small enough to write the expected prompt ids out by hand."""

import base64
import json

import pytest
import torch

import glmkit
from glmkit.chat.glm4 import GLM4Format
from glmkit.chat.protocols import GLM4Protocol, MAX_CALLS_PER_REPLY
from glmkit.chat.tool_calls import CodeCall, INTERPRETER, RefusedCall, ToolCall

transformers = pytest.importorskip("transformers")

# --- the tokenizer: every byte, then a few merges (each the join of two earlier tokens) ----------
MERGES = [b"\n\n", b"he", b"ll", b"hell", b"hello", b" w", b"or", b" wor", b"ld", b" world",
          "你".encode()[:2], "你".encode(), "好".encode()[:2], "好".encode(), "你好".encode()]
RANKS = {bytes([b]): b for b in range(256)} | {m: 256 + i for i, m in enumerate(MERGES)}
N = len(RANKS)                       # 271: the specials follow, as 151329.. follow the release's ranks
SPECIALS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
            "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
            "<|end_of_video|>"]
ID = {name: N + i for i, name in enumerate(SPECIALS)}
VOCAB = 320                          # padded, as 151552 pads the release's 151343 ids

# GLM-4's chat template from glm-4-9b-chat's tokenizer_config.json (its function and python tool
# branches; the browser and image tools are not glmkit's)
GLM4_TEMPLATE = (
    "[gMASK]<sop>{% for item in messages %}{% if item['tools'] is defined %}<|system|>\n"
    "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，你的任务是针对用户的问题和要求提供适当的答复和支持。"
    "\n\n# 可用工具{% set tools = item['tools'] %}{% for tool in tools %}{% if tool['type'] == 'function' %}"
    "\n\n## {{ tool['function']['name'] }}\n\n{{ tool['function'] | tojson(indent=4) }}\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
    "{% elif tool['type'] == 'python' %}\n\n## python\n\n当你向 `python` 发送包含 Python 代码的消息时，该代码将会在一个有状态的 Jupyter notebook 环境中执行。\n"
    "`python` 返回代码执行的输出，或在执行 60 秒后返回超时。\n`/mnt/data` 将会持久化存储你的文件。在此会话中，`python` 无法访问互联网。"
    "不要使用 `python` 进行任何网络请求或者在线 API 调用，这些在线内容的访问将不会成功。{% endif %}{% endfor %}{% endif %}"
    "{% if item['content'] %}<|{{ item['role'] }}|>{{ item['metadata'] }}\n{{ item['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")

WEATHER = {"name": "get_weather", "description": "查询天气",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CONVERSATIONS = [
    [{"role": "user", "content": "hello world"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "你好"},
     {"role": "assistant", "content": "hello"}, {"role": "user", "content": "\n\nhello  world <|user|>"}],
    [{"role": "system", "content": "", "tools": [{"type": "function", "function": WEATHER}, {"type": "python"}]},
     {"role": "user", "content": "北京天气"},
     {"role": "assistant", "metadata": "get_weather", "content": '{"city": "北京"}'},
     {"role": "observation", "content": '{"temperature": 20}'}],
]


def write_ranks(path):
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in RANKS.items()))


def to_original_names(sd: dict) -> dict:
    """GlmForCausalLM's tensors under ChatGLMModel's names (what glm-4-9b-chat ships)."""
    out = {"transformer.embedding.word_embeddings.weight": sd["model.embed_tokens.weight"],
           "transformer.encoder.final_layernorm.weight": sd["model.norm.weight"],
           "transformer.output_layer.weight": sd["lm_head.weight"],
           "transformer.rotary_pos_emb.inv_freq": torch.ones(4)}     # a saved buffer the release has
    layers = {k.split(".")[2] for k in sd if k.startswith("model.layers.")}
    for i in layers:
        h, g = f"model.layers.{i}.", f"transformer.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            out[g + f"self_attention.query_key_value.{kind}"] = torch.cat(
                [sd[h + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
        out[g + "input_layernorm.weight"] = sd[h + "input_layernorm.weight"]
        out[g + "post_attention_layernorm.weight"] = sd[h + "post_attention_layernorm.weight"]
        out[g + "self_attention.dense.weight"] = sd[h + "self_attn.o_proj.weight"]
        out[g + "mlp.dense_h_to_4h.weight"] = sd[h + "mlp.gate_up_proj.weight"]
        out[g + "mlp.dense_4h_to_h.weight"] = sd[h + "mlp.down_proj.weight"]
    return {k: v.contiguous() for k, v in out.items()}


@pytest.fixture(scope="module")
def glm4(tmp_path_factory):
    """(original dir, -hf dir, the transformers model, its tokenizer)"""
    from safetensors.torch import save_file
    from transformers.convert_slow_tokenizer import TikTokenConverter
    root = tmp_path_factory.mktemp("glm4")
    orig, hf_dir = root / "glm-4-9b-chat", root / "glm-4-9b-chat-hf"
    orig.mkdir()
    write_ranks(orig / "tokenizer.model")
    torch.manual_seed(0)
    config = transformers.GlmConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, rope_theta=10000.0 * 5,
        rms_norm_eps=1.5625e-07, initializer_range=0.3, attention_bias=True, tie_word_embeddings=False,
        pad_token_id=ID["<|endoftext|>"], eos_token_id=[ID["<|endoftext|>"], ID["<|user|>"], ID["<|observation|>"]])
    hf = transformers.GlmForCausalLM(config).eval()
    hf.save_pretrained(hf_dir)
    tok = TikTokenConverter(vocab_file=str(orig / "tokenizer.model"), extra_special_tokens=SPECIALS).converted()
    tok.save(str(hf_dir / "tokenizer.json"))
    added = {str(i): {"content": name, "special": True, "lstrip": False, "rstrip": False, "normalized": False,
                      "single_word": False} for name, i in ID.items()}
    tc = {"added_tokens_decoder": added, "chat_template": GLM4_TEMPLATE, "eos_token": "<|endoftext|>",
          "pad_token": "<|endoftext|>", "clean_up_tokenization_spaces": False}
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(dict(tc, tokenizer_class="PreTrainedTokenizerFast")))
    (orig / "tokenizer_config.json").write_text(json.dumps(dict(
        tc, tokenizer_class="ChatGLM4Tokenizer", auto_map={"AutoTokenizer": ["tokenization_chatglm.ChatGLM4Tokenizer", None]})))
    save_file(to_original_names(hf.state_dict()), str(orig / "model.safetensors"))
    (orig / "config.json").write_text(json.dumps({
        "_name_or_path": "THUDM/glm-4-9b-chat", "architectures": ["ChatGLMModel"], "model_type": "chatglm",
        "auto_map": {"AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
        "add_bias_linear": False, "add_qkv_bias": True, "apply_residual_connection_post_layernorm": False,
        "ffn_hidden_size": 128, "hidden_size": 64, "kv_channels": 16, "layernorm_epsilon": 1.5625e-07,
        "multi_query_attention": True, "multi_query_group_num": 2, "num_attention_heads": 4, "num_hidden_layers": 2,
        "num_layers": 2, "original_rope": True, "padded_vocab_size": VOCAB, "post_layer_norm": True, "rmsnorm": True,
        "rope_ratio": 5, "seq_length": 4096, "torch_dtype": "float32", "pad_token_id": ID["<|endoftext|>"],
        "eos_token_id": [ID["<|endoftext|>"], ID["<|user|>"], ID["<|observation|>"]]}))
    # the release's remote code: glmkit must never run it
    for name in ("modeling_chatglm.py", "tokenization_chatglm.py", "configuration_chatglm.py"):
        (orig / name).write_text(f"open({str(root / 'REMOTE_CODE_RAN')!r}, 'w').write('ran')\n")
    ref_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"),
                                                   eos_token="<|endoftext|>")
    ref_tok.chat_template = GLM4_TEMPLATE
    yield orig, hf_dir, hf, ref_tok
    assert not (root / "REMOTE_CODE_RAN").exists()


@pytest.fixture(scope="module")
def models(glm4):
    orig, hf_dir, _, _ = glm4
    return {"original": glmkit.load(orig, dtype="float32"), "hf": glmkit.load(hf_dir, dtype="float32")}


def template_ids(ref_tok, messages):
    out = ref_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def glm_messages(messages):
    """The template's messages as glmkit's: the same, with tools in glmkit's flat form."""
    return [dict(m, tools=[t.get("function", t) if t["type"] == "function" else t for t in m["tools"]])
            if "tools" in m else m for m in messages]


# --- the prompt ------------------------------------------------------------------------------------

def test_prompt_ids_written_out_by_hand(models):
    """The format as the original defines it, token by token (see chat/glm4.py)."""
    for m in models.values():
        assert isinstance(m.format, GLM4Format)
        assert m.encode_chat(CONVERSATIONS[0]) == [
            ID["[gMASK]"], ID["<sop>"],      # the prefix every GLM-4 prompt starts with
            ID["<|user|>"],                  # the role marker, an id
            10,                              # "\n" ends the (empty) metadata line
            256 + MERGES.index(b"hello"),    # "hello": he + ll -> hell, + o
            256 + MERGES.index(b" world"),   # " world": the split keeps the space with the word
            ID["<|assistant|>"]]             # the cue to answer
        assert m.encode_chat(CONVERSATIONS[1]) == [
            ID["[gMASK]"], ID["<sop>"],
            ID["<|system|>"], 10,            # system role, its newline
            *b"You are terse.",              # no merges apply: one id per byte
            ID["<|user|>"], 10, 256 + MERGES.index("你好".encode()),
            ID["<|assistant|>"], 10, 256 + MERGES.index(b"hello"),   # an earlier answer: empty metadata line
            ID["<|user|>"],
            256 + MERGES.index(b"\n\n"), 10,  # "\n" + "\n\n...": the run is encoded whole, so the newlines
                                             # split as one piece "\n\n\n" -> "\n\n" + "\n"
            256 + MERGES.index(b"hello"), 32, 256 + MERGES.index(b" world"),   # two spaces: " " + " world"
            32, *b"<|", 117, 115, 101, 114, *b"|>",   # typed "<|user|>" stays characters (32 = " ")
            ID["<|assistant|>"]]


def test_tool_call_turn_ids_by_hand(models):
    """A call in the history is its segment: the function name on the metadata line, JSON args."""
    for m in models.values():
        ids = m.encode_chat(CONVERSATIONS[2])
        tail = ids[ids.index(ID["<|assistant|>"]):]
        assert tail == [ID["<|assistant|>"], *m.tokenizer.encode('get_weather\n{"city": "北京"}'),
                        ID["<|observation|>"], 10, *b'{"temperature": 20}', ID["<|assistant|>"]]
        # "get" and "_weather" split apart (a letter run may take one leading symbol); in "_weather"
        # only "he" merges; the newline and the brace are pieces of their own
        assert m.tokenizer.encode("get_weather\n{") == [*b"get_weat", 256 + MERGES.index(b"he"), *b"r", 10, *b"{"]


def test_prompt_ids_equal_the_chat_template(glm4, models):
    """Both layouts give apply_chat_template's ids (the -hf layout's tokenizer.json with GLM-4's
    template), tools and observations included."""
    _, _, _, ref_tok = glm4
    for convo in CONVERSATIONS:
        # (without the typed "<|user|>": transformers would make it the role marker; glmkit never does)
        convo = [dict(m, content=m["content"].replace("<|user|>", "")) for m in convo]
        want = template_ids(ref_tok, convo)
        for m in models.values():
            assert m.encode_chat(glm_messages(convo)) == want, convo


def test_tiktoken_and_tokenizer_json_agree(models):
    text = "hello world 你好！\n\n\tcode: x = [1, 22, 333, 4444]\r\n  <|user|> 'll 's ü 🙂 " * 3
    orig, hf = models["original"].tokenizer, models["hf"].tokenizer
    assert orig.encode(text) == hf.encode(text)
    assert orig.decode(orig.encode(text)) == text == hf.decode(hf.encode(text))
    assert orig.specials == {k: v for k, v in hf.specials.items()}
    assert not set(orig.encode("<|user|><|assistant|>[gMASK]")) & set(ID.values())


# --- the model ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["original", "hf"])
def test_logits_greedy_and_batching_match_transformers(glm4, models, layout):
    _, _, hf, _ = glm4
    m = models[layout]
    ids = m.encode_chat(CONVERSATIONS[1])
    m.model.setup_caches(1, len(ids))
    ours = m.model(torch.tensor([ids]), torch.zeros(1, dtype=torch.long))[0]
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0, -1]
    assert (ours - theirs).abs().max().item() < 1e-4
    got = m.generate(ids, max_new_tokens=20, temperature=0, repetition_penalty=1.0, stop_ids=())
    seq = list(ids)
    with torch.no_grad():
        for _ in range(20):
            seq.append(int(hf(torch.tensor([seq])).logits[0, -1].argmax()))
    assert got == seq[len(ids):]
    prompts = [m.encode_chat(c) for c in CONVERSATIONS[:2]]
    alone = [m.generate(p, max_new_tokens=12, temperature=0, repetition_penalty=1.0, stop_ids=()) for p in prompts]
    assert m.generate_batch(prompts, max_new_tokens=12, temperature=0, repetition_penalty=1.0, stop_ids=()) == alone


def test_stop_ids_and_config(models):
    for m in models.values():
        assert m.format.stop_ids == {ID["<|endoftext|>"], ID["<|user|>"], ID["<|observation|>"]}
        assert (m.config.family, m.config.rope_dims, m.config.rope_base, m.config.qkv_bias) == ("chatglm", 8, 50000.0, True)


@pytest.mark.parametrize("layout", ["original", "hf"])
def test_quantized_checkpoint_of_either_layout(glm4, models, tmp_path, layout):
    from glmkit.models import quantized_checkpoint
    from glmkit.models.quantize import QuantConfig
    src = glm4[0] if layout == "original" else glm4[1]
    quantized_checkpoint.write(src, tmp_path / "q", QuantConfig(8))
    saved, on_load = glmkit.load(tmp_path / "q"), glmkit.load(src, quantize="int8")
    assert isinstance(saved.format, GLM4Format)
    ids = saved.encode_chat(CONVERSATIONS[0])
    assert ids == models[layout].encode_chat(CONVERSATIONS[0])
    run = dict(max_new_tokens=8, temperature=0, repetition_penalty=1.0, stop_ids=())
    assert saved.generate(ids, **run) == on_load.generate(ids, **run)


# --- replies and tool calls ----------------------------------------------------------------------------

def reply(m, text: str):
    """Feed the ids of a reply the model writes through the format's parser."""
    parser = m.format.reply_parser()
    events = []
    for part_i, part in enumerate(text.split("<|assistant|>")):
        ids = ([ID["<|assistant|>"]] if part_i else []) + m.tokenizer.encode(part)
        for t in ids:
            events += parser.feed(t)
    events += parser.finish()
    return parser.messages(), events


def test_reply_segments(models):
    m = models["original"]
    msgs, events = reply(m, '\n好的。<|assistant|>get_weather\n{"city": "北京"}')
    assert msgs == [{"role": "assistant", "metadata": "", "content": "好的。"},
                    {"role": "assistant", "metadata": "get_weather", "content": '{"city": "北京"}'}]
    shown = "".join(GLM4Protocol().visible_text(events, {"get_weather"}))
    assert shown == "好的。"
    [call] = GLM4Protocol().find_calls(msgs, {"get_weather"})
    assert isinstance(call, ToolCall) and (call.name, call.arguments) == ("get_weather", {"city": "北京"})


def test_streamed_calls_are_checked_against_the_schema(models):
    m = models["hf"]
    schemas = {"get_weather": WEATHER["parameters"]}
    for text, want in [('get_weather\n{"city": "北京"}', {"city": "北京"}),
                       ('get_weather\n{"city": 42}', "city"),
                       ("get_weather\n{'city': '北京'}", "not valid JSON")]:
        parser = GLM4Protocol().call_parser(m.format.reply_parser(), schemas)
        items = [x for t in m.tokenizer.encode(text) for x in parser.feed(t)] + parser.finish()
        [call] = [x for x in items if not isinstance(x, str)]
        if isinstance(want, dict):
            assert isinstance(call, ToolCall) and call.arguments == want
        else:
            assert isinstance(call, RefusedCall) and want in call.reason and call.written.startswith("[get_weather]")


HOSTILE = [
    ("__import__('os').system('touch /tmp/glmkit-pwned')", "not valid JSON"),
    ('{"city": "北京"', "not valid JSON"),
    ('["北京"]', "must be a JSON object"),
    ('"北京"', "must be a JSON object"),
    ('{"city": NaN}', "number"),
    ('{"city": Infinity}', "number"),
    ('{"n": 1e999}', "number"),
    ('{"n": 123456789012345678901234567890}', "integers"),
    ('{"a": ' * 2000 + "1" + "}" * 2000, "nested too deeply"),
    ('{"city": "' + "x" * 30_000 + '"}', "longer than"),
    ('{"city": "\\ud800"}', "surrogate"),
    ("", "not valid JSON"),
]


@pytest.mark.parametrize("content,reason", HOSTILE)
def test_hostile_calls_are_refused_as_data(content, reason):
    [call] = GLM4Protocol().find_calls([{"metadata": "get_weather", "content": content}], {"get_weather"})
    assert isinstance(call, RefusedCall) and reason.lower() in call.reason.lower(), call.reason


def test_call_names_code_and_limits():
    p = GLM4Protocol()
    # a name that is not a runnable tool is text, not a call
    assert p.find_calls([{"metadata": "rm_rf", "content": "{}"}], {"get_weather"}) == []
    # code goes to the interpreter only when there is one (and no tool of the caller is named python)
    code = [{"metadata": "python", "content": "```python\nprint(1)\n```"}]
    [c] = p.find_calls(code, {INTERPRETER})
    assert isinstance(c, CodeCall) and c.code.strip() == "print(1)"
    assert p.find_calls(code, {"get_weather"}) == []
    [c] = p.find_calls([{"metadata": "python", "content": '{"x": 1}'}], {"python", INTERPRETER})
    assert isinstance(c, ToolCall) and c.arguments == {"x": 1}
    many = [{"metadata": "get_weather", "content": '{"city": "a"}'}] * (MAX_CALLS_PER_REPLY + 3)
    calls = p.find_calls(many, {"get_weather"})
    assert len(calls) == MAX_CALLS_PER_REPLY + 1 and isinstance(calls[-1], RefusedCall)


def test_system_message_lists_tools_and_the_interpreter(models):
    m = models["original"]
    system = GLM4Protocol().system_message([WEATHER], True, None)
    text = m.tokenizer.decode(m.encode_chat([system, {"role": "user", "content": "hi"}]))
    assert "## get_weather" in text and '"city": {' in text and "## python" in text and "Jupyter" in text
    assert GLM4Protocol().system_message([], False, None) is None


# --- `glmkit models` -------------------------------------------------------------------------------------

def test_models_lists_both_layouts(glm4):
    from glmkit.models.inventory import describe
    orig, hf_dir, _, _ = glm4
    a, b = describe(orig), describe(hf_dir)
    assert (a.family, a.layout, b.family, b.layout) == ("glm4", "ChatGLM directory", "glm4", "transformers directory")
    assert a.parameters == b.parameters == sum(p.numel() for p in glm4[2].parameters())


# --- the server, the console, tools and code (a real server on loopback) ----------------------------------

SCRIPTS = {     # the model's first reply to each message, forced token by token (--scripted-replies)
    "北京天气": 'get_weather\n{"city": "北京"}',
    "先说再查": '\n好的。<|assistant|>get_weather\n{"city": "上海"}',
    "evil": "get_weather\n__import__('os').system('touch /tmp/glmkit-pwned')",
    "forced": '{"city": "广州"}',                       # continues the forced metadata line
    "算一下": 'calculator\n{"expression": "6 * 7"}',
    "画个图": "python\n```python\nprint('画好了')\n```",
}
TOOL = {"type": "function", "function": WEATHER}


@pytest.fixture(scope="module")
def server(glm4, tmp_path_factory):
    from glmkit.sandbox import sandbox_available
    from server_helpers import running_server
    data = tmp_path_factory.mktemp("glm4-server")
    (data / "scripts.json").write_text(json.dumps(SCRIPTS, ensure_ascii=False))
    args = ["--model", str(glm4[0]), "--dtype", "float32", "--data-dir", str(data / "store"), "--no-embeddings",
            "--tools", "builtin", "--max-steps", "1", "--max-tokens", "80", "--scripted-replies", str(data / "scripts.json")]
    code = sandbox_available() is None
    with running_server(*(args + ["--code"] if code else args)) as (url, _):
        yield url, code


def test_api_tool_calls_in_glm4s_protocol(server):
    import openai
    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
    ask = lambda text: [{"role": "user", "content": text}]          # noqa: E731
    r = client.chat.completions.create(model="default", messages=ask("北京天气"), tools=[TOOL])
    [call] = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls"
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "北京"})
    chunks = list(client.chat.completions.create(model="default", messages=ask("先说再查"), tools=[TOOL], stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == "好的。"
    [streamed] = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
    assert json.loads(streamed.function.arguments) == {"city": "上海"}
    r = client.chat.completions.create(model="default", messages=ask("forced"), tools=[TOOL],
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert json.loads(r.choices[0].message.tool_calls[0].function.arguments) == {"city": "广州"}
    r = client.chat.completions.create(model="default", messages=ask("evil"), tools=[TOOL])
    assert not r.choices[0].message.tool_calls and "refused" in r.choices[0].message.content
    # no script: the random model writes the arguments itself, constrained by the strict schema
    strict = {"type": "function", "function": dict(WEATHER, strict=True, parameters=dict(
        WEATHER["parameters"], properties={"city": {"enum": ["北京", "上海"]}}, additionalProperties=False))}
    r = client.chat.completions.create(model="default", messages=ask("天气?"), tools=[strict], temperature=1.0,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert json.loads(r.choices[0].message.tool_calls[0].function.arguments)["city"] in ("北京", "上海")


def test_api_round_trip_writes_the_call_and_result_in_glm4s_format(server, models):
    import openai
    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": "北京天气"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                    "name": "get_weather", "arguments": '{"city": "北京"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 20}'}]
    r = client.chat.completions.create(model="default", messages=messages, tools=[TOOL], max_tokens=3, temperature=0)
    want = models["original"].encode_chat(glm_messages(
        [{"role": "system", "content": "", "tools": [TOOL]}] + CONVERSATIONS[2][1:]))
    assert r.usage.prompt_tokens == len(want)


def test_server_runs_tools_and_code_for_glm4(server):
    import httpx
    url, code = server
    body = {"model": "default", "messages": [{"role": "user", "content": "算一下"}], "temperature": 0,
            "glmkit_run_tools": True}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    [step] = r.json()["glmkit_steps"]
    assert (step["name"], step["arguments"], json.loads(step["observation"])["result"]) == \
        ("calculator", {"expression": "6 * 7"}, 42)
    # the console: calls are stored as GLM-4 segments; code is a `python` segment run in the sandbox
    conv = httpx.post(url + "/api/conversations", json={"mode": "tool"}).json()["id"]
    r = httpx.post(f"{url}/api/conversations/{conv}/messages", timeout=120,
                   json={"content": "算一下", "settings": {"temperature": 0, "max_new_tokens": 80}})
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    assert next(e for e in events if e["type"] == "tool_call")["arguments"] == {"expression": "6 * 7"}
    stored = httpx.get(f"{url}/api/conversations/{conv}").json()["messages"]
    assert (stored[1]["metadata"], stored[1]["content"], stored[2]["role"]) == \
        ("calculator", '{"expression": "6 * 7"}', "observation")
    if code:
        conv = httpx.post(url + "/api/conversations", json={"mode": "code"}).json()["id"]
        r = httpx.post(f"{url}/api/conversations/{conv}/messages", timeout=120,
                       json={"content": "画个图", "settings": {"temperature": 0, "max_new_tokens": 80}})
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
        assert next(e for e in events if e["type"] == "code")["code"].strip() == "print('画好了')"
        assert next(e for e in events if e["type"] == "tool_result")["output"] == "画好了\n"
