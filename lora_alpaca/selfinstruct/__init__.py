"""Self-instruct data generation (`generate_instruction.py`): Stanford Alpaca's recipe for
making instruction data with a teacher model, resumable and deduplicated."""
