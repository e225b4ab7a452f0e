"""Sample from a fine-tuned adapter (or a base / merged model): browser UI, one prompt, or a file.

\b
python generate.py --lora_weights ./lora-alpaca                       # sampler on 127.0.0.1:7860
python generate.py --lora_weights ./lora-alpaca --prompt "Tell me about alpacas."
python generate.py --lora_weights ./lora-alpaca --api                 # OpenAI API on 127.0.0.1:7860/v1
python generate.py --input_file prompts.jsonl --output_file out.jsonl  # batches, default base
python generate.py --lora_weights ./lora-alpaca --watermark --moderation keywords  # safeguards
python generate.py --detect_watermark out.jsonl --output_file scores.jsonl  # find the watermark
"""

from lora_alpaca.generate.app import console_main

if __name__ == "__main__":
    console_main()
