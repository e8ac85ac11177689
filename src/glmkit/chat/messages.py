"""The message shape everyone uses: ChatGLM3's official history format.

`{"role": "system"|"user"|"assistant"|"observation", "content": str, "metadata"?: str,
"tools"?: list}`; `tools` only on a system message."""

from __future__ import annotations

from ..errors import GlmkitError

ROLES = ("system", "user", "assistant", "observation")


def validate_messages(messages, roles=ROLES) -> list[dict]:
    if not isinstance(messages, list):
        raise GlmkitError("messages must be a list of {'role', 'content'} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise GlmkitError(f"message {i} is not an object")
        role = m.get("role")
        if role not in roles:
            raise GlmkitError(f"message {i}: role {role!r} is not one of {', '.join(roles)}")
        content = m.get("content", "")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise GlmkitError(f"message {i}: content must be a string")
        metadata = m.get("metadata", "") or ""
        if not isinstance(metadata, str) or "\n" in metadata:
            raise GlmkitError(f"message {i}: metadata must be a one-line string")
        clean = {"role": role, "content": content}
        if metadata:
            clean["metadata"] = metadata
        if "tools" in m:
            if role != "system":
                raise GlmkitError(f"message {i}: only a system message may carry tools")
            if not isinstance(m["tools"], list):
                raise GlmkitError(f"message {i}: tools must be a list")
            clean["tools"] = m["tools"]
        out.append(clean)
    return out
