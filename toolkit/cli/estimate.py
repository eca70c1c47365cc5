"""`toolkit-estimate recipe=... [estimate.device_memory_gb=80]`: memory per device for every strategy."""

from __future__ import annotations

import sys

from toolkit.console import console
from toolkit.errors import ToolkitError
from toolkit.training.memory import (
    estimate,
    table,
)


def selected_strategy() -> str:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.choices.get("strategy", "single")


def main() -> None:
    from toolkit.config import compose_config

    args = list(sys.argv[1:])
    device_gb = None
    for arg in list(args):
        if arg.startswith("estimate.device_memory_gb="):
            device_gb = float(arg.split("=", 1)[1])
            args.remove(arg)
    try:
        cfg = compose_config(args)
        rows = estimate(cfg)
    except ToolkitError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    console.print(table(rows, selected_strategy(), device_gb))
