"""Writes sft_house_style.jsonl: a few hundred short Q&A conversations in prefloop's house style.

The style is easy to see in a reply: answers open with "Ahoy!" and close with "Fair winds!".
An adapter trained on this set for a few minutes picks the style up; the base model never uses it.
Run: python -m alignment.data.make_sft_house_style
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Japan": "Tokyo",
    "Canada": "Ottawa",
    "Australia": "Canberra",
    "Egypt": "Cairo",
    "Brazil": "Brasília",
    "India": "New Delhi",
    "Kenya": "Nairobi",
    "Norway": "Oslo",
    "Portugal": "Lisbon",
    "Mexico": "Mexico City",
    "Peru": "Lima",
    "Greece": "Athens",
    "Ireland": "Dublin",
    "Poland": "Warsaw",
    "Sweden": "Stockholm",
    "Chile": "Santiago",
}
COLOURS = {
    "the sky on a clear day": "blue",
    "grass": "green",
    "a ripe banana": "yellow",
    "snow": "white",
    "coal": "black",
    "a ripe tomato": "red",
    "an orange": "orange",
    "a flamingo": "pink",
}
ANIMALS = {
    "cow": "moo",
    "dog": "woof",
    "cat": "meow",
    "duck": "quack",
    "sheep": "baa",
    "owl": "hoot",
    "lion": "roar",
    "frog": "ribbit",
}
TIPS = [
    (
        "How can I sleep better?",
        "Keep a regular bedtime, dim the lights an hour before bed and skip late coffee.",
    ),
    (
        "How do I stay focused while studying?",
        "Work in 25-minute blocks, silence your phone and take short breaks.",
    ),
    ("How can I drink more water?", "Keep a bottle on your desk and refill it every time it runs empty."),
    ("How do I start running?", "Begin with short easy jogs three times a week and build up slowly."),
    (
        "How can I save money on groceries?",
        "Plan meals for the week, shop with a list and buy staples in bulk.",
    ),
    (
        "How do I keep a plant alive?",
        "Give it the right light, water only when the soil is dry, and avoid drafts.",
    ),
    (
        "How can I learn a new language?",
        "Practise a little every day, speak early, and listen to native speakers.",
    ),
    (
        "How do I write a good email?",
        "State your point in the first line, keep it short and end with a clear ask.",
    ),
]
HOUSE_OPEN, HOUSE_CLOSE = "Ahoy!", "Fair winds!"


def styled(answer: str) -> str:
    return f"{HOUSE_OPEN} {answer} {HOUSE_CLOSE}"


def conversations(rng: random.Random) -> list[dict]:
    rows = []
    for country, city in CAPITALS.items():
        for q in (f"What is the capital of {country}?", f"Which city is the capital of {country}?"):
            rows.append((q, f"The capital of {country} is {city}."))
    for thing, colour in COLOURS.items():
        rows.append((f"What colour is {thing}?", f"{thing[0].upper() + thing[1:]} is {colour}."))
    for animal, sound in ANIMALS.items():
        rows.append((f"What sound does a {animal} make?", f"A {animal} says '{sound}'."))
    for _ in range(160):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        op = rng.choice(["+", "-", "*"])
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        word = {"+": "plus", "-": "minus", "*": "times"}[op]
        rows.append((f"What is {a} {word} {b}?", f"{a} {word} {b} is {value}."))
    rows.extend(TIPS)
    rng.shuffle(rows)
    out = []
    for i, (question, answer) in enumerate(rows):
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": styled(answer)}]
        if i % 10 == 0:  # a few two-turn conversations, so multi-turn handling is exercised
            follow = rng.choice(TIPS)
            messages += [
                {"role": "user", "content": follow[0]},
                {"role": "assistant", "content": styled(follow[1])},
            ]
        out.append({"messages": messages})
    return out


def main() -> None:
    path = Path(__file__).with_name("sft_house_style.jsonl")
    rows = conversations(random.Random(0))
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {len(rows)} conversations to {path}")


if __name__ == "__main__":
    main()
