"""Tasks: the batch format, HF Auto class and metrics of each task family (see tasks/base.py)."""
