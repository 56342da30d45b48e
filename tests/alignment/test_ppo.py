"""PPO: the losses and GAE against hand-computed values, then real training on a tiny model."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignment.config import ConfigError, load_config
from alignment.data_files import DataError
from alignment.prompts import PromptSampler, load_prompts
from alignment.rl.config import PPORunConfig
from alignment.rl.losses import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    compute_gae,
    masked_whiten,
    per_token_rewards,
    policy_loss,
    value_loss,
)
from alignment.rl.models import load_ppo_models
from alignment.rl.ppo import train_ppo
from alignment.rl.ppo_trainer import build_ppo_trainer

# --- losses against hand-computed values ----------------------------------------------------------


def test_gae_matches_hand_computation() -> None:
    # One response of 3 tokens (the 4th is padding), gamma=0.9, lam=0.8.
    rewards = torch.tensor([[0.0, 0.5, 1.0, 7.0]])
    values = torch.tensor([[0.2, 0.4, 0.6, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    advantages, returns = compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # delta_2 = 1.0 + 0.9*0 - 0.6 = 0.4            A_2 = 0.4
    # delta_1 = 0.5 + 0.9*0.6 - 0.4 = 0.64         A_1 = 0.64 + 0.72*0.4 = 0.928
    # delta_0 = 0.0 + 0.9*0.4 - 0.2 = 0.16         A_0 = 0.16 + 0.72*0.928 = 0.82816
    expected = torch.tensor([[0.82816, 0.928, 0.4, 0.0]])
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, expected + values * mask)


def test_gae_with_lambda_one_is_discounted_return_minus_value() -> None:
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    values = torch.tensor([[0.5, 0.5, 0.5]])
    advantages, returns = compute_gae(rewards, values, torch.ones(1, 3), gamma=0.5, lam=1.0)
    discounted = torch.tensor([[1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3.0]])
    torch.testing.assert_close(returns, discounted)
    torch.testing.assert_close(advantages, discounted - values)


def test_per_token_rewards_put_score_on_last_token_and_kl_everywhere() -> None:
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    ref_logprobs = torch.tensor([[-1.5, -2.0, -2.0], [-2.0, -1.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    scores = torch.tensor([2.0, -1.0])
    rewards, kl = per_token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.0, -1.0], [1.0, 0.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.0, 0.1 + 2.0], [-0.1, 0.0 - 1.0, 0.0]]))
    # k3 = (r - 1) - log r with r = pi_ref / pi: non-negative per token.
    _, kl3 = per_token_rewards(scores, logprobs, ref_logprobs, mask, 0.1, kl_estimator="k3")
    assert kl3[0, 0].item() == pytest.approx(math.exp(-0.5) - 1 + 0.5)
    assert (kl3 >= 0).all()


def test_policy_loss_clips_the_ratio() -> None:
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    advantages = torch.tensor([[1.0, -1.0, 2.0]])
    loss, stats = policy_loss(new, old, advantages, torch.ones(1, 3), cliprange=0.2)
    # token 0: min(1.5*1, 1.2*1) = 1.2 (clipped); token 1: min(-0.5, -0.8) = -0.8 (clipped);
    # token 2: min(2.2, 2.2) = 2.2. Loss = -mean = -(1.2 - 0.8 + 2.2) / 3.
    assert loss.item() == pytest.approx(-(1.2 - 0.8 + 2.2) / 3)
    assert stats["policy/clipfrac"].item() == pytest.approx(2 / 3)


def test_value_loss_takes_the_worse_of_clipped_and_unclipped() -> None:
    old_values = torch.tensor([[0.0, 0.0]])
    vpred = torch.tensor([[1.0, 0.1]])
    returns = torch.tensor([[1.0, -1.0]])
    loss, stats = value_loss(vpred, old_values, returns, torch.ones(1, 2), cliprange_value=0.2)
    # token 0: unclipped (1-1)^2 = 0, clipped (0.2-1)^2 = 0.64 -> 0.64;
    # token 1: unclipped (0.1+1)^2 = 1.21, clipped (0.1+1)^2 = 1.21 -> 1.21.
    assert loss.item() == pytest.approx(0.5 * (0.64 + 1.21) / 2)
    assert stats["value/clipfrac"].item() == pytest.approx(0.5)


def test_masked_whiten_ignores_padding() -> None:
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    whitened = masked_whiten(values, mask)
    torch.testing.assert_close(whitened, torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-4, rtol=0)
    kept_mean = masked_whiten(values, mask, shift_mean=False)
    assert kept_mean[0, :3].mean().item() == pytest.approx(2.0, abs=1e-4)


def test_adaptive_kl_controller_moves_beta_towards_the_target() -> None:
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=100)
    ctl.update(12.0, n_steps=10)  # error clipped to +0.2: beta *= 1 + 0.2 * 10/100
    assert ctl.value == pytest.approx(0.1 * 1.02)
    ctl.update(3.0, n_steps=10)  # error -0.5 clipped to -0.2
    assert ctl.value == pytest.approx(0.1 * 1.02 * 0.98)
    fixed = FixedKLController(0.1)
    fixed.update(100.0, 10)
    assert fixed.value == 0.1


def test_running_moments_match_batch_statistics() -> None:
    moments = RunningMoments()
    x = torch.arange(10, dtype=torch.float32)
    moments.update(x[:3])
    moments.update(x[3:])
    assert moments.mean == pytest.approx(x.mean().item())
    assert moments.std == pytest.approx(x.std(unbiased=False).item())


# --- prompts ---------------------------------------------------------------------------------------


def test_prompts_come_from_prompt_rows_preference_pairs_and_sft_conversations(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    rows = [
        {"prompt": "Say hi."},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}]},
        {"prompt": "Pick one.", "chosen": "A", "rejected": "B"},
        {"chosen": "\n\nHuman: Hello?\n\nAssistant: Hi!", "rejected": "\n\nHuman: Hello?\n\nAssistant: Go away."},
        {"messages": [{"role": "user", "content": "1?"}, {"role": "assistant", "content": "one"},
                      {"role": "user", "content": "2?"}, {"role": "assistant", "content": "two"}]},
        {"messages": [{"role": "system", "content": "Terse."}, {"role": "user", "content": "3?"}]},
    ]  # fmt: skip
    path.write_text("\n".join(json.dumps(r) for r in rows))
    prompts = load_prompts(path)
    assert [p[-1]["content"] for p in prompts] == ["Say hi.", "Why?", "Pick one.", "Hello?", "1?", "2?", "3?"]
    assert prompts[1][0] == {"role": "system", "content": "Be brief."}
    assert len(prompts[-2]) == 3  # the second user turn keeps its conversation
    assert len(prompts[-1]) == 2  # messages still waiting for a response are the prompt as they are


def test_bad_prompt_rows_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": [{"role": "assistant", "content": "x"}]}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: .*assistant"):
        load_prompts(path)
    path.write_text('{"prompt": "ok"}\n{"question": "where?"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: expected 'prompt'"):
        load_prompts(path)


def test_prompt_sampler_draws_shuffled_passes_and_resumes_the_same_order() -> None:
    sampler = PromptSampler(n_prompts=5, batch_size=4, seed=3)
    batches = [sampler.next_batch() for _ in range(5)]  # 20 draws = 4 full passes over 5 prompts
    drawn = [i for batch in batches for i in batch]
    for k in range(4):
        assert sorted(drawn[5 * k : 5 * k + 5]) == [0, 1, 2, 3, 4]
    assert len({tuple(drawn[5 * k : 5 * k + 5]) for k in range(4)}) > 1  # each pass reshuffled

    again = PromptSampler(5, 4, seed=3)
    first = [again.next_batch() for _ in range(2)]
    resumed = PromptSampler(5, 4, seed=99)
    resumed.load_state(again.state())
    assert first + [resumed.next_batch() for _ in range(3)] == batches
    # Data-parallel workers share one global batch and take disjoint shares of it.
    shares = [batches[0][rank::2] for rank in range(2)]
    assert sorted(shares[0] + shares[1]) == sorted(batches[0])


def test_ptx_without_data_is_a_config_error(tiny_model: Path, tmp_path: Path) -> None:
    config = load_config(PPORunConfig, None, [f"model={tiny_model}", "ppo.ptx_coef=0.5"])
    with pytest.raises(ConfigError, match=r"data\.ptx"):
        build_ppo_trainer(config, lambda prompts, responses: [0.0] * len(responses))


# --- training on a tiny model ----------------------------------------------------------------------


class PickledCall:
    """Unpickling this calls a function: what `weights_only=True` exists to refuse."""

    def __reduce__(self) -> tuple:
        return (print, ("unpickled a callable",))


N_TOKENS = 6  # reward: responses shorter than this (so they ended with EOS)
TOPICS = ["cats", "rain", "tea", "maps", "ships", "bread", "music", "stars"]


@pytest.fixture(scope="session")
def eos_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-random with a reachable EOS.

    Its EOS row is all zeros (EOS doubles as the padding token), so it ends a response with
    p = 1/vocab and no sample ever earns a length reward. An untied LM head whose EOS row is a fixed
    random direction gives EOS a context-dependent logit: about a quarter of 8-token samples end, and
    the policy can learn to end more often by moving its hidden states towards that direction.
    """
    from transformers import AutoModelForCausalLM

    from alignment.models import load_tokenizer

    out = tmp_path_factory.mktemp("eos-model")
    model = AutoModelForCausalLM.from_pretrained(tiny_model, tie_word_embeddings=False, dtype=torch.float32)
    tokenizer = load_tokenizer(tiny_model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.lm_head.weight.copy_(model.model.embed_tokens.weight)
        direction = torch.randn(model.config.hidden_size, generator=generator)
        model.lm_head.weight[tokenizer.eos_token_id] = direction / direction.norm() * 5.0
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def prompt_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"Question number {i}: tell me about {t}."})
                              for i, t in enumerate(TOPICS * 4)))  # fmt: skip
    return path


