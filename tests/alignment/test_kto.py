"""KTO on unpaired thumbs-up/thumbs-down rows with the tiny random model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignment.config import ConfigError, load_config
from alignment.data_files import DataError, write_jsonl
from alignment.kto import KTORunConfig, load_feedback, train_kto
from alignment.preference_data import EXAMPLE_PREFERENCES, load_preference_rows
from tests.alignment.test_dpo import one_torch_thread  # noqa: F401 (autouse: one torch thread)


def feedback_rows() -> list[dict]:
    """Thumbs from the bundled pairs: house-style answers up, plain answers down, unpaired and shuffled."""
    rows = []
    for i, pair in enumerate(load_preference_rows(EXAMPLE_PREFERENCES)[:30]):
        side, label = ("chosen", True) if i % 3 else ("rejected", False)
        rows.append({"prompt": pair["prompt"], "completion": pair[side], "label": label})
    return rows


def test_kto_trains_and_saves(tiny_model: Path, tmp_path: Path) -> None:
    data = tmp_path / "thumbs.jsonl"
    write_jsonl(data, feedback_rows())
    cfg = load_config(
        KTORunConfig,
        overrides=[
            f"model={tiny_model}",
            f"output_dir={tmp_path / 'kto'}",
            f"data.train={data}",
            "data.eval_fraction=0.2",
            "data.max_length=96",
            "training.batch_size=8",
            "training.max_steps=2",
            "training.logging_steps=1",
            "training.learning_rate=1e-3",
            "tracking.report_to=none",
        ],
    )
    metrics = train_kto(cfg)
    out = cfg.output_dir
    assert (out / "adapter_model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert json.loads((out / "metrics.json").read_text())["train_runtime"] > 0
    assert "eval_loss" in metrics
    assert "kto" in (out / "README.md").read_text()


def test_pairs_unpair_into_thumbs_up_and_down(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, [{"prompt": "Hi?", "chosen": "Ahoy!", "rejected": "Hello."}])
    rows = load_feedback(path)
    assert [(r["completion"][0]["content"], r["label"]) for r in rows] == [("Ahoy!", True), ("Hello.", False)]
    assert rows[0]["prompt"] == [{"role": "user", "content": "Hi?"}]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {"prompt": "Hi?", "completion": "Yo", "label": "false"},
            r"thumbs\.jsonl:2: field 'label' must be true or false",
        ),
        ({"prompt": "Hi?", "completion": "Yo"}, r"thumbs\.jsonl:2: missing field 'label'"),
        (
            {"prompt": "Hi?", "completion": "  ", "label": True},
            r"thumbs\.jsonl:2: field 'completion' is empty",
        ),
        ({"completion": "Yo", "label": True}, r"thumbs\.jsonl:2: missing field 'prompt'"),
    ],
)
def test_bad_feedback_rows_name_file_line_and_field(tmp_path: Path, row: dict, message: str) -> None:
    path = tmp_path / "thumbs.jsonl"
    write_jsonl(path, [{"prompt": "Ok?", "completion": "Ok.", "label": True}, row])
    with pytest.raises(DataError, match=message):
        load_feedback(path)


def test_kto_config_rejects_single_row_batches() -> None:
    with pytest.raises(ConfigError, match="batch_size must be >= 2"):
        load_config(KTORunConfig, overrides=["training.batch_size=1"])
