"""The LLM judge talking to a real `prefloop serve` (tiny-random behind uvicorn, keys enforced)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select

from reward.judge import JudgeSettings, LLMJudge
from tests.serving.conftest import CLIENT_KEY, RunningServer


def completions(server: RunningServer) -> int:
    from serving.feedback_store import Completion

    with server.store.session() as session:
        return session.scalar(select(func.count()).select_from(Completion)) or 0


def test_judge_asks_a_running_prefloop_serve(
    server: RunningServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PREFLOOP_JUDGE_API_KEY", CLIENT_KEY)
    settings = JudgeSettings(
        base_url=f"{server.url}/v1",
        model="tiny-random",
        max_tokens=8,
        max_parse_retries=1,
        cache_dir=tmp_path / "cache",
    )
    before = completions(server)
    judge = LLMJudge(settings)
    result = judge.compare(["Name a fruit.", "Name a colour."], ["An apple.", "Blue."], ["A rock.", "Loud."])
    judge.close()
    # A random-weights model never writes a verdict: every reply is a counted parse failure, retried once,
    # and the pairs stay undecided instead of being guessed.
    assert result.requests == 8 and completions(server) - before == 8
    assert result.parse_failures == 8 and result.unresolved == 4
    assert result.scores == [None, None] and result.summary()["decided"] == 0
    assert all(isinstance(a, str) for pair in result.raw for a in pair)

    monkeypatch.setenv("PREFLOOP_JUDGE_API_KEY", "wrong-key")
    from reward.judge import JudgeError

    with pytest.raises(JudgeError, match=r"\(401\)"):
        LLMJudge(settings).compare(["q"], ["a"], ["b"])


def test_curation_scores_by_the_judge_through_a_running_serve(
    server: RunningServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from alignment.sft_curation import CurationSettings, ScoreSettings, curate_rows
    from reward.curation import build_scorers

    monkeypatch.setenv("PREFLOOP_JUDGE_API_KEY", CLIENT_KEY)
    judge = {"base_url": f"{server.url}/v1", "model": "tiny-random", "max_tokens": 4, "max_parse_retries": 0}
    score = ScoreSettings(
        judge={**judge, "cache_dir": str(tmp_path / "cache")}, select_by="judge", min_score=1
    )
    scorers = build_scorers(score)
    assert set(scorers) == {"judge"}
    rows = [
        (
            "f:1",
            {
                "messages": [
                    {"role": "user", "content": "Name a fruit."},
                    {"role": "assistant", "content": "Apple."},
                ]
            },
        ),
        (
            "f:2",
            {
                "messages": [
                    {"role": "user", "content": "Name a tree."},
                    {"role": "assistant", "content": "Oak."},
                ]
            },
        ),
    ]
    result = curate_rows(rows, CurationSettings(score=score, languages=None), scorers)
    # The random-weights judge gives no rating: each row scores 0, below the 1-10 scale, and is removed.
    assert result.scores == {"judge": [0.0, 0.0]} and len(result.removed["low_score"]) == 2

    from alignment.config import ConfigError

    with pytest.raises(ConfigError, match=r"score\.judge"):
        build_scorers(ScoreSettings(judge={"base_url": "http://x"}))  # no model
