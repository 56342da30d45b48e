"""The LLM judge against a fake OpenAI-compatible judge whose position bias is known."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest

from alignment.config import ConfigError
from reward.judge import JudgeError, JudgeSettings, LLMJudge, parse_pairwise, parse_rating


class BiasedJudge:
    """Prefers the answer with more "good" words; when both are equally good it always says A.

    That is a judge with a pure position bias on ties of quality, so its single-order win rate is
    wrong by a known amount and its both-order win rate is exactly the true one.
    """

    def __init__(self, garble_first: bool = False) -> None:
        self.requests = 0
        self.garble_first = garble_first
        self.seen: set[str] = set()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        body = json.loads(request.content)
        text = body["messages"][0]["content"]
        if self.garble_first and text not in self.seen:
            self.seen.add(text)
            return self.reply("I think the first one, probably.")  # no verdict: a parse failure
        if "[Answer A]" in text:
            a = re.search(r"\[Answer A\]\n(.*?)\n\n\[Answer B\]", text, re.S).group(1)
            b = re.search(r"\[Answer B\]\n(.*?)\n\nReply", text, re.S).group(1)
            qa, qb = a.count("good"), b.count("good")
            return self.reply("[[A]]" if qa >= qb else "[[B]]")
        answer = re.search(r"\[Answer\]\n(.*?)\n\nRate", text, re.S).group(1)
        return self.reply(f"Rating: [[{min(10, 1 + answer.count('good'))}]]")

    @staticmethod
    def reply(content: str) -> httpx.Response:
        return httpx.Response(200, json={"choices": [{"message": {"role": "assistant", "content": content}}]})


def settings(tmp_path: Path, **kw: object) -> JudgeSettings:
    values = {
        "base_url": "http://judge.test/v1",
        "model": "fake",
        "api_key_env": None,
        "cache_dir": tmp_path / "cache",
    }
    return JudgeSettings(**(values | kw))


# 10 prompts: candidate better on 3, baseline better on 3, equally good on 4 -> true win rate 0.5.
PROMPTS = [f"question {i}" for i in range(10)]
CANDIDATE = ["good good"] * 3 + ["meh"] * 3 + ["good, says the candidate"] * 4
BASELINE = ["meh"] * 3 + ["good good"] * 3 + ["good, says the baseline"] * 4


def test_both_orders_cancel_a_known_position_bias(tmp_path: Path) -> None:
    fake = BiasedJudge()
    judge = LLMJudge(settings(tmp_path), transport=httpx.MockTransport(fake))
    result = judge.compare(PROMPTS, CANDIDATE, BASELINE)
    # Shown first, the candidate "wins" the 4 equal pairs too: 7/10. Both orders: 3 wins + 4 ties.
    assert result.first_order_win_rate == pytest.approx(0.7)
    assert result.win_rate == pytest.approx(0.5)
    # 20 verdicts: 3+3 decided on quality in each order, and 4 pairs x 2 orders of "A".
    assert result.position_bias == pytest.approx(14 / 20)
    assert result.consistency == pytest.approx(6 / 10)
    summary = result.summary()
    assert (summary["wins"], summary["ties"], summary["losses"]) == (3, 4, 3)
    assert fake.requests == 20 and result.requests == 20


def test_second_run_is_served_from_the_cache(tmp_path: Path) -> None:
    fake = BiasedJudge()
    first = LLMJudge(settings(tmp_path), transport=httpx.MockTransport(fake)).compare(
        PROMPTS, CANDIDATE, BASELINE
    )
    assert fake.requests == 20
    again = BiasedJudge()
    second = LLMJudge(settings(tmp_path), transport=httpx.MockTransport(again)).compare(
        PROMPTS, CANDIDATE, BASELINE
    )
    assert again.requests == 0 and second.requests == 0 and second.cache_hits == 20
    assert second.scores == first.scores
    # A different rubric is a different judge: nothing of the first run is reused.
    other = BiasedJudge()
    LLMJudge(settings(tmp_path, rubric="Be terse."), transport=httpx.MockTransport(other)).compare(
        PROMPTS[:1], CANDIDATE[:1], BASELINE[:1]
    )
    assert other.requests == 2


def test_parse_failures_are_counted_and_retried(tmp_path: Path) -> None:
    fake = BiasedJudge(garble_first=True)
    result = LLMJudge(settings(tmp_path), transport=httpx.MockTransport(fake)).compare(
        PROMPTS[:3], CANDIDATE[:3], BASELINE[:3]
    )
    assert result.parse_failures == 6 and result.unresolved == 0 and fake.requests == 12
    assert result.win_rate == 1.0

    never = LLMJudge(
        settings(tmp_path / "b", max_parse_retries=1),
        transport=httpx.MockTransport(lambda r: BiasedJudge.reply("no idea")),
    ).compare(PROMPTS[:2], CANDIDATE[:2], BASELINE[:2])
    assert never.parse_failures == 8 and never.unresolved == 4 and never.scores == [None, None]
    assert never.summary()["decided"] == 0


def test_ratings_score_single_answers(tmp_path: Path) -> None:
    judge = LLMJudge(settings(tmp_path), transport=httpx.MockTransport(BiasedJudge()))
    assert judge.scorer(["q1", "q2"], ["meh", "good good good"]) == [1.0, 4.0]
    assert parse_rating("[[7]] no, [[8]]") == 8.0 and parse_rating("eight") is None
    assert parse_pairwise("[[C]]") == "tie" and parse_pairwise("I think A") is None
    assert parse_pairwise("A is more helpful.") == "A" and parse_pairwise("(B)") == "B"
    assert parse_pairwise("a dog") is None and parse_pairwise("Both are fine") is None


def test_refusals_and_missing_keys_are_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    refuse = httpx.MockTransport(lambda r: httpx.Response(401, json={"error": {"message": "bad key"}}))
    with pytest.raises(JudgeError, match=r"refused the request \(401\)"):
        LLMJudge(settings(tmp_path), transport=refuse).compare(["q"], ["a"], ["b"])
    monkeypatch.delenv("MY_JUDGE_KEY", raising=False)
    with pytest.raises(ConfigError, match="MY_JUDGE_KEY is not set"):
        LLMJudge(settings(tmp_path).model_copy(update={"api_key_env": "MY_JUDGE_KEY"}))
    monkeypatch.setenv("MY_JUDGE_KEY", "sekrit")
    seen = []

    def auth(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["authorization"])
        return BiasedJudge.reply("[[C]]")

    judge = LLMJudge(
        settings(tmp_path / "k").model_copy(update={"api_key_env": "MY_JUDGE_KEY"}), httpx.MockTransport(auth)
    )
    assert judge.compare(["q"], ["a"], ["b"]).scores == [0.5]
    assert seen == ["Bearer sekrit", "Bearer sekrit"]


def test_a_pair_won_in_one_order_and_tied_in_the_other_leans_to_a_win(tmp_path: Path) -> None:
    # Candidate first: always "A"; baseline first: "C" (tie). Scores 3/4: a win on balance.
    def replies(request: httpx.Request) -> httpx.Response:
        text = json.loads(request.content)["messages"][0]["content"]
        first = re.search(r"\[Answer A\]\n(.*?)\n\n", text, re.S).group(1)
        return BiasedJudge.reply("[[A]]" if first == "cand" else "[[C]]")

    result = LLMJudge(settings(tmp_path), transport=httpx.MockTransport(replies)).compare(
        ["q"], ["cand"], ["base"]
    )
    assert result.scores == [0.75]
    assert (result.summary()["wins"], result.summary()["ties"], result.summary()["losses"]) == (1, 0, 0)


def test_server_errors_are_retried_and_an_unreachable_judge_is_a_clear_error(tmp_path: Path) -> None:
    calls = []

    def flaky(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(503) if len(calls) == 1 else BiasedJudge.reply("[[A]]")

    judge = LLMJudge(settings(tmp_path, max_http_retries=1), transport=httpx.MockTransport(flaky))
    assert judge.ask("pairwise", "q", parse_pairwise)[0] == "A" and len(calls) == 2
    gone = LLMJudge(settings(tmp_path, base_url="http://127.0.0.1:9/v1", max_http_retries=0, cache_dir=None))
    with pytest.raises(JudgeError, match="judge unreachable after 1 tries"):
        gone.compare(["q"], ["a"], ["b"])
