"""SFT curation: every filter on hand-made rows, shared dedup, scoring/selection, versioned output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignment import dedup, preference_data, sft_curation
from alignment.sft_curation import CurationSettings, ScoreSettings, curate_rows, write_curated


def conv(user: str, assistant: str, **extra: object) -> dict:
    return {
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}],
        **extra,
    }


GOOD = conv(
    "How do I boil an egg?", "Put the egg in boiling water for about nine minutes, then cool it.", id="good"
)


def run(rows: list[dict], **settings: object):
    cfg = CurationSettings(near_dup_threshold=None, **settings)
    return curate_rows(((f"f.jsonl:{i + 1}", r) for i, r in enumerate(rows)), cfg)


def removed_ids(result) -> dict[str, list[str]]:
    return {reason: [r["id"] for r in rows] for reason, rows in result.removed.items() if rows}


def test_each_rule_filter_removes_its_row_and_says_why() -> None:
    rows = [
        GOOD,
        {
            "messages": [{"role": "assistant", "content": "I start."}, {"role": "user", "content": "ok"}],
            "id": "roles",
        },
        {
            "messages": [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "x"}],
            "id": "badrole",
        },
        conv("Tell me about rivers, please.", "   ", id="empty"),
        conv("Why is the sky blue?", "k", id="short"),
        conv("Write a long essay about the sea.", "wave " * 500, id="long"),
        conv(
            "Comment faire cuire un oeuf dur rapidement ?",
            "Mettez l'oeuf dans l'eau bouillante pendant neuf minutes, puis refroidissez-le.",
            id="french",
        ),
        conv("Sing me a song about the moon.", "la la la la la la la la la la la la la la", id="loop"),
        conv("What is the capital of Peru?", "As an AI language model, I cannot know that.", id="refusal"),
    ]
    result = run(rows, max_chars=1000)
    ids = removed_ids(result)
    assert [r["id"] for r in result.kept] == ["good"]
    assert ids == {
        "malformed_roles": ["roles", "badrole"],
        "empty": ["empty"],
        "too_short": ["short"],
        "too_long": ["long"],
        "language": ["french"],
        "repeated_ngrams": ["loop"],
        "boilerplate": ["refusal"],
    }
    details = {reason: rows[0]["detail"] for reason, rows in result.removed.items()}
    assert "last message must be the assistant's" in details["malformed_roles"]
    assert "needs a role" in result.removed["malformed_roles"][1]["detail"]
    assert "detected 'fr'" in details["language"]
    assert "as an ai" in details["boilerplate"].lower()
    assert result.removed["too_short"][0]["where"] == "f.jsonl:5"
    report = result.report()
    assert report["removed"]["language"] == 1 and report["rows_read"] == len(rows)
    assert report["examples"]["boilerplate"][0]["id"] == "refusal"


def test_filters_follow_their_settings() -> None:
    french = conv("Comment ça va aujourd'hui, mon ami ?", "Très bien, merci beaucoup de demander !", id="fr")
    refusal = conv("Help me?", "Nope, not today my friend.", id="nope")
    result = run(
        [french, refusal], languages=None, boilerplate_patterns=[r"^nope\b"], max_repeated_ngram_fraction=None
    )
    assert removed_ids(result) == {"boilerplate": ["nope"]}
    assert [r["id"] for r in result.kept] == ["fr"]
    with pytest.raises(ValueError, match="invalid regex"):
        CurationSettings(boilerplate_patterns=["(unclosed"])


def test_exact_near_duplicates_and_contamination_use_the_shared_dedup(tmp_path: Path) -> None:
    base = "Boil water, add the egg gently, wait nine minutes, then cool it in cold water before peeling."
    rows = [
        conv("How do I boil an egg?", base, id="a"),
        conv("how do I  boil an egg?", base, id="a-copy"),  # differs only in case/space
        conv("How do I boil an egg?", base + "!", id="a-near"),
        conv("What is the capital of Peru?", "Lima is the capital of Peru.", id="leak"),
        conv("Name a green vegetable.", "Spinach is a green vegetable.", id="clean"),
    ]
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"prompt": "What is the capital of Peru?"}) + "\n")
    cfg = CurationSettings(near_dup_threshold=0.8, decontaminate_against={"peru-bench": bench})
    result = curate_rows(((str(i), r) for i, r in enumerate(rows)), cfg)
    assert [r["id"] for r in result.kept] == ["a", "clean"]
    assert removed_ids(result) == {
        "exact_duplicate": ["a-copy"],
        "near_duplicate": ["a-near"],
        "contaminated": ["leak"],
    }
    assert result.removed["contaminated"][0]["detail"] == "in peru-bench"
    # One implementation: both data pipelines call the same module (imported, not copied).
    assert sft_curation.dedup is dedup and preference_data.dedup is dedup
    assert not hasattr(sft_curation, "minhash") and not hasattr(preference_data, "_minhash")


def test_scoring_keeps_the_top_fraction_and_a_threshold() -> None:
    rows = [
        conv(f"Question number {i}?", f"An answer of length {'x' * i}.", id=f"r{i}") for i in range(1, 11)
    ]
    seen: list[tuple[list, str]] = []

    def by_length(prompts: list, responses: list[str]) -> list[float]:
        seen.extend(zip(prompts, responses, strict=True))
        return [float(len(r)) for r in responses]

    def settings(**score: object) -> CurationSettings:
        return CurationSettings(
            near_dup_threshold=None, max_repeated_ngram_fraction=None, score=ScoreSettings(**score)
        )

    located = [(str(i), r) for i, r in enumerate(rows)]
    top = curate_rows(located, settings(keep_top_fraction=0.3), {"reward": by_length})
    assert [r["id"] for r in top.kept] == ["r8", "r9", "r10"]
    assert len(top.removed["low_score"]) == 7 and top.threshold == len("An answer of length xxxxxxxx.")
    assert seen[0][0] == [
        {"role": "user", "content": "Question number 1?"}
    ]  # prompt = turns before the reply
    above = curate_rows(located, settings(min_score=25), {"reward": by_length})
    assert [r["id"] for r in above.kept] == [f"r{i}" for i in range(4, 11)]
    assert above.kept[0]["scores"] == {"reward": 25.0}


def test_output_is_versioned_by_content_and_has_a_report(tmp_path: Path) -> None:
    def score(prompts: list, responses: list[str]) -> list[float]:
        return [float(len(r)) for r in responses]

    rows = [
        GOOD,
        conv("Why?", "k", id="short"),
        conv("Name a colour.", "Blue is a colour of the sky.", id="blue"),
    ]
    result = curate_rows(((str(i), r) for i, r in enumerate(rows)), CurationSettings(), {"reward": score})
    first = write_curated(result, tmp_path / "out")
    assert first.version == "v0001" and first.rows == 2 and not first.unchanged
    kept = [json.loads(line) for line in first.train_file.read_text().splitlines()]
    assert [r["id"] for r in kept] == ["good", "blue"]
    report = json.loads((first.path / "report.json").read_text())
    assert report["removed"]["too_short"] == 1
    assert (first.path / "scores.png").stat().st_size > 1000
    markdown = (first.path / "report.md").read_text()
    assert "| too_short | 1 |" in markdown and "### too_short" in markdown
    assert json.loads((first.path / "removed.jsonl").read_text().splitlines()[0])["reason"] == "too_short"

    again = write_curated(result, tmp_path / "out")  # same content = same version, nothing written
    assert (again.version, again.unchanged) == ("v0001", True)
    (tmp_path / "out" / ".v0002-leftover").mkdir()  # a killed run's staging dir
    fewer = curate_rows([("0", GOOD)], CurationSettings(), {"reward": score})
    second = write_curated(fewer, tmp_path / "out")
    assert second.version == "v0002" and second.rows == 1
    assert not list((tmp_path / "out").glob(".v*"))
