"""The chat message type every loader, trainer and annotation record uses.

A message is `{"role": "system" | "user" | "assistant", "content": str}`, the shape of
Hugging Face chat templates and of the OpenAI chat API, so it is a plain dict rather than a class:
rows read from JSONL, Argilla records and HTTP bodies are used as they are.
"""

from __future__ import annotations

from typing import Any

from alignment.data_files import DataError

Message = dict[str, str]
ROLES = frozenset({"system", "user", "assistant"})


def checked_messages(
    value: list[Any], where: str, field: str, roles: frozenset[str] | None = ROLES
) -> list[Message]:
    """Each entry a dict with a string role (one of `roles`, unless None) and string content, copied
    down to those two keys; the one shape check the SFT, preference and prompt readers share."""
    for i, msg in enumerate(value):
        if (
            not isinstance(msg, dict)
            or not isinstance(msg.get("role"), str)
            or (roles is not None and msg["role"] not in roles)
            or not isinstance(msg.get("content"), str)
        ):
            need = f"a role in {sorted(roles)} and a string content" if roles else "a string role and content"
            raise DataError(f"{where}: {field}[{i}] needs {need}")
    return [{"role": m["role"], "content": m["content"]} for m in value]
