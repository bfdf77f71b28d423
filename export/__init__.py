"""The training-stack side: fixtures, presets, LoRA merge and artifact export (needs torch)."""
