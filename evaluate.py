#!/usr/bin/env python
"""Judge a fine-tune the way Alpaca was judged: blind pairwise comparison by people and by a
judge model, with win rates, in AlpacaEval's file format.

\b
python evaluate.py answers --eval_set user_oriented_instructions.jsonl --lora_weights out/quickstart --output_file adapter.json
python evaluate.py human --model_outputs adapter.json --reference_outputs base.json --output_dir eval/
python evaluate.py judge --model_outputs adapter.json --reference_outputs base.json --output_dir eval/ --api_base http://127.0.0.1:8000/v1 --judge_model NAME

Every subcommand's flags: `python evaluate.py SUBCOMMAND --help`. The work happens in
lora_alpaca/evaluate/ (app.py builds the command).
"""

from lora_alpaca.evaluate.app import console_main

if __name__ == "__main__":
    console_main()