def short_response_reward(tokenizer):
    def reward(prompts: list, responses: list[str]) -> list[float]:
        return [float(len(tokenizer(r, add_special_tokens=False)["input_ids"]) < N_TOKENS) for r in responses]

    return reward


def ppo_overrides(model: Path, prompts: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"model={model}",
        f"output_dir={out}",
        f"data.prompts={prompts}",
        "tracking.report_to=none",
        "training.dtype=fp32",
        "training.learning_rate=1e-3",
        "lora.r=8",
        "lora.dropout=0.0",
        "ppo.rollout_batch_size=16",
        "ppo.mini_batch_size=8",
        "ppo.ppo_epochs=2",
        "ppo.generation.max_new_tokens=8",
        "ppo.generation.temperature=1.0",
        *extra,
    ]


@pytest.mark.timeout(900)
def test_ppo_raises_reward_with_bounded_kl_and_saves_policy_and_value_head(
    eos_model: Path, prompt_file: Path, tmp_path: Path
) -> None:
    from alignment.models import load_tokenizer

    out = tmp_path / "ppo"
    overrides = ppo_overrides(
        eos_model, prompt_file, out, "training.max_steps=8", "ppo.critic=shared", "ppo.init_kl_coef=0.1"
    )
    metrics = train_ppo(
        load_config(PPORunConfig, None, overrides), short_response_reward(load_tokenizer(eos_model))
    )
    log = [json.loads(line) for line in (out / "ppo_log.jsonl").read_text().splitlines()]
    assert len(log) == 8
    first = log[0]["reward/raw"]
    last = sum(r["reward/raw"] for r in log[-4:]) / 4
    assert last > first + 0.4, [r["reward/raw"] for r in log]
    assert metrics["eos_fraction_last"] > log[0]["rollout/eos_fraction"]
    assert max(r["objective/kl"] for r in log) < 10.0, [r["objective/kl"] for r in log]  # nats per response
    assert (out / "ppo_curves.png").stat().st_size > 0
    assert (out / "adapter_model.safetensors").is_file()
    assert (out / "value_head.safetensors").is_file()  # shared trunk: the head sits beside the adapter
    assert (out / "prefloop-config.yaml").is_file()


