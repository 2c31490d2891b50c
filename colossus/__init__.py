"""Colossus: train, plan and account for Grok-style MoE language models, from a laptop CPU to 100,000 GPUs."""

__version__ = "0.1.0"
