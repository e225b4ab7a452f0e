"""Benchmark: audit the real Alpaca data (52,002 rows) with the default SmolLM2 tokenizer.

Prints a small table: tokenizer load, cold `prepare_data` (read + validate + tokenize +
split + audit + write cache) and cached `prepare_data` (fingerprint + load cache), each
the best of --repeat runs in a fresh cache folder. Targets (2-core machine): cold <= 20 s
including tokenization; cached <= 2 s. Not a test: timings depend on the machine.

    python bench/audit_speed.py [--data ../shared/data/alpaca/alpaca_data.json] [--repeat 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/alpaca/alpaca_data.json"))
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--cutoff_len", type=int, default=256)
    args = ap.parse_args()

    # Wall time and CPU time (all threads of this process): on a shared machine wall time
    # is inflated by other jobs, CPU time is not; on an idle 2-core machine the cold wall
    # time is about imports + (tokenization CPU / 2) + the rest.
    t0, c0 = time.perf_counter(), time.process_time()
    from lora_alpaca.data.audit import format_audit
    from lora_alpaca.data.pipeline import DataOptions, prepare_data
    from lora_alpaca.models import load_tokenizer, resolve_base_model
    from lora_alpaca.prompts import load_template

    tokenizer = load_tokenizer(resolve_base_model(None))
    template = load_template("alpaca")
    t_load, c_load = time.perf_counter() - t0, time.process_time() - c0
    # The real data has 28 empty outputs: skip them (the default policy would refuse).
    opts = DataOptions(data=args.data, cutoff_len=args.cutoff_len, empty_outputs="skip")

    cold, cached = [], []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as cache:
            t, c = time.perf_counter(), time.process_time()
            prepared = prepare_data(opts, tokenizer, template, cache_dir=Path(cache))
            cold.append((time.perf_counter() - t, time.process_time() - c))
            t, c = time.perf_counter(), time.process_time()
            again = prepare_data(opts, tokenizer, template, cache_dir=Path(cache))
            report = format_audit(again.audit, color=False)
            cached.append((time.perf_counter() - t, time.process_time() - c))
            assert again.fingerprint == prepared.fingerprint

    print(report)
    print()
    best_cold, best_cached = min(cold), min(cached)
    print(f"{'step':<44}{'wall s':>9}{'cpu s':>9}")
    print(f"{'imports + tokenizer load':<44}{t_load:>9.2f}{c_load:>9.2f}")
    print(
        f"{f'prepare_data cold (best of {args.repeat})':<44}{best_cold[0]:>9.2f}{best_cold[1]:>9.2f}"
    )
    total = (t_load + best_cold[0], c_load + best_cold[1])
    print(f"{'cold incl. imports + tokenizer':<44}{total[0]:>9.2f}{total[1]:>9.2f}")
    print(f"{'prepare_data cached + format_audit':<44}{best_cached[0]:>9.2f}{best_cached[1]:>9.2f}")
    print(f"(load average now: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    print(
        f"rows: {prepared.audit.rows_read:,} read, {len(prepared.train):,} train, "
        f"{len(prepared.val) if prepared.val is not None else 0:,} val"
    )


if __name__ == "__main__":
    main()