def test_saved_policy_and_separate_critic_reload(eos_model: Path, prompt_file: Path, tmp_path: Path) -> None:
    """Separate critic: its LoRA and value head go to critic/, and policy and critic reload exactly."""
    from alignment.devices import plan_device
    from alignment.models import load_tokenizer
    from alignment.rl.data import pad
    from alignment.rl.models import critic_values, forward_policy

    out = tmp_path / "ppo-separate"
    overrides = ppo_overrides(eos_model, prompt_file, out, "ppo.critic=separate", "ppo.ppo_epochs=1")
    config = load_config(PPORunConfig, None, overrides)
    trainer, prompts, prompt_ids = build_ppo_trainer(config, short_response_reward(load_tokenizer(eos_model)))
    stats = trainer.step(prompts[:16], prompt_ids[:16])
    assert stats["loss/value"] > 0
    assert trainer.critic.head.summary.weight.abs().sum() > 0  # the value head was trained
    trainer.save(out)
    assert (out / "critic" / "value_head.safetensors").is_file()
    assert (out / "critic" / "adapter_model.safetensors").is_file()

    # A checkpoint whose trainer state carries a pickled object is refused, before any weight moves.
    tampered = tmp_path / "checkpoint-1"
    trainer.save_checkpoint(tampered, 1, {"rng": None, "order": []})
    torch.save({"step": 1, "payload": PickledCall()}, tampered / "trainer_state.pt")
    head_before = trainer.critic.head.summary.weight.detach().clone()
    with torch.no_grad():
        trainer.critic.head.summary.weight.add_(1.0)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        trainer.load_checkpoint(tampered)
    torch.testing.assert_close(trainer.critic.head.summary.weight, head_before + 1.0)
    with torch.no_grad():
        trainer.critic.head.summary.weight.sub_(1.0)

    ids = pad(prompt_ids[:4], trainer.tokenizer.pad_token_id, "left")
    mask = pad([[1] * len(p) for p in prompt_ids[:4]], 0, "left")
    policy, critic = load_ppo_models(out, plan_device("fp32"))
    with torch.no_grad():
        want_logprobs, _, _ = forward_policy(trainer.policy, ids, mask, 3, 1.0)
        got_logprobs, _, _ = forward_policy(policy, ids, mask, 3, 1.0)
        torch.testing.assert_close(got_logprobs, want_logprobs)
        torch.testing.assert_close(
            critic_values(critic, ids, mask, 3), critic_values(trainer.critic, ids, mask, 3)
        )


