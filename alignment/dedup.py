"""Exact and MinHash near-duplicate removal, and decontamination against eval sets.

One building block for every kind of training data: preference pairs (`alignment.preference_data`)
and SFT conversations (`alignment.sft_curation`) both reduce a row to a text and call these.

    dupes = near_duplicates([(row_id, text), ...], threshold=0.9)   # {index: id of the row it repeats}
    leaks = EvalIndex({"mt-bench": prompts}, threshold=0.8).contaminated(train_prompts)
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

NUM_PERM = 128


def normalise(text: str) -> str:
    """Case and whitespace do not make a different text."""
    return " ".join(text.lower().split())


def content_hash(text: str) -> str:
    return hashlib.sha256(normalise(text).encode("utf-8", "surrogatepass")).hexdigest()


def minhash(text: str) -> Any:
    from datasketch import MinHash

    # Character 5-grams: chat prompts are short, and word shingles of a 6-word prompt are too coarse.
    text = normalise(text)
    shingles = {text[i : i + 5] for i in range(max(1, len(text) - 4))}
    mh = MinHash(num_perm=NUM_PERM, seed=1)
    mh.update_batch(s.encode("utf-8", "surrogatepass") for s in shingles)
    return mh


def exact_duplicates(keys: Sequence[str]) -> dict[int, int]:
    """Index of each key equal to an earlier one -> index of that first one."""
    first: dict[str, int] = {}
    found: dict[int, int] = {}
    for i, key in enumerate(keys):
        if key in first:
            found[i] = first[key]
        else:
            first[key] = i
    return found


def near_duplicates(items: Sequence[tuple[str, str]], threshold: float) -> dict[int, str]:
    """Index of each (id, text) whose text near-duplicates an earlier kept one -> that one's id.

    The first of a group wins, so the result depends on row order only in which copy is kept.
    """
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    found: dict[int, str] = {}
    for i, (key, text) in enumerate(items):
        mh = minhash(text)
        if hits := lsh.query(mh):
            found[i] = sorted(hits)[0]
        elif key not in lsh:
            lsh.insert(key, mh)
    return found


class EvalIndex:
    """Prompts of named eval sets, for exact (normalised) and MinHash-near contamination checks."""

    def __init__(self, eval_sets: Mapping[str, Iterable[str]], threshold: float) -> None:
        from datasketch import MinHashLSH

        self.lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
        self.exact: dict[str, str] = {}
        for name, texts in eval_sets.items():
            for j, text in enumerate(texts):
                self.exact.setdefault(normalise(text), name)
                key = f"{name}#{j}"
                if key not in self.lsh:
                    self.lsh.insert(key, minhash(text))

    def match(self, text: str) -> str | None:
        """The name of the eval set `text` appears in (exactly or nearly), or None."""
        if (hit := self.exact.get(normalise(text))) is not None:
            return hit
        if hits := self.lsh.query(minhash(text)):
            return sorted(hits)[0].rsplit("#", 1)[0]
        return None

    def contaminated(self, texts: Iterable[str]) -> dict[int, str]:
        """Index of each text that matches an eval prompt -> the eval set's name."""
        return {i: hit for i, text in enumerate(texts) if (hit := self.match(text)) is not None}
