"""The quickstart's building blocks without servers or models: rubric, simulated annotators, intervals,
profiles, the prompt split and the all-or-nothing stage outputs."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest

from reward.win_rate import wilson_interval, win_rate_with_ci
from serving.quickstart.annotators import SimulatedAnnotator, assigned, team
from serving.quickstart.config import AnnotationSettings, PromptSettings, flatten, load_quickstart_config
from serving.quickstart.context import staged
from serving.quickstart.production import corrected, simulated_feedback
from serving.quickstart.prompts import load_split
from serving.quickstart.rubric import load_rubric, prefer, score
from serving.quickstart.stats import win_rate

RUBRIC = load_rubric()
PROMPT = "Explain volcanoes in simple terms."
GOOD = "Ahoy! A volcano is a mountain that lets melted rock escape from deep inside the Earth. Fair winds!"


def test_rubric_awards_each_criterion() -> None:
    assert score(RUBRIC, PROMPT, GOOD).total == 5.0
    missing_closer = GOOD.removesuffix(" Fair winds!")
    assert score(RUBRIC, PROMPT, missing_closer).criteria["closer"] == 0.0
    repeated = "Ahoy! Volcanoes are hot mountains. Volcanoes are hot mountains. Fair winds!"
    assert score(RUBRIC, PROMPT, repeated).criteria["no_repetition"] == 0.0
    off_topic = "Ahoy! Bananas are a yellow fruit that many people like to eat for breakfast. Fair winds!"
    assert score(RUBRIC, PROMPT, off_topic).criteria["on_topic"] == 0.0
    rambling = "Ahoy! " + " ".join(f"volcano{i}" for i in range(70)) + " Fair winds!"
    assert score(RUBRIC, PROMPT, rambling).criteria["length"] == 0.0
    assert 0 < score(RUBRIC, PROMPT, "Ahoy! Volcanoes erupt. Fair winds!").criteria["length"] < 1


def test_rubric_preference_is_antisymmetric_and_ties_equal_replies() -> None:
    worse = GOOD.removeprefix("Ahoy! ")
    assert prefer(RUBRIC, PROMPT, GOOD, worse) == "a"
    assert prefer(RUBRIC, PROMPT, worse, GOOD) == "b"
    assert prefer(RUBRIC, PROMPT, GOOD, GOOD) == "tie"


def _pairs(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """Random reply pairs of varied quality: (key, a, b)."""
    rng = random.Random(seed)
    words = [
        "volcanoes",
        "hot",
        "lava",
        "rock",
        "melted",
        "mountain",
        "earth",
        "fire",
        "ash",
        "smoke",
        "deep",
    ]
    out = []
    for i in range(n):
        replies = []
        for _ in range(2):
            body = " ".join(rng.choice(words) for _ in range(rng.randint(3, 50)))
            opener = "Ahoy! " if rng.random() < 0.7 else ""
            closer = " Fair winds!" if rng.random() < 0.6 else ""
            replies.append(opener + body + closer)
        out.append((f"r{i}", replies[0], replies[1]))
    return out


def _annotator(kind: str) -> SimulatedAnnotator:
    members = {m.kind: m for m in team(AnnotationSettings(), RUBRIC)}
    return members[kind]  # type: ignore[index]


def test_noisy_annotator_flips_about_its_rate() -> None:
    annotator = _annotator("noisy")
    decisive = flips = 0
    for key, a, b in _pairs(3000):
        truth = prefer(RUBRIC, PROMPT, a, b)
        if truth == "tie":
            continue
        decisive += 1
        flips += annotator.vote(key, PROMPT, a, b) != truth
    assert decisive > 1000
    assert flips / decisive == pytest.approx(0.15, abs=0.03)


def test_position_annotator_favours_a_on_near_ties_only() -> None:
    annotator = _annotator("position")
    near, far = [], []
    for key, a, b in _pairs(3000):
        diff = score(RUBRIC, PROMPT, a).total - score(RUBRIC, PROMPT, b).total
        vote = annotator.vote(key, PROMPT, a, b)
        (near if abs(diff) <= 1.0 else far).append((vote, prefer(RUBRIC, PROMPT, a, b)))
    share_a_near = sum(v == "a" for v, _ in near) / len(near)
    assert share_a_near > 0.6  # unbiased would be about half of the decisive near-ties
    assert all(v == truth for v, truth in far)  # clear cases follow the rubric


def test_shorter_annotator_prefers_the_shorter_reply_on_near_ties() -> None:
    annotator = _annotator("shorter")
    shorter = total = 0
    for key, a, b in _pairs(3000):
        sa, sb = score(RUBRIC, PROMPT, a), score(RUBRIC, PROMPT, b)
        if abs(sa.total - sb.total) > 1.0 or sa.words == sb.words:
            continue
        total += 1
        vote = annotator.vote(key, PROMPT, a, b)
        shorter += vote == ("a" if sa.words < sb.words else "b")
    assert total > 300
    assert shorter / total > 0.7


def test_votes_are_deterministic_and_every_record_gets_the_overlap() -> None:
    annotator = _annotator("noisy")
    key, a, b = _pairs(1)[0]
    assert {annotator.vote(key, PROMPT, a, b) for _ in range(5)} == {annotator.vote(key, PROMPT, a, b)}
    for i in range(200):
        voters = [j for j in range(3) if assigned(f"rec{i}", j, 3, 2)]
        assert len(voters) == 2
    pairs_seen = {tuple(j for j in range(3) if assigned(f"rec{i}", j, 3, 2)) for i in range(200)}
    assert pairs_seen == {(0, 1), (0, 2), (1, 2)}  # every annotator pair overlaps: kappa is defined


def test_wilson_interval_known_values() -> None:
    low, high = wilson_interval(60, 100)
    assert low == pytest.approx(0.5020, abs=1e-3) and high == pytest.approx(0.6906, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_bootstrap_interval_covers_the_mean_and_narrows_with_n() -> None:
    rng = random.Random(1)
    small = [float(rng.random() < 0.6) for _ in range(50)]
    large = [float(rng.random() < 0.6) for _ in range(2000)]
    lo_s, hi_s = win_rate_with_ci(small)["ci95"]
    lo_l, hi_l = win_rate_with_ci(large)["ci95"]
    assert lo_l < sum(large) / len(large) < hi_l
    assert hi_l - lo_l < hi_s - lo_s
    assert lo_l > 0.55 and hi_l < 0.65


def test_win_rate_counts_ties_half() -> None:
    result = win_rate([3.0, 2.0, 1.0, 5.0], [1.0, 2.0, 4.0, 1.0], tolerance=0.05)
    assert (result["wins"], result["ties"], result["losses"]) == (2, 1, 1)
    assert result["win_rate"] == pytest.approx(2.5 / 4)
    assert result["decisive_win_rate"] == pytest.approx(2 / 3)
    assert result["ci95"][0] <= result["win_rate"] <= result["ci95"][1]


def test_profiles_and_overrides() -> None:
    default = load_quickstart_config()
    small = load_quickstart_config(profile="small", overrides=["eval.bootstrap=300"])
    assert small.prompts.train_prompts < default.prompts.train_prompts
    assert small.sft["training"]["max_steps"] < default.sft["training"]["max_steps"]
    assert small.dpo["training"]["learning_rate"] == default.dpo["training"]["learning_rate"]
    assert small.eval.bootstrap == 300
    assert "training.epochs=3" in flatten({"training": {"epochs": 3}})
    from alignment.config import ConfigError

    with pytest.raises(ConfigError, match="no profile"):
        load_quickstart_config(profile="huge")
    with pytest.raises(ConfigError, match="unknown key"):
        load_quickstart_config(overrides=["sampling.temprature=1.0"])


def test_prompt_split_is_by_hashed_id_and_disjoint() -> None:
    settings = PromptSettings(train_prompts=10_000, heldout_prompts=10_000)
    train, heldout = load_split(settings)
    assert len(train) + len(heldout) >= 300
    assert not set(train) & set(heldout)
    assert 0.2 < len(heldout) / (len(train) + len(heldout)) < 0.4
    assert load_split(settings) == (train, heldout)


def test_staged_outputs_appear_only_when_complete(tmp_path) -> None:
    final = tmp_path / "stage"
    with pytest.raises(RuntimeError), staged(final) as out:
        (out / "half.txt").write_text("x")
        raise RuntimeError("interrupted")
    assert not final.exists()
    with staged(final) as out:
        (out / "done.txt").write_text("x")
    assert (final / "done.txt").is_file() and not (tmp_path / "stage.partial").exists()


def test_simulated_users_post_every_feedback_kind() -> None:
    bad = "volcanoes volcanoes volcanoes volcanoes volcanoes volcanoes"
    pair = simulated_feedback(RUBRIC, PROMPT, [("c1", GOOD), ("c2", bad)], 0)
    assert pair == [{"type": "pairwise", "chosen_id": "c1", "rejected_id": "c2"}]
    thumbs = simulated_feedback(RUBRIC, PROMPT, [("c3", GOOD)], 0)[0]
    assert thumbs["type"] == "thumbs" and thumbs["value"] == "up" and "corrected_response" not in thumbs
    rating = simulated_feedback(RUBRIC, PROMPT, [("c4", bad)], 1)[0]
    assert rating["type"] == "rating" and rating["stars"] <= 3
    assert score(RUBRIC, PROMPT, rating["corrected_response"]).total > score(RUBRIC, PROMPT, bad).total
    assert corrected(RUBRIC, PROMPT, bad).startswith("Ahoy!")


def test_ppo_and_grpo_get_the_quickstarts_own_budget() -> None:
    from alignment.config import load_config
    from alignment.rl.config import GRPORunConfig, PPORunConfig
    from serving.quickstart.config import CONFIGS
    from serving.quickstart.runner import fingerprints

    config = load_quickstart_config(overrides=["algorithm=ppo", "rl.training.learning_rate=2e-5"])
    shipped = load_config(PPORunConfig, CONFIGS / "ppo.yaml")
    ppo = load_config(PPORunConfig, CONFIGS / "ppo.yaml", [*flatten(config.rl), *flatten(config.ppo)])
    assert ppo.training.max_steps < shipped.training.max_steps  # configs/ppo.yaml's 100 are ~1 h here
    assert ppo.ppo.ppo_epochs < shipped.ppo.ppo_epochs
    assert ppo.training.learning_rate == 2e-5  # `rl` still reaches both
    grpo = load_config(GRPORunConfig, CONFIGS / "grpo.yaml", [*flatten(config.rl), *flatten(config.grpo)])
    assert grpo.training.max_steps < load_config(GRPORunConfig, CONFIGS / "grpo.yaml").training.max_steps

    # the PPO budget is part of a PPO run's fingerprint, and not of a DPO run's
    longer = load_quickstart_config(overrides=["algorithm=ppo", "ppo.training.max_steps=20"])
    assert (
        fingerprints(longer)["align"]
        != fingerprints(load_quickstart_config(overrides=["algorithm=ppo"]))["align"]
    )
    dpo = load_quickstart_config()
    dpo_longer_ppo = load_quickstart_config(overrides=["ppo.training.max_steps=20"])
    assert fingerprints(dpo)["align"] == fingerprints(dpo_longer_ppo)["align"]


def test_a_rubric_tie_is_still_a_pairwise_pick_of_the_more_concise_reply() -> None:
    # CI once saw a DPO policy whose n=2 replies all tied on the rubric: no pairwise feedback at all
    longer = GOOD.replace("from deep inside", "from very deep down inside")
    assert score(RUBRIC, PROMPT, GOOD).total == score(RUBRIC, PROMPT, longer).total
    pick = simulated_feedback(RUBRIC, PROMPT, [("c1", longer), ("c2", GOOD)], 0)
    assert pick == [{"type": "pairwise", "chosen_id": "c2", "rejected_id": "c1"}]
    same = simulated_feedback(RUBRIC, PROMPT, [("c1", GOOD), ("c2", GOOD)], 0)
    assert [body["type"] for body in same] == ["thumbs"]


def test_rerunning_a_stage_marks_later_ones_stale_until_they_run_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The runner itself with stage bodies that only record that they ran: `--stages align,eval` once
    # presented the previous run's report (another algorithm's win rate) as this run's result.
    from rich.console import Console

    from serving.quickstart import runner

    ran: list[str] = []
    missing: set[str] = set()  # stages whose outputs were deleted

    def fake(stage: runner.Stage) -> runner.Stage:
        def run(ctx: object) -> dict[str, str]:
            ran.append(stage.name)
            missing.discard(stage.name)
            return {"ran": stage.name}

        return dataclasses.replace(stage, run=run, valid=lambda ctx: stage.name not in missing)

    monkeypatch.setattr(runner, "STAGES", tuple(fake(s) for s in runner.STAGES))
    config = load_quickstart_config(None, "default", [f"output_dir={tmp_path}"])
    console = Console(record=True, width=200)
    runner.run_quickstart(config, console=console)
    assert ran == list(runner.STAGE_NAMES)

    ran.clear()
    missing.add("align")  # same settings, new outputs: what follows is out of date all the same
    state = runner.run_quickstart(config, ["align", "eval"], console=console)
    assert ran == ["align", "eval"]
    assert state["stages"]["serve"]["stale"] and state["stages"]["report"]["stale"]
    assert state["this_run"] == {"align": "ran", "eval": "ran"}
    assert "--stages serve,report" in console.export_text()

    ran.clear()
    missing.add("align")
    runner.run_quickstart(config, ["align"], console=console)
    with pytest.raises(runner.QuickstartError, match="'eval'"):
        runner.run_quickstart(config, ["serve"], console=console)  # it needs eval, now stale
    state = runner.run_quickstart(config, console=console)  # unchanged fingerprints, yet they rerun
    assert ran == ["align", "eval", "serve", "report"]
    assert not any(record.get("stale") for record in state["stages"].values())
