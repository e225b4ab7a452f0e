"""Turn tokenized rows into model inputs: padding-free packing, or the padded alternative.

Packing puts the rows of a micro-batch end to end in ONE sequence of batch size 1, with
`position_ids` restarting at 0 for every row and no `attention_mask`. transformers then
detects the packed format from the position ids (`masking_utils.find_packed_sequence_indices`)
and builds a block-diagonal causal mask (sdpa / eager / flex on CPU) or runs flash-attention
varlen (GPU), so no row ever attends to another. Nothing is computed on padding.

Two conditions make that detection fire, and both are on the caller: the model must run with
`use_cache=False` (a cache disables packed-sequence detection; `loss.causal_lm_loss_sum`
passes it) and no `attention_mask` may be given.

Loss bookkeeping: the causal LM loss predicts token t+1 from position t, so a row's first
label would be predicted from the previous row's last token. `pack_rows` masks it (-100);
`count_supervised` counts exactly the positions the shifted loss sums over, the same number
for packed and padded batches, so a loop that divides by it optimizes the same objective
either way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lora_alpaca.constants import IGNORE_INDEX


def _check_row(i: int, row: dict) -> tuple[list[int], list[int]]:
    ids, labels = list(row["input_ids"]), list(row["labels"])
    if len(ids) != len(labels):
        raise ValueError(f"row {i}: input_ids has {len(ids)} tokens but labels has {len(labels)}")
    if not ids:
        raise ValueError(f"row {i}: empty input_ids")
    return ids, labels


def count_supervised(rows: Sequence[dict]) -> int:
    """Label positions the shifted loss counts: every non -100 label except each row's first."""
    return sum(sum(1 for y in list(row["labels"])[1:] if y != IGNORE_INDEX) for row in rows)


def pack_rows(rows: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Concatenate rows into one [1, T] sequence with per-row position ids and no attention mask."""
    if not rows:
        raise ValueError("pack_rows: no rows")
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    for i, row in enumerate(rows):
        ids, row_labels = _check_row(i, row)
        input_ids += ids
        # The first token of a row is never a target: its predictor would be the last
        # token of the previous row (or nothing, for the first row).
        labels += [IGNORE_INDEX] + row_labels[1:]
        position_ids += range(len(ids))
    return {
        "input_ids": torch.tensor([input_ids], dtype=torch.long),
        "position_ids": torch.tensor([position_ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
    }


def pad_rows(
    rows: Sequence[dict], pad_token_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad rows to the longest one: [B, L] input_ids, attention_mask, labels, position_ids."""
    if not rows:
        raise ValueError("pad_rows: no rows")
    checked = [_check_row(i, row) for i, row in enumerate(rows)]
    width = max(len(ids) for ids, _ in checked)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    batch = len(rows)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    for b, (ids, row_labels) in enumerate(checked):
        n = len(ids)
        input_ids[b, :n] = torch.tensor(ids)
        labels[b, :n] = torch.tensor(row_labels)
        labels[b, 0] = IGNORE_INDEX  # shifted out anyway; keeps labels identical to pack_rows
        attention_mask[b, :n] = 1
    # Right padding: real tokens sit at 0..n-1, so a plain arange is their true position.
    position_ids = torch.arange(width, dtype=torch.long).unsqueeze(0).expand(batch, -1).clone()
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "position_ids": position_ids,
    }
