"""Writes data/prompts.jsonl: the quickstart's bundled prompt set, a few hundred prompts we wrote ourselves.

Deterministic (fixed seed, fixed lists), so every checkout has the same file and the same
train/held-out split (by hashed id, see `serving.quickstart.prompts`). The mix matters for the
demo: short factual questions the SFT data resembles, and open-ended requests ("Explain ...",
"Tell me about ...") where a small model tends to ramble, repeat itself or drift off topic -
exactly what the rubric rewards avoiding.
Run: python -m serving.quickstart.make_prompts
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent / "data" / "prompts.jsonl"

TOPICS = [
    "volcanoes",
    "tides",
    "rainbows",
    "photosynthesis",
    "honey bees",
    "lighthouses",
    "glaciers",
    "compasses",
    "sourdough bread",
    "bicycles",
    "thunderstorms",
    "coral reefs",
    "the moon",
    "owls",
    "maps",
    "sailing knots",
    "tea",
    "whales",
    "deserts",
    "bridges",
    "clocks",
    "recycling",
    "chess",
    "penguins",
    "rivers",
    "windmills",
    "batteries",
    "sunflowers",
    "earthquakes",
    "kites",
    "libraries",
    "octopuses",
    "snowflakes",
    "trains",
    "coffee",
    "forests",
    "stars",
    "rain",
    "magnets",
    "seashells",
    "the wind",
    "maple syrup",
    "lightning",
    "mountains",
    "pirates",
]
EXPLAIN = [
    "Explain {t} in simple terms.",
    "Tell me about {t}.",
    "What should a child know about {t}?",
    "Why are {t} interesting?",
    "Describe {t} to someone who has never seen them.",
    "Give me one surprising fact about {t}.",
    "Write a short note about {t} for a school newsletter.",
    "What is the most important thing about {t}?",
]
GOALS = [
    "sleep better",
    "learn to swim",
    "save money",
    "keep a plant alive",
    "cook rice",
    "stay focused while studying",
    "make new friends",
    "write a thank-you note",
    "pack for a trip",
    "run a first 5k",
    "keep my desk tidy",
    "learn a new language",
    "bake cookies",
    "prepare for a job interview",
    "fix a flat bicycle tyre",
    "start journaling",
    "drink more water",
    "read more books",
    "plan a picnic",
    "care for a pet fish",
]
ADVICE = ["How can I {g}?", "Give me a tip to {g}.", "What is a good first step to {g}?"]
COUNTRIES = [
    "France",
    "Japan",
    "Kenya",
    "Peru",
    "Norway",
    "Canada",
    "Egypt",
    "Chile",
    "Italy",
    "India",
    "Greece",
    "Mexico",
    "Ireland",
    "Portugal",
    "Sweden",
    "Poland",
    "Spain",
    "Brazil",
]
FACTS = [
    "What is the capital of {c}?",
    "Name one famous dish from {c}.",
    "What language is spoken in {c}?",
]
ANIMALS = ["cat", "dog", "cow", "duck", "owl", "frog", "horse", "sheep", "lion", "goat"]
ANIMAL_Q = ["What sound does a {a} make?", "What does a {a} eat?", "Where does a {a} live?"]


def prompt_id(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build(seed: int = 0) -> list[dict[str, str]]:
    texts = [tpl.format(t=t) for t in TOPICS for tpl in EXPLAIN]
    texts += [tpl.format(g=g) for g in GOALS for tpl in ADVICE]
    texts += [tpl.format(c=c) for c in COUNTRIES for tpl in FACTS]
    texts += [tpl.format(a=a) for a in ANIMALS for tpl in ANIMAL_Q]
    rng = random.Random(seed)
    rng.shuffle(texts)
    # open-ended requests dominate (they are where the rubric separates responses), facts stay in
    return [{"id": prompt_id(t), "prompt": t} for t in texts]


def main() -> None:
    rows = build()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {len(rows)} prompts to {OUT}")


if __name__ == "__main__":
    main()
