"""The one composer: where conf/ is, the resolvers, `compose_config`, and loading an earlier run's config."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict

from toolkit.data.assets import register_resolver
from toolkit.errors import ToolkitError
from toolkit.layout import new_run_dir


def config_dir() -> str:
    """conf/ of a source checkout (editable install), else the copy shipped inside the package."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "train.yaml").exists():
            return str(candidate)
    raise RuntimeError(f"toolkit's conf/ not found next to {here}")


def register_resolvers() -> None:
    register_resolver()
    OmegaConf.register_new_resolver("new_run_dir", new_run_dir, replace=True, use_cache=True)


def load_from_run(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """The earlier run's saved config with this command's overrides applied on top.

    Each overridden key (or config group) takes its value from this command's composed config, so both
    `stages=[evaluate]` and a group swap such as `logger=csv` carry over.
    """
    run_dir = Path(cfg.from_run)
    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise ToolkitError(f"from_run='{cfg.from_run}' is not a run directory (no .hydra/config.yaml in it)")
    merged = OmegaConf.load(saved)
    with open_dict(merged):  # keys newer than the saved run (e.g. a new stage's group) come from this command
        for key in cfg:
            if key not in merged and key != "hydra":
                merged[key] = cfg[key]
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if key.startswith("hydra") or key == "recipe":
            continue
        with open_dict(merged):
            OmegaConf.update(merged, key, OmegaConf.select(cfg, key), merge=False)
    return merged


def compose_config(overrides: list[str]) -> DictConfig:
    """The config `toolkit-train <overrides>` would run with, for the other commands (submit, estimate)."""
    register_resolvers()
    with initialize_config_dir(config_dir=config_dir(), version_base=None):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # so ${hydra:...} interpolations resolve
    return cfg
