"""Does the exported model say what the adapter said? A numeric check run after every export.

K prompts (rendered with the adapter's own template) go through the reference (base +
unmerged adapter, fp32) and through the exported model, fed the *same token ids*:

- max |logit difference| over every prompt position and vocabulary entry, against a
  tolerance per export dtype (`atol + rtol * max|reference logit|`);
- top-1 agreement at every prompt position; required to be perfect where the reference is
  decisive (its top-2 margin exceeds the tolerance), reported raw everywhere;
- greedy continuations of the first few prompts, required identical, except that a split
  at a step where the reference itself was at a near-tie (margin below tolerance) is
  accepted and reported: rounding weights to 16 bits can legitimately flip a coin toss.

Self-contained on purpose (a tiny cached greedy loop), so it checks the model and not a
sampler that might share a bug with it.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_alpaca.prompts import PromptTemplate

REPORT_NAME = "parity.json"

# Used when the adapter's run.json does not point to readable training data. Written for
# this project: short, varied, with and without an input, like Alpaca rows.
BUILTIN_PROMPTS: list[tuple[str, str]] = [
    ("Give three tips for staying healthy.", ""),
    ("What is the capital of France?", ""),
    ("Translate the sentence into French.", "The weather is nice today."),
    (
        "Classify the sentiment of the review as positive or negative.",
        "The food was cold and late.",
    ),
    ("Write a haiku about autumn leaves.", ""),
    (
        "Summarize the text in one sentence.",
        "LoRA trains two small matrices per layer instead of the full weights.",
    ),
    ("List the first five prime numbers.", ""),
    ("Explain what a hash table is to a ten-year-old.", ""),
    ("Correct the grammar of the sentence.", "She don't like apples."),
    ("Suggest a name for a coffee shop run by cats.", ""),
    ("Convert 100 degrees Fahrenheit to Celsius.", ""),
    ("Describe the color blue to someone who cannot see.", ""),
]


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float

    def bound(self, scale: float) -> float:
        return self.atol + self.rtol * scale


# Per export format. fp32 exports differ from the reference only by summation order; the
# 16-bit ones by rounding every weight once (the exported model is run in fp32, so this
# measures the file, not CPU half-precision arithmetic); q8_0 by 8-bit blocks.
TOLERANCES = {
    "fp32": Tolerance(atol=1e-3, rtol=1e-4),
    "fp16": Tolerance(atol=2e-2, rtol=5e-3),
    "bf16": Tolerance(atol=1e-1, rtol=4e-2),
    "gguf-f16": Tolerance(atol=2e-2, rtol=5e-3),
    "gguf-q8_0": Tolerance(atol=2e-1, rtol=6e-2),
}


@dataclass
class PromptRef:
    """What the reference model produced for one prompt."""

    text: str
    ids: list[int]
    logits: torch.Tensor  # [prompt_len, vocab], fp32
    greedy: list[int] | None = None  # generated ids (None: not a greedy prompt)
    margins: list[float] | None = None  # reference top1-top2 logit gap at each greedy step


def _rows_from_file(path: Path) -> list[tuple[str, str]]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        rows = json.loads(text)
    out = []
    for r in rows if isinstance(rows, list) else []:
        if (
            isinstance(r, dict)
            and isinstance(r.get("instruction"), str)
            and r["instruction"].strip()
        ):
            out.append((r["instruction"], r.get("input") or ""))
    return out


def parity_prompts(
    template: PromptTemplate, run: dict | None, k: int, seed: int = 1234
) -> list[str]:
    """K prompts in the adapter's template: rows of its training data file (as named in
    run.json) when readable, else the built-in list."""
    rows: list[tuple[str, str]] = []
    data_path = ((run or {}).get("data") or {}).get("path")
    if data_path and Path(data_path).is_file():
        try:
            rows = _rows_from_file(Path(data_path))
        except (OSError, ValueError, UnicodeDecodeError):
            rows = []  # unreadable data only costs us realism, never the check
    if len(rows) >= k:
        rows = random.Random(seed).sample(rows, k)
    else:
        rows = (BUILTIN_PROMPTS * (k // len(BUILTIN_PROMPTS) + 1))[:k]
    return [template.build_prompt(instruction, inp) for instruction, inp in rows]


@torch.no_grad()
def greedy(
    model, ids: list[int], max_new_tokens: int, eos_id: int | None
) -> tuple[list[int], list[float]]:
    """Greedy continuation with a KV cache; also returns the top1-top2 margin per step."""
    input_ids = torch.tensor([ids])
    out = model(input_ids=input_ids, use_cache=True)
    tokens: list[int] = []
    margins: list[float] = []
    for _ in range(max_new_tokens):
        logits = out.logits[0, -1].float()
        top2 = torch.topk(logits, 2)
        nxt = int(top2.indices[0])
        tokens.append(nxt)
        margins.append(float(top2.values[0] - top2.values[1]))
        if eos_id is not None and nxt == eos_id:
            break
        out = model(
            input_ids=torch.tensor([[nxt]]), past_key_values=out.past_key_values, use_cache=True
        )
    return tokens, margins


@torch.no_grad()
def prompt_logits(model, ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids])).logits[0].float()


def reference_outputs(
    model, tokenizer, prompts: list[str], n_greedy: int = 3, max_new_tokens: int = 16
) -> list[PromptRef]:
    refs = []
    for i, text in enumerate(prompts):
        ids = tokenizer(text)["input_ids"]
        ref = PromptRef(text=text, ids=ids, logits=prompt_logits(model, ids))
        if i < n_greedy:
            ref.greedy, ref.margins = greedy(model, ids, max_new_tokens, tokenizer.eos_token_id)
        refs.append(ref)
    return refs


def compare(refs: list[PromptRef], model, tol: Tolerance, eos_id: int | None, label: str) -> dict:
    """Run `model` on the reference's prompts; a JSON-able section of the parity report."""
    max_diff, worst_bound = 0.0, 0.0
    agree = total = decisive_agree = decisive_total = 0
    failures: list[str] = []
    greedy_rows = []
    for i, ref in enumerate(refs):
        got = prompt_logits(model, ref.ids)
        if got.shape != ref.logits.shape:
            failures.append(
                f"prompt {i}: logits shape {tuple(got.shape)} != {tuple(ref.logits.shape)}"
            )
            continue
        bound = tol.bound(float(ref.logits.abs().max()))
        diff = float((got - ref.logits).abs().max())
        if diff > max_diff:
            max_diff, worst_bound = diff, bound
        if diff > bound:
            failures.append(f"prompt {i}: max |logit diff| {diff:.4g} > {bound:.4g}")
        top2 = torch.topk(ref.logits, 2, dim=-1)
        same = top2.indices[:, 0] == got.argmax(-1)
        decisive = (top2.values[:, 0] - top2.values[:, 1]) > bound
        agree += int(same.sum())
        total += same.numel()
        decisive_agree += int((same & decisive).sum())
        decisive_total += int(decisive.sum())
        if not bool(same[decisive].all()):
            failures.append(f"prompt {i}: top-1 token differs at a decisive position")
        if ref.greedy is not None:
            tokens, _ = greedy(model, ref.ids, len(ref.greedy), eos_id)
            split = next(
                (s for s, (a, b) in enumerate(zip(ref.greedy, tokens, strict=False)) if a != b),
                None,
            )
            if split is None and len(tokens) != len(ref.greedy):
                split = min(len(tokens), len(ref.greedy))
            status = "identical"
            if split is not None:
                near_tie = split < len(ref.margins) and ref.margins[split] <= bound
                status = (
                    f"near-tie split at step {split}" if near_tie else f"differs from step {split}"
                )
                if not near_tie:
                    failures.append(f"prompt {i}: greedy continuation {status}")
            greedy_rows.append(
                {"prompt": i, "status": status, "reference": ref.greedy, "exported": tokens}
            )
    return {
        "target": label,
        "tolerance": {"atol": tol.atol, "rtol": tol.rtol},
        "max_abs_logit_diff": max_diff,
        "bound_at_worst_prompt": worst_bound,
        "top1_agreement": agree / max(total, 1),
        "top1_agreement_decisive": decisive_agree / max(decisive_total, 1),
        "decisive_positions": decisive_total,
        "positions": total,
        "greedy": greedy_rows,
        "passed": not failures,
        "failures": failures,
    }


