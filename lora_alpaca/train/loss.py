"""Next-token cross-entropy as a SUM over supervised positions, optionally without full logits.

Why not `model(labels=...)`: transformers returns a mean over the micro-batch, and the mean of
means is not the per-token mean of an accumulation window whose micro-batches hold different
numbers of supervised tokens (packed vs padded, different splits). Returning (sum, count) lets
the training loop divide by the whole window's count, so every layout optimizes one objective.

Why chunked: the [tokens, vocab] logits (plus their fp32 copy and log-softmax saved for
backward) dominate activation memory for large vocabularies (49152 for SmolLM2, 128k for
Llama 3). We run the decoder body for hidden states, keep only the positions that have a
target, and run lm_head + cross-entropy chunk by chunk, so at most one chunk of logits exists
at a time, in forward and in backward.

Why the gradient is made in forward (`_FrozenHeadCrossEntropy`): with a frozen lm_head (every
LoRA run that does not train the head) the only gradient the loss passes back is dL/dh =
(softmax - onehot) @ W. Computing it chunk by chunk while the chunk's logits exist costs two
vocabulary matmuls per chunk and keeps only [tokens, hidden] for backward; checkpointing
instead costs three (forward, recompute, backward) plus a saved log-softmax. Profiled on
SmolLM2 (BENCHMARKS.md): the loss was ~20% of a CPU step. This is the fused linear +
cross-entropy of Liger / Apple's cut-cross-entropy, which exist only as GPU kernels; torch
has no such op, hence these few lines. A trainable head (or one sharded as a DTensor) takes
the checkpointed path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lora_alpaca.constants import IGNORE_INDEX

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")
# Config fields of architectures that post-process logits after lm_head (Gemma 2/3 softcapping,
# Cohere scale, Granite scaling). The chunked path would silently skip that step, so such
# models take the exact (HF forward) path instead.
LOGIT_POSTPROCESS_FIELDS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
# bench/speed_variants.py sets this to measure the old paths: "checkpointed" (the checkpointed
# path even where the fused frozen-head path applies), "recompute_all" (that path, with the
# last chunk recomputed too). None: the paths below as they are.
_BENCH_LOSS_PATH: str | None = None


def _causal_lm(model):
    """The *ForCausalLM inside a peft.PeftModel (LoRA layers are injected in place)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def _inputs(batch: dict) -> dict:
    return {k: batch[k] for k in MODEL_INPUTS if batch.get(k) is not None}


