"""Values shared by several subpackages, kept in one place."""

from __future__ import annotations

import torch

# The label value torch's cross_entropy and transformers skip: positions not learned.
IGNORE_INDEX = -100

# --dtype / --export_dtype names and the torch dtypes they stand for.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
