"""Shared fixtures: the real config composed with tiny overrides; one tiny trained run per task."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

from tests.helpers import (  # noqa: E402
    TINY_BERT,
    TINY_CLASSIFIER,
    TINY_LLAMA,
    TINY_SFT,
    compose_config,
    save_tiny_pretrained,
)
from toolkit.config import register_resolvers  # noqa: E402
from toolkit.run.pipeline import run_pipeline  # noqa: E402

register_resolvers()


@pytest.fixture(autouse=True)
def _restore_environment():
    """In-process runs leave variables behind (Lightning's LOCAL_RANK/WORLD_SIZE/MASTER_PORT after a DDP
    strategy, W&B directories): a later `toolkit-train` subprocess inheriting LOCAL_RANK would believe it
    is an already launched rank and wait forever for a partner. Each test starts from the same env."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import BertModel

    from toolkit.data.assets import asset_path

    return save_tiny_pretrained(
        tmp_path_factory.mktemp("tiny_bert"), TINY_BERT, BertModel, asset_path("minilm")
    )


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaForCausalLM

    from toolkit.data.assets import asset_path

    path = tmp_path_factory.mktemp("tiny_llama")
    return save_tiny_pretrained(path, TINY_LLAMA, LlamaForCausalLM, asset_path("smollm2_135m_instruct"))


@pytest.fixture(scope="session")
def tiny_vit_rgb_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 32x32 RGB ViT classifier with a 3-class head, saved like a hub checkpoint."""
    from transformers import ViTConfig, ViTForImageClassification

    path = tmp_path_factory.mktemp("tiny_vit_rgb")
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32, num_labels=3,
    )  # fmt: skip
    ViTForImageClassification(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def classifier_run(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> tuple[DictConfig, Path]:
    """One tiny classification run (pretrained tiny base + LoRA) through train, export and evaluate."""
    run_dir = tmp_path_factory.mktemp("classifier_run")
    cfg = compose_config(
        [
            *TINY_CLASSIFIER,
            f"model.name_or_path={tiny_bert_dir}",
            "model.config=null",
            "logger=csv",
            "stages=[train,export,evaluate]",  # later stages are tested on copies of this run
        ]
    )
    assert run_pipeline(cfg, run_dir) == ["train", "export", "evaluate"]
    return cfg, run_dir


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> tuple[DictConfig, Path]:
    """One tiny chat-SFT run (pretrained tiny causal LM + LoRA) through train, export and evaluate."""
    run_dir = tmp_path_factory.mktemp("sft_run")
    cfg = compose_config(
        [
            *TINY_SFT,
            f"model.name_or_path={tiny_llama_dir}",
            "model.config=null",
            "stages=[train,export,evaluate]",
        ]
    )
    assert run_pipeline(cfg, run_dir) == ["train", "export", "evaluate"]
    return cfg, run_dir


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT with dropout off, saved as a pretrained base: runs on any number of ranks see the
    same computation (each rank would draw its own dropout masks)."""
    from transformers import BertModel

    from toolkit.data.assets import asset_path

    no_dropout = TINY_BERT.replace(
        "}", ",hidden_dropout_prob:0.0,attention_probs_dropout_prob:0.0,classifier_dropout:0.0}"
    )
    return save_tiny_pretrained(tmp_path_factory.mktemp("base"), no_dropout, BertModel, asset_path("minilm"))
