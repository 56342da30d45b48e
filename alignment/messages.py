"""The chat message type every loader, trainer and annotation record uses.

A message is `{"role": "system" | "user" | "assistant", "content": str}`, the shape of
Hugging Face chat templates and of the OpenAI chat API, so it is a plain dict rather than a class:
rows read from JSONL, Argilla records and HTTP bodies are used as they are.
"""

from __future__ import annotations

Message = dict[str, str]
