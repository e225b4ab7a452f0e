"""Held-out loss of reference answers under a locally loaded system.

Where the evaluation set carries reference answers (AlpacaEval / Alpaca `output`, the
self-instruct `instances[0].output`) or `--reference_outputs` supplies them, each one is
scored the way training scores a row: the prompt rendered by the system's own template,
prompt and answer tokenized apart and concatenated (data.tokenize.Encoder: the answer's
first token is exactly what generation would emit first), EOS appended, prompt positions
masked by token ids; the loss is the summed next-token cross-entropy of the answer tokens
(train.loss.causal_lm_loss_sum). The figure per system is the token-weighted mean, the
same definition as finetune.py's eval loss, so it is comparable across systems that share
a tokenizer (not across tokenizers: a token is not the same unit there).
"""

from __future__ import annotations

from lora_alpaca.errors import UsageError
from lora_alpaca.evaluate.sets import alpaca_eval_instruction, read_model_outputs
from lora_alpaca.log import log


def attach_references(rows: list[dict], reference_outputs: str | None) -> int:
    """Set `reference` on rows from --reference_outputs (by AlpacaEval instruction text,
    which overrides the set's own); returns how many rows have one."""
    if reference_outputs:
        refs = {
            r["instruction"]: r["output"]
            for r in read_model_outputs(reference_outputs, "--reference_outputs")
        }
        missing = 0
        for r in rows:
            key = alpaca_eval_instruction(r["instruction"], r["input"])
            if key in refs:
                r["reference"] = refs[key]
            else:
                missing += 1
        if missing == len(rows):
            raise UsageError(
                f"--reference_outputs {reference_outputs}: no row matches an --eval_set "
                "instruction (AlpacaEval pairs rows by the instruction text)"
            )
    return sum(bool(r.get("reference")) for r in rows)


def reference_losses(gen, rows: list[dict]) -> list[tuple[float, int] | None]:
    """(mean loss per answer token, answer tokens incl. EOS) per row; None without a reference."""
    import torch

    from lora_alpaca.data.tokenize import Encoder
    from lora_alpaca.train.loss import causal_lm_loss_sum

    # The whole context: a held-out answer is scored uncut where it fits (truncate keeps the
    # template intact otherwise, as training does).
    cutoff = gen.context_len() or 2048
    enc = Encoder(gen.tokenizer, gen.template, cutoff, False, True, "truncate")
    todo = [i for i, r in enumerate(rows) if r.get("reference")]
    out: list[tuple[float, int] | None] = [None] * len(rows)
    if not todo:
        return out
    batch = enc.encode_rows(
        [rows[i]["instruction"] for i in todo],
        [rows[i]["input"] for i in todo],
        [rows[i]["reference"] for i in todo],
    )
    # One row per forward pass: no padding to get wrong, and a few hundred short rows
    # cost well under the generation that precedes this (cost: one forward per row).
    with gen.lock, torch.inference_mode():
        for k, i in enumerate(todo):
            ids, labels = batch.row(k)
            t = {
                "input_ids": torch.tensor([ids], device=gen.device),
                "labels": torch.tensor([labels], device=gen.device),
            }
            loss_sum, count = causal_lm_loss_sum(gen.model, t)
            out[i] = (float(loss_sum) / count, count) if count else None
    scored = [x for x in out if x]
    tokens = sum(n for _, n in scored)
    mean = sum(loss * n for loss, n in scored) / tokens if tokens else float("nan")
    log(f"held-out loss {mean:.4f} over {len(scored)} reference answers ({tokens} tokens)",
        tag="evaluate")  # fmt: skip
    return out


def mean_loss(rows: list[dict]) -> tuple[float, int] | None:
    """Token-weighted mean `reference_loss` of answer rows and its row count; None if none."""
    scored = [r for r in rows if isinstance(r.get("reference_loss"), (int, float))]
    tokens = sum(r["reference_tokens"] for r in scored)
    if not tokens:
        return None
    return sum(r["reference_loss"] * r["reference_tokens"] for r in scored) / tokens, len(scored)
