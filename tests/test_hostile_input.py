"""Property tests (hypothesis): every loader and parser, fed anything, fails only with our own errors.

SFT rows, preference rows, Anthropic-HH text, eval prompt files, YAML configs and `--set` overrides:
whatever the bytes, the outcome is a result or a DataError/ConfigError naming where, never another
exception (a traceback for the user). Feedback payloads are covered by the HTTP tests.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alignment.config import ConfigError, load_config, parse_override
from alignment.data_files import DataError
from alignment.preference_data import (
    PreferenceDataSettings,
    load_preference_rows,
    parse_hh_text,
    prepare_preferences,
    to_canonical,
)
from alignment.sft import SFTRunConfig
from alignment.sft_curation import CurationSettings, curate_rows
from alignment.sft_data import load_conversations, to_conversation
from reward.eval_data import load_eval_items
from reward.evaluate import EvalConfig

OURS = (DataError, ConfigError)
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Any JSON value, with the texts and keys our loaders look for over-represented.
KEYS = st.sampled_from(
    ["messages", "role", "content", "prompt", "chosen", "rejected", "id", "instruction", "input", "output",
     "annotator_agreement", "source", "reference"]
)  # fmt: skip
ROLES = st.sampled_from(["user", "assistant", "system", "tool", "", "USER"])
TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["\n\nHuman: hi\n\nAssistant: yo", "Human:", "\ud800", "\x00", " ", "Assistant: x"]),
)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), TEXT)
JSON = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(KEYS, st.text(max_size=5)), children, max_size=5),
    ),
    max_leaves=20,
)
MESSAGE = st.fixed_dictionaries({"role": ROLES, "content": st.one_of(TEXT, SCALARS)})
MESSAGES = st.lists(st.one_of(MESSAGE, JSON), max_size=5)
ROW = st.one_of(
    st.dictionaries(KEYS, JSON, max_size=6),
    st.fixed_dictionaries({"messages": MESSAGES}),
    st.fixed_dictionaries(
        {
            "prompt": st.one_of(TEXT, MESSAGES),
            "chosen": st.one_of(TEXT, MESSAGES),
            "rejected": st.one_of(TEXT, MESSAGES),
        }
    ),
    st.fixed_dictionaries({"chosen": TEXT, "rejected": TEXT}),
)


def only_our_errors(fn: Callable[[], Any]) -> None:
    with contextlib.suppress(*OURS):
        fn()


def in_file(content: bytes | str, suffix: str = ".jsonl") -> Callable[[Callable[[Path], Any]], None]:
    def run(fn: Callable[[Path], Any]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"data{suffix}"
            path.write_bytes(
                content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass")
            )
            only_our_errors(lambda: fn(path))

    return run


def jsonl(rows: list[Any]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


# --- SFT data ------------------------------------------------------------------------------------


@FAST
@given(ROW)
def test_sft_row_normalisation(row: dict) -> None:
    only_our_errors(lambda: to_conversation(row, "f.jsonl:1"))


@FAST
@given(st.lists(st.one_of(ROW, JSON), max_size=4))
def test_sft_file_of_any_json(rows: list) -> None:
    in_file(jsonl(rows))(load_conversations)


@FAST
@given(st.binary(max_size=200))
def test_sft_file_of_any_bytes(data: bytes) -> None:
    in_file(data)(load_conversations)


@FAST
@given(st.lists(ROW, max_size=6))
def test_sft_curation_never_raises_on_rows(rows: list) -> None:
    # Curation turns every problem into a counted filter: not even our own errors come out.
    cfg = CurationSettings(near_dup_threshold=0.5)
    result = curate_rows(((f"f:{i}", r) for i, r in enumerate(rows)), cfg)
    assert len(result.kept) + sum(len(v) for v in result.removed.values()) == len(rows)


# --- preference data and Anthropic-HH text -------------------------------------------------------


@FAST
@given(ROW)
def test_preference_row_canonicalisation(row: dict) -> None:
    only_our_errors(lambda: to_canonical(row, "f.jsonl:1"))


@FAST
@given(
    st.text(max_size=80),
    st.lists(st.sampled_from(["\n\nHuman:", "\n\nAssistant:", "Human: ", " "]), max_size=6),
)
def test_hh_text_parsing(text: str, turns: list[str]) -> None:
    only_our_errors(lambda: parse_hh_text("".join(turns) + text, "f.jsonl:1"))
    only_our_errors(lambda: parse_hh_text(text + "".join(turns), "f.jsonl:1"))


@FAST
@given(st.lists(st.one_of(ROW, JSON), max_size=4))
def test_preference_file_load_and_prepare(rows: list) -> None:
    in_file(jsonl(rows))(load_preference_rows)
    in_file(jsonl(rows))(lambda p: prepare_preferences(PreferenceDataSettings(train=p, eval_fraction=0.5)))


@FAST
@given(st.binary(max_size=200))
def test_preference_file_of_any_bytes(data: bytes) -> None:
    in_file(data)(load_preference_rows)


@FAST
@given(st.lists(st.one_of(ROW, JSON), max_size=4))
def test_eval_prompt_file(rows: list) -> None:
    in_file(jsonl(rows))(lambda p: load_eval_items(p, None, 10))


# --- configs and --set overrides -----------------------------------------------------------------

YAML_BITS = st.sampled_from(
    ["model: x\n", "training:\n  epochs: 2\n", "training: 3\n", "data: [1, 2]\n", "lora: {r: -1}\n",
     "- a\n", "? [a]\n: b\n", "2001-02-30\n", "x: 2001-02-30\n", "training: {epochs: 1e400}\n", "&a [*a]\n",
     "!!python/object:os.system x\n", "\t", ": :\n", "{", "'", "~\n", "1: 2\n", "model: !!binary aGk=\n"]
)  # fmt: skip


@FAST
@given(st.lists(st.one_of(YAML_BITS, st.text(max_size=20)), max_size=5))
def test_yaml_config_text(parts: list[str]) -> None:
    in_file("".join(parts), ".yaml")(lambda p: load_config(SFTRunConfig, p))


@FAST
@given(st.binary(max_size=100))
def test_yaml_config_bytes(data: bytes) -> None:
    in_file(data, ".yaml")(lambda p: load_config(EvalConfig, p, ["candidate.adapter=x", "reward_model=y"]))


OVERRIDE = st.one_of(
    st.text(max_size=30),
    st.builds(
        lambda k, v: f"{k}={v}",
        st.sampled_from(
            ["training.epochs", "training", "data.train", "lora.r", "a..b", ".", "model", "x.y.z"]
        ),
        st.one_of(YAML_BITS, st.text(max_size=15)),
    ),
)


@FAST
@given(st.lists(OVERRIDE, max_size=4))
def test_set_overrides(overrides: list[str]) -> None:
    for item in overrides:
        only_our_errors(lambda item=item: parse_override(item))
    only_our_errors(lambda: load_config(SFTRunConfig, None, overrides))


@pytest.mark.parametrize(
    "override", ["training.epochs=2001-02-30", "x=2001-02-30", "a..b=1", "=1", "training=1"]
)
def test_known_hostile_overrides_are_config_errors(override: str) -> None:
    with pytest.raises(ConfigError):
        load_config(SFTRunConfig, None, ["training.epochs=1", override])


# --- the crashes hypothesis found, kept as plain examples ---------------------------------------


def test_found_crashes_are_now_clear_errors(tmp_path: Path) -> None:
    good = json.dumps(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    )
    bad_utf8 = tmp_path / "bytes.jsonl"
    bad_utf8.write_bytes(good.encode() + b"\n\x80\n")
    with pytest.raises(DataError, match=r"bytes\.jsonl:2: not UTF-8"):
        load_conversations(bad_utf8)
    surrogate = tmp_path / "surrogate.jsonl"
    pair = '{"prompt": "q", "chosen": "a", "rejected": "b"}'
    surrogate.write_text(pair + "\n" + '{"prompt": "q", "chosen": "\\ud800", "rejected": "b"}\n')
    with pytest.raises(DataError, match=r"surrogate\.jsonl:2: invalid Unicode"):
        load_preference_rows(surrogate)
    with pytest.raises(DataError, match=r"f:1: messages\[0\] needs a role"):
        to_conversation({"messages": [{"role": ["user"], "content": "x"}]}, "f:1")
    with pytest.raises(DataError, match=r"f:1: prompt\[0\] needs a role"):
        to_canonical({"prompt": [{"role": {}, "content": "x"}], "chosen": "a", "rejected": "b"}, "f:1")
    date = tmp_path / "date.yaml"
    date.write_text("training:\n  epochs: 2001-02-30\n")
    with pytest.raises(ConfigError, match=r"date\.yaml: invalid YAML value"):
        load_config(SFTRunConfig, date)
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("model: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml: not UTF-8"):
        load_config(SFTRunConfig, latin1)
