"""Generation: the engine (TextGenerator + DecodingSettings), loading a base / adapter / merged
model into it, and the generate command's front ends (one prompt, batch file, gradio page,
probe)."""

from lora_alpaca.generate.engine import (
    FINISH_REASONS,
    MODES,
    DecodingSettings,
    GenerationResult,
    TextGenerator,
)
from lora_alpaca.generate.loading import Loaded, LoadRequest, load_generator

__all__ = [
    "FINISH_REASONS",
    "MODES",
    "DecodingSettings",
    "GenerationResult",
    "LoadRequest",
    "Loaded",
    "TextGenerator",
    "load_generator",
]
