"""alignment/quiet.py: the known-harmless library output is gone, and real warnings still show.

The in-process tests trigger the real messages (tiny-random through transformers and peft); the
CLI test runs `prefloop train reward` in a subprocess twice, with the filters and with
PREFLOOP_LIBRARY_NOISE=1, so the absence it asserts is of lines that the same run does print.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from alignment import quiet
from alignment.preference_data import EXAMPLE_PREFERENCES

# One regex per silenced line: what the console showed before alignment/quiet.py.
SILENCED = {
    "peft's deprecated-alias FutureWarning": r"`is_gradient_checkpointing` is deprecated",
    "bitsandbytes without `kernels`": r"Failed to load CPU gemm_4bit_forward",
    "the reward head's LOAD REPORT": r"LlamaForSequenceClassification LOAD REPORT",
    "transformers' weight-loading bar": r"Loading weights",
    "datasets' map bars": r"Tokenizing train dataset",
}


@pytest.fixture
def fresh_quiet(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """quiet_libraries() installs again, inside a warnings context that is undone afterwards."""
    monkeypatch.setattr(quiet, "_installed", False)
    for name in (quiet.SHOW_ALL_ENV, "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(name, raising=False)  # and restored after the test: quiet sets the second
    with warnings.catch_warnings():
        yield


@pytest.fixture
def load_reports() -> Iterator[list[str]]:
    """Every LOAD REPORT transformers logs while the test runs (its handlers see only what filters pass)."""
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "LOAD REPORT" in record.getMessage():
                seen.append(record.getMessage())

    handler = Collect()
    root = logging.getLogger("transformers")
    root.addHandler(handler)
    try:
        yield seen
    finally:
        root.removeHandler(handler)


def test_the_deprecated_alias_warning_is_silenced_and_other_warnings_are_not(
    tiny_model: Path, fresh_quiet: None
) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # quiet's filters go in front of this one
        quiet.quiet_libraries()
        assert model.is_gradient_checkpointing is False  # the alias still works, silently
        warnings.warn("a real FutureWarning from prefloop", FutureWarning, stacklevel=1)
        warnings.warn_explicit(
            "some other transformers deprecation",
            FutureWarning,
            "modeling_utils.py",
            1,
            "transformers.modeling_utils",
        )
    messages = [str(w.message) for w in caught]
    assert not any("is_gradient_checkpointing" in m for m in messages), messages
    assert "a real FutureWarning from prefloop" in messages
    assert "some other transformers deprecation" in messages


def test_the_bitsandbytes_kernels_log_is_dropped_and_its_other_logs_are_not(fresh_quiet: None) -> None:
    quiet.quiet_libraries()
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    kept: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            kept.append(record.getMessage())

    handler = Collect()
    logger.addHandler(handler)
    try:
        logger.warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure ...",
            "No module",
        )
        logger.warning("gemv_4bit: unsupported dtype torch.float16")
    finally:
        logger.removeHandler(handler)
    assert kept == ["gemv_4bit: unsupported dtype torch.float16"]


def test_the_new_head_report_is_hidden_only_where_the_head_is_new(
    tiny_model: Path, tmp_path: Path, load_reports: list[str]
) -> None:
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForSequenceClassification

    with quiet.new_head_expected():
        AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    assert load_reports == []
    AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    assert len(load_reports) == 1 and "score.weight" in load_reports[0]  # outside the block it shows

    # A checkpoint that also lacks a layer weight: the report is a real problem and shows whole.
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (broken / name).write_bytes((tiny_model / name).read_bytes())
    weights = load_file(tiny_model / "model.safetensors")
    dropped = next(k for k in weights if "layers.0.mlp.down_proj" in k)
    save_file({k: v.contiguous() for k, v in weights.items() if k != dropped}, broken / "model.safetensors")
    with quiet.new_head_expected():
        model = AutoModelForSequenceClassification.from_pretrained(broken, num_labels=1)
    assert len(load_reports) == 2
    assert "score.weight" in load_reports[1] and "down_proj" in load_reports[1]
    assert isinstance(model.score.weight, torch.Tensor)


def test_library_noise_env_turns_every_filter_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quiet, "_installed", False)
    monkeypatch.setenv(quiet.SHOW_ALL_ENV, "1")
    with warnings.catch_warnings():
        before = list(warnings.filters)
        quiet.quiet_libraries()
        assert warnings.filters == before
    assert quiet._installed is False


def _reward_run(
    tiny_model: Path, tmp_path: Path, name: str, env: dict[str, str]
) -> subprocess.CompletedProcess:
    rows = [json.loads(line) for line in EXAMPLE_PREFERENCES.read_text().splitlines()[:16]]
    train = tmp_path / "pairs.jsonl"
    # an exact duplicate: preference_data warns that it removed it (a real warning of prefloop's)
    train.write_text("".join(json.dumps(r) + "\n" for r in [*rows, {**rows[0], "id": "dup"}]))
    cmd = [
        *(
            str(Path(sys.executable).parent / "prefloop"),
            "train",
            "reward",
            "--config",
            "configs/reward.yaml",
        ),
        *("--set", f"model={tiny_model}", "--set", f"output_dir={tmp_path / name}"),
        *("--set", f"data.train={train}", "--set", "data.eval_fraction=0.2"),
        *(
            "--set",
            "training.max_steps=1",
            "--set",
            "training.batch_size=2",
            "--set",
            "tracking.report_to=none",
        ),
    ]
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HF_DATASETS_DISABLE_PROGRESS_BARS", quiet.SHOW_ALL_ENV)
    }
    return subprocess.run(
        cmd,
        env={**base, "OMP_NUM_THREADS": "1", **env},
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.slow
def test_a_reward_run_prints_no_silenced_line_and_still_its_real_warning(
    tiny_model: Path, tmp_path: Path
) -> None:
    import re

    loud = _reward_run(tiny_model, tmp_path, "loud", {quiet.SHOW_ALL_ENV: "1"})
    quiet_run = _reward_run(tiny_model, tmp_path, "quiet", {})
    assert loud.returncode == 0, loud.stderr[-3000:]
    assert quiet_run.returncode == 0, quiet_run.stderr[-3000:]
    for what, pattern in SILENCED.items():
        if what == "bitsandbytes without `kernels`" and not _bitsandbytes_warns():
            continue  # only printed where bitsandbytes finds AVX512-BF16 and no `kernels` package
        assert re.search(pattern, loud.stderr), f"{what}: not printed even without the filters"
        assert not re.search(pattern, quiet_run.stderr), f"{what} still printed:\n{quiet_run.stderr[-3000:]}"
    for run in (loud, quiet_run):
        assert re.search(r"preference data .*pairs\.jsonl: removed 1 exact_duplicate", run.stderr), (
            run.stderr[-3000:]
        )


def _bitsandbytes_warns() -> bool:
    try:
        import kernels  # noqa: F401
    except ImportError:
        pass
    else:
        return False
    try:
        from bitsandbytes.functional import has_avx512bf16
    except ImportError:
        return False
    return bool(has_avx512bf16())


def test_argilla_lookup_warnings_are_dropped_and_other_argilla_warnings_are_not(fresh_quiet: None) -> None:
    # the SDK's own words and attribution (argilla/client.py); a real server is in tests/test_quickstart.py
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet.quiet_libraries()
        for message in (
            "Workspace with name 'prefloop' not found.",
            "Dataset with name 'quickstart' not found in workspace 'prefloop'",
            "User with name 'sim-noisy' not found.",
        ):
            warnings.warn_explicit(message, UserWarning, "argilla/client.py", 253, "argilla.client")
    assert [str(w.message) for w in caught] == ["User with name 'sim-noisy' not found."]

    kept: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            kept.append(record.getMessage())

    logger = logging.getLogger("argilla.sdk")
    handler = Collect()
    logger.addHandler(handler)
    try:
        logger.warning("DatasetRecords: The provided batch size 256 was normalized. Using value 232.")
        logger.warning("DatasetRecords: Failed to ingest 3 records")
    finally:
        logger.removeHandler(handler)
    assert kept == ["DatasetRecords: Failed to ingest 3 records"]
