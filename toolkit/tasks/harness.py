"""Standard LLM benchmarks through EleutherAI's lm-evaluation-harness (`lm_eval`), on a model in memory.

`evaluate.lm_eval.tasks` names the harness's tasks (`hellaswag`, `arc_easy`, ...; they download their data
from the hub) or tasks of your own: YAML files in `evaluate.lm_eval.include_path`, e.g. multiple choice over a
local jsonl file. Each causal-LM variant of a run (base, fine-tuned, quantized) is scored by the same harness
call; the scores join the variant's metrics as `lm_eval/<task>/<metric>`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from omegaconf import DictConfig

from toolkit.errors import ToolkitError

log = logging.getLogger(__name__)


def harness_tasks(options: DictConfig | None) -> list[str]:
    """The tasks to run, none when lm_eval is not configured."""
    return list(options.get("tasks") or []) if options else []


def task_manager(options: DictConfig) -> Any:
    """The harness's task index. Indexing its few thousand built-in task files takes ~15 s: when every
    named task is one of `include_path`'s own, the built-in ones are not indexed. An unknown name is refused
    here, before any model is loaded."""
    from lm_eval.tasks import TaskManager

    tasks, include = harness_tasks(options), options.get("include_path")
    manager = TaskManager(include_path=include, include_defaults=False) if include else None
    if manager is None or not set(tasks) <= set(manager.all_tasks):
        manager = TaskManager(include_path=include)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f"the harness's tasks or {include}" if include else "the harness's tasks"
        raise ToolkitError(
            f"evaluate.lm_eval.tasks: '{unknown[0]}' is not in {where}; "
            "list them with lm_eval ls tasks; evaluate.lm_eval.include_path adds a folder of task YAMLs"
        )
    return manager


def harness_metrics(model: torch.nn.Module, tokenizer: Any, options: DictConfig, manager: Any) -> dict:
    """`lm_eval.simple_evaluate` on `model` (a transformers causal LM, quantized or not) -> flat metrics."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    device = next(model.parameters()).device
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=options.batch_size, device=str(device))
    out = simple_evaluate(
        model=lm,
        tasks=harness_tasks(options),
        task_manager=manager,
        num_fewshot=options.num_fewshot,
        limit=options.limit,
        apply_chat_template=options.apply_chat_template,
        bootstrap_iters=options.bootstrap_iters,
        random_seed=options.seed,
        numpy_random_seed=options.seed,
        torch_random_seed=options.seed,
        fewshot_random_seed=options.seed,
        log_samples=False,
    )
    return flatten_results(out["results"])


def flatten_results(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """{task: {"acc,none": 0.8, "acc_stderr,none": 0.04, "alias": ...}} -> {"lm_eval/task/acc": 0.8, ...}.
    The filter name is kept only where it is not the default `none` (e.g. `exact_match,strict-match`)."""
    flat = {}
    for task, values in results.items():
        for key, value in values.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or not isinstance(value, (int, float)):
                continue  # alias, name, sample_len; "N/A" stderr without bootstrap
            name = metric if filter_name == "none" else f"{metric}[{filter_name}]"
            flat[f"lm_eval/{task}/{name}"] = float(value)
    return flat
