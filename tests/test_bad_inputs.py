"""The bad-input corpus: files written here (never downloaded), run through the real CLIs of
finetune.py, generate.py and export_hf_checkpoint.py.

Every case must give exactly one `error: ...` line naming the file / row / flag at fault,
exit code 2, no traceback, and leave nothing on disk: no output folder or file, no dataset
cache, no temp folder. Most cases run in-process through the very click command each script
builds (`cli.run`, as `python finetune.py` does) so the suite pays the torch/transformers
import once; a sample runs as real subprocesses (in parallel) to prove the process-level
behaviour: stderr, exit code, `--debug` tracebacks, and a machine without bitsandbytes.

Cases the lead's tests/test_finetune.py already runs (lora_r 0, batch size not divisible,
unknown target module, cutoff_len too small, template traversal, YAML unknown key, output
folder not empty) are covered there for finetune.py; here they are exercised for the
scripts and variants that test does not reach.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from adapters import make_adapter
from conftest import SCRIPTS, run_cli, run_script
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny import make_tiny_model

GOOD_ROWS = [
    {"instruction": f"Say the number {i}.", "input": "", "output": f"The number is {i}."}
    for i in range(12)
]
TEMPLATE = {
    "description": "mine",
    "prompt_input": "Q: {instruction}\nC: {input}\nA:",
    "prompt_no_input": "Q: {instruction}\nA:",
    "response_split": "A:",
}


@dataclass
class World:
    """Shared, read-only inputs (built once) and the per-case scratch folder."""

    tiny: Path  # a good base model
    other: Path  # a different base model (other architecture -> other fingerprint)
    adapter: Path  # an adapter trained (made) on `tiny`
    good_data: Path
    work: Path  # this case's folder: inputs it writes, and where outputs would go

    def file(self, name: str, content: str | bytes) -> Path:
        p = self.work / name
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content, encoding="utf-8")
        return p

    def rows(self, name: str, rows: list) -> Path:
        return self.file(name, json.dumps(rows))

    @property
    def out(self) -> Path:
        return self.work / "out"


def ft(w: World, *extra) -> list:
    """finetune.py with small settings; `extra` overrides (click keeps the last value)."""
    return [
        "--base_model", w.tiny, "--data", w.good_data, "--output_dir", w.out,
        "--batch_size", "4", "--micro_batch_size", "2", "--val_set_size", "0",
        "--cutoff_len", "96", "--max_steps", "1", "--dtype", "fp32", *extra,
    ]  # fmt: skip


def gen(w: World, *extra) -> list:
    return ["--lora_weights", w.adapter, "--prompt", "Say hi.", "--max_new_tokens", "2", *extra]


def exp(w: World, *extra) -> list:
    return ["--lora_weights", w.adapter, "--output_dir", w.out, "--dtype", "fp32", *extra]


def no_tokenizer_copy(w: World) -> Path:
    d = w.work / "no-tok"
    d.mkdir()
    for f in ("config.json", "model.safetensors", "generation_config.json"):
        if (w.tiny / f).is_file():
            shutil.copy(w.tiny / f, d / f)
    return d


def adapter_copy(w: World, name: str = "ad") -> Path:
    d = w.work / name
    shutil.copytree(w.adapter, d)
    return d


def moved_base_adapter(w: World) -> Path:
    """An adapter whose manifest points at a base model that is not on this machine."""
    d = adapter_copy(w)
    m = json.loads((d / "lora_alpaca.json").read_text())
    m["base_model"]["path"] = m["base_model"]["name"] = str(w.work / "gone-base")
    (d / "lora_alpaca.json").write_text(json.dumps(m))
    return d


def jsonl(rows: list) -> str:
    return "\n".join(json.dumps(r) for r in rows) + "\n"


@dataclass
class Case:
    id: str
    script: str  # finetune | generate | export
    argv: Callable[[World], list]
    needles: tuple[str, ...]  # all must appear in the one error line
    # The data was valid and the mistake is found after it was prepared: its (correct)
    # tokenized cache may stay, as it would for a good run; nothing else may appear.
    cache_ok: bool = False


MB_ROW = {"instruction": "Summarise. " + "The quick brown fox jumps. " * 40_000, "output": "ok"}

CASES = [
    # ---- finetune.py: data files -------------------------------------------------------
    Case("ft-invalid-json", "finetune",
         lambda w: ft(w, "--data", w.file("d.json", '[\n {"instruction": "a", "output": "b"},\n {"instruction": "a" "output": "b"}\n]')),
         ("d.json: invalid JSON at line 3 column",)),
    Case("ft-object-not-list", "finetune",
         lambda w: ft(w, "--data", w.file("d.json", json.dumps({"data": GOOD_ROWS}))),
         ("d.json", "expected a JSON array of rows, got an object", "'data'")),
    Case("ft-jsonl-broken-line", "finetune",
         lambda w: ft(w, "--data", w.file("d.jsonl", jsonl(GOOD_ROWS[:3]) + '{"instruction": "x", "output": \n' + jsonl(GOOD_ROWS[3:]))),
         ("d.jsonl", "1 broken line(s): line 4")),
    Case("ft-wrong-columns", "finetune",
         lambda w: ft(w, "--data", w.rows("d.json", [{"prompt": "a", "completion": "b"}] * 8)),
         ("--instruction_column 'instruction': no such column", "columns present: prompt, completion")),
    Case("ft-non-string-field", "finetune",
         lambda w: ft(w, "--data", w.rows("d.json", GOOD_ROWS + [{"instruction": "a", "output": 42}])),
         ("d.json", "row 13: 'output' is int, expected a string")),
    Case("ft-null-field", "finetune",
         lambda w: ft(w, "--data", w.rows("d.json", [{"instruction": None, "output": "b"}] + GOOD_ROWS)),
         ("d.json", "row 1: 'instruction' is null")),
    Case("ft-empty-instruction", "finetune",
         lambda w: ft(w, "--data", w.rows("d.json", GOOD_ROWS[:5] + [{"instruction": " \t", "output": "b"}] + GOOD_ROWS[5:])),
         ("d.json", "row 6: empty instruction")),
    Case("ft-empty-output-refused", "finetune",
         lambda w: ft(w, "--empty_outputs", "error", "--data", w.rows("d.json", GOOD_ROWS + [{"instruction": "a", "output": ""}])),
         ("d.json", "row 13: empty output", "--empty_outputs skip")),
    Case("ft-all-rows-empty", "finetune",
         lambda w: ft(w, "--data", w.rows("d.json", [{"instruction": f"q{i}", "output": " "} for i in range(6)])),
         ("d.json", "no rows left to train on", "6 empty output")),
    Case("ft-1mb-row-overlength-error", "finetune",
         lambda w: ft(w, "--overlength", "error", "--data", w.file("d.jsonl", jsonl(GOOD_ROWS + [MB_ROW]))),
         ("d.jsonl", "line 13", "--cutoff_len 96")),
    Case("ft-non-utf8", "finetune",
         lambda w: ft(w, "--data", w.file("d.jsonl", jsonl(GOOD_ROWS).encode() + '{"instruction": "caf\xe9", "output": "x"}\n'.encode("latin-1"))),
         ("d.jsonl", "not UTF-8 text: invalid byte 0xe9 at line 13")),
    Case("ft-data-missing-file", "finetune",
         lambda w: ft(w, "--data", w.work / "nope.json"),
         ("--data", "nope.json: no such file or folder")),
    Case("ft-no-data-flag", "finetune",
         lambda w: [a for a in ft(w) if a not in ("--data", w.good_data)],
         ("--data is required",)),
    # ---- finetune.py: templates, base model, flags --------------------------------------
    Case("ft-template-missing-key", "finetune",
         lambda w: ft(w, "--prompt_template_name", w.file("t.json", json.dumps({k: v for k, v in TEMPLATE.items() if k != "response_split"}))),
         ("t.json", "missing key(s) response_split")),
    Case("ft-template-unknown-placeholder", "finetune",
         lambda w: ft(w, "--prompt_template_name", w.file("t.json", json.dumps({**TEMPLATE, "prompt_input": "{instruction} {input} {context}"}))),
         ("t.json", "unknown placeholder(s) {context}")),
    Case("ft-template-traversal-json", "finetune",
         lambda w: ft(w, "--prompt_template_name", "../../../../../../etc/passwd.json"),
         ("--prompt_template_name", "no such template file")),
    Case("ft-base-missing", "finetune",
         lambda w: ft(w, "--base_model", w.work / "no-such-model"),
         ("--base_model: no such folder", "no-such-model")),
    Case("ft-base-without-tokenizer", "finetune",
         lambda w: ft(w, "--base_model", no_tokenizer_copy(w)),
         ("--base_model", "no-tok", "no tokenizer files")),
    Case("ft-gguf-not-gguf", "finetune",
         lambda w: ft(w, "--base_model", w.file("fake.gguf", b"PK\x03\x04 this is a zip, not GGUF" * 10)),
         ("--base_model", "fake.gguf", "GGUF")),
    Case("ft-lora-r-negative", "finetune",
         lambda w: ft(w, "--lora_r", "-4", "--lora_dropout", "1.5"),
         ("--lora_r must be > 0 (got -4)", "--lora_dropout must be in [0, 1) (got 1.5)")),
    Case("ft-batch-larger-than-data", "finetune",
         lambda w: ft(w, "--batch_size", "64", "--micro_batch_size", "4"),
         ("--batch_size 64 is larger than the 12 training rows",), cache_ok=True),
    Case("ft-resume-not-a-checkpoint", "finetune",
         lambda w: ft(w, "--resume_from_checkpoint", w.work),
         ("--resume_from_checkpoint", "not a complete checkpoint folder")),
    Case("ft-init-adapter-wrong-rank", "finetune",
         lambda w: ft(w, "--init_from_adapter", w.adapter, "--lora_r", "8"),
         ("--init_from_adapter", "does not fit this LoRA setup", "its rank is 4", "--lora_r 4")),
    Case("ft-conflict-resume-overwrite", "finetune",
         lambda w: ft(w, "--resume_from_checkpoint", "auto", "--overwrite_output_dir"),
         ("--resume_from_checkpoint and --overwrite_output_dir conflict",)),
    Case("ft-yaml-not-a-mapping", "finetune",
         lambda w: ft(w, "--config", w.file("run.yaml", "- lora_r\n- 8\n")),
         ("--config", "run.yaml", "expected a mapping")),
    Case("ft-yaml-bad-value", "finetune",
         lambda w: ft(w, "--config", w.file("run.yaml", "lora_r: eight\n")),
         ("--config", "run.yaml", "lora_r", "eight")),
    # ---- generate.py ----------------------------------------------------------------------
    Case("gen-template-traversal", "generate",
         lambda w: gen(w, "--prompt_template_name", "../../etc/passwd"),
         ("--prompt_template_name", "../../etc/passwd")),
    Case("gen-base-missing", "generate",
         lambda w: ["--base_model", w.work / "no-such-model", "--prompt", "hi"],
         ("--base_model: no such folder",)),
    Case("gen-base-without-tokenizer", "generate",
         lambda w: ["--base_model", no_tokenizer_copy(w), "--prompt", "hi"],
         ("--base_model", "no tokenizer files")),
    Case("gen-gguf-not-gguf", "generate",
         lambda w: ["--base_model", w.file("fake.gguf", b"\x00" * 64), "--prompt", "hi"],
         ("--base_model", "fake.gguf", "GGUF")),
    Case("gen-adapter-other-base", "generate",
         lambda w: gen(w, "--base_model", w.other),
         ("--base_model", "adapter was trained on", "fingerprint")),
    Case("gen-adapter-no-manifest", "generate",
         lambda w: gen(w, "--lora_weights", adapter_copy(w).joinpath("lora_alpaca.json").unlink() or w.work / "ad"),
         ("--lora_weights", "no lora_alpaca.json")),
    Case("gen-adapter-corrupt-manifest", "generate",
         lambda w: gen(w, "--lora_weights", adapter_copy(w).joinpath("lora_alpaca.json").write_text("{oops") and w.work / "ad"),
         ("--lora_weights", "lora_alpaca.json is not valid JSON")),
    Case("gen-input-file-invalid-json", "generate",
         lambda w: ["--base_model", w.tiny, "--input_file", w.file("p.json", '[{"instruction": "a"},\n {"instruction": }]'), "--output_file", w.out],
         ("--input_file", "p.json", "invalid JSON at line 2")),
    Case("gen-input-file-null-instruction", "generate",
         lambda w: ["--base_model", w.tiny, "--input_file", w.file("p.jsonl", '{"instruction": "a"}\n{"instruction": null}\n'), "--output_file", w.out],
         ("--input_file", "p.jsonl line 2", "'instruction'")),
    Case("gen-output-file-parent-missing", "generate",
         lambda w: ["--base_model", w.tiny, "--input_file", w.file("p.jsonl", '{"instruction": "a"}\n'), "--output_file", w.work / "nodir" / "o.jsonl"],
         ("--output_file", "does not exist")),
    Case("gen-conflict-prompt-input-file", "generate",
         lambda w: gen(w, "--input_file", w.file("p.jsonl", '{"instruction": "a"}\n'), "--output_file", w.out),
         ("--prompt and --input_file",)),
    Case("gen-max-new-tokens-zero", "generate",
         lambda w: gen(w, "--max_new_tokens", "0"),
         ("--max_new_tokens 0: must be >= 1",)),
    Case("gen-yaml-unknown-key", "generate",
         lambda w: gen(w, "--config", w.file("g.yaml", "temprature: 0.5\n")),
         ("--config", "g.yaml", "unknown key(s) temprature")),
    # ---- export_hf_checkpoint.py ------------------------------------------------------------
    Case("exp-base-not-on-machine", "export",
         lambda w: exp(w, "--lora_weights", moved_base_adapter(w)),
         ("--lora_weights", "gone-base", "not on this machine", "--base_model")),
    Case("exp-gguf-not-gguf-base", "export",
         lambda w: exp(w, "--base_model", w.file("fake.gguf", b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)),
         ("--base_model", "fake.gguf")),
    Case("exp-adapter-no-weights", "export",
         lambda w: exp(w, "--lora_weights", adapter_copy(w).joinpath("adapter_model.safetensors").unlink() or w.work / "ad"),
         ("--lora_weights", "no adapter_model.safetensors")),
    Case("exp-output-is-a-file", "export",
         lambda w: exp(w, "--output_dir", w.file("out", "i am a file")),
         ("--output_dir", "exists and is not a folder")),
    Case("exp-parity-prompts-zero", "export",
         lambda w: exp(w, "--parity_prompts", "0"),
         ("--parity_prompts 0: must be at least 1",)),
    Case("exp-yaml-unknown-key", "export",
         lambda w: exp(w, "--config", w.file("e.yaml", "gguf_type: q8_0\n")),
         ("--config", "e.yaml", "unknown key(s) gguf_type")),
    Case("exp-unknown-flag", "export",
         lambda w: exp(w, "--merge", "yes"),
         ("No such option", "--merge")),
]  # fmt: skip


# ---- running the real commands -------------------------------------------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_model) -> dict:
    root = tmp_path_factory.mktemp("corpus-shared")
    data = root / "good.json"
    data.write_text(json.dumps(GOOD_ROWS))
    return {
        "tiny": tiny_model,
        "other": make_tiny_model(root / "other", arch="mistral"),
        "adapter": make_adapter(tiny_model, root / "adapter", r=4),
        "good_data": data,
    }


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every path under `roots` with size and mtime: 'nothing written' means equal snapshots."""
    out = {}
    for root in roots:
        for p in [root, *root.rglob("*")]:
            st = p.lstat()
            out[str(p)] = (st.st_size if p.is_file() else -1, st.st_mtime_ns)
    return out


