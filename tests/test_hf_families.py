"""Llama 2, Llama 3, Mistral and Qwen2.5 directories as transformers saves them (issue 13, item 3).

Each test builds a tiny random checkpoint with transformers' own class and `save_pretrained`, a
tokenizer.json trained here with `tokenizers` (byte-level BPE as Llama 3 and Qwen ship, or
SentencePiece-style pieces with byte fallback as Llama 2 and Mistral ship) and the family's chat
template, then checks glmkit against transformers on it: the prompt ids of apply_chat_template,
the last logits (float32, within 1e-4), 20 greedy tokens, and batched = unbatched."""

import json

import pytest
import torch

import glmkit

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

CORPUS = ["The quick brown fox jumps over the lazy dog. " * 3, "Hello there! How are you today? I am fine.",
          "你好，今天天气很好。我们去公园散步吧！", "def add(a, b):\n    return a + b\n", "Numbers: 123 4567 89."] * 20

LLAMA3_TEMPLATE = ("{{- bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
                   "'<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
QWEN_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}"
                 "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA2_TEMPLATE = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
                   "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
                   "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
                   "{% if loop.index0 == 0 and system_message != false %}"
                   "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
                   "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
                   "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
                   "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
MISTRAL_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
                    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
                    "{{ message['content'] + eos_token }}{% endif %}{% endfor %}")


def byte_level_tokenizer(specials):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def sentencepiece_style_tokenizer(specials):
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    tok = Tokenizer(models.BPE(byte_fallback=True, fuse_unk=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=600, special_tokens=specials + byte_tokens))
    return tok


FAMILIES = {
    # name: (transformers class, config class, extra config, tokenizer maker, specials, bos, eos, template, tied)
    "llama3": ("LlamaForCausalLM", "LlamaConfig",
               dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 64}, rope_theta=500000.0),
               byte_level_tokenizer, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                      "<|end_header_id|>", "<|eot_id|>"], "<|begin_of_text|>", "<|eot_id|>", LLAMA3_TEMPLATE, False),
    "qwen2.5": ("Qwen2ForCausalLM", "Qwen2Config", dict(rope_theta=1000000.0), byte_level_tokenizer,
                ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", QWEN_TEMPLATE, True),
    "llama2": ("LlamaForCausalLM", "LlamaConfig", dict(), sentencepiece_style_tokenizer, ["<unk>", "<s>", "</s>"],
               "<s>", "</s>", LLAMA2_TEMPLATE, False),
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(sliding_window=128), sentencepiece_style_tokenizer,
                ["<unk>", "<s>", "</s>"], "<s>", "</s>", MISTRAL_TEMPLATE, False),
}

CONVERSATIONS = [
    [{"role": "user", "content": "Hello there! How are you?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "你好，今天天气很好。"},
     {"role": "assistant", "content": "Fine weather."}, {"role": "user", "content": "def add(a, b):\n  return 1"}],
]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    name = request.param
    out = tmp_path_factory.mktemp(name)
    hf, ref_tok = write_family(name, out)
    return name, out, hf, ref_tok


def write_family(name, out, **overrides):
    """A tiny `name` checkpoint in `out`, as transformers saves it; `overrides` go to its config.
    Returns (the transformers model, its tokenizer with the chat template)."""
    cls, cfg_cls, extra, make_tok, specials, bos, eos, template, tied = FAMILIES[name]
    tok = make_tok(specials)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": bos, "eos_token": eos, "chat_template": template, "tokenizer_class": "PreTrainedTokenizerFast"}))
    torch.manual_seed(0)
    config = getattr(transformers, cfg_cls)(**{
        **dict(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tied,
               initializer_range=0.3, bos_token_id=tok.token_to_id(bos) if bos else None,
               eos_token_id=tok.token_to_id(eos)),
        **extra, **overrides})
    hf = getattr(transformers, cls)(config).eval()
    hf.save_pretrained(out)
    ref_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"), bos_token=bos, eos_token=eos)
    ref_tok.chat_template = template
    return hf, ref_tok


def reference_ids(ref_tok, messages):
    out = ref_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_prompt_ids_equal_apply_chat_template(family):
    name, path, hf, ref_tok = family
    m = glmkit.load(path, dtype="float32")
    for messages in CONVERSATIONS:
        assert m.encode_chat(messages) == reference_ids(ref_tok, messages), (name, messages)


def test_logits_and_greedy_tokens_match_transformers(family):
    name, path, hf, ref_tok = family
    m = glmkit.load(path, dtype="float32")
    ids = m.encode_chat(CONVERSATIONS[1])
    m.model.setup_caches(1, len(ids))
    ours = m.model(torch.tensor([ids]), torch.zeros(1, dtype=torch.long))[0]
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0, -1]
    assert (ours - theirs).abs().max().item() < 1e-4, name
    got = m.generate(ids, max_new_tokens=20, temperature=0, repetition_penalty=1.0, stop_ids=())
    # the reference: transformers' forward over the whole sequence at each step.  (Its own
    # generate() with a KV cache strays from that at the second token on the llama3 fixture in
    # transformers 5.24, so it is not the reference here.)
    seq = list(ids)
    with torch.no_grad():
        for _ in range(20):
            seq.append(int(hf(torch.tensor([seq])).logits[0, -1].argmax()))
    assert got == seq[len(ids):], name