def test_ptx_loss_is_logged_and_moves_the_gradient(
    eos_model: Path, prompt_file: Path, tmp_path: Path
) -> None:
    """PPO-ptx: with gamma_ptx > 0 the SFT loss enters the objective and changes the policy's update."""
    from alignment.models import load_tokenizer
    from alignment.sft import EXAMPLE_DATA

    reward = short_response_reward(load_tokenizer(eos_model))
    weights = {}
    for coef in (0.0, 1.0):
        overrides = ppo_overrides(
            eos_model, prompt_file, tmp_path / f"ptx-{coef}", f"ppo.ptx_coef={coef}", f"data.ptx={EXAMPLE_DATA}",
            "ppo.ppo_epochs=1", "ppo.mini_batch_size=16", "ppo.critic=shared", "training.seed=7",
        )  # fmt: skip
        trainer, prompts, prompt_ids = build_ppo_trainer(load_config(PPORunConfig, None, overrides), reward)
        torch.manual_seed(0)
        experience, _ = trainer.make_experience(prompts[:16], prompt_ids[:16])
        stats = trainer.update(experience)
        if coef > 0:
            assert stats["loss/ptx"] > 0
            # The ptx term alone has a gradient on the policy's LoRA weights.
            trainer.optimizer.zero_grad()
            trainer.ptx_loss().backward()
            assert any(
                p.grad is not None and p.grad.abs().sum() > 0
                for p in trainer.optimizer.param_groups[0]["params"]
            )
        else:
            assert "loss/ptx" not in stats
        weights[coef] = torch.cat([p.detach().flatten() for p in trainer.optimizer.param_groups[0]["params"]])
    # Same seed, same rollouts, same minibatches: only the ptx term differs between the two updates.
    assert not torch.allclose(weights[0.0], weights[1.0])