def check_one_line(code, err: str, needles, where) -> str:
    assert code == 2, (where, code, err[-3000:])
    assert "Traceback" not in err, (where, err[-3000:])
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, (where, err[-3000:])
    line = lines[0]
    for needle in needles:
        assert needle in line, (where, needle, line)
    assert len(line) < 2000, (where, "error line too long", len(line))
    return line


def run_case(case: Case, shared: dict, tmp_path: Path, capsys, monkeypatch) -> World:
    """Run one corpus case in-process (the harness test_data_safety.py reuses): one
    `error:` line with the needles, exit 2, and nothing written (inputs untouched, no
    output, no temp folder, no cache unless `case.cache_ok`). Returns its World."""
    work = tmp_path / "work"
    work.mkdir()
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("LORA_ALPACA_CACHE", str(cache))
    monkeypatch.delenv("LORA_ALPACA_DEBUG", raising=False)
    w = World(shared["tiny"], shared["other"], shared["adapter"], shared["good_data"], work)
    argv = [str(a) for a in case.argv(w)]
    watched = [work, shared["tiny"], shared["adapter"]] + ([] if case.cache_ok else [cache])
    before = snapshot(*watched)
    r = run_cli(case.script, *argv)
    check_one_line(r.returncode, r.stderr, case.needles, case.id)
    # Nothing written: no output, no temp folder, no dataset / GGUF cache, inputs untouched.
    assert snapshot(*watched) == before, case.id
    if case.cache_ok:
        assert {p.name for p in cache.iterdir()} <= {"datasets"}, case.id
    return w


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_corpus_case_one_line_exit_2_nothing_written(case, shared, tmp_path, capsys, monkeypatch):
    w = run_case(case, shared, tmp_path, capsys, monkeypatch)
    assert not w.out.exists() or w.out.is_file()  # exp-output-is-a-file writes `out` itself


