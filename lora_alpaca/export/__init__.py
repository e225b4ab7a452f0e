"""Export: merge an adapter into its base, write a transformers folder and/or a GGUF file,
and check parity with the adapter."""

from lora_alpaca.export.adapter import AdapterInfo, read_adapter
from lora_alpaca.export.app import ExportConfig
from lora_alpaca.export.merge import run_export

__all__ = ["AdapterInfo", "ExportConfig", "read_adapter", "run_export"]
