"""The package's shape: imports run one way between layers and never in a cycle; one answer per question."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from toolkit.tasks.base import Task
from toolkit.training.strategies import strategy_kind

from .helpers import compose_config

PACKAGE = Path(__file__).resolve().parents[1] / "toolkit"
# Layers from the top; a module may import its own layer's modules and any layer below its own.
LAYERS = [
    {"cli", "__main__"},
    {"config"},
    {"serve"},
    {"run"},
    {"checks"},
    {"training", "compress"},
    {"tasks", "models", "data"},
    {"layout", "files", "errors", "console", "redaction"},
]


def toolkit_imports() -> dict[str, set[str]]:
    """module -> the toolkit modules it imports, at the top or inside functions."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("toolkit"):
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("toolkit")}
        graph[module] = found
    return graph


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    return next((i for i, names in enumerate(LAYERS) if top in names), len(LAYERS))


def test_no_import_cycles():
    graph = toolkit_imports()

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    cyclic = sorted(m for m in graph if reaches(m, m, {m}))
    assert not cyclic, f"modules on an import cycle: {cyclic}"


def test_imports_run_one_way_between_layers():
    upward = [
        f"{module} -> {target}"
        for module, targets in toolkit_imports().items()
        for target in targets
        if "." in module and layer_of(target) < layer_of(module)
    ]
    assert not upward, f"imports against the layer order: {upward}"


@pytest.mark.parametrize(
    "strategy,kind",
    [
        ("single", "single"),
        ("ddp", "ddp"),
        ("deepspeed_zero1", "deepspeed"),
        ("deepspeed_zero3_offload", "deepspeed"),
        ("fsdp2", "fsdp2"),
        ("fsdp2_offload", "fsdp2"),
    ],
)
def test_strategy_kind_is_answered_from_the_class(strategy, kind):
    assert strategy_kind(compose_config(["recipe=quickstart", f"strategy={strategy}"]).strategy) == kind


def test_strategy_kind_of_lightning_names():
    assert strategy_kind(OmegaConf.create({"name": "ddp_spawn"})) == "ddp"
    assert strategy_kind(OmegaConf.create({"name": "auto"})) == "single"
    assert strategy_kind(None) == "single"


@pytest.mark.parametrize("task", sorted(p.stem for p in (PACKAGE.parent / "conf" / "task").glob("*.yaml")))
def test_every_task_keeps_the_task_contract(task):
    made = instantiate(compose_config(["recipe=quickstart", f"task={task}"]).task)
    contract = [*Task.__annotations__, "model_kwargs", "metrics", "update", "baselines"]
    assert not [name for name in contract if not hasattr(made, name)], (
        f"{task} lacks part of the Task contract"
    )
    assert made.mode in ("max", "min")
