"""One row per preference pair: the prompt once, then the chosen and the rejected completion.

    packed = pack_pairs(prompts, chosen, rejected)          # lists of 1-D token tensors
    hidden = transformer(input_ids=packed.input_ids, position_ids=packed.position_ids,
                         attention_mask=packed.attention_mask).last_hidden_state

The two rows of a pair share their prompt, a third to a half of the tokens of chat data. Packed as
[prompt | chosen | rejected], with the rejected positions restarting where the prompt ends and a mask
that hides the chosen completion from the rejected one, every token sees exactly the context it has
in its own full sequence: the numbers are those of two rows, for the cost of one row and a shorter
one. The DPO trainer (log-probs of completion tokens) and the reward trainer (a score at the last
token of each side) both run their pairs this way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class PackedPairs:
    input_ids: torch.Tensor  # (B, T), right-padded with pad_id
    position_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, 1, T, T) bool, True = may attend
    prompt_lens: list[int]
    chosen_lens: list[int]
    rejected_lens: list[int]

    @property
    def width(self) -> int:
        return self.input_ids.shape[1]

    def last_token_index(self) -> torch.Tensor:
        """(2B,) flat indices into (B*T) of each chosen completion's last token, then each rejected one's."""
        ends_c, ends_r = [], []
        for b, (p, c, r) in enumerate(
            zip(self.prompt_lens, self.chosen_lens, self.rejected_lens, strict=True)
        ):
            ends_c.append(b * self.width + p + c - 1)
            ends_r.append(b * self.width + p + c + r - 1)
        return torch.tensor(ends_c + ends_r, device=self.input_ids.device)

    def token_count(self) -> torch.Tensor:
        """(B,) real tokens per packed row."""
        lens = [
            p + c + r for p, c, r in zip(self.prompt_lens, self.chosen_lens, self.rejected_lens, strict=True)
        ]
        return torch.tensor(lens, device=self.input_ids.device)


def pack_pairs(
    prompts: Sequence[torch.Tensor],
    chosen: Sequence[torch.Tensor],
    rejected: Sequence[torch.Tensor],
    pad_id: int = 0,
) -> PackedPairs:
    """Pack B (prompt, chosen, rejected) token sequences (1-D tensors) into B rows."""
    if not (len(prompts) == len(chosen) == len(rejected)) or not prompts:
        raise ValueError("pack_pairs needs the same positive number of prompts, chosen and rejected")
    prompt_lens = [len(x) for x in prompts]
    chosen_lens = [len(x) for x in chosen]
    rejected_lens = [len(x) for x in rejected]
    device = prompts[0].device
    width = max(p + c + r for p, c, r in zip(prompt_lens, chosen_lens, rejected_lens, strict=True))
    batch = len(prompts)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long, device=device)
    position_ids = torch.zeros((batch, width), dtype=torch.long, device=device)
    q = torch.arange(width, device=device)[:, None]
    k = torch.arange(width, device=device)[None, :]
    masks = []
    for b, (p, c, r) in enumerate(zip(prompt_lens, chosen_lens, rejected_lens, strict=True)):
        n = p + c + r
        input_ids[b, :n] = torch.cat([prompts[b], chosen[b], rejected[b]])
        position_ids[b, : p + c] = torch.arange(p + c, device=device)
        position_ids[b, p + c : n] = torch.arange(p, p + r, device=device)
        chosen_key = (k >= p) & (k < p + c)
        rejected_query = q >= p + c
        # Padding queries attend to the real tokens (never to nothing: an all-masked row is NaN).
        masks.append((k <= q) & (k < n) & ~(rejected_query & chosen_key))
    return PackedPairs(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=torch.stack(masks)[:, None],
        prompt_lens=prompt_lens,
        chosen_lens=chosen_lens,
        rejected_lens=rejected_lens,
    )


def mask_for_attention(mask: torch.Tensor, model: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The packed boolean mask in the form the model's attention takes as a ready 4-D mask.

    SDPA and flex take booleans; eager attention adds the mask to its scores, so it needs 0 / -inf.
    """
    if getattr(model.config, "_attn_implementation", "sdpa") == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
            ~mask, torch.finfo(dtype).min
        )
    return mask
