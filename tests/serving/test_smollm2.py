"""End to end on the real SmolLM2-135M-Instruct in bf16: the served answers make sense."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.serving.conftest import CLIENT_KEY, serve_config, start_server


@pytest.fixture(scope="module")
def smollm2_url(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from serving.api import create_app
    from serving.feedback_store import FeedbackStore
    from serving.generation import GenerationEngine

    tmp = tmp_path_factory.mktemp("smollm2")
    settings = serve_config(tmp, smollm2, served_name="smollm2")
    engine = GenerationEngine(str(smollm2), served_name="smollm2", threads=1)
    store = FeedbackStore(settings.store_url)
    server, thread, url = start_server(create_app(settings, engine, store))
    yield url
    server.should_exit = True
    thread.join(timeout=10)
    engine.close()
    store.close()


@pytest.mark.slow
def test_smollm2_answers_sensibly_plain_and_streamed(smollm2_url: str) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{smollm2_url}/v1", api_key=CLIENT_KEY, max_retries=0, timeout=300)
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    plain = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=8, temperature=0)
    assert "Paris" in plain.choices[0].message.content
    streamed = client.chat.completions.create(
        model="prefloop-current", messages=messages, max_tokens=8, temperature=0, stream=True
    )
    assert (
        "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        == plain.choices[0].message.content
    )
