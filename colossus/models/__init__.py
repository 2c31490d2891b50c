"""Model definitions: grok.py (the Grok-style transformer), moe.py (its mixture-of-experts layer) and
presets.py (named sizes). Import from those modules; this package imports nothing, so reading a
config (which needs only the presets) does not load torch."""
