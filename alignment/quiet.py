"""The one place that silences library output known to be harmless in prefloop's runs.

`quiet_libraries()` is called by the `prefloop` command before any stage runs (serving/cli.py) and
by every Ray Train worker process at start, as Ray's setup hook (alignment/distributed.py); Python
callers of the trainers may call it too. Each filter names the library, the exact message and why it is
harmless here; anything else a library warns about still shows. `PREFLOOP_LIBRARY_NOISE=1` turns
every filter off, to see what the libraries say.

`new_head_expected()` is the one filter that cannot be global: transformers' LOAD REPORT of a
sequence classifier's freshly initialised `score` head is expected where prefloop builds a reward
model from a causal LM, and a real problem anywhere else (a causal LM passed as a trained reward model).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

SHOW_ALL_ENV = "PREFLOOP_LIBRARY_NOISE"

# (category, message regex, module regex, why it is harmless)
WARNING_FILTERS: tuple[tuple[type[Warning], str, str, str], ...] = (
    (
        FutureWarning,
        r"`is_gradient_checkpointing` is deprecated",
        r"transformers\.modeling_utils",
        # peft (peft_model.py, mixed_model.py) reads the deprecated alias when wrapping a model;
        # prefloop itself uses `activation_checkpointing`. Nothing for a user to change.
        "peft reads transformers' deprecated alias; prefloop does not",
    ),
    (
        UserWarning,
        r"(Workspace|Dataset) with name '.*' not found",
        r"argilla\.client",
        # The SDK warns before returning None from a lookup by name. prefloop looks up to create the
        # workspace or dataset when missing, and every lookup that needs one raises its own error
        # naming it (annotation/push.py get_dataset, the quickstart's annotators).
        "a create-if-missing lookup; a needed one that is missing is prefloop's own error",
    ),
)

# (logger name, message regex, why it is harmless)
LOG_FILTERS: tuple[tuple[str, str, str], ...] = (
    (
        "bitsandbytes.backends.cpu.ops",
        r"Failed to load CPU gemm_4bit_forward from kernels-community",
        # Logged on import of bitsandbytes (pulled in by peft/transformers) when the optional
        # `kernels` package is absent; bitsandbytes then uses its own torch implementation. prefloop
        # trains bf16 LoRA on CPU by default; QLoRA on CPU still works, on that slower path.
        "an optional faster CPU 4-bit kernel is absent; bitsandbytes falls back to torch",
    ),
    (
        "argilla.sdk",
        r"DatasetRecords: The provided batch size \d+ was normalized",
        # records.log's default batch of 256 is lowered to the number of records pushed: one batch.
        "the SDK's default batch size capped at the record count",
    ),
)

# transformers' tqdm bars dropped: rich shows prefloop's progress, and loading a 135M model's
# weights takes under a second. Other transformers bars (and huggingface_hub downloads) still show.
QUIET_TQDM_BARS = frozenset({"Loading weights"})

# The loggers transformers writes its LOAD REPORT with (modeling_utils.py, modeling_layers.py,
# integrations/peft.py in transformers 5).
LOAD_REPORT_LOGGERS = (
    "transformers.modeling_utils",
    "transformers.modeling_layers",
    "transformers.integrations.peft",
)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class DropMessages(logging.Filter):
    """Drops the records of one logger whose message matches `pattern`; passes everything else."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


class DropNewHeadReport(logging.Filter):
    """Drops a LOAD REPORT whose only rows are MISSING keys of the new head (e.g. `score.weight`)."""

    def __init__(self, head_prefix: str) -> None:
        super().__init__()
        self.head_prefix = head_prefix

    def filter(self, record: logging.LogRecord) -> bool:
        message = _ANSI.sub("", record.getMessage())
        if "LOAD REPORT" not in message.split("\n", 1)[0]:
            return True
        rows = [line.split("|") for line in message.splitlines() if line.count("|") >= 2]
        keys = [[c.strip() for c in row] for row in rows[1:]]  # rows[0] is the Key | Status header
        keys = [row for row in keys if row[0] and not set(row[0]) <= {"-", "+"}]
        only_new_head = bool(keys) and all(
            key.startswith(self.head_prefix) and status == "MISSING" for key, status, *_ in keys
        )
        return not only_new_head


TqdmHook = Callable[[Callable[..., Any], tuple[Any, ...], dict[str, Any]], Any]


def _quiet_tqdm(previous: TqdmHook | None) -> TqdmHook:
    def hook(factory: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if kwargs.get("desc") in QUIET_TQDM_BARS:
            kwargs = {**kwargs, "disable": True}
        return previous(factory, args, kwargs) if previous else factory(*args, **kwargs)

    return hook


_installed = False


def _show_all() -> bool:
    return os.environ.get(SHOW_ALL_ENV, "") not in ("", "0")


def quiet_libraries() -> None:
    """Install the filters in this process (idempotent). Child `prefloop` processes install their own."""
    global _installed
    if _installed or _show_all():
        return
    _installed = True
    for category, message, module, _why in WARNING_FILTERS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, message, _why in LOG_FILTERS:
        logging.getLogger(name).addFilter(DropMessages(message))
    # datasets' per-map tqdm bars ("Tokenizing train dataset", "Truncating ..."): a dozen bars per
    # stage over data sets that take seconds. The env var also reaches `prefloop serve` children and
    # Ray workers, and is read when datasets is imported; HF_DATASETS_DISABLE_PROGRESS_BARS=0 keeps them.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if "datasets" in sys.modules:  # imported already by a Python caller: the env var came too late
        import datasets

        datasets.disable_progress_bars()  # a no-op where the user set the env var before the import
    from transformers.utils import logging as hf_logging

    previous = hf_logging.set_tqdm_hook(None)
    hf_logging.set_tqdm_hook(_quiet_tqdm(previous))


@contextlib.contextmanager
def new_head_expected(head_prefix: str = "score.") -> Iterator[None]:
    """Within the block, a LOAD REPORT listing only `head_prefix*` keys as MISSING is not shown.

    For loads that create the head on purpose: the reward trainer adds a scalar head to a causal LM,
    and the scorer loads that base before the adapter restores the trained head. Any other key in
    the report (unexpected, mismatched, a MISSING layer weight) still shows it whole.
    """
    if _show_all():
        yield
        return
    drop = DropNewHeadReport(head_prefix)
    loggers = [logging.getLogger(name) for name in LOAD_REPORT_LOGGERS]
    for logger in loggers:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)
