"""`prefloop data curate` and `train sft` with a `curate:` block, scored by a real (tiny) reward model."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from serving.cli import app

runner = CliRunner()


def conv(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def write_rows(path: Path) -> Path:
    topics = ["the sea", "a mountain", "bread", "winter", "a violin", "the moon", "gardening", "trains"]
    rows = [
        conv(f"Tell me one thing about {t}.", f"big sad {t} ahoy" if i % 2 else f"small cold {t}")
        for i, t in enumerate(topics)
    ]
    rows += [conv("Why?", "k"), conv("How are you?", "I'm sorry, but I can't answer that.")]
    rows.append(rows[0])  # an exact duplicate
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_data_curate_scores_by_reward_model_and_versions_the_output(trained: tuple, tmp_path: Path) -> None:
    rows = write_rows(tmp_path / "sft.jsonl")
    args = [
        "data", "curate", "--input", str(rows), "--output-dir", str(tmp_path / "cur"),
        "--reward-model", str(trained[0]), "--set", "score.keep_top_fraction=0.5", "--set", "languages=null",
    ]  # fmt: skip
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    version = tmp_path / "cur" / "v0001"
    report = json.loads((version / "report.json").read_text())
    assert report["rows_read"] == 11
    assert report["removed"]["too_short"] == 1 and report["removed"]["boilerplate"] == 1
    assert report["removed"]["exact_duplicate"] == 1 and report["removed"]["low_score"] == 4
    kept = [json.loads(line) for line in (version / "train.jsonl").read_text().splitlines()]
    # The tiny reward model was trained to like the "ahoy" marker: the top half is the marked replies.
    assert len(kept) == 4 and all(r["messages"][-1]["content"].endswith("ahoy") for r in kept)
    assert (version / "scores.png").stat().st_size > 1000 and "low_score" in (
        version / "report.md"
    ).read_text()
    assert "wrote v0001" in first.output

    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "unchanged" in again.output
    assert sorted(p.name for p in (tmp_path / "cur").iterdir()) == ["v0001"]


def test_data_curate_bad_settings_exit_2(tmp_path: Path) -> None:
    rows = write_rows(tmp_path / "sft.jsonl")
    bad = runner.invoke(app, ["data", "curate", "--input", str(rows), "--set", "score.keep_top_fraction=0.5"])
    assert bad.exit_code == 2 and "need score.reward_model or score.judge" in bad.output
    typo = runner.invoke(app, ["data", "curate", "--input", str(rows), "--set", "min_charz=3"])
    assert typo.exit_code == 2 and "min_charz: unknown key" in typo.output


def test_train_sft_curates_first_by_config(tiny_model: Path, trained: tuple, tmp_path: Path) -> None:
    rows = write_rows(tmp_path / "sft.jsonl")
    overrides = [
        f"model={tiny_model}", f"output_dir={tmp_path / 'run'}", f"data.train={rows}", "data.eval_fraction=0",
        "training.max_steps=1", "training.batch_size=2", "tracking.report_to=none",
        f"curate.output_dir={tmp_path / 'cur'}", "curate.languages=null",
        f"curate.score.reward_model={trained[0]}", "curate.score.min_score=-1000",
    ]  # fmt: skip
    result = runner.invoke(app, ["train", "sft", *(a for o in overrides for a in ("--set", o))])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["curated_rows"] == 8 and metrics["curated_rows_read"] == 11
    assert metrics["curated_version"] == str(tmp_path / "cur" / "v0001")