def test_bundled_config_validates() -> None:
    config = load_config(PPORunConfig, Path(__file__).parents[2] / "configs" / "ppo.yaml")
    assert config.ppo.critic == "separate" and config.ppo.kl_controller == "adaptive"


def test_cli_without_reward_model_exits_2(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from serving.cli import app

    result = CliRunner().invoke(app, ["train", "ppo", "--set", f"output_dir={tmp_path}"])
    assert result.exit_code == 2
    assert "no reward model" in result.output


def test_reference_is_a_frozen_copy_of_the_init_adapter(
    eos_model: Path, prompt_file: Path, tmp_path: Path
) -> None:
    """From an SFT adapter, in bf16: KL starts at 0, and an update moves the policy but not the reference."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from alignment.models import load_tokenizer

    sft = tmp_path / "sft-adapter"
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(eos_model),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    model.save_pretrained(sft)
    overrides = [
        *ppo_overrides(eos_model, prompt_file, tmp_path / "ppo-sft", "ppo.critic=shared", "ppo.ppo_epochs=1"),
        f"init_adapter={sft}",
        "training.dtype=bf16",
        "ppo.rollout_batch_size=8",
    ]
    trainer, prompts, prompt_ids = build_ppo_trainer(
        load_config(PPORunConfig, None, overrides), short_response_reward(load_tokenizer(eos_model))
    )
    policy = trainer.policy
    assert set(policy.peft_config) == {"default", "reference"}

    def lora_b(adapter: str) -> torch.Tensor:
        return torch.cat(
            [p.detach().float().flatten() for n, p in policy.named_parameters() if f"lora_B.{adapter}." in n]
        )

    before_default, before_reference = lora_b("default"), lora_b("reference")
    experience, stats = trainer.make_experience(prompts[:8], prompt_ids[:8])
    assert stats["objective/kl"] == pytest.approx(0.0, abs=1e-6)
    trainer.update(experience)
    assert not torch.equal(lora_b("default"), before_default)
    assert torch.equal(lora_b("reference"), before_reference)
    assert all(not p.requires_grad for n, p in policy.named_parameters() if ".reference." in n)
    _, stats = trainer.make_experience(prompts[:8], prompt_ids[:8])
    assert stats["objective/kl"] != 0.0


@pytest.mark.timeout(900)
def test_run_resumed_after_a_crash_ends_where_an_uninterrupted_one_does(
    eos_model: Path, prompt_file: Path, tmp_path: Path
) -> None:
    from alignment.models import load_tokenizer

    reward = short_response_reward(load_tokenizer(eos_model))
    settings = ["training.max_steps=4", "training.save_steps=2", "ppo.critic=separate", "ppo.ppo_epochs=1"]

    def config(out: Path, *extra: str) -> PPORunConfig:
        return load_config(PPORunConfig, None, ppo_overrides(eos_model, prompt_file, out, *settings, *extra))

    straight = tmp_path / "straight"
    train_ppo(config(straight), reward)

    crashed, calls = tmp_path / "crashed", 0

    def crashing_reward(prompts: list, responses: list[str]) -> list[float]:
        nonlocal calls
        calls += 1
        if calls == 3:  # step 3, after checkpoint-2 was written
            raise RuntimeError("reward server went away")
        return reward(prompts, responses)

    with pytest.raises(RuntimeError, match="reward server went away"):
        train_ppo(config(crashed), crashing_reward)
    assert (crashed / "checkpoint-2" / "trainer_state.pt").is_file()
    assert not (crashed / "adapter_model.safetensors").exists()
    with pytest.raises(ConfigError, match="no checkpoint"):
        train_ppo(config(tmp_path / "empty", "resume=true"), reward)

    train_ppo(config(crashed, "resume=true"), reward)
    for name in (
        "adapter_model.safetensors",
        "critic/adapter_model.safetensors",
        "critic/value_head.safetensors",
    ):
        want, got = load_file(str(straight / name)), load_file(str(crashed / name))
        assert want.keys() == got.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=0, rtol=0, msg=f"{name}:{key}")
    logs = [
        [json.loads(line) for line in (d / "ppo_log.jsonl").read_text().splitlines()]
        for d in (straight, crashed)
    ]
    assert [r["step"] for r in logs[1]] == [1, 2, 3, 4]
    assert [r["reward/raw"] for r in logs[1]] == [r["reward/raw"] for r in logs[0]]


# --- packed forward passes and bf16 adapters (issue 13) --------------------------------------------


def padded_logprobs_and_values(trainer, ids: torch.Tensor, mask: torch.Tensor, T: int, temperature: float):  # type: ignore[no-untyped-def]
    """The forward passes before issue 13: left-padded rows, full model, logits of the last T + 1 positions."""
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    out = trainer.policy(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=T + 1)
    logits = out.logits[:, :-1].float() / temperature
    logprobs = logits.gather(-1, ids[:, -T:, None]).squeeze(-1) - torch.logsumexp(logits, -1)
    hidden = trainer.critic.trunk(
        input_ids=ids, attention_mask=mask, position_ids=positions
    ).last_hidden_state
    return logprobs, trainer.critic.head(hidden[:, -T - 1 : -1])


def test_packed_passes_equal_padded_ones_and_do_not_depend_on_the_batch(
    eos_model: Path, prompt_file: Path, tmp_path: Path
) -> None:
    """Padding-free packing computes the padded batch's log-probs and values (fp32), and a rollout's
    numbers are the same in the whole batch as in any minibatch (bf16 too), so the PPO ratio starts at 1."""
    from alignment.models import load_tokenizer
    from alignment.rl.experience import generate_rollouts
    from alignment.rl.models import critic_values, forward_policy

    for dtype in ("fp32", "bf16"):
        overrides = ppo_overrides(
            eos_model, prompt_file, tmp_path / dtype, "ppo.critic=separate", f"training.dtype={dtype}"
        )
        trainer, prompts, prompt_ids = build_ppo_trainer(
            load_config(PPORunConfig, None, overrides), short_response_reward(load_tokenizer(eos_model))
        )
        with torch.no_grad():  # a value head that is not zero, so values are compared for real
            trainer.critic.head.summary.weight.normal_()
        g = trainer.ppo.generation
        # prompts of different lengths, so the padded batch really is padded
        ids_in = [p + p[-3:] * (i % 3) for i, p in enumerate(prompt_ids[:8])]
        rollout = generate_rollouts(trainer.policy, trainer.tokenizer, ids_in, prompts[:8], g)
        ids, mask, T = rollout.input_ids, rollout.attention_mask, rollout.response_ids.shape[1]
        response = rollout.response_mask.bool()
        assert not mask.bool().all()
        with torch.no_grad():
            logprobs, _, _ = forward_policy(trainer.policy, ids, mask, T, 0.7)
            values = critic_values(trainer.critic, ids, mask, T)
            rows = torch.tensor([5, 1, 6])
            sub_logprobs, _, _ = forward_policy(trainer.policy, ids[rows], mask[rows], T, 0.7)
            sub_values = critic_values(trainer.critic, ids[rows], mask[rows], T)
            assert torch.equal(sub_logprobs[response[rows]], logprobs[rows][response[rows]])
            assert torch.equal(sub_values[response[rows]], values[rows][response[rows]])
            assert (logprobs[~response] == 0).all() and (values[~response] == 0).all()
            if dtype == "fp32":
                for module in (trainer.policy.get_base_model(), trainer.critic.trunk.get_base_model()):
                    module.set_attn_implementation("eager")
                want_logprobs, want_values = padded_logprobs_and_values(trainer, ids, mask, T, 0.7)
                torch.testing.assert_close(logprobs[response], want_logprobs[response], atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(values[response], want_values[response], atol=1e-4, rtol=1e-4)


def test_bf16_adapters_step_fp32_masters_and_resume_them(
    eos_model: Path, prompt_file: Path, tmp_path: Path
) -> None:
    """bf16 base: LoRA weights are bf16 in the model (no fp32 casts of activations), the optimizer
    steps fp32 masters, and a checkpoint restores the masters themselves, not their bf16 rounding."""
    from alignment.models import load_tokenizer

    overrides = ppo_overrides(
        eos_model, prompt_file, tmp_path / "run", "training.dtype=bf16", "ppo.critic=separate",
        "ppo.ppo_epochs=1", "training.learning_rate=1e-4",
    )  # fmt: skip
    config = load_config(PPORunConfig, None, overrides)
    trainer, prompts, prompt_ids = build_ppo_trainer(config, short_response_reward(load_tokenizer(eos_model)))
    lora = [p for n, p in trainer.policy.named_parameters() if "lora_" in n and p.requires_grad]
    assert lora and all(p.dtype == torch.bfloat16 for p in lora)
    assert all(p.dtype == torch.float32 for g in trainer.optimizer.param_groups for p in g["params"])
    trainer.step(prompts[:16], prompt_ids[:16])
    masters = [m.detach().clone() for _, m in trainer.masters[0].pairs]
    assert any(
        not torch.equal(m, p.float()) for m, (p, _) in zip(masters, trainer.masters[0].pairs, strict=True)
    )
    for master, (param, _) in zip(masters, trainer.masters[0].pairs, strict=True):
        assert torch.equal(master.to(torch.bfloat16), param)
    trainer.save_checkpoint(tmp_path / "checkpoint-1", 1, {"rng": None, "order": []})

    fresh, _, _ = build_ppo_trainer(config, short_response_reward(load_tokenizer(eos_model)))
    fresh.load_checkpoint(tmp_path / "checkpoint-1")
    for want, (param, master) in zip(masters, fresh.masters[0].pairs, strict=True):
        assert torch.equal(master, want)
        assert torch.equal(param, want.to(torch.bfloat16))
    assert all(p.grad is None for p in lora)  # cleared after each step


def test_update_pass_gradients_equal_the_padded_peft_path(
    eos_model: Path, prompt_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The update's forward + backward (packed rows, LoRA as one addmm, attention scores kept for the
    backward) gives the gradients of PEFT's own LoRA forward over padded rows with eager attention (fp32)."""
    import alignment.shared_prompt
    from alignment.models import load_tokenizer
    from alignment.rl.experience import generate_rollouts
    from alignment.rl.models import critic_values, forward_policy

    overrides = ppo_overrides(eos_model, prompt_file, tmp_path / "run", "ppo.critic=separate")
    trainer, prompts, prompt_ids = build_ppo_trainer(
        load_config(PPORunConfig, None, overrides), short_response_reward(load_tokenizer(eos_model))
    )
    models = (trainer.policy, trainer.critic.trunk)
    assert all(any(hasattr(m, "_peft_forward") for m in model.modules()) for model in models)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B != 0 and a live value head, so every LoRA weight gets a gradient
        for param in [*trainer.policy.parameters(), *trainer.critic.parameters()]:
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    ids_in = [p + p[-3:] * (i % 3) for i, p in enumerate(prompt_ids[:8])]
    rollout = generate_rollouts(
        trainer.policy, trainer.tokenizer, ids_in, prompts[:8], trainer.ppo.generation
    )
    ids, mask, T = rollout.input_ids, rollout.attention_mask, rollout.response_ids.shape[1]
    response = rollout.response_mask.bool()
    weights = torch.randn(response.shape, generator=generator)
    params = [p for model in (trainer.policy, trainer.critic) for p in model.parameters() if p.requires_grad]

    def gradients(logprobs: torch.Tensor, values: torch.Tensor) -> list[torch.Tensor]:
        loss = (logprobs * weights)[response].sum() + (values * weights)[response].square().sum()
        grads = torch.autograd.grad(loss, params)
        assert all(g.abs().sum() > 0 for g in grads)
        return list(grads)

    def no_recompute(*args: object, **kwargs: object) -> None:
        raise AssertionError("the update pass recomputed attention scores")

    with monkeypatch.context() as patch:
        patch.setattr(alignment.shared_prompt, "checkpoint", no_recompute)
        logprobs, _, _ = forward_policy(trainer.policy, ids, mask, T, 0.7)
        got = gradients(logprobs, critic_values(trainer.critic, ids, mask, T))
    for model in models:  # back to PEFT's forward and eager attention over the padded rows
        for module in model.modules():
            if hasattr(module, "_peft_forward"):
                del module.forward, module._peft_forward
        model.get_base_model().set_attn_implementation("eager")
    want = gradients(*padded_logprobs_and_values(trainer, ids, mask, T, 0.7))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-3)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("critic", ["separate", "shared"])
