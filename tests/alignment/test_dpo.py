"""DPO on the tiny random model: learning, the SFT-adapter reference, the reference cache, TRL parity."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from alignment.config import ConfigError, load_config
from alignment.data_files import write_jsonl
from alignment.dpo import (
    DPORunConfig,
    add_completion_lm_head,
    build_dpo_trainer,
    share_prompts,
    train_dpo,
)
from alignment.preference_data import EXAMPLE_PREFERENCES, load_preference_rows
from alignment.shared_prompt import SEGMENT_ATTENTION


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The tiny model's ops are too small to gain from threads, and a busy 2-core box makes OpenMP
    barriers wait on descheduled threads: one thread is both faster and steadier here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """48 training and 16 held-out bundled house-style pairs, and a reference cache shared by the module."""
    root = tmp_path_factory.mktemp("pairs")
    rows = load_preference_rows(EXAMPLE_PREFERENCES)
    write_jsonl(root / "train.jsonl", rows[:48])
    write_jsonl(root / "eval.jsonl", rows[48:64])
    return root / "train.jsonl", root / "eval.jsonl", root / "ref-cache"


def dpo_config(
    tiny_model: Path, tmp_path: Path, pairs: tuple[Path, Path, Path], *overrides: str
) -> DPORunConfig:
    train, eval_, cache = pairs
    return load_config(
        DPORunConfig,
        overrides=[
            f"model={tiny_model}",
            f"output_dir={tmp_path / 'dpo'}",
            f"data.train={train}",
            f"data.eval={eval_}",
            "data.max_length=96",
            "training.batch_size=8",
            "training.eval_batch_size=16",
            "training.learning_rate=2e-3",
            "training.max_steps=8",
            "training.logging_steps=4",
            "training.lr_scheduler=constant",
            "lora.dropout=0.0",
            "tracking.report_to=none",
            f"dpo.reference_cache_dir={cache}",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def sft_adapter(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stand-in SFT adapter: non-zero LoRA weights, so the adapter-as-reference differs from the base."""
    from peft import LoraConfig, get_peft_model

    from alignment.models import load_causal_lm, load_tokenizer

    out = tmp_path_factory.mktemp("sft-adapter")
    torch.manual_seed(1)
    base = load_causal_lm(tiny_model)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(base, lora).save_pretrained(out)
    load_tokenizer(tiny_model).save_pretrained(out)
    return out


@contextmanager
def count_backbone_forwards() -> Iterator[list[int]]:
    """Counts every forward of a decoder stack (LlamaModel), whoever calls it."""
    from transformers.models.llama.modeling_llama import LlamaModel

    calls = [0]

    def hook(module: torch.nn.Module, *_: object) -> None:
        if isinstance(module, LlamaModel):
            calls[0] += 1

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


