"""What ROUGE-L dedupe costs at Alpaca's scale: every one of the 52,002 instructions of
alpaca_data.json checked, in order, against the seed tasks and all instructions kept before
it (as generate_instruction.py does), with lora_alpaca's bit-parallel scorer; and Stanford's
way (rouge_score._score_lcs per pre-tokenized pair) timed on a sample of queries against
the same index, extrapolated to the same number of pairs. Both give equal scores (checked).

    python bench/selfinstruct_dedupe.py [--limit N] [--baseline_queries 20]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

from rouge_score import rouge_scorer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's lora_alpaca
from lora_alpaca.selfinstruct.dedupe import RougeIndex, rouge_tokens  # noqa: E402
from lora_alpaca.selfinstruct.seeds import load_seed_tasks  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca" / "alpaca_data.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--baseline_queries", type=int, default=20)
    args = ap.parse_args()
    instructions = [r["instruction"] for r in json.loads(Path(args.data).read_text())]
    if args.limit:
        instructions = instructions[: args.limit]
    index = RougeIndex()
    for task in load_seed_tasks(str(DATA.parents[1] / "self_instruct" / "seed_tasks.jsonl"), 3):
        index.add(task["instruction"])
    pairs = kept = 0
    t0 = time.perf_counter()
    for n, text in enumerate(instructions, start=1):
        pairs += len(index)
        sim = index.similarity(text)
        if sim.max_score <= 0.7:
            index.add(text)
            kept += 1
        if n % 10000 == 0:
            print(f"  {n} checked, {kept} kept, {time.perf_counter() - t0:.0f} s", flush=True)
    ours = time.perf_counter() - t0
    print(f"lora_alpaca: {len(instructions)} checked, {kept} kept, {pairs:,} pairs in {ours:.1f} s")

    # Stanford's inner loop on the final index (pre-tokenized, one process)
    all_tokens = [rouge_tokens(t) for t in index.texts]
    queries = random.Random(0).sample(instructions, args.baseline_queries)
    t0 = time.perf_counter()
    refs = []
    for q in queries:
        q_tokens = rouge_tokens(q)
        refs.append([rouge_scorer._score_lcs(q_tokens, t).fmeasure for t in all_tokens])
    per_pair = (time.perf_counter() - t0) / (len(queries) * len(all_tokens))
    for q, ref in zip(queries, refs):  # every timed query, not only the last one
        assert list(index.scores(q)) == ref, f"scores differ from rouge-score for {q!r}"
    print(
        f"Stanford-style _score_lcs: {per_pair * 1e6:.2f} us/pair -> {per_pair * pairs / 3600:.2f} h "
        f"for the same {pairs:,} pairs in one process (x{per_pair * pairs / ours:.0f})"
    )
    print(
        f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}"
    )


if __name__ == "__main__":
    main()
