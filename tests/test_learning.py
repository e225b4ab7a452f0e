"""The claim that matters: finetune.py makes the real SmolLM2-135M better at Alpaca data.

~40 optimizer steps on real rows from ../shared/data/alpaca/alpaca_data.json must lower
the held-out loss on the responses (eval rows never trained on) clearly below step 0.
"""

from __future__ import annotations

import json

import pytest
from conftest import run_script


@pytest.mark.slow
def test_smollm2_learns_alpaca_responses(smollm2, alpaca_json, tmp_path):
    rows = json.loads(alpaca_json.read_text())[:400]
    data = tmp_path / "alpaca_400.json"
    data.write_text(json.dumps(rows))
    out = tmp_path / "run"
    r = run_script(
        "finetune.py",
        "--data",
        data,
        "--output_dir",
        out,
        "--max_steps",
        "40",
        "--batch_size",
        "8",
        "--micro_batch_size",
        "4",
        "--learning_rate",
        "1e-3",
        "--warmup_steps",
        "4",
        "--cutoff_len",
        "192",
        "--val_set_size",
        "48",
        "--lora_r",
        "16",
        "--lora_alpha",
        "32",
        "--lora_target_modules",
        "all-linear",
        "--eval_steps",
        "40",
        "--save_steps",
        "0",
        "--logging_steps",
        "5",
        timeout=1500,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    evals = run["eval_history"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 40
    before, after = evals[0]["eval_loss"], evals[-1]["eval_loss"]
    # Response-only loss on held-out rows; measured here: ~1.95 -> ~1.6.
    assert after < before - 0.15, (before, after)
    assert run["data"]["val_rows"] == 48 and run["steps"] == 40