def _chunk_ce_sum(
    lm_head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    # fp32 logits for the softmax whatever the matmul dtype: bf16 log-softmax over a 50k
    # vocabulary loses about 2 significant digits of the loss.
    logits = lm_head(hidden).float()
    return F.cross_entropy(logits, targets, reduction="sum")


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` against `targets`, chunk by chunk, with
    dL/dhidden computed in forward (weight is frozen: no gradient for it). The matmuls run
    in hidden's dtype (the autocast dtype under autocast, as lm_head would); the softmax is
    fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size):
        # One cast of the head for the whole call where autocast would cast it per matmul;
        # autocast off inside so that the matmuls can write into the reused buffers (out=).
        weight = weight.to(hidden.dtype)
        device = hidden.device
        total = torch.zeros((), dtype=torch.float32, device=device)
        grad = torch.empty_like(hidden)
        rows_max = min(chunk_size, hidden.shape[0])
        # [n, V] buffers, reused by every chunk: the matmul's logits (later the gradient,
        # rounded into the same buffer) and their fp32 copy that the softmax works in. Only
        # same-dtype in-place ops on them: a mixed-dtype op with out= (bf16 -> fp32) is
        # ~10x slower on CPU than a copy_ followed by the in-place op.
        logits_buf = _chunk_buffer("logits", rows_max, weight.shape[0], hidden.dtype, device)
        fp32_buf = _chunk_buffer("fp32", rows_max, weight.shape[0], torch.float32, device)
        with torch.autocast(device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_size):
                h, y = hidden[start : start + chunk_size], targets[start : start + chunk_size]
                rows = torch.arange(len(y), device=y.device)
                logits, probs = logits_buf[: len(y)], fp32_buf[: len(y)]
                torch.mm(h, weight.t(), out=logits)
                probs.copy_(logits)
                picked = probs[rows, y]
                peak = probs.amax(dim=-1, keepdim=True)
                probs.sub_(peak).exp_()
                sums = probs.sum(dim=-1, keepdim=True)
                total += (sums.log() + peak).sum() - picked.sum()
                probs.div_(sums)  # softmax
                probs[rows, y] -= 1.0  # d(loss)/d(logits)
                logits.copy_(probs)  # the gradient, in the matmul dtype
                torch.mm(logits, weight, out=grad[start : start + chunk_size])
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None


# CPU only: a fresh fp32 [chunk, vocab] tensor is above glibc's mmap threshold (32 MiB at
# most), so every allocation is a new mapping that page-faults in as it is first written
# (measured: `.float()` of a [256, 49152] bf16 tensor 15 ms into a fresh tensor, 1.6 ms into
# a kept one; the chunk's other ops take ~50 ms). CUDA's caching allocator already keeps such
# blocks; on CPU the buffers are kept here, one of each kind, grown when a larger chunk or
# vocabulary comes.
_CPU_BUFFERS: dict[tuple, torch.Tensor] = {}


def _chunk_buffer(name, rows, cols, dtype, device) -> torch.Tensor:
    if device.type != "cpu":
        return torch.empty(rows, cols, dtype=dtype, device=device)
    key = (name, dtype)
    buf = _CPU_BUFFERS.get(key)
    if buf is None or buf.shape[0] < rows or buf.shape[1] != cols:
        buf = _CPU_BUFFERS[key] = torch.empty(rows, cols, dtype=dtype)
    return buf[:rows]


def _frozen_head_weight(lm_head, hidden) -> torch.Tensor | None:
    """lm_head's weight if the fused path applies: a plain bias-free Linear whose weight is
    a frozen ordinary tensor, while the hidden states need a gradient."""
    if type(lm_head) is not torch.nn.Linear or lm_head.bias is not None:
        return None
    weight = lm_head.weight
    if weight.requires_grad or type(weight) not in (torch.Tensor, torch.nn.Parameter):
        return None  # trainable head, or a DTensor shard under FSDP2
    if not (torch.is_grad_enabled() and hidden.requires_grad):
        return None  # evaluation: the checkpointed path does no backward work either
    return weight


def _supports_chunking(causal_lm) -> bool:
    config = getattr(causal_lm, "config", None)
    if config is None or causal_lm.get_output_embeddings() is None:
        return False
    if any(getattr(config, f, None) not in (None, 1, 1.0) for f in LOGIT_POSTPROCESS_FIELDS):
        return False
    return hasattr(causal_lm, getattr(causal_lm, "base_model_prefix", "") or "\0")


def causal_lm_loss_sum(
    model, batch: dict, chunk_size: int | None = 1024
) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over positions whose (shifted) label is not -100, and their count.

    `batch`: input_ids [B,T], labels [B,T], optional attention_mask and position_ids (packed
    batches give position_ids and no attention_mask). chunk_size=None: plain full-logits
    forward through the model's own head. Otherwise logits exist only for supervised
    positions, `chunk_size` rows at a time. Runs under whatever autocast the caller set.
    """
    labels = batch["labels"]
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    count = int(keep.sum())
    causal_lm = _causal_lm(model)

    if chunk_size is None or not _supports_chunking(causal_lm):
        # use_cache=False: with a cache, transformers skips packed-sequence detection and
        # packed rows would attend to each other.
        logits = model(**_inputs(batch), use_cache=False).logits
        loss = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        return loss, count

    if chunk_size < 1:
        raise ValueError(
            f"chunk_size must be a positive number of tokens or None, got {chunk_size}"
        )
    body = getattr(causal_lm, causal_lm.base_model_prefix)
    hidden = body(**_inputs(batch), use_cache=False).last_hidden_state
    selected = hidden[:, :-1][keep]  # [N, H]: only positions that predict a target
    selected_targets = targets[keep]
    if count == 0:
        # Keep the graph connected so backward() works on a micro-batch with nothing to learn.
        return hidden.sum() * 0.0, 0
    lm_head = causal_lm.get_output_embeddings()
    weight = _frozen_head_weight(lm_head, selected)
    if weight is not None and _BENCH_LOSS_PATH is None:
        if torch.is_autocast_enabled(hidden.device.type):
            selected = selected.to(torch.get_autocast_dtype(hidden.device.type))
        return _FrozenHeadCrossEntropy.apply(selected, weight, selected_targets, chunk_size), count
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, count, chunk_size):
        h = selected[start : start + chunk_size]
        y = selected_targets[start : start + chunk_size]
        if start + chunk_size >= count and _BENCH_LOSS_PATH != "recompute_all":
            # The last chunk's logits are the last thing forward makes and the first thing
            # backward frees, so keeping them costs no extra peak memory over recomputing
            # them (either way one chunk's logits exist next to the body's activations) and
            # saves one lm_head matmul; a micro-batch with <= chunk_size targets recomputes
            # nothing (profiled: the recompute was ~4% of a SmolLM2 step).
            total = total + _chunk_ce_sum(lm_head, h, y)
        else:
            # Checkpointing drops the chunk's logits after forward and recomputes them in
            # backward; without it, every chunk's logits would be saved and nothing gained.
            total = total + checkpoint(_chunk_ce_sum, lm_head, h, y, use_reentrant=False)
    return total, count
