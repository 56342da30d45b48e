"""The long multi-turn bench set is deterministic and has the length profile it claims (issue 14)."""

from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "make_long_pairs.py"


@pytest.fixture(scope="module")
def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_long_pairs", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_long_pairs"] = module
    spec.loader.exec_module(module)
    return module


def test_long_pairs_are_deterministic_with_the_target_length_profile(
    generator: ModuleType, tiny_model: Path
) -> None:
    from alignment.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model)  # the real SmolLM2 tokenizer and chat template
    rows = generator.long_pairs(400, seed=3, tokenizer=tokenizer)
    assert rows == generator.long_pairs(400, seed=3, tokenizer=tokenizer)
    assert rows != generator.long_pairs(400, seed=4, tokenizer=tokenizer)

    def count(messages: list[dict[str, str]], generation_prompt: bool) -> int:
        return generator.template_count(tokenizer, messages, generation_prompt)

    prompt = [count(r["prompt"], True) for r in rows]
    chosen = [count(r["prompt"] + r["chosen"], False) - p for r, p in zip(rows, prompt, strict=True)]
    for values, (p10, p50, p90, top) in ((prompt, generator.PROMPT), (chosen, generator.CHOSEN)):
        q = statistics.quantiles(values, n=10)
        assert abs(statistics.median(values) - p50) <= 0.15 * p50
        assert abs(q[0] - p10) <= 0.25 * p10 + 2 and abs(q[8] - p90) <= 0.15 * p90
        assert max(values) <= top
    messages = [len(r["prompt"]) for r in rows]
    assert statistics.median(messages) == 3 and max(messages) <= generator.MAX_MESSAGES
    systems = {r["prompt"][0]["content"] for r in rows if r["prompt"][0]["role"] == "system"}
    assert len(systems) > 5  # varied system prompts, and about half without one
    assert 0.3 < sum(r["prompt"][0]["role"] == "system" for r in rows) / len(rows) < 0.7
