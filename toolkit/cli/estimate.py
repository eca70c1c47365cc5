"""`toolkit-estimate recipe=... [estimate.device_memory_gb=80]`: memory per device for every strategy."""

from __future__ import annotations

import sys

from toolkit.console import console
from toolkit.errors import ToolkitError
from toolkit.training.memory import GB, estimate, levers, table


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
        strategy = selected_strategy()
        console.print(table(rows, strategy, device_gb))
        if device_gb and rows[strategy]["total"] / GB > device_gb:
            recommend(args, strategy, rows[strategy]["total"], device_gb)
    except ToolkitError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def recommend(args: list[str], strategy: str, total: float, device_gb: float) -> None:
    """The levers that make the selected strategy fit, each added to those before it, with its estimate."""
    from toolkit.config import compose_config

    console.print(
        f"[bold]{strategy} does not fit {device_gb:g} GiB[/] ({total / GB:.2f} GiB estimated); each lever "
        "below is added to the ones before it:"
    )
    chosen: dict[str, str] = {}  # key -> override: a later adapter= replaces an earlier one
    for lever in levers(compose_config(args)):
        trial = {**chosen, lever.split("=", 1)[0]: lever}
        after = estimate(compose_config([*args, *trial.values()]), describe=False)[strategy]["total"]
        if after >= total:
            continue  # the model has nothing this lever saves
        chosen, total = trial, after
        fits = total / GB <= device_gb
        console.print(f"  {lever:<38} {total / GB:8.2f} GiB{'  fits' if fits else ''}")
        if fits:
            console.print(f"toolkit-train {' '.join([*args, *chosen.values()])}")
            return
    console.print(
        f"no lever makes {strategy} fit {device_gb:g} GiB: shard across more devices "
        "(strategy=fsdp2 or deepspeed_zero3 with trainer.devices / trainer.num_nodes)"
    )
