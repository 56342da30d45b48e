"""What is measured on one model's own samples: log-probs, KL to a reference, DPO implicit-reward
accuracy, held-out perplexity, and ROUGE-L/BLEU/chrF against reference answers.

KL(pi || pi_ref) ~= E_{y ~ pi} [ (1/|y|) sum_t log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t) ];
implicit reward (DPO, https://arxiv.org/abs/2305.18290) r(x, y) = beta * log pi(y|x) / pi_ref(y|x);
perplexity = exp(total NLL of the assistant tokens / their number).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from alignment.messages import Message
from alignment.sft_data import to_prompt_completion

Messages = list[Message]


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def sequence_logprobs(
    model: torch.nn.Module, prompt_ids: list[list[int]], response_ids: list[list[int]], batch_size: int = 8
) -> list[np.ndarray]:
    """Per-token log pi(y_t | x, y_<t) of each response given its prompt."""
    out: list[np.ndarray] = []
    for start in range(0, len(prompt_ids), batch_size):
        prompts, responses = prompt_ids[start : start + batch_size], response_ids[start : start + batch_size]
        seqs = [p + r for p, r in zip(prompts, responses, strict=True)]
        width = max(map(len, seqs))
        input_ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs], device=device_of(model))
        attention_mask = torch.tensor(
            [[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device_of(model)
        )
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        # Position t predicts token t+1.
        logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            out.append(logps[i, len(p) - 1 : len(p) - 1 + len(r)].cpu().numpy())
    return out


@contextlib.contextmanager
def reference_of(
    model: torch.nn.Module, reference: torch.nn.Module | None = None
) -> Iterator[torch.nn.Module]:
    """The reference policy: an explicit one, else the same weights with the LoRA adapter switched off."""
    if reference is not None:
        yield reference
    elif hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield model
    else:
        yield model


def mean_kl(policy_logps: list[np.ndarray], reference_logps: list[np.ndarray]) -> float:
    per_sequence = [
        float(np.mean(p - q)) for p, q in zip(policy_logps, reference_logps, strict=True) if len(p)
    ]
    return float(np.mean(per_sequence)) if per_sequence else 0.0


def implicit_reward_accuracy(
    model: torch.nn.Module,
    tokenizer: Any,
    pairs: list[dict[str, Any]],
    beta: float,
    batch_size: int,
    reference: torch.nn.Module | None = None,
) -> dict[str, float]:
    """DPO's implicit reward r = beta * log(pi / pi_ref) ranks held-out chosen above rejected how often?"""
    prompt_ids, response_ids = [], []
    for side in ("chosen", "rejected"):
        for row in pairs:
            prompt, response = encode_turn(tokenizer, row["prompt"], row[side])
            prompt_ids.append(prompt)
            response_ids.append(response)
    policy = sequence_logprobs(model, prompt_ids, response_ids, batch_size)
    with reference_of(model, reference) as ref:
        reference_logps = sequence_logprobs(ref, prompt_ids, response_ids, batch_size)
    rewards = np.array([beta * float(np.sum(p - q)) for p, q in zip(policy, reference_logps, strict=True)])
    n = len(pairs)
    margins = rewards[:n] - rewards[n:]
    return {
        "implicit_reward_accuracy": float(np.mean(margins > 0)),
        "implicit_reward_margin": float(margins.mean()),
    }


def encode_prompt(tokenizer: Any, prompt: Messages) -> list[int]:
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_turn(tokenizer: Any, prompt: Messages, reply: Messages) -> tuple[list[int], list[int]]:
    """(prompt ids ending in the generation prompt, the reply's ids as the template renders them)."""
    prompt_ids = encode_prompt(tokenizer, prompt)
    text = tokenizer.apply_chat_template(prompt + reply, tokenize=False)
    return prompt_ids, tokenizer(text, add_special_tokens=False)["input_ids"][len(prompt_ids) :]


def perplexity(
    model: torch.nn.Module, tokenizer: Any, conversations: list[Messages], batch_size: int = 8
) -> dict[str, float]:
    """exp(mean NLL per assistant token) over every assistant turn of held-out conversations, each
    given the conversation before it (the tokens SFT trains on, end-of-turn tokens included)."""
    examples = to_prompt_completion(conversations)
    prompt_ids, response_ids = [], []
    for ex in examples:
        prompt, response = encode_turn(tokenizer, ex["prompt"], ex["completion"])
        prompt_ids.append(prompt)
        response_ids.append(response)
    logps = sequence_logprobs(model, prompt_ids, response_ids, batch_size)
    tokens = sum(len(lp) for lp in logps)
    nll = -sum(float(lp.sum()) for lp in logps)
    return {"perplexity": math.exp(nll / tokens) if tokens else float("nan"), "heldout_tokens": tokens}


def reference_metrics(predictions: list[str], references: list[str | None]) -> dict[str, float]:
    """ROUGE-L F1 (mean over answers), corpus BLEU and chrF, on the answers that have a reference."""
    import sacrebleu
    from rouge_score import rouge_scorer

    pairs = [(p, r) for p, r in zip(predictions, references, strict=True) if r]
    if not pairs:
        return {}
    preds, refs = [p for p, _ in pairs], [r for _, r in pairs]
    rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge_l = [rouge.score(r, p)["rougeL"].fmeasure for p, r in pairs]
    return {
        "rouge_l": float(np.mean(rouge_l)),
        "bleu": float(sacrebleu.corpus_bleu(preds, [refs]).score),
        "chrf": float(sacrebleu.corpus_chrf(preds, [refs]).score),
        "references": len(pairs),
    }
