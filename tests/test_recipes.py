"""Every recipe composes and instantiates (data, model, module, trainer) with tiny overrides, so none rots."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from toolkit.config import config_dir
from toolkit.run.build import build_data_and_task, build_module
from toolkit.run.pipeline import run_pipeline
from toolkit.training.trainer import build_trainer

from .helpers import FAST, TINY_BERT, TINY_BERT4REC, TINY_LLAMA, TINY_SASREC, TINY_VIT, compose_config

RECIPES = sorted(
    str(p.relative_to(Path(config_dir()) / "recipe").with_suffix(""))
    for p in (Path(config_dir()) / "recipe").rglob("*.yaml")
)
TINY_DATA = ["data.max_train_examples=16", "data.max_eval_examples=8", "data.batch_size=4"]


def tiny_overrides(recipe: str, vit_dir: Path | None = None, llama_dir: Path | None = None) -> list[str]:
    """A model built from config in place of the recipe's (its real weights may need a hub), small data.
    QLoRA quantizes pretrained weights: a tiny saved Llama stands in for its base."""
    cfg = compose_config([f"recipe={recipe}"])
    task = cfg.task._target_
    if task.endswith("CausalLM"):
        quantized = cfg.adapter.get("quantization") is not None
        return [
            *([f"model.name_or_path={llama_dir}", "model.config=null"] if quantized else [TINY_LLAMA]),
            "model.tokenizer=${asset:smollm2_135m_instruct}",
            "model.dtype=float32",
            "task.max_new_tokens=2",
            *TINY_DATA,
        ]
    if task.endswith("Preference"):  # answers of a few hundred tokens: longer rows than SFT's
        return [TINY_LLAMA, "model.tokenizer=${asset:smollm2_135m_instruct}", "model.dtype=float32",
                *TINY_DATA, "data.max_length=384"]  # fmt: skip
    if task.endswith("NextItemPrediction"):
        model = TINY_SASREC if cfg.model.config.model_type == "sasrec" else TINY_BERT4REC
        return [model, "data.max_users=20", "data.max_length=12", "data.batch_size=4"]
    if task.endswith("ImageClassification"):
        if cfg.model.config is None:  # a pretrained checkpoint: a tiny saved ViT stands in
            return [f"model.name_or_path={vit_dir}", "data.image_size=32", "data.num_channels=3",
                    "data.resize=true", *TINY_DATA]  # fmt: skip
        return ([TINY_VIT] if cfg.model.config.model_type == "vit" else []) + TINY_DATA
    return [TINY_BERT, *TINY_DATA]


def test_the_recipes_are_all_found():
    assert {
        "quickstart",
        "nlp/minilm_full_sentiment",
        "nlp/smollm2_lora_sft",
        "nlp/llama3_8b_lora_sft",
        "nlp/smollm2_chat_sft",
        "nlp/llama3_8b_chat_sft",
        "nlp/smollm2_dpo",
        "nlp/smollm2_orpo",
        "nlp/smollm2_kto",
        "nlp/llama3_8b_dpo",
        "nlp/llama3_8b_qlora_sft",
        "nlp/llama3_70b_qlora_fsdp2",
        "recsys/sasrec_movielens",
        "recsys/bert4rec_movielens",
        "vision/vit_fashion_mnist",
        "vision/mlp_mnist_seed",
        "vision/vit_lora_transfer",
        "vision/vit_base_lora",
    } <= set(RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_instantiates(recipe, tmp_path, tiny_vit_rgb_dir, tiny_llama_dir):
    overrides = tiny_overrides(recipe, tiny_vit_rgb_dir, tiny_llama_dir)
    cfg = compose_config([f"recipe={recipe}", *overrides, *FAST])
    data, task = build_data_and_task(cfg)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    module = build_module(cfg, task, data.pad_token_id, total_steps=2)
    module.configure_model()
    assert module(batch).loss.isfinite()
    assert isinstance(instantiate(cfg.optim)(module.parameters()), torch.optim.Optimizer)
    assert (
        build_trainer(cfg, tmp_path, f"val/{task.primary_metric}", task.mode).max_steps
        == cfg.trainer.max_steps
    )


@pytest.mark.parametrize(
    "recipe,shorter",
    [
        ("nlp/llama3_8b_lora_sft", []),
        ("nlp/llama3_8b_qlora_sft", ["data.max_length=128"]),  # 4-bit base computing in bf16, checkpointed
        ("nlp/llama3_8b_dpo", ["data.max_length=192", "trainer.limit_val_batches=1"]),
        # rows of 4,096 tokens under bf16 autocast take minutes on a CPU: the same packing, shorter rows;
        # every stage the recipe lists (its lm-eval benchmarks need the hub: not here)
        (
            "nlp/llama3_8b_chat_sft",
            [
                "data.max_length=256",
                "data.pack_length=512",
                "stages=[train,export,evaluate,report]",
                "evaluate.lm_eval.tasks=[]",
                "evaluate.max_new_tokens=4",
            ],
        ),
    ],
)
def test_hub_recipe_runs_with_a_tiny_model(tmp_path, recipe, shorter, tiny_llama_dir):
    """The Llama-3-8B recipes as written (DDP strategy, bf16-mixed, LoRA on all projections; the chat one on
    the packed ShareGPT mixture), tiny model."""
    cfg = compose_config(
        [
            f"recipe={recipe}",
            *tiny_overrides(recipe, llama_dir=tiny_llama_dir),
            *FAST,
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
            "trainer.accumulate_grad_batches=1",
            "stages=[train,export]",
            *shorter,
        ]
    )
    assert cfg.trainer.precision == "bf16-mixed"
    assert run_pipeline(cfg, tmp_path) == list(cfg.stages)
    assert (tmp_path / "export" / "adapter" / "adapter_config.json").exists()
    if "report" in cfg.stages:  # the chat recipe: held-out conversations answered in the report
        samples = json.loads((tmp_path / "evaluate" / "samples.json").read_text())
        assert 0 < len(samples) <= cfg.evaluate.samples
        assert "## Held-out prompts" in (tmp_path / "report.md").read_text()


def test_wheel_ships_conf_and_recipes(tmp_path):
    """A plain (non-editable) install must find conf/ and recipes/: they ship inside the package."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(root),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next(tmp_path.glob("toolkit-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "toolkit/conf/train.yaml" in names
    for recipe in RECIPES:
        assert f"toolkit/conf/recipe/{recipe}.yaml" in names
    assert {"toolkit/slurm_files/train.sbatch.j2", "toolkit/slurm_files/local-cluster.sh"} <= names
