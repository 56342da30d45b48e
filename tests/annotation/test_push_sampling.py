"""Sampling candidate pairs from a real (tiny) policy, dropping near-duplicates, scoring them."""

from __future__ import annotations

import pytest

from alignment.data_files import DataError
from alignment.prompts import load_prompts
from annotation.config import PushSettings
from annotation.push import build_pairs, distance, generated_pairs, score_pairs

PROMPTS = [[{"role": "user", "content": "Say hi."}], [{"role": "user", "content": "Count to three."}]]


def length_scorer(prompts: list, responses: list[str]) -> list[float]:
    """A programmatic reward: longer is better."""
    assert len(prompts) == len(responses)
    return [float(len(r)) for r in responses]


def test_build_pairs_drops_near_identical_and_keeps_the_most_uncertain() -> None:
    settings = PushSettings(num_samples=3, max_pairs_per_prompt=1, min_distance=0.2)
    responses = [
        ["hello there friend", "Hello there, friend!", "good day to you"],
        ["one two three", "1 2 3", "one two three"],
    ]
    pairs, dropped = build_pairs(PROMPTS, responses, settings, length_scorer)
    assert dropped == 2  # the case/punctuation variant and the exact repeat
    assert len(pairs) == 2
    # prompt 0 keeps the pair whose rewards are closest: |18 - 15| = 3 beats |20 - 15| = 5
    assert {pairs[0].first, pairs[0].second} == {"hello there friend", "good day to you"}
    assert pairs[0].reward_margin == pytest.approx(3.0)


def test_distance_is_zero_for_same_words() -> None:
    assert distance("A b c", "c, b; a") == 0.0
    assert distance("a b", "c d") == 1.0


def test_generated_pairs_from_the_tiny_model(tiny_model) -> None:
    settings = PushSettings(
        model=str(tiny_model), num_samples=3, max_new_tokens=8, min_distance=0.0, dtype="fp32"
    )
    pairs, _ = generated_pairs(PROMPTS, settings, length_scorer)
    assert len(pairs) == 2
    for pair, prompt in zip(pairs, PROMPTS, strict=True):
        assert pair.prompt == prompt and pair.source == "generated"
        assert pair.first_reward == float(len(pair.first)) and pair.second_reward == float(len(pair.second))


def test_score_pairs_attaches_rewards_to_existing_pairs() -> None:
    pairs, _ = build_pairs(PROMPTS[:1], [["short", "a much longer reply"]], PushSettings(), None)
    assert pairs[0].reward_margin is None
    scored = score_pairs(pairs, length_scorer)
    assert scored[0].reward_margin == pytest.approx(abs(len("short") - len("a much longer reply")))


def test_load_prompts_names_file_and_line(tmp_path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "hi"}\n{"messages": [{"role": "user", "content": "yo"}]}\n{"text": 1}\n')
    with pytest.raises(DataError, match=r"prompts.jsonl:3: expected 'prompt'"):
        load_prompts(path)
    path.write_text('{"prompt": "hi"}\n{"messages": [{"role": "user", "content": "yo"}]}\n')
    assert load_prompts(path) == [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "yo"}]]
