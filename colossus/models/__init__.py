"""Model definitions: the Grok-style transformer, its mixture-of-experts layer and named presets."""

from colossus.models.grok import ModelOutput, Transformer, build_model
from colossus.models.presets import PRESETS, get_preset

__all__ = ["ModelOutput", "Transformer", "build_model", "PRESETS", "get_preset"]