def test_corpus_is_large_and_covers_all_three_scripts():
    assert len({c.id for c in CASES}) == len(CASES) >= 25
    assert {c.script for c in CASES} == {"finetune", "generate", "export"}


# ---- as real processes -----------------------------------------------------------------


def no_bitsandbytes_env(tmp_path: Path) -> dict:
    """A Python that behaves like a machine without bitsandbytes: a `bitsandbytes` module
    earlier on sys.path whose import fails exactly like a missing package's does."""
    shim = tmp_path / "no-bnb"
    shim.mkdir()
    (shim / "bitsandbytes.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'bitsandbytes'\", name='bitsandbytes')\n"
    )
    return {"PYTHONPATH": os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")])}


def test_real_processes_one_line_no_traceback_and_debug_shows_it(shared, tmp_path):
    """A sample of the corpus as real processes, in parallel: stderr, exit code, --debug, and
    4-bit on a machine without bitsandbytes (finetune and generate)."""
    by_id = {c.id: c for c in CASES}
    jobs = []  # (label, script, argv, env, needles)
    for cid in ("ft-invalid-json", "gen-adapter-other-base", "exp-base-not-on-machine"):
        c = by_id[cid]
        work = tmp_path / cid
        work.mkdir()
        w = World(shared["tiny"], shared["other"], shared["adapter"], shared["good_data"], work)
        jobs.append((cid, SCRIPTS[c.script], c.argv(w), {}, c.needles))
    nobnb = no_bitsandbytes_env(tmp_path)
    w = World(shared["tiny"], shared["other"], shared["adapter"], shared["good_data"], tmp_path)
    jobs.append(
        (
            "ft-4bit-no-bnb",
            "finetune.py",
            ft(w, "--quantization", "4bit"),
            nobnb,
            ("--quantization 4bit: bitsandbytes is not installed", "--quantization none"),
        )
    )
    jobs.append(
        (
            "gen-4bit-no-bnb",
            "generate.py",
            gen(w, "--quantization", "4bit"),
            nobnb,
            ("--quantization 4bit: bitsandbytes is not installed",),
        )
    )
    debug_argv = ft(w, "--lora_r", "0", "--debug")
    cache = tmp_path / "cache"

    def go(job):
        label, script, argv, env, needles = job
        return job, run_script(
            script,
            *argv,
            env={"LORA_ALPACA_CACHE": str(cache), "OMP_NUM_THREADS": "1", **env},
            timeout=300,
        )

    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(go, jobs))
        debug = run_script(
            "finetune.py", *debug_argv, env={"LORA_ALPACA_CACHE": str(cache)}, timeout=300
        )
    for (label, _, _, _, needles), r in results:
        check_one_line(r.returncode, r.stderr, needles, label)
        assert r.stdout == "", label
    assert not w.out.exists()
    # --debug: the same mistake, now with the traceback that names the raising code.
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert "UsageError: --lora_r must be > 0 (got 0)" in debug.stderr


