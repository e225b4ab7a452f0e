"""The README Quickstart, as written: a short fine-tune of SmolLM2 on data/quickstart.json
visibly changes the answers on held-out rows, and the sample command prints the new format."""

from __future__ import annotations

import json
import re

import pytest
from conftest import ROOT, readme_quickstart_commands, run_script


def readme_sample_answer() -> str:
    """The answer the README's Quickstart says the sample command prints."""
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"The sample command prints:\n\n```text\n(.*?)\n```", readme)
    assert found, "README Quickstart: no 'The sample command prints:' block"
    return found.group(1)


def exact_matches(answers_file, eval_rows) -> int:
    answers = [json.loads(line) for line in answers_file.read_text().splitlines()]
    assert len(answers) == len(eval_rows)
    return sum(a["response"].strip() == row["output"] for a, row in zip(answers, eval_rows))


@pytest.mark.slow
def test_quickstart_changes_answers(quickstart_run, tmp_path):
    run = json.loads((quickstart_run / "run.json").read_text())
    evals = run["eval_history"]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] * 0.5, evals

    # The sample command of the README, on the adapter it trained.
    gen = readme_quickstart_commands()["generate.py"]
    gen[gen.index("--lora_weights") + 1] = str(quickstart_run)
    r = run_script("generate.py", *gen, "--max_new_tokens", "48", cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    # Exactly the answer the README shows under the command (the base model answers in
    # prose or fenced multi-line JSON; a near-miss like `" Noah"` must fail here).
    assert r.stdout.strip() == readme_sample_answer(), r.stdout
    # Neither command printed anything alarming that is not about the user's input.
    from test_first_hour import alarming_lines

    finetune_err = (quickstart_run.parent / "finetune.stderr").read_text()
    assert alarming_lines(finetune_err) == [] and alarming_lines(r.stderr) == [], (
        finetune_err[-2000:] + r.stderr[-2000:]
    )

    # Held-out rows: exact answers before (base model) and after (adapter).
    eval_file = ROOT / "data" / "quickstart_eval.json"
    eval_rows = json.loads(eval_file.read_text())
    scores = {}
    for name, extra in (("base", []), ("tuned", ["--lora_weights", str(quickstart_run)])):
        out = tmp_path / f"{name}.jsonl"
        r = run_script(
            "generate.py",
            *extra,
            "--input_file",
            eval_file,
            "--output_file",
            out,
            "--max_new_tokens",
            "48",
            "--batch_size",
            "8",
            cwd=ROOT,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        scores[name] = exact_matches(out, eval_rows)
    print("quickstart exact matches on 40 held-out rows:", scores)
    assert scores["base"] <= 4 and scores["tuned"] >= 24, scores
