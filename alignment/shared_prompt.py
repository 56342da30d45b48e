"""Preference pairs packed so that shared prompt tokens run once.

    packed = pack_pairs(prompts, chosen, rejected)          # lists of 1-D token tensors
    hidden = transformer(input_ids=packed.input_ids, position_ids=packed.position_ids,
                         attention_mask=packed.attention_mask).last_hidden_state

The two sequences of a pair share their prompt, and the prompts of a batch usually share a prefix
too (a chat template's system prompt: 24 of SmolLM2's ~75 tokens a pair on the bundled data). A
packed row is

    [batch prefix | rest of prompt 1 | chosen 1 | rejected 1 | rest of prompt 2 | chosen 2 | ...]

with position ids that restart where each sequence would have them and a mask under which every
token sees exactly the context it has in its own full sequence: a pair's tokens see the batch prefix
and their own pair, and a rejected token never sees its chosen twin. The numbers are those of the
2B full sequences, for the cost of their distinct tokens. Rows hold about `row_tokens` tokens
(attention over a row costs its length squared), filled evenly. The DPO trainer (log-probs of completion tokens)
and the reward trainer (a score at each side's last token) both run their pairs this way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

ROW_TOKENS = 256  # measured: a little faster than 512 on SmolLM2 (less attention over masked blocks)


@dataclass(frozen=True)
class PairPlace:
    """Where one pair sits: its row, where its own prompt tokens start, and its segment lengths."""

    row: int
    start: int  # index in the row of the first token after the batch prefix
    prefix: int  # the row's shared batch prefix length
    prompt: int  # prompt tokens beyond the batch prefix
    chosen: int
    rejected: int

    @property
    def chosen_start(self) -> int:
        return self.start + self.prompt

    @property
    def rejected_start(self) -> int:
        return self.chosen_start + self.chosen

    @property
    def end(self) -> int:
        return self.rejected_start + self.rejected

    @property
    def prompt_last(self) -> int:
        """Index of the last prompt token: it predicts both completions' first tokens."""
        return self.start + self.prompt - 1 if self.prompt else self.prefix - 1


@dataclass
class PackedPairs:
    input_ids: torch.Tensor  # (rows, T), right-padded with pad_id
    position_ids: torch.Tensor  # (rows, T)
    attention_mask: torch.Tensor  # (rows, 1, T, T) bool, True = may attend
    token_mask: torch.Tensor  # (rows, T) long, 1 for real tokens, 0 for padding
    places: list[PairPlace]

    @property
    def width(self) -> int:
        return self.input_ids.shape[1]

    def flat(self, place: PairPlace, index: torch.Tensor | int) -> torch.Tensor:
        return place.row * self.width + torch.as_tensor(index, device=self.input_ids.device)

    def last_token_index(self) -> torch.Tensor:
        """(2B,) flat indices into (rows*T) of each chosen completion's last token, then each rejected one's."""
        chosen = [self.flat(p, p.rejected_start - 1) for p in self.places]
        rejected = [self.flat(p, p.end - 1) for p in self.places]
        return torch.stack(chosen + rejected)

    def predictor_index(self, place: PairPlace, side: str) -> torch.Tensor:
        """Flat indices of the hidden states that predict each token of one completion, in order."""
        start, length = (
            (place.chosen_start, place.chosen) if side == "chosen" else (place.rejected_start, place.rejected)
        )
        previous = torch.arange(start - 1, start + length - 1, device=self.input_ids.device)
        previous[0] = place.prompt_last  # the first completion token follows the prompt, not its twin
        return self.flat(place, previous)


def common_prefix(seqs: Sequence[torch.Tensor]) -> int:
    shortest = min(len(s) for s in seqs)
    n = 0
    while n < shortest and all(s[n] == seqs[0][n] for s in seqs[1:]):
        n += 1
    return n


