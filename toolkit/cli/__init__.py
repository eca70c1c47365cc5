"""The commands (`toolkit-train`, `toolkit-submit`, `toolkit-estimate`): argument handling only."""
