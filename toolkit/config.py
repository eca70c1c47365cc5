"""The one composer: where conf/ is, the resolvers, `compose_config`, and loading an earlier run's config."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf, open_dict

from toolkit.data.assets import register_resolver
from toolkit.errors import ToolkitError
from toolkit.layout import SAVED_CONFIG, new_run_dir


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
    saved = run_dir / SAVED_CONFIG
    if not saved.is_file():
        raise ToolkitError(f"from_run='{cfg.from_run}' is not a run directory (no {SAVED_CONFIG} in it)")
    merged = OmegaConf.load(saved)
    check_targets(merged, saved)
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


def check_targets(cfg: DictConfig, source: Path) -> None:
    """Refuse a saved config naming a toolkit class that no longer exists (a run saved by an older layout),
    with the old path, instead of a traceback from deep inside Hydra's instantiate."""
    for target in toolkit_targets(OmegaConf.to_container(cfg, resolve=False)):
        try:
            get_object(target)
        except ImportError as err:
            raise ToolkitError(
                f"{source} names _target_ '{target}', which this version of the toolkit does not have "
                "(the run was saved by an older version); rerun it from its recipe, or edit that path"
            ) from err


def toolkit_targets(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["_target_"]] if str(node.get("_target_", "")).startswith("toolkit.") else []
        return own + [t for value in node.values() for t in toolkit_targets(value)]
    if isinstance(node, list):
        return [t for value in node for t in toolkit_targets(value)]
    return []


USER_RECIPES = "user"  # the group folder a recipe file outside the catalogue appears under


def expand_recipe_file(overrides: list[str]) -> list[str]:
    """`recipe=<path>.yaml` (a recipe file anywhere, same format as recipes/) -> `recipe=user/<name>`, found
    through a search-path entry that holds a link to the file; other overrides pass through unchanged."""
    out = []
    for arg in overrides:
        key, _, value = arg.partition("=")
        if key != "recipe" or not value.endswith((".yaml", ".yml")):
            out.append(arg)
            continue
        path = Path(value).expanduser()
        if not path.is_file():
            raise ToolkitError(
                f"recipe={value}: no such file; give the path of a recipe .yaml file, "
                "or a catalogue recipe's name (e.g. recipe=quickstart)"
            )
        # beside the recipe: Hydra's parser takes overrides in one run, not on both sides of a flag
        out += [f"recipe={USER_RECIPES}/{path.stem}", f"hydra.searchpath=[file://{recipe_search_dir(path)}]"]
    return out


def recipe_search_dir(recipe: Path) -> Path:
    """A temporary config directory where `recipe/user/<name>.yaml` links to `recipe` (removed at exit;
    ranks that Lightning launches run while this process lives)."""
    root = Path(tempfile.mkdtemp(prefix="toolkit-recipe-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    (root / "recipe" / USER_RECIPES).mkdir(parents=True)
    (root / "recipe" / USER_RECIPES / f"{recipe.stem}.yaml").symlink_to(recipe.resolve())
    return root


def compose_named(config_name: str, overrides: list[str], **kwargs: Any) -> DictConfig:
    """conf/<config_name>.yaml composed with the overrides."""
    GlobalHydra.instance().clear()  # an earlier composition in this process would make initialize refuse
    with initialize_config_dir(config_dir=config_dir(), version_base=None):
        return compose(config_name, overrides=overrides, **kwargs)


def compose_serve_config(overrides: list[str]) -> DictConfig:
    """The config of `toolkit-serve` / `toolkit-chat` (conf/serve.yaml with the overrides)."""
    return compose_named("serve", overrides)


def compose_config(overrides: list[str]) -> DictConfig:
    """The config `toolkit-train <overrides>` would run with, for the other commands (submit, estimate)."""
    register_resolvers()
    cfg = compose_named("train", expand_recipe_file(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # so ${hydra:...} interpolations resolve
    return cfg