# ---- property: hostile row contents through the data pipeline ------------------------
# tests/test_data.py already feeds random unicode (surrogates too), nulls, numbers and
# lists (up to 600 characters) to `prepare_data`; this adds what it does not reach: very
# long strings made of control characters, bidi overrides, NULs and template markers, at
# every truncation policy.

HOSTILE = st.sampled_from(
    ["\x00", "\x1b[2J", "\r", "\u202e", "\ufeff", "### Response:", "</s>", "\U0001f999", " ", "é"]
)
LONG_TEXT = st.tuples(
    st.lists(st.one_of(HOSTILE, st.text(max_size=12)), min_size=1, max_size=6),
    st.integers(min_value=1, max_value=4000),
).map(lambda t: "".join(t[0]) * t[1])


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    rows=st.lists(
        st.fixed_dictionaries(
            {"instruction": LONG_TEXT, "output": LONG_TEXT},
            optional={"input": st.one_of(LONG_TEXT, st.none())},
        ),
        min_size=1,
        max_size=3,
    ),
    overlength=st.sampled_from(["truncate", "drop", "error"]),
)
def test_long_hostile_rows_give_valid_examples_or_one_clear_error(
    tmp_path_factory, tiny_model, rows, overlength
):
    from transformers import AutoTokenizer

    from lora_alpaca.data.pipeline import DataOptions, prepare_data
    from lora_alpaca.errors import UsageError
    from lora_alpaca.prompts import load_template

    tok = _TOK.setdefault("tok", AutoTokenizer.from_pretrained(tiny_model))
    d = tmp_path_factory.mktemp("hostile")
    f = d / "rows.jsonl"
    f.write_text(jsonl(rows), encoding="utf-8")
    opts = DataOptions(data=str(f), cutoff_len=48, overlength=overlength, val_set_size=0,
                       empty_outputs="skip")  # fmt: skip
    try:
        got = prepare_data(opts, tok, load_template("alpaca"), cache_dir=d / "cache")
    except UsageError as e:
        msg = str(e)
        assert "\n" not in msg and str(f) in msg and len(msg) < 2000, msg[:300]
        return
    for ex in got.train:
        ids, labels = ex["input_ids"], ex["labels"]
        assert len(ids) == len(labels) <= 48
        assert ids[-1] == labels[-1] == tok.eos_token_id  # EOS always learned, even truncated
        learned = [i for i, y in enumerate(labels) if y != -100]
        assert learned == list(range(learned[0], len(ids)))  # prompt masked, one learned tail
        assert all(labels[i] == ids[i] for i in learned)


_TOK: dict = {}
