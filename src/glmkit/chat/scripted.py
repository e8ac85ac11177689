"""Scripted replies as token ids, for constrained decoding in tests (`--scripted-replies`).

A script is the text a model would write: segments separated by '<|assistant|>', each starting
with its metadata line.  It ends the way the model ends such a reply: <|observation|> after a
tool or interpreter segment (ChatGLM3), else end-of-sequence."""

from __future__ import annotations


def scripted_reply_ids(tokenizer, text: str, chatglm: bool = True) -> list[int]:
    parts = text.split("<|assistant|>")
    ids: list[int] = []
    for i, part in enumerate(parts):
        if i:
            ids.append(tokenizer.special_id("<|assistant|>"))
        ids += tokenizer.encode(part)
    last_meta = parts[-1].split("\n", 1)[0].strip() if "\n" in parts[-1] else ""
    if chatglm and last_meta:
        return ids + [tokenizer.special_id("<|observation|>")]
    return ids + [tokenizer.eos_id]