def pack_pairs(
    prompts: Sequence[torch.Tensor],
    chosen: Sequence[torch.Tensor],
    rejected: Sequence[torch.Tensor],
    pad_id: int = 0,
    row_tokens: int = ROW_TOKENS,
    across_pairs: bool = True,
) -> PackedPairs:
    """Pack B (prompt, chosen, rejected) token sequences (1-D tensors) into rows of about `row_tokens`.

    `across_pairs=False`: one row per pair, [prompt | chosen | rejected]. A pair's numbers then do not
    depend on which pairs share its batch; packed together, bf16 sums over a row change with its
    layout (DPO's cached reference log-ratios moved by 0.2 nats on average on SmolLM2).
    """
    if not (len(prompts) == len(chosen) == len(rejected)) or not prompts:
        raise ValueError("pack_pairs needs the same positive number of prompts, chosen and rejected")
    device = prompts[0].device
    # The batch prefix; a pair needs a token of its own after it only if its prompt is longer.
    prefix = 0 if not across_pairs else common_prefix(prompts) if len(prompts) > 1 else len(prompts[0])
    sizes = [len(p) - prefix + len(c) + len(r) for p, c, r in zip(prompts, chosen, rejected, strict=True)]
    # As few rows as fit, filled evenly: every row is padded to the longest.
    n_rows = -(-sum(sizes) // max(1, row_tokens - prefix))
    target = sum(sizes) / n_rows
    places: list[PairPlace] = []
    row, used = 0, prefix
    for b, size in enumerate(sizes):
        if used > prefix and (not across_pairs or used - prefix + size / 2 > target):
            row, used = row + 1, prefix
        places.append(
            PairPlace(row, used, prefix, len(prompts[b]) - prefix, len(chosen[b]), len(rejected[b]))
        )
        used += size
    rows = row + 1
    width = max(place.end for place in places)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long, device=device)
    position_ids = torch.zeros((rows, width), dtype=torch.long, device=device)
    pair = torch.full((rows, width), -2, dtype=torch.long, device=device)  # -1: batch prefix, -2: padding
    chosen_token = torch.zeros((rows, width), dtype=torch.bool, device=device)
    rejected_token = torch.zeros((rows, width), dtype=torch.bool, device=device)
    input_ids[:, :prefix] = prompts[0][:prefix]
    position_ids[:, :prefix] = torch.arange(prefix, device=device)
    pair[:, :prefix] = -1
    for b, place in enumerate(places):
        input_ids[place.row, place.start : place.end] = torch.cat(
            [prompts[b][prefix:], chosen[b], rejected[b]]
        )
        completion_pos = prefix + place.prompt
        position_ids[place.row, place.start : place.rejected_start] = torch.arange(
            prefix, completion_pos + place.chosen, device=device
        )
        position_ids[place.row, place.rejected_start : place.end] = torch.arange(
            completion_pos, completion_pos + place.rejected, device=device
        )
        pair[place.row, place.start : place.end] = b
        chosen_token[place.row, place.chosen_start : place.rejected_start] = True
        rejected_token[place.row, place.rejected_start : place.end] = True
    q = torch.arange(width, device=device)[:, None]
    k = torch.arange(width, device=device)[None, :]
    pair_q, pair_k = pair[:, :, None], pair[:, None, :]
    real_k = pair_k != -2
    mask = (
        (k <= q)
        & real_k
        & ((pair_k == -1) | (pair_k == pair_q) | (pair_q == -2))  # padding queries look at anything real
        & ~(rejected_token[:, :, None] & chosen_token[:, None, :])
    )
    return PackedPairs(input_ids, position_ids, mask[:, None], real_k[:, 0].long(), places)


def mask_for_attention(mask: torch.Tensor, model: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The packed boolean mask in the form the model's attention takes as a ready 4-D mask.

    SDPA and flex take booleans; eager attention adds the mask to its scores, so it needs 0 / -inf.
    """
    if getattr(model.config, "_attn_implementation", "sdpa") == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
            ~mask, torch.finfo(dtype).min
        )
    return mask
