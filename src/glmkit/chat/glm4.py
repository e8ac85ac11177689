"""GLM-4-9B-chat's chat format, at the level of token ids.

The facts, from the chat template in glm-4-9b-chat's tokenizer_config.json (both layouts ship
it; nothing of the model repository is run):

    [gMASK]<sop>
    <|system|>\\n{preamble}\\n\\n# 可用工具\\n## {name}\\n\\n{function as JSON, indent 4}\\n在调用...   (if tools)
    <|{role}|>{metadata}\\n{content}        per message whose content is not empty
    <|assistant|>                          the cue to answer

This is the format as transformers' apply_chat_template renders that template, which is what
the -hf layout defines and what vLLM and transformers users of either layout get.  The release's
older remote code (`build_single_message`) differed in two small ways, noted for whoever compares:
it encoded the metadata line and the content separately, and wrote the tools preamble's name as
"GLM-4" with two newlines before each `##`.

Each run of text between two special tokens is encoded whole (as apply_chat_template encodes it).
Role markers are ids; content, tool definitions and metadata are always ordinary text, so a user
or a tool description spelling `<|user|>` stays characters.

A reply is ChatGLM3's shape: segments split by the <|assistant|> id, each led by a metadata line.
A plain answer has an empty metadata line; a tool call names the function on that line and
writes its arguments as JSON after it; code for the interpreter is a segment named `python`.
Results go back in the observation role.  It ends at <|endoftext|>, <|user|> or <|observation|>
(generation_config.json's eos ids).
"""

from __future__ import annotations

import json

from .glm3 import GLM3ReplyParser
from .messages import validate_messages
from .tool_calls import ToolCall

TOOLS_PREAMBLE = ("你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
                  "你的任务是针对用户的问题和要求提供适当的答复和支持。")
FUNCTION_NOTE = "在调用上述函数时，请使用 Json 格式表示调用的参数。"
PYTHON_TOOL = ("当你向 `python` 发送包含 Python 代码的消息时，该代码将会在一个有状态的 Jupyter notebook 环境中执行。\n"
               "`python` 返回代码执行的输出，或在执行 60 秒后返回超时。\n"
               "`/mnt/data` 将会持久化存储你的文件。在此会话中，`python` 无法访问互联网。"
               "不要使用 `python` 进行任何网络请求或者在线 API 调用，这些在线内容的访问将不会成功。")
PYTHON = "python"      # the segment name GLM-4 writes code under


def tools_text(tools: list) -> str:
    """The system text that lists `tools`: flat {name, description, parameters} dicts, OpenAI's
    {"type": "function", "function": {...}}, or {"type": "python"} for the code interpreter."""
    out = "\n" + TOOLS_PREAMBLE + "\n\n# 可用工具"
    for t in tools:
        kind = t.get("type", "function")
        # one newline before each "##": the template writes two, right after a block tag, and
        # Jinja's trim_blocks (on in transformers' chat templates) removes the first
        if kind == PYTHON:
            out += f"\n## python\n\n{PYTHON_TOOL}"
        else:
            fn = t.get("function", t) if kind == "function" else t
            out += f"\n## {fn.get('name', '')}\n\n{json.dumps(fn, ensure_ascii=False, indent=4)}\n{FUNCTION_NOTE}"
    return out


def tool_call_message(call: ToolCall) -> dict:
    """A call as GLM-4 writes it in its history: a segment named after the function, holding
    its arguments as JSON."""
    return {"role": "assistant", "metadata": call.name, "content": json.dumps(call.arguments, ensure_ascii=False)}


class GLM4Format:
    name = "glm4"

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.role_ids = {r: tokenizer.special_id(f"<|{r}|>") for r in ("system", "user", "assistant", "observation")}
        self.prefix = [tokenizer.special_id("[gMASK]"), tokenizer.special_id("<sop>")]
        self.stop_ids = frozenset({tokenizer.special_id("<|endoftext|>"), self.role_ids["user"],
                                   self.role_ids["observation"]})

    def encode(self, messages: list[dict]) -> list[int]:
        ids = list(self.prefix)
        for m in validate_messages(messages):
            if m["role"] == "system" and m.get("tools"):
                ids += [self.role_ids["system"]] + self.tok.encode(tools_text(m["tools"]))
            if m["content"]:     # the template leaves out a message with no content
                ids += [self.role_ids[m["role"]]] + self.tok.encode(f"{m.get('metadata', '')}\n{m['content']}")
        return ids + [self.role_ids["assistant"]]

    def reply_parser(self) -> GLM3ReplyParser:
        return GLM3ReplyParser(self.tok, self.role_ids["assistant"])
