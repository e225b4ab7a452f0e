"""`--bundle`: one folder that says what it is and how it was measured. Beside the merged
checkpoint and the GGUF files it holds the Modelfiles and a model card built from the
adapter's own records (run.json: data fingerprint and size, training settings, audit,
held-out loss history; loss_curve.png) and, with `--eval_results DIR` (an `evaluate.py
judge` / `human` output folder; nothing links an adapter to its evaluations otherwise),
the win rates.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from lora_alpaca.errors import UsageError
from lora_alpaca.fileio import expand_user

# evaluate.py's result files (lora_alpaca/evaluate/judge.py RESULTS, human.py RESULTS)
JUDGE_RESULTS, HUMAN_RESULTS = "results.json", "human_results.json"
CARD_SETTINGS = (
    "epochs", "num_epochs", "learning_rate", "batch_size", "micro_batch_size", "cutoff_len",
    "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "train_on_inputs",
    "prompt_template_name", "chat_template", "val_set_size", "seed",
)  # fmt: skip


def read_eval_results(eval_dir: str | None) -> dict:
    """{judge: results.json, human: human_results.json} of an evaluate.py output folder."""
    if not eval_dir:
        return {}
    path = expand_user(eval_dir)
    found = {}
    for key, name in (("judge", JUDGE_RESULTS), ("human", HUMAN_RESULTS)):
        if (path / name).is_file():
            try:
                found[key] = json.loads((path / name).read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise UsageError(f"--eval_results {eval_dir}: {name} is not valid JSON") from None
    if not found:
        raise UsageError(
            f"--eval_results {eval_dir}: no {JUDGE_RESULTS} or {HUMAN_RESULTS} there "
            "(the --output_dir of `evaluate.py judge` or `evaluate.py human`)"
        )
    return found


def _pct(v) -> str:
    return "n/a" if v is None else f"{v:.1f}%"


def _eval_section(results: dict) -> list[str]:
    if not results:
        return [
            "Not evaluated in this bundle (export with `--eval_results DIR`, the output folder "
            "of `evaluate.py judge` / `human`)."
        ]
    lines = []
    if "judge" in results:
        j = results["judge"]
        lines += [
            f"Judge {j.get('judge')} on {j.get('dataset')}: {j.get('model')} vs {j.get('reference')}, "
            f"{j.get('n')} pairs.",
            "",
            "| measure | value |",
            "|---|---|",
            f"| win rate | {_pct(j.get('win_rate'))} (SE {j.get('standard_error', 0):.1f}) |",
            f"| discrete win rate | {_pct(j.get('discrete_win_rate'))} |",
            f"| length-controlled win rate | {_pct(j.get('length_controlled_win_rate'))} |",
            "",
        ]
    if "human" in results:
        h = results["human"]
        lines.append(f"Human votes: {h.get('tally')} (win rate {_pct(h.get('win_rate'))}).")
    return lines


def bundle_card(info, record: dict, report: dict, eval_results: dict) -> str:
    """The bundle's README.md."""
    run = info.run or {}
    cfg, data, audit = run.get("config") or {}, run.get("data") or {}, run.get("audit") or {}
    base = info.manifest["base_model"]["name"]
    files = [f"`{n}`" for n in record.get("files", [])]
    lines = [
        "---",
        f"base_model: {json.dumps(base)}",
        "library_name: transformers",
        "tags: [lora-alpaca, lora, merged, gguf]",
        "---",
        f"# {info.dir.resolve().name}",
        "",
        f"A LoRA fine-tune of **{base}**, exported by lora-alpaca's `export_hf_checkpoint.py "
        "--bundle`.",
        "",
        "## Files",
        "",
        "- " + ", ".join(files),
        "- `Modelfile` (merged GGUF) / `Modelfile.adapter` (base GGUF + LoRA GGUF): "
        "`ollama create NAME -f Modelfile`",
        "- llama.cpp: `llama-cli -m base-*.gguf --lora adapter-*.gguf` or `-m model-*.gguf`",
        "",
        "## Training data",
        "",
        f"- file: {data.get('path', 'unknown (no run.json)')}",
        f"- fingerprint: `{data.get('fingerprint', 'unknown')}`",
        f"- rows: {data.get('train_rows')} train / {data.get('val_rows')} held out",
        "- audit: " + (", ".join(f"{k} {v}" for k, v in audit.items()) or "not recorded"),
        "",
        "## Training settings",
        "",
        *(f"- {k}: {cfg[k]}" for k in CARD_SETTINGS if k in cfg),
        f"- steps: {run.get('steps')}, final train loss {run.get('final_train_loss')}, "
        f"final held-out loss {run.get('final_eval_loss')}",
        "",
        "## Held-out loss",
        "",
    ]
    history = run.get("eval_history") or []
    if history:
        lines += ["| step | held-out loss |", "|---|---|"]
        lines += [f"| {h['step']} | {h['eval_loss']:.4f} |" for h in history]
    else:
        lines.append("No held-out loss recorded.")
    if (info.dir / "loss_curve.png").is_file():
        lines += ["", "![loss curve](loss_curve.png)"]
    lines += ["", "## Evaluation", "", *_eval_section(eval_results), "", "## Parity", ""]
    lines += [f"- {line}" for line in report.get("summary", [])]
    lines += [
        "",
        "Details in `parity.json`. Prompt format and stops: `Modelfile` (TEMPLATE, PARAMETER "
        "stop) and the GGUF's `tokenizer.chat_template`. Stop strings: "
        + ", ".join(repr(s) for s in info.stop_strings)
        + ".",
    ]
    return "\n".join(lines) + "\n"


def copy_records(info, out: Path) -> None:
    """The adapter's own loss curve travels with the card that shows it."""
    if (info.dir / "loss_curve.png").is_file():
        shutil.copyfile(info.dir / "loss_curve.png", out / "loss_curve.png")
