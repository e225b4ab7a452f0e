#!/usr/bin/env python
"""Make Alpaca-format instruction data with a teacher model (self-instruct, as Stanford did).

\b
python generate_instruction.py --api_base http://127.0.0.1:8000/v1 --model NAME \\
    --num_instructions_to_generate 500 --output_dir out/selfinstruct
python generate_instruction.py --teacher_model path/to/model --output_dir out/si
python generate_instruction.py ... --resume --num_instructions_to_generate 1000

The work happens in lora_alpaca/selfinstruct/ (prompt, parse, dedupe, teacher, state, report).
"""

from lora_alpaca.cli import build_command, run
from lora_alpaca.selfinstruct.config import SelfInstructConfig
from lora_alpaca.selfinstruct.run import main

HELP = """Generate instruction data from seed tasks with a teacher model (Stanford Alpaca's
self-instruct recipe): requests showing 3 random seed tasks ask for 20 tasks; answers are
parsed, filtered and deduplicated by ROUGE-L. --output_dir receives alpaca_data.json (for
finetune.py --data), regen.json (Stanford's records), state.json (for --resume) and a
report. The API key comes from OPENAI_API_KEY."""

command = build_command(SelfInstructConfig, main, HELP)

if __name__ == "__main__":
    run(command)
