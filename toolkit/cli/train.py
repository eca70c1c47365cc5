"""`toolkit-train` / `python -m toolkit`: compose a recipe with Hydra and run its stages.

toolkit-train recipe=quickstart trainer.max_steps=50 logger=csv
toolkit-train recipe=quickstart stages=[evaluate] from_run=runs/quickstart/<timestamp>
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig

from toolkit.config import compose_config, config_dir, expand_recipe_file, load_from_run, register_resolvers
from toolkit.errors import ToolkitError, cause_of
from toolkit.layout import CHECKPOINTS, TRAIN_LOG
from toolkit.run.pipeline import run_pipeline
from toolkit.run.train_log import train_log


@hydra.main(version_base=None, config_path=config_dir(), config_name="train")
def _main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    fresh = not cfg.from_run
    done: list[str] = []
    if cfg.get("private_run_dir"):
        os.umask(0o077)  # everything this run writes is readable by its owner only
        run_dir.chmod(0o700)
    log_file = run_dir / TRAIN_LOG  # a rerun's log goes to its own folder under <from_run>/reruns/
    try:
        with train_log(log_file):
            if not fresh:
                cfg = load_from_run(cfg, list(hydra_cfg.overrides.task))
                run_dir = Path(cfg.from_run)
            run_pipeline(cfg, run_dir, done)
    except Exception as err:
        cause = cause_of(err, ToolkitError)  # resolvers and instantiate wrap what they raise
        if cause is None:
            raise
        started = (run_dir / CHECKPOINTS).exists()  # a failure after checkpoints keeps them (and logs)
        if fresh and not done and not started and hydra_cfg.output_subdir is not None:
            shutil.rmtree(run_dir, ignore_errors=True)  # bad input leaves nothing that looks like a run
        else:  # a later stage's failure (e.g. the quantization gate) keeps what the earlier stages wrote
            with log_file.open("a") as log:
                log.write(f"error: {cause}\n")
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(2)


def one_line(message: str) -> str:
    """Hydra's multi-line composition error as one line: `header: option, option` parts joined by `; `."""
    message = message.split("Config search path:")[0].removeprefix("In 'train': ")
    parts: list[str] = []
    for line in message.splitlines():
        if not line.strip():
            continue
        if line.startswith("\t") and parts:  # an option listed under the previous line
            sep = " " if parts[-1].endswith(":") else ", "
            parts[-1] += sep + line.strip()
        else:
            part = line.strip().rstrip(".")
            parts.append(part[:1].lower() + part[1:] if parts else part)
    return "; ".join(parts)


def composition_error(args: list[str]) -> str | None:
    """Compose the config once up front so that a misspelled group, option or key is one line of error
    instead of Hydra's multi-line report. Flags (--multirun, --cfg, ...) are left to Hydra itself."""
    if any(arg.startswith("-") for arg in args):
        return None
    try:
        compose_config(args)
    except HydraException as err:
        return one_line(str(err))
    return None


def main() -> None:
    register_resolvers()
    try:
        sys.argv[1:] = expand_recipe_file(sys.argv[1:])  # Hydra's own main reads sys.argv
    except ToolkitError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    error = composition_error(sys.argv[1:])
    if error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    _main()


if __name__ == "__main__":
    main()
