import json
from pathlib import Path

import pytest
from datasets import Dataset

from alignment.data_files import DataError
from alignment.sft_data import load_conversations, to_prompt_completion


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_messages_and_alpaca_rows_normalise(tmp_path: Path) -> None:
    path = jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"instruction": "Add", "input": "2 and 3", "output": "5"},
        ],
    )
    convs = load_conversations(path)
    assert convs[1] == [
        {"role": "user", "content": "Add\n\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ]


def test_datasets_directory(tmp_path: Path) -> None:
    Dataset.from_list([{"instruction": "Say yes", "output": "yes"}]).save_to_disk(str(tmp_path / "ds"))
    assert load_conversations(tmp_path / "ds")[0][-1]["content"] == "yes"


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ('{"messages": [', r"bad\.jsonl:2: malformed JSON"),
        ({"text": "no fields"}, r"bad\.jsonl:2: row has neither 'messages'"),
        ({"instruction": "x"}, r"bad\.jsonl:2: Alpaca row needs a string 'output'"),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
            r"bad\.jsonl:2: messages\[1\] is an empty assistant turn",
        ),
        (
            {"messages": [{"role": "user", "content": "q"}]},
            r"bad\.jsonl:2: the last message must be the assistant's",
        ),
        ({"messages": [{"role": "robot", "content": "q"}]}, r"bad\.jsonl:2: messages\[0\] needs a role"),
        ("[1, 2]", r"bad\.jsonl:2: expected a JSON object"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path: Path, row: object, message: str) -> None:
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path = jsonl(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(DataError, match=message):
        load_conversations(path)


def test_empty_file_and_wrong_suffix(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no rows"):
        load_conversations(jsonl(tmp_path / "empty.jsonl", []))
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_conversations(tmp_path / "data.csv")


def test_every_assistant_turn_becomes_a_completion() -> None:
    conv = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    examples = to_prompt_completion([conv])
    assert [e["completion"][0]["content"] for e in examples] == ["b", "d"]
    assert examples[1]["prompt"] == conv[:3]


def test_bundled_example_data_is_valid() -> None:
    from alignment.sft import EXAMPLE_DATA

    convs = load_conversations(EXAMPLE_DATA)
    assert len(convs) >= 200
    assert all(c[-1]["content"].startswith("Ahoy!") for c in convs)
