"""Sample from a fine-tuned adapter (or a base / merged model): browser UI, one prompt, or a file.

\b
python generate.py --lora_weights ./lora-alpaca                       # sampler on 127.0.0.1:7860
python generate.py --lora_weights ./lora-alpaca --prompt "Tell me about alpacas."
python generate.py --input_file prompts.jsonl --output_file out.jsonl  # batches, default base
"""

from lora_alpaca.generate.app import console_main

if __name__ == "__main__":
    console_main()
