"""Record ids, the randomised A/B order and its un-mapping, and the declared Argilla schema."""

from __future__ import annotations

from annotation.preference_dataset import (
    PREFERENCE,
    CandidatePair,
    is_swapped,
    record_id,
    to_record,
    unmap_vote,
)

PROMPT = [{"role": "user", "content": "Name a colour."}]


def test_record_id_is_stable_and_ignores_pair_order() -> None:
    pair = CandidatePair(PROMPT, "Red.", "Blue is a colour.")
    assert record_id(pair) == record_id(CandidatePair(PROMPT, "Red.", "Blue is a colour."))
    assert record_id(pair) == record_id(CandidatePair(PROMPT, "Blue is a colour.", "Red."))
    assert record_id(pair) != record_id(CandidatePair(PROMPT, "Red.", "Green."))


def test_order_is_randomised_across_records_and_stored_in_metadata() -> None:
    pairs = [CandidatePair([{"role": "user", "content": f"q{i}"}], f"x{i}", f"y{i}") for i in range(40)]
    swaps = [is_swapped(record_id(p)) for p in pairs]
    assert 5 < sum(swaps) < 35  # a fair coin, not a constant
    for pair, swapped in zip(pairs, swaps, strict=True):
        record = to_record(pair, uncertainty_rank=0)
        assert record.metadata["swapped"] == ("yes" if swapped else "no")
        assert record.fields["response_a"] == (pair.second if swapped else pair.first)


def test_unmap_vote_through_the_stored_order() -> None:
    assert unmap_vote("a", swapped=False) == "first"
    assert unmap_vote("a", swapped=True) == "second"
    assert unmap_vote("b", swapped=True) == "first"
    assert unmap_vote("tie", swapped=True) == "tie"


def test_reward_suggestion_points_at_the_displayed_slot() -> None:
    pair = CandidatePair(PROMPT, "good", "bad answer", first_reward=2.0, second_reward=-1.0)
    record = to_record(pair, uncertainty_rank=3)
    suggestion = record.suggestions[PREFERENCE]
    assert suggestion.value == ("b" if is_swapped(record_id(pair)) else "a")  # always the `first` response
    assert 0.9 < suggestion.score < 1.0  # sigmoid(3)
    assert record.metadata["reward_margin"] == 3.0 and record.metadata["uncertainty_rank"] == 3