def test_batched_equals_unbatched(family):
    name, path, hf, ref_tok = family
    m = glmkit.load(path, dtype="float32")
    prompts = [m.encode_chat(c) for c in CONVERSATIONS]
    alone = [m.generate(p, max_new_tokens=12, temperature=0, repetition_penalty=1.0, stop_ids=()) for p in prompts]
    assert m.generate_batch(prompts, max_new_tokens=12, temperature=0, repetition_penalty=1.0, stop_ids=()) == alone


def test_user_text_never_becomes_special_tokens(family):
    name, path, hf, ref_tok = family
    m = glmkit.load(path, dtype="float32")
    specials = set(m.tokenizer.specials.values())
    for text in ("<|im_start|>system", "<|eot_id|><|start_header_id|>", "</s><s>[INST]"):
        assert not set(m.tokenizer.encode(text)) & specials
        prompt = m.encode_chat([{"role": "user", "content": text}])
        plain = m.encode_chat([{"role": "user", "content": "x"}])
        assert sum(t in specials for t in prompt) == sum(t in specials for t in plain), (name, text)


def test_chat_streams_text_and_stops_at_end_of_turn(family):
    """The reply streams as text (no special token shown) and the family's end-of-turn id ends it."""
    name, path, hf, ref_tok = family
    m = glmkit.load(path, dtype="float32")
    eos = m.tokenizer.eos_id
    assert eos in m.format.stop_ids
    pieces = list(m.stream_chat(CONVERSATIONS[0], temperature=0, max_new_tokens=15, repetition_penalty=1.0))
    text = "".join(pieces)
    assert not any(s in text for s in m.tokenizer.specials)
    ids = m.generate(m.encode_chat(CONVERSATIONS[0]), max_new_tokens=15, temperature=0, repetition_penalty=1.0,
                     stop_ids=m.format.stop_ids)
    assert text == m.tokenizer.decode([t for t in ids if t not in m.format.stop_ids]).rstrip() or \
        text == m.tokenizer.decode([t for t in ids if t not in m.format.stop_ids])


def test_unsupported_config_is_one_clear_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_act": "gelu", "hidden_size": 8,
                                                      "num_attention_heads": 2}))
    with pytest.raises(glmkit.CheckpointError, match=r"config.json: hidden_act 'gelu' is not supported"):
        glmkit.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2,
                                                      "num_hidden_layers": 1, "intermediate_size": 8, "vocab_size": 10,
                                                      "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))
    with pytest.raises(glmkit.CheckpointError, match=r"rope_scaling type 'yarn' is not supported"):
        glmkit.load(tmp_path)


def test_glmkit_quantize_writes_a_checkpoint_that_loads_as_quantizing_on_load_does(family, tmp_path):
    """`glmkit quantize` for these families: the written checkpoint loads without re-quantizing,
    brings its tokenizer and template along, and decodes the tokens of --quantize on load."""
    from glmkit.models import quantized_checkpoint
    from glmkit.models.quantize import Int4Linear, QuantConfig
    name, path, hf, ref_tok = family
    out = tmp_path / "int4"
    quantized_checkpoint.write(path, out, QuantConfig(4, 32))
    saved = glmkit.load(out)
    on_load = glmkit.load(path, quantize="int4", group_size=32)
    assert isinstance(saved.model.layers[0].attention.wqkv, Int4Linear)
    ids = saved.encode_chat(CONVERSATIONS[0])
    assert ids == on_load.encode_chat(CONVERSATIONS[0]) and saved.format.stop_ids == on_load.format.stop_ids
    run = dict(max_new_tokens=10, temperature=0, repetition_penalty=1.0, stop_ids=())
    assert saved.generate(ids, **run) == on_load.generate(ids, **run)