def tokenizer_section(refs: list[PromptRef], tokenizer, label: str) -> dict:
    """Does a tokenizer rebuilt from an exported file encode the prompts to the same ids?"""
    bad = [i for i, r in enumerate(refs) if tokenizer(r.text)["input_ids"] != r.ids]
    failures = [f"prompt {i}: token ids differ from the training tokenizer" for i in bad]
    return {"target": label, "prompts_checked": len(refs), "passed": not bad, "failures": failures}


def summary_lines(report: dict) -> list[str]:
    lines = []
    for s in report["checks"]:
        verdict = "PASS" if s["passed"] else "FAIL"
        if "max_abs_logit_diff" in s:
            same = sum(g["status"] == "identical" for g in s["greedy"])
            ties = sum("near-tie" in g["status"] for g in s["greedy"])
            lines.append(
                f"parity {verdict} {s['target']}: max|dlogit| {s['max_abs_logit_diff']:.3g} "
                f"(bound {s['bound_at_worst_prompt']:.3g}), top-1 agreement {s['top1_agreement']:.4f}, "
                f"greedy {same}/{len(s['greedy'])} identical"
                + (f" ({ties} near-tie)" if ties else "")
            )
        else:
            lines.append(
                f"parity {verdict} {s['target']}: token ids identical on {s['prompts_checked']} prompts"
            )
        lines.extend(f"  - {f}" for f in s["failures"][:5])
    for cand in (report.get("merge_base") or {}).get("candidates", []):
        lines.append(
            f"merge_base {cand['merge_base']}: vs the 4-bit adapter max|dlogit| "
            f"{cand['max_abs_logit_diff']:.3g}, top-1 agreement {cand['top1_agreement']:.4f}"
        )
    if report.get("merge_base"):
        lines.append(
            f"merge_base: {report['merge_base']['better']} matches the adapter's outputs better"
        )
    return lines


