"""Training: the one LightningModule, the Trainer and its loggers, callbacks, strategies, checkpoints."""
