"""End to end through `generate.py --api`: SmolLM2 base and an adapter on it served by one
live process; `evaluate.py answers` asks both through the endpoint, `evaluate.py judge`
uses the same server's base model as the judge (logprobs), and writes the report."""

from __future__ import annotations

import json

import httpx
import pytest
from adapters import make_adapter
from api_server import ApiServer
from conftest import SELF_INSTRUCT, run_script

N_PROMPTS = 5


@pytest.mark.slow
def test_answers_and_judge_through_generate_api(smollm2, tmp_path):
    adapter = make_adapter(smollm2, tmp_path / "adapter", scale=0.05)
    srv = ApiServer("--lora_weights", adapter, "--max_new_tokens_limit", "64")
    try:
        api = srv.url + "/v1"
        ids = [m["id"] for m in httpx.get(srv.url + "/v1/models", timeout=10).json()["data"]]
        adapter_id = next(i for i in ids if i != "base")
        outputs = {}
        for model_id in ("base", adapter_id):
            out = tmp_path / f"{model_id}.json"
            r = run_script("evaluate.py", "answers", "--eval_set", SELF_INSTRUCT, "--limit", N_PROMPTS,
                           "--api_base", api, "--api_model", model_id, "--max_new_tokens", 24,
                           "--output_file", out, timeout=600)  # fmt: skip
            assert r.returncode == 0, r.stderr[-2000:]
            outputs[model_id] = out
        rows = json.loads(outputs[adapter_id].read_text())
        assert len(rows) == N_PROMPTS and all(r["generator"] == adapter_id for r in rows)
        base_rows = json.loads(outputs["base"].read_text())
        assert [r["instruction"] for r in rows] == [r["instruction"] for r in base_rows]

        out_dir = tmp_path / "eval"
        r = run_script("evaluate.py", "judge", "--model_outputs", outputs[adapter_id],
                       "--reference_outputs", outputs["base"], "--output_dir", out_dir,
                       "--api_base", api, "--judge_model", "base", timeout=600)  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
    finally:
        srv.stop()
    results = json.loads((out_dir / "results.json").read_text())
    assert results["n"] + results["n_unparsed"] == N_PROMPTS
    assert results["n_logprobs"] == results["n"] > 0  # the server returns top_logprobs
    for key in ("win_rate", "discrete_win_rate", "length_controlled_win_rate"):
        assert 0 <= results[key] <= 100
    assert results["standard_error"] >= 0
    assert results["usage"]["calls"] == N_PROMPTS and results["usage"]["prompt_tokens"] > 0
    report = (out_dir / "report.md").read_text()
    assert f"# {adapter_id} vs base" in report and "## Probe of the answers" in report
    assert (out_dir / "win_rates.png").stat().st_size > 1000
