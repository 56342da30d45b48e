"""Preference data: every loader shape, validation with row ids, dedup, decontamination, split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignment.data_files import DataError
from alignment.preference_data import (
    EXAMPLE_PREFERENCES,
    PreferenceDataSettings,
    in_eval_split,
    load_preference_rows,
    pair_id,
    prepare_preferences,
    write_preference_rows,
)


def write_lines(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pair(prompt: str, chosen: str, rejected: str, **extra: object) -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **extra}


def settings(train: Path, **kw: object) -> PreferenceDataSettings:
    return PreferenceDataSettings(train=train, eval_fraction=0.0, near_dup_threshold=None, **kw)


def test_anthropic_hh_text_is_split_at_the_last_assistant_turn(tmp_path: Path) -> None:
    history = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Name a fruit."
    path = write_lines(
        tmp_path / "hh.jsonl",
        [{"chosen": history + "\n\nAssistant: An apple.", "rejected": history + "\n\nAssistant: No."}],
    )
    (row,) = load_preference_rows(path)
    assert row["prompt"] == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Name a fruit."},
    ]
    assert row["chosen"] == [{"role": "assistant", "content": "An apple."}]
    assert row["rejected"] == [{"role": "assistant", "content": "No."}]
    assert row["id"] == pair_id(row["prompt"], row["chosen"], row["rejected"])


def test_string_and_message_forms_give_the_same_canonical_row(tmp_path: Path) -> None:
    as_text = pair("Why?", "Because.", "No.")
    as_messages = {
        "chosen": [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because."}],
        "rejected": [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "No."}],
    }
    a, b = load_preference_rows(write_lines(tmp_path / "p.jsonl", [as_text, as_messages]))
    assert a == b
    assert pair_id("Why?", "Because.", "No.") == a["id"]


def test_structural_errors_name_file_and_line(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "bad.jsonl", [pair("q", "a", "b"), {"prompt": "q", "chosen": "a"}])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: missing 'rejected'"):
        load_preference_rows(path)
    path = write_lines(tmp_path / "agree.jsonl", [pair("q", "a", "b", annotator_agreement=3)])
    with pytest.raises(DataError, match=r"agree\.jsonl:1: annotator_agreement"):
        load_preference_rows(path)


def test_invalid_pairs_are_dropped_counted_and_reported_by_id(tmp_path: Path) -> None:
    mismatch = {
        "chosen": [{"role": "user", "content": "A?"}, {"role": "assistant", "content": "yes"}],
        "rejected": [{"role": "user", "content": "B?"}, {"role": "assistant", "content": "no"}],
        "id": "mismatch",
    }
    rows = [
        pair("q1", "good", "bad", id="ok"),
        pair("q2", "same", " same ", id="identical"),
        pair("q3", "", "bad", id="empty"),
        mismatch,
        pair("q4", "x", "y", id="ok"),  # same id, different content
    ]
    train, eval_ds, report = prepare_preferences(settings(write_lines(tmp_path / "p.jsonl", rows)))
    assert train["id"] == ["ok"] and eval_ds is None
    assert report["removed"] == {"identical": 1, "empty_response": 1, "prompt_mismatch": 1, "duplicate_id": 1}
    assert report["removed_ids"]["prompt_mismatch"] == ["mismatch"]


def test_on_invalid_error_fails_naming_line_and_id(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "p.jsonl", [pair("q1", "good", "bad"), pair("q2", "same", "same", id="dup")]
    )
    with pytest.raises(DataError, match=r"p\.jsonl:2 \(id=dup\): chosen and rejected are identical"):
        prepare_preferences(settings(path, on_invalid="error"))


def test_overlength_pairs_are_dropped_with_a_tokenizer(tmp_path: Path, tiny_model: Path) -> None:
    from alignment.models import load_tokenizer

    rows = [pair("short?", "yes", "no", id="short"), pair("long?", "word " * 200, "no", id="long")]
    train, _, report = prepare_preferences(
        settings(write_lines(tmp_path / "p.jsonl", rows), max_length=64), load_tokenizer(tiny_model)
    )
    assert train["id"] == ["short"]
    assert report["removed_ids"] == {"overlength": ["long"]}


def test_exact_and_near_duplicates_are_removed(tmp_path: Path) -> None:
    base = "Ahoy! The capital of France is Paris, a city on the Seine with many museums. Fair winds!"
    rows = [
        pair("What is the capital of France?", base, "Paris.", id="a"),
        pair("What is the capital of France?", base, "Paris.", id="a-copy"),
        pair("What is the capital of France?", base + "!", "Paris.", id="a-near"),
        pair("How do I start running?", "Ahoy! Slowly. Fair winds!", "Run.", id="b"),
    ]
    path = write_lines(tmp_path / "p.jsonl", rows)
    train, _, report = prepare_preferences(
        PreferenceDataSettings(train=path, eval_fraction=0.0, near_dup_threshold=0.8)
    )
    assert train["id"] == ["a", "b"]
    assert report["removed_ids"] == {"exact_duplicate": ["a-copy"], "near_duplicate": ["a-near"]}


def test_decontamination_drops_training_prompts_seen_in_the_eval_set(tmp_path: Path) -> None:
    train = write_lines(
        tmp_path / "train.jsonl",
        [
            pair("What is the capital of Peru?", "Lima", "Oslo", id="leak"),
            pair("what is the  capital of peru", "Lima!", "Rome", id="leak-normalised"),
            pair("What colour is snow?", "white", "green", id="clean"),
        ],
    )
    bench = write_lines(
        tmp_path / "bench.jsonl",
        [{"messages": [{"role": "user", "content": "What is the capital of Peru?"}]}],
    )
    ds, _, report = prepare_preferences(settings(train, decontaminate_against=bench))
    assert ds["id"] == ["clean"]
    assert sorted(report["removed_ids"]["contaminated"]) == ["leak", "leak-normalised"]


def test_split_is_by_hashed_id_and_independent_of_row_order(tmp_path: Path) -> None:
    rows = [pair(f"question {i}?", f"answer {i}", f"wrong {i}") for i in range(60)]
    first = tmp_path / "a.jsonl"
    write_preference_rows(first, rows)
    second = tmp_path / "b.jsonl"
    write_preference_rows(second, list(reversed(rows)))
    kw = {"eval_fraction": 0.25, "near_dup_threshold": None}
    _, eval_a, _ = prepare_preferences(PreferenceDataSettings(train=first, **kw))
    _, eval_b, _ = prepare_preferences(PreferenceDataSettings(train=second, **kw))
    assert eval_a is not None and eval_b is not None
    assert sorted(eval_a["id"]) == sorted(eval_b["id"])
    assert 5 <= len(eval_a) <= 25
    assert all(in_eval_split(i, 0.25) for i in eval_a["id"])


def test_datasets_directory_round_trip(tmp_path: Path) -> None:
    from alignment.preference_data import to_dataset

    rows = load_preference_rows(EXAMPLE_PREFERENCES)[:20]
    to_dataset(rows).save_to_disk(str(tmp_path / "ds"))
    loaded = load_preference_rows(tmp_path / "ds")
    assert [r["id"] for r in loaded] == [r["id"] for r in rows]
    assert loaded[0]["annotator_agreement"] == rows[0]["annotator_agreement"]


def test_bundled_house_style_set_is_clean() -> None:
    rows = load_preference_rows(EXAMPLE_PREFERENCES)
    assert len(rows) >= 200
    assert all(r["chosen"][0]["content"].startswith("Ahoy!") for r in rows)
    assert not any(r["rejected"][0]["content"].startswith("Ahoy!") for r in rows)
    _, _, report = prepare_preferences(PreferenceDataSettings())
    assert report["removed"] == {}
