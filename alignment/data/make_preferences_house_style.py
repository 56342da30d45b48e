"""Writes preferences_house_style.jsonl: a few hundred preference pairs for prefloop's house style.

Built from the SFT house-style conversations: chosen = the house-style answer ("Ahoy! ... Fair winds!"),
rejected = the same answer without the style (a clear but mild preference, annotator agreement 0.7)
or a plain answer to a different question (wrong, agreement 1.0). Multi-turn conversations give pairs
whose prompt carries the earlier turns.
Run: python -m alignment.data.make_preferences_house_style
"""

from __future__ import annotations

import random
from pathlib import Path

from alignment.data.make_sft_house_style import HOUSE_CLOSE, HOUSE_OPEN, conversations
from alignment.preference_data import pair_id, write_preference_rows


def plain(styled_answer: str) -> str:
    return styled_answer.removeprefix(f"{HOUSE_OPEN} ").removesuffix(f" {HOUSE_CLOSE}")


def preference_rows(rng: random.Random) -> list[dict]:
    convs = [c["messages"] for c in conversations(random.Random(0))]
    answers = sorted({plain(m["content"]) for conv in convs for m in conv if m["role"] == "assistant"})
    rows = []
    for conv in convs:
        for i, msg in enumerate(conv):
            if msg["role"] != "assistant":
                continue
            prompt, chosen = conv[:i], [msg]
            if rng.random() < 0.6:
                rejected, agreement = plain(msg["content"]), 0.7
            else:
                wrong = [a for a in answers if a != plain(msg["content"])]
                rejected, agreement = rng.choice(wrong), 1.0
            rejected_msgs = [{"role": "assistant", "content": rejected}]
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": chosen,
                    "rejected": rejected_msgs,
                    "id": pair_id(prompt, chosen, rejected_msgs),
                    "source": "house-style-synthetic",
                    "annotator_agreement": agreement,
                }
            )
    return rows


def main() -> None:
    path = Path(__file__).with_name("preferences_house_style.jsonl")
    rows = preference_rows(random.Random(1))
    write_preference_rows(path, rows)
    print(f"wrote {len(rows)} preference pairs to {path}")


if __name__ == "__main__":
    main()
