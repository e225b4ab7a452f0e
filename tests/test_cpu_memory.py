"""On CPU the training process keeps the memory a micro-step frees (train/cpu_memory.py): the
next step's activations reuse it instead of page-faulting fresh pages in."""

from __future__ import annotations

import subprocess
import sys

import pytest

# What a micro-step does to the allocator: many activations of a few MiB alive at once
# (160 MiB), all freed after backward, then the same again. Prints the page faults of the
# second round.
STEP = """
import resource, sys, torch
from lora_alpaca.train.cpu_memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def step():
    acts = [torch.ones(1 << 20) for _ in range(40)]  # 40 x 4 MiB
    return sum(float(a[-1]) for a in acts)
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults_of_second_step(mode: str) -> int:
    r = subprocess.run([sys.executable, "-c", STEP, mode], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return int(r.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_activations_are_reused_without_page_faults():
    default = faults_of_second_step("default")
    kept = faults_of_second_step("keep")
    # Positive control: by default the freed 160 MiB went back to the kernel and its
    # ~40,000 pages fault in again; kept, a tenth of them at most do (measured: 4,096).
    assert default > 20_000, default
    assert kept < default // 5, (kept, default)