def test_dpo_from_sft_adapter_raises_margin_and_heldout_accuracy(
    tiny_model: Path, sft_adapter: Path, tmp_path: Path, pairs: tuple[Path, Path, Path]
) -> None:
    cfg = dpo_config(tiny_model, tmp_path, pairs, f"init_adapter={sft_adapter}")
    trainer = build_dpo_trainer(cfg)
    peft_model = trainer.model
    # The reference is the frozen SFT adapter, loaded as a second adapter on the same base weights.
    assert set(peft_model.peft_config) == {"default", "ref"}
    ref_params = [p for n, p in peft_model.named_parameters() if ".ref." in n]
    assert ref_params and not any(p.requires_grad for p in ref_params)
    assert trainer.ref_model is None  # no second full model
    before = trainer.evaluate()
    # Policy == reference at the start: every implicit reward is 0, so nothing is "accurate" yet.
    assert before["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-2)
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_rewards/margins"] > before["eval_rewards/margins"] + 0.05
    assert after["eval_rewards/accuracies"] >= 0.75
    train_logs = [log for log in trainer.state.log_history if "rewards/margins" in log]
    assert train_logs[-1]["rewards/margins"] > train_logs[0]["rewards/margins"]


def test_reference_logps_are_cached_and_reused(
    tiny_model: Path, tmp_path: Path, pairs: tuple[Path, Path, Path]
) -> None:
    cfg = dpo_config(tiny_model, tmp_path, pairs)
    with count_backbone_forwards() as first:
        trainer = build_dpo_trainer(cfg)
    # One reference forward per batch of 16 pairs, train and eval; none during training.
    assert first[0] == math.ceil(len(trainer.train_dataset) / 16) + math.ceil(len(trainer.eval_dataset) / 16)
    cached = trainer.train_dataset["ref_chosen_logps"]

    with count_backbone_forwards() as second:
        again = build_dpo_trainer(cfg)
    assert second[0] == 0
    assert again.train_dataset["ref_chosen_logps"] == cached

    # Another reference (a different max_length truncates differently) is a miss, not a stale hit.
    with count_backbone_forwards() as third:
        build_dpo_trainer(dpo_config(tiny_model, tmp_path, pairs, "data.max_length=64"))
    assert third[0] > 0

    # The cached values are the reference's: with a fresh LoRA (B = 0) the policy equals the reference.
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    with torch.no_grad():
        policy_chosen, _ = trainer.compute_ref_log_probs(trainer.model, batch)
    torch.testing.assert_close(policy_chosen.float(), batch["ref_chosen_logps"].float(), atol=1e-3, rtol=1e-4)


def test_train_dpo_writes_adapter_card_and_metrics(
    tiny_model: Path, tmp_path: Path, pairs: tuple[Path, Path, Path]
) -> None:
    cfg = dpo_config(tiny_model, tmp_path, pairs, "training.max_steps=2", "dpo.loss_type=[ipo]")
    metrics = train_dpo(cfg)
    out = cfg.output_dir
    assert (out / "adapter_model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert "dpo" in (out / "README.md").read_text()
    assert json.loads((out / "metrics.json").read_text())["train_runtime"] == metrics["train_runtime"]
    assert "eval_rewards/accuracies" in metrics


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_losses_match_trl_dpo_trainer(
    tiny_model: Path, tmp_path: Path, pairs: tuple[Path, Path, Path], dtype: str
) -> None:
    """Same data, batches and LoRA init: TRL's stock trainer (fp32, reference forward every step) and
    prefloop's (cached reference, packed pairs, completion-only head, addmm LoRA) log the same losses:
    in fp32 to rounding (the pipelines compute the same function), in bf16 weights within bf16 noise."""
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from alignment.devices import plan_device
    from alignment.models import load_causal_lm, load_tokenizer

    cfg = dpo_config(
        tiny_model,
        tmp_path,
        pairs,
        "training.batch_size=4",
        "training.max_steps=3",
        "training.logging_steps=1",
        f"training.dtype={dtype}",
    )
    ours = build_dpo_trainer(cfg)
    ours.train()
    trl_args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=4,
        learning_rate=2e-3,
        lr_scheduler_type="constant",
        max_steps=3,
        logging_steps=1,
        max_length=96,
        bf16=False,
        gradient_checkpointing=False,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=cfg.training.seed,
    )
    theirs = DPOTrainer(
        model=load_causal_lm(tiny_model, plan_device("fp32")),
        args=trl_args,
        train_dataset=ours.train_dataset.remove_columns(["ref_chosen_logps", "ref_rejected_logps"]),
        processing_class=load_tokenizer(tiny_model),
        peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"),
    )
    theirs.train()

    def logged(trainer: object, key: str) -> list[float]:
        return [log[key] for log in trainer.state.log_history if key in log]  # type: ignore[attr-defined]

    assert len(logged(ours, "loss")) == 3
    if dtype == "fp32":
        for key in ("loss", "logps/chosen", "logps/rejected", "rewards/margins"):
            torch.testing.assert_close(
                torch.tensor(logged(ours, key)), torch.tensor(logged(theirs, key)), rtol=1e-4, atol=2e-4
            )
        return
    assert ours.model.get_base_model().dtype == torch.bfloat16
    # bf16 weights round each logit to ~3 significant digits: a sequence log-prob of ~-500 is off by ~1.
    torch.testing.assert_close(
        torch.tensor(logged(ours, "logps/chosen")),
        torch.tensor(logged(theirs, "logps/chosen")),
        rtol=5e-3,
        atol=0.5,
    )
    torch.testing.assert_close(
        torch.tensor(logged(ours, "loss")), torch.tensor(logged(theirs, "loss")), rtol=0, atol=0.03
    )


def test_bad_config_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "dpo.yaml"
    path.write_text("dpo:\n  loss_type: [sigmoidd]\n")
    with pytest.raises(ConfigError, match=r"dpo\.loss_type"):
        load_config(DPORunConfig, path)


def test_cli_train_dpo_reports_config_errors(tmp_path: Path) -> None:
    from serving.cli import app

    result = CliRunner().invoke(app, ["train", "dpo", "--set", "dpo.beta=-1"])
    assert result.exit_code == 2
    assert "dpo.beta" in result.output


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("mode", ["pair", "batch"])
def test_shared_prompt_forward_matches_one_row_per_response(
    tiny_model: Path, tmp_path: Path, pairs: tuple[Path, Path, Path], attention: str, mode: str
) -> None:
    """Running each pair's prompt once (rejected masked from chosen) gives the same log-probs."""
    cfg = dpo_config(
        tiny_model,
        tmp_path,
        pairs,
        "training.dtype=fp32",
        "dpo.precompute_ref_log_probs=false",
        f"training.attention={attention}",
        f"dpo.share_prompt={mode}",
    )
    trainer = build_dpo_trainer(cfg)
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    model = trainer.model.get_base_model()
    assert model.config._attn_implementation == SEGMENT_ATTENTION  # packed rows attend per sequence
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}
    packed = share_prompts(**kwargs, across_pairs=mode == "batch")
    assert packed is not None and packed.input_ids.shape[0] == (4 if mode == "pair" else 1)
    with torch.no_grad():
        shared = model(**kwargs, fused_lm_head=True)
        add_completion_lm_head(model, share_prompt="off")
        model.set_attn_implementation(attention)  # the reference: full rows under eager / SDPA
        separate = model(**kwargs, fused_lm_head=True)
    torch.testing.assert_close(shared.log_probs, separate.log_probs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(shared.entropy, separate.entropy, atol=1e-4, rtol=1e-4)
    assert shared.log_probs[separate.label_mask].abs().min() > 0
