"""evaluate.py judge / answers against a scripted OpenAI-compatible server on loopback:
preference read from top_logprobs (probability-weighted) and from text, in both answer
orders; the cache makes a rerun free; results.json fields; bad input one-liners."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_script
from json_http import server_process

HERE = Path(__file__).resolve().parent
N_PAIRS = 12


@pytest.fixture(scope="module")
def judge_server(tmp_path_factory):
    log = tmp_path_factory.mktemp("judge") / "requests.jsonl"
    log.touch()
    with server_process("scripted_openai_server.py", str(log)) as port:
        yield {"url": f"http://127.0.0.1:{port}/v1", "log": log}


def requests_made(server) -> list[dict]:
    return [json.loads(x) for x in server["log"].read_text().splitlines()]


def write_outputs(folder: Path, good_for_model: list[bool]) -> tuple[Path, Path]:
    """Model and reference files; the scripted judge prefers the answer holding GOOD.
    The reference answers are longer so the length-controlled rate has something to do."""
    model, ref = [], []
    for i, good in enumerate(good_for_model):
        instruction = f"Task {i}: say something useful."
        model.append({"instruction": instruction, "output": ("GOOD " if good else "") + f"m{i}",
                      "generator": "cand", "dataset": "t"})  # fmt: skip
        ref.append({"instruction": instruction, "output": ("" if good else "GOOD ") + f"r{i} " * 5,
                    "generator": "ref", "dataset": "t"})  # fmt: skip
    mp, rp = folder / "model.json", folder / "ref.json"
    mp.write_text(json.dumps(model))
    rp.write_text(json.dumps(ref))
    return mp, rp


def run_judge(server, mp, rp, out, judge_model, *extra):
    r = run_script("evaluate.py", "judge", "--model_outputs", mp, "--reference_outputs", rp,
                   "--output_dir", out, "--api_base", server["url"], "--judge_model", judge_model,
                   *extra, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads((out / "results.json").read_text()), json.loads(
        (out / "judgements.json").read_text()
    )


GOOD = [True, True, False, True, False, True, True, False, True, True, False, True]  # 8 of 12


def test_logprobs_weighted_in_both_orders_and_cache_reruns_free(judge_server, tmp_path):
    mp, rp = write_outputs(tmp_path, GOOD)
    out = tmp_path / "eval"
    before = len(requests_made(judge_server))
    results, rows = run_judge(
        judge_server, mp, rp, out, "logprob-judge", "--price_input_per_million", "2"
    )
    calls = requests_made(judge_server)[before:]
    assert len(calls) == N_PAIRS and all(c["logprobs"] and c["top_logprobs"] for c in calls)
    # The model's answer was shown as (A) on some pairs and as (B) on others.
    assert {r["model_as"] for r in rows} == {"A", "B"}
    p_good = 0.80 / 0.95
    for r, good in zip(rows, GOOD, strict=True):
        assert r["method"] == "logprobs"
        assert r["p_model"] == pytest.approx(p_good if good else 1 - p_good)
    expected = (8 * p_good + 4 * (1 - p_good)) / 12
    assert results["win_rate"] == pytest.approx(100 * expected)
    assert results["discrete_win_rate"] == pytest.approx(100 * 8 / 12)
    assert 0 < results["standard_error"] < 20
    assert results["length_controlled_win_rate"] is not None
    assert results["usage"]["calls"] == N_PAIRS and results["usage"]["prompt_tokens"] > 0
    assert results["usage"]["cost"] == pytest.approx(results["usage"]["prompt_tokens"] * 2 / 1e6)
    assert (out / "report.md").is_file() and (out / "win_rates.png").stat().st_size > 1000

    # Rerun: every judgement comes from the cache, no request reaches the server.
    again, _ = run_judge(judge_server, mp, rp, out, "logprob-judge")
    assert len(requests_made(judge_server)) == before + N_PAIRS
    assert again["usage"] == {**results["usage"], "calls": 0, "cached": N_PAIRS,
                              "prompt_tokens": 0, "completion_tokens": 0, "cost": 0.0}  # fmt: skip
    assert again["win_rate"] == results["win_rate"]


@pytest.mark.parametrize("judge_model", ["text-judge", "strict-judge"])
def test_text_verdicts_in_both_orders(judge_server, tmp_path, judge_model):
    mp, rp = write_outputs(tmp_path, GOOD)
    results, rows = run_judge(judge_server, mp, rp, tmp_path / "eval", judge_model)
    assert {r["model_as"] for r in rows} == {"A", "B"}
    assert [r["p_model"] for r in rows] == [1.0 if g else 0.0 for g in GOOD]
    assert {r["method"] for r in rows} == {"text"}
    assert results["win_rate"] == pytest.approx(100 * 8 / 12)


def test_unreadable_verdicts_are_counted_not_guessed(judge_server, tmp_path):
    mp, rp = write_outputs(tmp_path, GOOD[:4])
    results, rows = run_judge(judge_server, mp, rp, tmp_path / "eval", "confused-judge")
    assert results["n_unparsed"] == 4 and results["n"] == 0 and results["win_rate"] is None


def test_human_agreement_and_export_preferences(judge_server, tmp_path):
    from lora_alpaca.evaluate.human import Session
    from lora_alpaca.evaluate.sets import pair_outputs, read_model_outputs

    mp, rp = write_outputs(tmp_path, GOOD[:4])
    out = tmp_path / "eval"
    out.mkdir()
    # A rater who agrees with the judge on pairs 0 and 1, disagrees on 2, ties 3.
    pairs = pair_outputs(read_model_outputs(str(mp), "m"), read_model_outputs(str(rp), "r"))
    session = Session(out, pairs, "cand", "ref", seed=0)
    for i, agree in enumerate([True, True, False]):
        model_wins = GOOD[i] == agree
        session.vote(session.state["model_as"][i] if model_wins else
                     {"A": "B", "B": "A"}[session.state["model_as"][i]])  # fmt: skip
    session.vote("tie")
    prefs = tmp_path / "prefs.jsonl"
    results, _ = run_judge(judge_server, mp, rp, out, "text-judge", "--export_preferences", prefs)
    assert results["human_agreement"] == {"pairs": 3, "agreement": pytest.approx(2 / 3)}
    assert "human tally" in (out / "report.md").read_text()
    rows = [json.loads(x) for x in prefs.read_text().splitlines()]
    assert [r["source"] for r in rows] == ["human"] * 3 + ["judge"] * 4
    rows = rows[3:]
    for row, good in zip(rows, GOOD[:4], strict=True):
        assert set(row) >= {"prompt", "chosen", "rejected"}
        assert row["chosen"].startswith("GOOD") and not row["rejected"].startswith("GOOD")
        assert row["chosen_generator"] == ("cand" if good else "ref")


def test_answers_from_an_endpoint(judge_server, tmp_path):
    rows = [{"instruction": "Name a colour."}, {"instruction": "Add the numbers.", "input": "2 3"}]
    src = tmp_path / "set.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "model_outputs.json"
    r = run_script("evaluate.py", "answers", "--eval_set", src, "--api_base", judge_server["url"],
                   "--api_model", "cand-model", "--output_file", out, "--concurrency", 2,
                   timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    got = json.loads(out.read_text())
    assert [g["instruction"] for g in got] == ["Name a colour.", "Add the numbers.\n\n2 3"]
    assert (
        got[1]["output"] == "GOOD answer: Add the numbers. 2"
        and got[0]["generator"] == "cand-model"
    )
    assert {g["dataset"] for g in got} == {"set"} and got[0]["finish_reason"] == "eos"
    # Never overwritten without --overwrite.
    r = run_script("evaluate.py", "answers", "--eval_set", src, "--api_base", judge_server["url"],
                   "--api_model", "cand-model", "--output_file", out)  # fmt: skip
    assert r.returncode == 2 and "--overwrite" in r.stderr
    # ... and the eval set itself is never the output, even with --overwrite (the endpoint is
    # live, so only this check stands between the user's prompts and the answers).
    before = src.read_bytes()
    r = run_script("evaluate.py", "answers", "--eval_set", src, "--api_base", judge_server["url"],
                   "--api_model", "cand-model", "--output_file", src, "--overwrite")  # fmt: skip
    assert r.returncode == 2 and "same file as --eval_set" in r.stderr, r.stderr
    assert src.read_bytes() == before


def _bad(tmp_path, *args):
    r = run_script("evaluate.py", *map(str, args), timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr
    return lines[0]


def test_bad_inputs_are_one_line(tmp_path, judge_server):
    mp, rp = write_outputs(tmp_path, GOOD[:3])
    out = tmp_path / "never"
    url = judge_server["url"]
    common = ["--output_dir", out, "--api_base", url, "--judge_model", "text-judge"]
    assert "no such file" in _bad(tmp_path, "judge", "--model_outputs", tmp_path / "nope.json",
                                  "--reference_outputs", rp, *common)  # fmt: skip
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    assert "invalid JSON" in _bad(
        tmp_path, "judge", "--model_outputs", broken, "--reference_outputs", rp, *common
    )
    no_output = tmp_path / "no_output.json"
    no_output.write_text(json.dumps([{"instruction": "x"}]))
    assert "'output'" in _bad(
        tmp_path, "judge", "--model_outputs", no_output, "--reference_outputs", rp, *common
    )
    other = tmp_path / "other.json"
    other.write_text(json.dumps([{"instruction": "other", "output": "o", "generator": "ref"}]))
    assert "no answer for --model_outputs row 0" in _bad(
        tmp_path, "judge", "--model_outputs", mp, "--reference_outputs", other, *common
    )
    assert "different 'generator'" in _bad(
        tmp_path, "judge", "--model_outputs", mp, "--reference_outputs", mp, *common
    )
    assert "give a judge" in _bad(
        tmp_path, "judge", "--model_outputs", mp, "--reference_outputs", rp, "--output_dir", out
    )
    taken = tmp_path / "taken.jsonl"
    taken.write_text("")
    assert "exists" in _bad(tmp_path, "judge", "--model_outputs", mp, "--reference_outputs", rp, *common,
                            "--export_preferences", taken)  # fmt: skip
    assert "cannot connect" in _bad(tmp_path, "judge", "--model_outputs", mp, "--reference_outputs", rp,
                                    "--output_dir", out, "--api_base", "http://127.0.0.1:9/v1", "--judge_model", "j")  # fmt: skip
    bad_row = tmp_path / "set.jsonl"
    bad_row.write_text('{"instruction": "ok"}\n{"instruction": ""}\n')
    assert "line 2" in _bad(tmp_path, "answers", "--eval_set", bad_row, "--output_file", tmp_path / "a.json",
                            "--api_base", url, "--api_model", "m")  # fmt: skip
    assert "not available with --api_base" in _bad(tmp_path, "answers", "--eval_set", bad_row,
        "--output_file", tmp_path / "a.json", "--api_base", url, "--api_model", "m",
        "--reference_outputs", rp)  # fmt: skip
    assert "--server_port" in _bad(tmp_path, "human", "--model_outputs", mp, "--reference_outputs", rp,
                                   "--output_dir", out, "--server_port", "70000")  # fmt: skip
    assert taken.read_text() == "" and not (tmp_path / "a.json").exists()
    assert not (out / "results.json").exists()