def check_exports(out: Path, refs: list[PromptRef], info, record: dict) -> list[dict]:
    """Parity sections for every artifact in `out` (transformers folder and GGUF files)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_alpaca.gguf_export import gguf_file_name, load_gguf_model

    eos = info.manifest["special_tokens"]["eos_token_id"]
    sections = []
    if record["transformers"]:
        model = AutoModelForCausalLM.from_pretrained(
            out, dtype=torch.float32, use_safetensors=True
        ).eval()
        sections.append(
            compare(
                refs, model, TOLERANCES[record["dtype"]], eos, f"transformers ({record['dtype']})"
            )
        )
        del model
        sections.append(
            tokenizer_section(refs, AutoTokenizer.from_pretrained(out), "transformers tokenizer")
        )
    for qtype in record["gguf"]:
        model, tokenizer = load_gguf_model(out / gguf_file_name(qtype))
        sections.append(compare(refs, model, TOLERANCES[f"gguf-{qtype}"], eos, f"gguf {qtype}"))
        del model
        tok = tokenizer_section(refs, tokenizer, f"gguf {qtype} tokenizer")
        instruction = "Name a colour."
        try:
            rendered = tokenizer.apply_chat_template(
                [{"role": "user", "content": instruction}],
                tokenize=False,
                add_generation_prompt=True,
            )
        except Exception as e:  # noqa: BLE001 - any template failure is a parity failure
            rendered = f"<error: {e}>"
        if rendered != info.template.build_prompt(instruction):
            tok["passed"] = False
            tok["failures"].append("chat template does not render the adapter's prompt")
        sections.append(tok)
    return sections
