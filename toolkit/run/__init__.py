"""A run: its stages and pipeline, evaluation, report, sweeps and Slurm job scripts."""
