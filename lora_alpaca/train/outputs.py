"""What a finished run leaves in --output_dir: adapter, manifest, run.json, loss curve."""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
from pathlib import Path

from lora_alpaca.fileio import write_json_atomic
from lora_alpaca.runfolder import MANIFEST_NAME, write_manifest
from lora_alpaca.runlock import LOCK_NAME
from lora_alpaca.train.adapter_card import adapter_card


def library_versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in (
        "torch",
        "transformers",
        "peft",
        "bitsandbytes",
        "datasets",
        "accelerate",
        "lora-alpaca",
    ):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def plot_loss_curve(history: list[dict], eval_history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if history:
        ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train", lw=1.2)
    if eval_history:
        ax.plot(
            [h["step"] for h in eval_history],
            [h["eval_loss"] for h in eval_history],
            "o-",
            label="eval",
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per learned token")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_final_outputs(
    output_dir: Path,
    peft_model,
    tokenizer,
    manifest: dict,
    run_info: dict,
    history: list[dict],
    eval_history: list[dict],
    state_dict: dict | None = None,
) -> None:
    """`state_dict`: the whole trainable weights when the model is sharded (FSDP).

    Write everything into a temp folder, then move it in; the manifest goes last, so
    its presence means the output folder is complete."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in output_dir.glob(".tmp-final-*"):  # left by a run killed while writing these
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-final-", dir=output_dir))
    try:
        if state_dict is None:
            peft_model.save_pretrained(tmp, safe_serialization=True)
        else:
            peft_model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        # Our own card, not peft's template of "[More Information Needed]".
        (tmp / "README.md").write_text(adapter_card(output_dir, manifest, run_info))
        plot_loss_curve(history, eval_history, tmp / "loss_curve.png")
        write_json_atomic(tmp / "run.json", run_info)
        for item in tmp.iterdir():
            dest = output_dir / item.name
            if dest.is_dir():
                shutil.rmtree(dest)
            os.replace(item, dest)
            if dest.is_file():
                os.chmod(dest, 0o644)
        write_manifest(output_dir, manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def output_dir_problem(output_dir: Path) -> str | None:
    """Why this --output_dir cannot take a fresh run, or None."""
    d = Path(output_dir)
    if d.exists() and not d.is_dir():
        return f"--output_dir {d}: exists and is not a folder"
    if d.is_dir() and any(p.name != LOCK_NAME for p in d.iterdir()):
        finished = (d / MANIFEST_NAME).is_file()
        hint = (
            "it holds a finished run"
            if finished
            else "it holds an unfinished run; add --resume_from_checkpoint auto to continue it"
        )
        return f"--output_dir {d}: exists and is not empty ({hint}); choose another folder or pass --overwrite_output_dir"
    return None