def test_step_reusing_the_first_minibatch_pass_updates_as_the_separate_passes_do(
    eos_model: Path, prompt_file: Path, tmp_path: Path, critic: str
) -> None:
    """`step`'s update takes the first minibatch's old log-probs and values from its training forward
    instead of a no-grad pass: same experience, statistics and updated weights as the separate passes
    (fp32)."""
    from alignment.models import load_tokenizer
    from alignment.rl.experience import compute_advantages, reference_logprobs, rollout_logprobs_and_values
    from alignment.rl.ppo_trainer import ScoredRollout

    reward = short_response_reward(load_tokenizer(eos_model))
    results = []
    rollout = scores = None
    for reuse in (False, True):
        overrides = ppo_overrides(eos_model, prompt_file, tmp_path / f"reuse-{reuse}", f"ppo.critic={critic}")
        trainer, prompts, prompt_ids = build_ppo_trainer(load_config(PPORunConfig, None, overrides), reward)
        with torch.no_grad():  # a value head that is not zero, so values are compared for real
            trainer.critic.head.summary.weight.normal_(generator=torch.Generator().manual_seed(3))
        if rollout is None:
            torch.manual_seed(0)
            rollout, scores, _ = trainer.sample(prompts[:16], prompt_ids[:16])
        temperature = trainer.ppo.generation.temperature
        torch.manual_seed(1)  # the same minibatch order in both
        if reuse:
            ref = reference_logprobs(trainer.policy, rollout, temperature)
            stats = trainer.update(ScoredRollout(rollout, scores, ref))
        else:
            logprobs, ref, values = rollout_logprobs_and_values(
                trainer.policy, trainer.critic, rollout, temperature
            )
            experience, stats = compute_advantages(
                rollout, scores, logprobs, ref, values, trainer.kl_ctl.value, trainer.ppo
            )
            stats |= trainer.update(experience)
        weights = [
            p.detach().clone() for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]
        ]
        results.append((stats, weights))
    (want, want_weights), (got, got_weights) = results
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-3, abs=1e-5), key
    for a, b in zip(want_weights, got_weights, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
