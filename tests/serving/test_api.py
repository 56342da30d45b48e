"""The OpenAI-compatible API, exercised with the official `openai` client against a real server."""

from __future__ import annotations

import httpx
import openai
import pytest

from serving import feedback_store as fs
from tests.serving.conftest import CLIENT_KEY

MESSAGES = [{"role": "user", "content": "Say hello."}]


def test_models_lists_base_and_current_alias(client) -> None:
    ids = {m.id for m in client.models.list().data}
    assert {"tiny-random", "prefloop-current"} <= ids


def test_completion_is_answered_and_logged(client, server) -> None:
    response = client.chat.completions.create(
        model="tiny-random", messages=MESSAGES, max_tokens=8, temperature=0
    )
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason in {"stop", "length"}
    assert 0 < response.usage.completion_tokens <= 8
    assert response.system_fingerprint == "tiny-random"
    with server.store.session() as session:
        row = fs.find_completion(session, response.id)  # a single-choice response id names its choice
        assert row is not None and row.id == choice.completion_id
        assert row.prompt == MESSAGES and row.response == choice.message.content
        assert row.model_version == "tiny-random" and row.params["max_tokens"] == 8
        assert row.latency_ms > 0 and row.completion_tokens == response.usage.completion_tokens


def test_greedy_is_deterministic_and_batched_requests_agree(client) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def ask(_: int) -> str:
        r = client.chat.completions.create(
            model="tiny-random", messages=MESSAGES, max_tokens=12, temperature=0
        )
        return r.choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    assert len(set(answers)) == 1  # left padding and batching must not change a greedy answer


def test_n2_returns_two_choices_with_their_own_ids(client) -> None:
    response = client.chat.completions.create(
        model="tiny-random", messages=MESSAGES, n=2, max_tokens=8, temperature=1.0
    )
    assert [c.index for c in response.choices] == [0, 1]
    ids = {c.completion_id for c in response.choices}
    assert len(ids) == 2 and all(i.startswith(response.id) for i in ids)


def test_a_seed_makes_sampled_choices_repeatable(client) -> None:
    def ask(n: int, seed: int | None) -> list[str]:
        response = client.chat.completions.create(
            model="tiny-random", messages=MESSAGES, n=n, max_tokens=10, temperature=1.0, seed=seed
        )
        return [c.message.content for c in response.choices]

    # Same batch shapes only: the server runs bf16, where a row's logits may round differently
    # beside other rows (the engine test checks batch-independence in fp32).
    first = ask(2, 1234)
    assert ask(2, 1234) == first
    assert first[0] != first[1]  # each choice has its own stream
    assert ask(1, 5) == ask(1, 5) != ask(1, 6)
    with pytest.raises(openai.BadRequestError) as err:
        ask(1, 2**64)
    assert "seed" in str(err.value)


def test_streaming_matches_the_plain_answer(client) -> None:
    plain = client.chat.completions.create(
        model="tiny-random", messages=MESSAGES, max_tokens=10, temperature=0
    )
    stream = client.chat.completions.create(
        model="tiny-random",
        messages=MESSAGES,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert text == plain.choices[0].message.content
    assert finish == plain.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == plain.usage.completion_tokens


def test_streaming_n2_interleaves_both_choices(client) -> None:
    stream = client.chat.completions.create(
        model="tiny-random", messages=MESSAGES, max_tokens=6, n=2, stream=True
    )
    finished = set()
    for chunk in stream:
        for c in chunk.choices:
            if c.finish_reason:
                finished.add(c.index)
    assert finished == {0, 1}


def test_stop_sequence_cuts_the_answer(client, server, adapters) -> None:
    # The random adapter makes tiny-random say varied words (the bare base model repeats newlines).
    r = httpx.post(
        f"{server.url}/admin/adapters",
        json={"name": "a1", "path": str(adapters["a1"])},
        headers=server.admin_headers,
    )
    assert r.status_code == 200, r.text
    full = client.chat.completions.create(model="a1", messages=MESSAGES, max_tokens=24, temperature=0)
    text = full.choices[0].message.content
    middle = len(text) // 2
    stop = text[middle : middle + 3]
    assert stop.strip(), f"need visible text to stop on, got {text!r}"
    cut = client.chat.completions.create(
        model="a1", messages=MESSAGES, max_tokens=24, temperature=0, stop=[stop]
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.find(stop)]
    streamed = client.chat.completions.create(
        model="a1", messages=MESSAGES, max_tokens=24, temperature=0, stop=[stop], stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text[: text.find(stop)]


@pytest.mark.parametrize(
    ("kwargs", "status", "reason"),
    [
        ({"temperature": 5}, 400, "temperature"),
        ({"n": 50}, 400, "n: at most 4"),
        ({"max_tokens": 100000}, 400, "max_tokens: at most"),
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
        ({"model": "no-such-model"}, 404, "does not exist"),
        ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ],
)
def test_bad_requests_get_4xx_with_a_reason(client, kwargs: dict, status: int, reason: str) -> None:
    args = {"model": "tiny-random", "messages": MESSAGES, "max_tokens": 4} | kwargs
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(**args)
    assert info.value.status_code == status
    assert reason in info.value.message


def test_auth_missing_and_wrong_keys_are_401(server) -> None:
    body = {"model": "tiny-random", "messages": MESSAGES}
    missing = httpx.post(f"{server.url}/v1/chat/completions", json=body)
    wrong = httpx.post(
        f"{server.url}/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"}
    )
    assert missing.status_code == wrong.status_code == 401
    assert "missing API key" in missing.json()["error"]["message"]
    assert wrong.json()["error"]["code"] == "invalid_api_key"
    # A client key is not an admin key.
    assert httpx.post(f"{server.url}/admin/reload", headers=server.client_headers).status_code == 401


def test_oversized_body_is_413(server) -> None:
    body = {"model": "tiny-random", "messages": [{"role": "user", "content": "x" * 30000}]}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=server.client_headers)
    assert r.status_code == 413 and "limit is 20000" in r.json()["error"]["message"]


def test_prompt_over_the_token_limit_is_400(server) -> None:
    body = {"model": "tiny-random", "messages": [{"role": "user", "content": "word " * 2500}]}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=server.client_headers)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_rate_limit_is_429_per_key(tiny_model, tmp_path, server) -> None:
    from fastapi.testclient import TestClient

    from serving.api import create_app
    from tests.serving.conftest import serve_config

    settings = serve_config(tmp_path, tiny_model, limits={"requests_per_minute": 2})
    with TestClient(create_app(settings, server.engine, server.store)) as http:
        headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
        codes = [http.get("/v1/models", headers=headers).status_code for _ in range(3)]
    assert codes == [200, 200, 429]


def test_openapi_schema_documents_the_typed_routes(server) -> None:
    schema = httpx.get(f"{server.url}/openapi.json", headers=server.client_headers).json()
    assert {"/v1/chat/completions", "/v1/models", "/v1/feedback", "/admin/reload"} <= set(schema["paths"])
    feedback = schema["paths"]["/v1/feedback"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert feedback["discriminator"]["propertyName"] == "type"
    assert {"ThumbsFeedback", "RatingFeedback", "PairwiseFeedback"} <= set(schema["components"]["schemas"])
    assert "HTTPBearer" in schema["components"]["securitySchemes"]
