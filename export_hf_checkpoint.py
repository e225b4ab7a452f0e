"""Merge a lora-alpaca adapter into its base model; write a transformers folder and/or a
GGUF file; check that the export says what the adapter said.

    python export_hf_checkpoint.py --lora_weights ./lora-alpaca --output_dir ./merged
    python export_hf_checkpoint.py --lora_weights ./lora-alpaca --output_dir ./merged --gguf q8_0
    python export_hf_checkpoint.py --lora_weights ./lora-alpaca --output_dir ./gguf --gguf f16 --gguf_only
    python export_hf_checkpoint.py --lora_weights ./lora-alpaca --output_dir ./merged --parity_only

The base model and the prompt template come from the adapter's `lora_alpaca.json`. Exit
codes: 0 exported and parity passed, 1 parity failed (report in OUTPUT_DIR/parity.json),
2 bad input (one line on stderr, nothing written).
"""

from lora_alpaca import cli
from lora_alpaca.export.app import ExportConfig, command, main  # noqa: F401 - the script's API

if __name__ == "__main__":
    cli.run(command)
