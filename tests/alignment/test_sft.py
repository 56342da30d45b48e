import json
from pathlib import Path

import pytest
import torch
from peft import get_peft_model_state_dict

from alignment.config import load_config
from alignment.data_files import DataError
from alignment.models import load_tokenizer, load_with_adapter
from alignment.runner import use_rich_progress
from alignment.sft import EXAMPLE_DATA, SFTRunConfig, build_datasets, build_sft_trainer, train_sft


def small_copy(tmp_path: Path, n: int = 96) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(EXAMPLE_DATA.read_text().splitlines(keepends=True)[:n]))
    return path


def tiny_config(tiny_model: Path, tmp_path: Path, *overrides: str) -> SFTRunConfig:
    return load_config(
        SFTRunConfig,
        None,
        [
            f"model={tiny_model}",
            f"output_dir={tmp_path / 'run'}",
            f"data.train={small_copy(tmp_path)}",
            "data.eval_fraction=0.2",
            "data.max_length=64",
            "training.max_steps=24",
            "training.batch_size=8",
            "training.learning_rate=5e-3",
            "training.logging_steps=4",
            "tracking.report_to=none",
            *overrides,
        ],
    )


def test_sft_lowers_eval_loss_and_reloads_with_same_logits(tiny_model: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_model, tmp_path)
    trainer = use_rich_progress(build_sft_trainer(cfg))
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < before - 0.5, (before, after)

    trainer.save_model(str(cfg.output_dir))
    tokenizer = load_tokenizer(tiny_model)
    ids = tokenizer("Ahoy! The capital of Peru is Lima.", return_tensors="pt")["input_ids"]
    trained = trainer.model.eval()
    reloaded = load_with_adapter(None, cfg.output_dir).eval()
    # The saved LoRA weights are exactly the trained ones (trained in bf16; PEFT loads adapters as fp32)...
    saved, live = get_peft_model_state_dict(reloaded), get_peft_model_state_dict(trained)
    assert saved and saved.keys() == live.keys()
    for name, tensor in live.items():
        torch.testing.assert_close(saved[name], tensor.to(saved[name].dtype), atol=0, rtol=0)
    # ...and the logits agree up to bf16 rounding in the base weights' matmuls.
    with torch.no_grad():
        torch.testing.assert_close(
            trained(ids).logits.float(), reloaded(ids).logits.float(), atol=5e-2, rtol=2e-2
        )


def test_train_sft_writes_the_run_outputs(tiny_model: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_model, tmp_path, "training.max_steps=4", "merge=true")
    metrics = train_sft(cfg)
    out = cfg.output_dir
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "README.md",
        "prefloop-config.yaml",
        "metrics.json",
    ):
        assert (out / name).is_file(), name
    assert "eval_loss" in metrics and json.loads((out / "metrics.json").read_text())["train_runtime"] > 0
    card = (out / "README.md").read_text()
    assert "data sha256" in card and str(tiny_model) in card
    assert (out / "merged" / "model.safetensors").is_file()
    # the resolved config round-trips into an identical config
    assert load_config(SFTRunConfig, out / "prefloop-config.yaml") == cfg


def test_qlora_4bit_trains_and_saves(tiny_model: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_model, tmp_path, "lora.quantization=4bit", "training.max_steps=3")
    trainer = build_sft_trainer(cfg)
    assert getattr(trainer.model, "is_loaded_in_4bit", False) or any(
        "4bit" in type(m).__name__ for m in trainer.model.modules()
    )
    result = trainer.train()
    assert result.global_step == 3
    trainer.save_model(str(cfg.output_dir))
    assert (cfg.output_dir / "adapter_model.safetensors").is_file()


def test_overlength_rows_are_counted_then_dropped_or_kept(tiny_model: Path, tmp_path: Path) -> None:
    tokenizer = load_tokenizer(tiny_model)
    kept = build_datasets(tiny_config(tiny_model, tmp_path, "data.max_length=60"), tokenizer)
    dropped = build_datasets(
        tiny_config(tiny_model, tmp_path, "data.max_length=60", "data.overlength=drop"), tokenizer
    )
    assert kept[2]["overlength_examples"] > 0
    assert kept[2]["overlength_examples"] == dropped[2]["dropped_examples"]
    assert len(dropped[0]) == len(kept[0]) - dropped[2]["dropped_examples"]
    with pytest.raises(DataError, match="no training examples left"):
        build_datasets(
            tiny_config(tiny_model, tmp_path, "data.max_length=10", "data.overlength=drop"), tokenizer
        )


@pytest.mark.parametrize(
    ("overrides", "evaluations"),
    [((), 1), (("training.eval_steps=2",), 3)],
    ids=["once-after-training", "asked-for-every-2-steps"],
)
def test_held_out_set_is_evaluated_once_unless_asked(
    tiny_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    overrides: tuple[str, ...],
    evaluations: int,
) -> None:
    from transformers import Trainer

    calls: list[int] = []
    real_evaluate = Trainer.evaluate

    def counting_evaluate(self: Trainer, *args: object, **kwargs: object) -> dict[str, float]:
        calls.append(self.state.global_step)
        return real_evaluate(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "evaluate", counting_evaluate)
    metrics = train_sft(tiny_config(tiny_model, tmp_path, "training.max_steps=4", *overrides))
    assert "eval_loss" in metrics
    assert len(calls) == evaluations, calls  # 2 steps: steps 2 and 4, then the final evaluation
