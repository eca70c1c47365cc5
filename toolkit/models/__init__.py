"""Models: building HF models, PEFT adapters, and the toolkit's own registered HF model types."""
