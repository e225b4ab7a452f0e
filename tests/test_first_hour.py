"""What a new user sees in the first hour: the scripts' stderr (run in fresh processes,
stderr a pipe as in a log file) carries no library noise, every slow stage says what it
is doing, figures are formatted for people, and the adapter folder's README is a real card."""

from __future__ import annotations

import json
import re

import pytest
from conftest import finetune, run_script
from test_finetune import TINY_FLAGS, write_rows

# Lines a user must never have to wonder about; none is about their own input.
ALARMING = [
    "Failed to load CPU gemm_4bit_forward",
    "kernels-community",
    "FutureWarning",
    "DeprecationWarning",
    "is_gradient_checkpointing",
    "past_key_values",
    "Loading weights",
    "Traceback",
]


def alarming_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if any(a in line for a in ALARMING)]


@pytest.fixture(scope="module")
def tiny_run(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("firsthour")
    data = write_rows(tmp / "rows.json")
    out = tmp / "adapter"
    r = finetune("--base_model", tiny_model, "--data", data, "--output_dir", out, *TINY_FLAGS)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def test_finetune_stderr_is_clean_and_readable(tiny_run):
    out, r = tiny_run
    err = r.stderr
    assert alarming_lines(err) == [], err[-3000:]
    # Not a terminal: no carriage-return bar redraws, one event per line.
    assert "\r" not in err, err[-2000:]
    lines = err.splitlines()
    # Tokenizing says how long it took (48 rows: no opening line, a fraction of a second).
    assert any(
        re.fullmatch(r"tokenized 48 rows in \d+\.\d s \([\d,]+ rows/s\)", x) for x in lines
    ), err[-3000:]
    # Saving the adapter opens and closes with a line of its own.
    save = next(i for i, x in enumerate(lines) if x.startswith("saving the adapter, tokenizer"))
    assert re.fullmatch(r"saved in \d[^ ]* (s|min.*)", lines[save + 1]), lines[save : save + 2]
    # The pre-training evaluation has its own line before it runs, and its result its own.
    start = next(i for i, x in enumerate(lines) if x.startswith("evaluating on 8 validation rows"))
    assert re.fullmatch(
        r"step 0/\d+ \| eval loss \d+\.\d{4} \(before training, \d+ s\)", lines[start + 1]
    )
    # An estimate of the whole run comes after the first evaluation, before the first step.
    est = next(i for i, x in enumerate(lines) if x.startswith("estimate: "))
    assert "--max_steps" in lines[est] and est > start
    assert re.search(r"tokens/s\)", lines[est]), lines[est]
    first = next(i for i, x in enumerate(lines) if re.match(r"step [1-9]\d*/\d+ \| loss ", x))
    assert est < first, lines[est : first + 1]
    done = next(x for x in lines if x.startswith("done: "))
    assert re.search(r"train loss \d\.\d{0,3}\d?(e-\d+)?, held-out loss ", done), done
    assert not re.search(r"\d\.\d{6,}", done), done  # no raw floats
    assert re.search(r"[\d,]+ tokens/s, \d+ (s|min \d\d s) in all\)$", done), done


def test_adapter_folder_card_is_real(tiny_run):
    out, _ = tiny_run
    card = (out / "README.md").read_text()
    run = json.loads((out / "run.json").read_text())
    manifest = json.loads((out / "lora_alpaca.json").read_text())
    assert "More Information Needed" not in card
    assert manifest["base_model"]["name"] in card
    assert run["data"]["path"] in card and "(40 training / 8 held-out rows)" in card
    assert "r=4, alpha=16, dropout=0.0, targets q_proj, v_proj" in card, card
    assert "48 rows read, 48 kept" in card and "% of tokens learned" in card
    evals = run["eval_history"]
    first, last = (f"{evals[i]['eval_loss']:.4g}" for i in (0, -1))
    assert f"{first} before training, {last} after" in card
    assert f"PeftModel.from_pretrained(base, {json.dumps(str(out.resolve()))})" in card
    assert f"python generate.py --lora_weights {out.resolve()}" in card


def test_generate_stderr_is_clean(tiny_run):
    out, _ = tiny_run
    r = run_script("generate.py", "--lora_weights", out, "--prompt", "Repeat the word 3.",
                   "--max_new_tokens", "4")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert alarming_lines(r.stderr) == [], r.stderr[-2000:]


def test_finetune_help_is_sectioned():
    r = run_script("finetune.py", "--help")
    assert r.returncode == 0, r.stderr
    titles = [x[:-1] for x in r.stdout.splitlines() if re.fullmatch(r"[A-Z][A-Za-z ]+:", x)]
    assert titles == ["Model", "Data", "LoRA", "Training", "Checkpoints", "Logging",
                      "Config and debugging"], titles  # fmt: skip
    flat = " ".join(r.stdout.split())
    section, title = {}, None
    for line in r.stdout.splitlines():
        if re.fullmatch(r"[A-Z][A-Za-z ]+:", line):
            title = line[:-1]
        elif title and line.startswith("  -"):
            section[title] = section.get(title, "") + line.split()[0] + " "
    assert "--audit_only" in section["Data"] and "--lora_r" in section["LoRA"]
    assert "--resume_from_checkpoint" in section["Checkpoints"]
    assert "A bare --audit_only means true." in flat
    assert "Off by default, because that code runs with your permissions" in flat
    assert alarming_lines(r.stderr) == [], r.stderr


def test_estimate_is_timed_on_the_runs_own_micro_batches(tiny_model, tmp_path, monkeypatch):
    """The estimate comes a few seconds in, from the run's second micro-batch: the run does one
    training forward pass per micro-batch and none besides (until 2026-12-07 the estimate
    timed two extra, thrown-away passes: 2 of the Quickstart's 19)."""
    from lora_alpaca.train.step import LossModule

    passes = []
    forward = LossModule.forward

    def counted(self, **batch):
        passes.append("train" if self.training else "eval")
        return forward(self, **batch)

    monkeypatch.setattr(LossModule, "forward", counted)
    flags = ["--batch_size", "4", "--micro_batch_size", "4", "--max_steps", "5",
             "--val_set_size", "0", "--lora_r", "4", "--dtype", "fp32", "--cutoff_len", "96"]  # fmt: skip
    r = finetune("--base_model", tiny_model, "--data", write_rows(tmp_path / "rows.json"),
                 "--output_dir", tmp_path / "out", *flags, in_process=True)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert passes == ["train"] * 5, passes  # 5 steps x 1 micro-batch, nothing else
    lines = r.stderr.splitlines()
    est = [x for x in lines if x.startswith("estimate: ")]
    # One micro-batch a step: the second is step 2's, so step 1 is done and 4 remain.
    assert len(est) == 1 and "for the remaining 4 step(s)" in est[0], est
    assert re.search(r"\(~[\d,]+ tokens/s\)", est[0]), est[0]
