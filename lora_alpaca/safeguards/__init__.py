"""The two safeguards of the Alpaca demo: a watermark on every output (with a detector) and
a pluggable content filter on prompts and outputs. Both off by default."""
