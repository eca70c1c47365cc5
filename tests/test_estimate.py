"""toolkit-estimate: exact model-state counts, the sharding arithmetic, and a check against the bytes one
ZeRO-3 rank really held (its checkpoint shard)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForSequenceClassification

from toolkit.config import compose_config, config_dir
from toolkit.models.build import build_model
from toolkit.training import memory
from toolkit.training.memory import GB, SHARDING, estimate, per_device

from .helpers import TINY_BERT, toolkit_train

FULL = ["recipe=quickstart", TINY_BERT, "adapter=none", "trainer.devices=2", "data.batch_size=8"]


def test_model_states_are_exact_counts():
    cfg = compose_config([*FULL, "strategy=deepspeed_zero3"])
    rows = estimate(cfg)
    model = build_model(AutoModelForSequenceClassification, None, dict(cfg.model.config), num_labels=2)
    n = sum(p.numel() for p in model.parameters())
    assert rows["ddp"]["parameters"] == rows["ddp"]["gradients"] == 4 * n  # fp32, full fine-tune
    assert rows["ddp"]["optimizer"] == 8 * n  # AdamW's two fp32 moments
    assert rows["deepspeed_zero1"]["optimizer"] == 4 * n and rows["deepspeed_zero1"]["gradients"] == 4 * n
    assert rows["deepspeed_zero3"]["parameters"] == rows["fsdp2"]["parameters"] == 2 * n
    assert rows["deepspeed_zero3_offload"]["optimizer"] == rows["fsdp2_offload"]["parameters"] == 0
    assert all(row["activations"] > 0 for row in rows.values())


def test_lora_states_count_only_trainable_gradients_and_moments():
    cfg = compose_config(["recipe=quickstart", TINY_BERT, "trainer.devices=2"])
    row = estimate(cfg)["ddp"]
    assert row["gradients"] < row["parameters"] / 10 and row["optimizer"] == 2 * row["gradients"]


def test_sharding_arithmetic():
    from toolkit.training.memory import ModelStates

    states = ModelStates(parameters=800, gradients=800, optimizer=1600)
    assert per_device(states, "deepspeed_zero2", 4) == {"parameters": 800, "gradients": 200, "optimizer": 400}
    assert per_device(states, "deepspeed_zero2_offload", 4)["optimizer"] == 0


def test_estimate_matches_what_a_zero3_rank_holds(tmp_path):
    """ZeRO-3 rank r's optimizer shard file holds its fp32 parameter partition and both Adam moments:
    the estimate's parameters + optimizer per device, to within DeepSpeed's partition padding."""
    run_dir = tmp_path / "run"
    args = [
        *FULL,
        "strategy=deepspeed_zero3",
        "trainer.accelerator=cpu",
        "trainer.max_steps=1",
        "data.max_train_examples=32",
        "data.max_eval_examples=8",
        "logger=none",
        "progress_bar=false",
        "stages=[train]",
        f"hydra.run.dir={run_dir}",
    ]
    result = toolkit_train(args, tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    row = estimate(compose_config([*FULL, "strategy=deepspeed_zero3"]))["deepspeed_zero3"]
    expected = row["parameters"] + row["optimizer"]
    for rank in (0, 1):
        shard = next(
            (run_dir / "checkpoints" / "last.ckpt" / "checkpoint").glob(f"zero_pp_rank_{rank}_*optim*")
        )
        state = torch.load(shard, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        held = sum(t.numel() * t.element_size() for t in tensors(state))
        assert abs(held - expected) / expected < 0.02, (
            f"rank {rank}: held {held / GB:.4f} GiB, estimated {expected / GB:.4f}"
        )


def tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from tensors(value)
    elif isinstance(obj, list | tuple):
        for value in obj:
            yield from tensors(value)


def test_every_strategy_config_has_a_sharding_entry():
    """The estimator, the strategy tests and the benchmark all enumerate strategies from SHARDING."""
    configs = {p.stem for p in (Path(config_dir()) / "strategy").glob("*.yaml")}
    assert configs == set(SHARDING)


# --- every recipe, offline -------------------------------------------------------------------------------

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
# recipes/sweeps/ holds multirun sweeps; each composes (without -m) to the config its jobs run: estimated
RECIPES = sorted(p.relative_to(RECIPES_DIR).with_suffix("").as_posix() for p in RECIPES_DIR.rglob("*.yaml"))
UNKNOWN_MODEL_ERROR = (
    "error: cannot read the config of model 'nobody/no-such-model': it is not a local directory, no "
    "model.architecture describes it, and the hub could not give it; set model.architecture to its HF config "
    "(model_type, hidden_size, num_hidden_layers, ...) or point model.name_or_path at a local directory "
    "holding its config.json"
)


def run_estimate(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """`toolkit-estimate <args>` in this process; returns (exit code, stdout, stderr)."""
    from toolkit.cli import estimate as estimate_cli

    monkeypatch.setattr(sys, "argv", ["toolkit-estimate", *args])
    try:
        estimate_cli.main()
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    out, err = capsys.readouterr()
    return code, out, err


def printed_rows(out: str) -> dict[str, list[float]]:
    """strategy -> (params, grads, optim, activ., total) GiB, read back from the printed table."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in re.split(r"[│|]", line) if c.strip()]
        if cells and cells[0].removesuffix(" *") in SHARDING:
            rows[cells[0].removesuffix(" *")] = [float(c) for c in cells[1:6]]
    return rows


@pytest.fixture(scope="module")
def vit_export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What vision/vit_lora_transfer starts from: a vision/vit_fashion_mnist export. Its config.json is all an
    estimate reads (no weights), so only that is written."""
    from transformers import AutoConfig

    values = OmegaConf.to_container(compose_config(["recipe=vision/vit_fashion_mnist"]).model.config)
    path = tmp_path_factory.mktemp("vit_export")
    AutoConfig.for_model(values.pop("model_type"), **values, num_labels=10).save_pretrained(path)
    return path


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_estimates_offline(recipe, vit_export_dir, monkeypatch, capsys):
    args = [f"recipe={recipe}", "trainer.devices=2"]
    if recipe == "vision/vit_lora_transfer":  # the recipe asks for the run it transfers from
        args.append(f"model.name_or_path={vit_export_dir}")
    code, out, err = run_estimate(args, monkeypatch, capsys)
    assert code == 0, err[-2000:]
    total, trainable = (
        int(n.replace(",", "")) for n in re.findall(r"([\d,]+) (?:parameters|trainable)", out)
    )
    assert total >= trainable > 0
    rows = printed_rows(out)
    assert set(rows) == set(SHARDING)
    assert all(row[4] >= row[3] >= 0 for row in rows.values())  # total includes the activations
    assert rows["single"][4] > 0 and rows["ddp"][0] > 0


def test_llama3_8b_estimates_from_its_yaml_without_a_hub(monkeypatch, capsys):
    """The published Llama-3-8B numbers in conf/model/llama3_8b_instruct.yaml: 8,030,261,248 parameters,
    and LoRA r=16 on the 7 projections of 32 layers (q, o: 4096 -> 4096; k, v: 4096 -> 1024; gate, up, down:
    4096 <-> 14336)."""
    monkeypatch.setattr(memory, "_from_hub", lambda *args: pytest.fail("the hub was asked"))
    args = ["recipe=nlp/llama3_8b_lora_sft", "trainer.devices=8", "trainer.num_nodes=2"]
    code, out, err = run_estimate([*args, "estimate.device_memory_gb=80"], monkeypatch, capsys)
    assert code == 0, err[-2000:]
    lora = 32 * 16 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))
    assert f"{8_030_261_248 + lora:,} parameters, {lora:,} trainable; 16 ranks" in out
    rows = printed_rows(out)
    weights = (8_030_261_248 * 2 + lora * 4) / GB  # bf16 base; PEFT keeps the LoRA weights in fp32
    assert rows["ddp"][0] == pytest.approx(weights, abs=1e-3)  # 15.114 GiB
    assert rows["fsdp2"][0] == pytest.approx(weights / 16, abs=1e-3)  # sharded over 16 ranks
    assert rows["ddp"][1] == pytest.approx(lora * 4 / GB, abs=1e-3)  # gradients: LoRA weights only
    # two fp32 moments; no master copy: PEFT keeps LoRA weights in fp32 on a bf16 base
    assert rows["ddp"][2] == pytest.approx(lora * 8 / GB, abs=1e-3)
    assert "yes" in out  # fits 80 GB


@pytest.mark.parametrize("recipe", ["nlp/smollm2_lora_sft", "quickstart"])
def test_architecture_numbers_match_the_local_assets_config(recipe):
    """model.architecture (used with the hub id) builds the same model as the packaged asset's config.json."""
    hub_id = compose_config([f"recipe={recipe}"]).model.architecture.name_or_path
    assert estimate(compose_config([f"recipe={recipe}"])) == estimate(
        compose_config([f"recipe={recipe}", f"model.name_or_path={hub_id}"])
    )


@pytest.mark.parametrize("recipe", ["quickstart", "nlp/llama3_8b_lora_sft"])
def test_a_hub_model_without_a_config_here_is_one_line(recipe, monkeypatch, capsys):
    """Offline, and the YAML's model.architecture describes another model: nothing to estimate from."""
    args = [f"recipe={recipe}", "model.name_or_path=nobody/no-such-model"]
    code, out, err = run_estimate(args, monkeypatch, capsys)
    assert code == 2
    assert err.strip().splitlines() == [UNKNOWN_MODEL_ERROR]


# --- the memory levers -----------------------------------------------------------------------------------

LLAMA3_8B = 8_030_261_248
LLAMA3_70B = 70_553_706_496  # the published count, from the numbers in conf/model/llama3_70b_instruct.yaml


def test_llama3_8b_qlora_recipe_fits_one_24_gb_device(monkeypatch, capsys):
    """4-bit linear weights (0.516 bytes each with double quantization), the unquantized embeddings and
    head in fp32 (PEFT's k-bit preparation), checkpointed activations at 2,048 tokens: under 24 GiB."""
    code, out, err = run_estimate(
        ["recipe=nlp/llama3_8b_qlora_sft", "estimate.device_memory_gb=24"], monkeypatch, capsys
    )
    assert code == 0, err[-2000:]
    single = printed_rows(out)["single"]
    embeddings = 2 * 128256 * 4096  # input embeddings and the untied head
    norms = 4096 * (2 * 32 + 1)
    four_bit = LLAMA3_8B - embeddings - norms
    lora = 32 * 16 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))
    nf4 = 0.5 + 1 / 64 + 4 / (64 * 256)
    assert single[0] == pytest.approx((four_bit * nf4 + (embeddings + norms + lora) * 4) / GB, abs=1e-3)
    assert single[2] == pytest.approx(lora * (2 + 8 / 256) / GB, abs=1e-3)  # paged 8-bit AdamW
    assert single[4] <= 24 and "does not fit" not in out


def test_llama3_70b_qlora_fsdp2_recipe_fits_two_80_gb_devices(monkeypatch, capsys):
    code, out, err = run_estimate(
        ["recipe=nlp/llama3_70b_qlora_fsdp2", "estimate.device_memory_gb=80"], monkeypatch, capsys
    )
    assert code == 0, err[-2000:]
    assert (
        f"{LLAMA3_70B + 80 * 16 * (2 * (8192 + 8192) + 2 * (8192 + 1024) + 3 * (8192 + 28672)):,} parameters"
        in out
    )
    rows = printed_rows(out)
    assert rows["fsdp2"][4] <= 80 < rows["single"][4] + 80  # fits each of the 2 devices
    # the 4-bit weights stay whole on each rank: FSDP2 halves only the rest
    embeddings = 2 * 128256 * 8192
    four_bit_gb = (LLAMA3_70B - embeddings - 8192 * (2 * 80 + 1)) * (0.5 + 1 / 64 + 4 / (64 * 256)) / GB
    assert rows["fsdp2"][0] == pytest.approx(four_bit_gb + (rows["single"][0] - four_bit_gb) / 2, abs=1e-3)


def test_estimate_names_the_levers_that_make_a_recipe_fit(monkeypatch, capsys):
    args = ["recipe=nlp/llama3_8b_lora_sft", "data.max_length=2048", "data.batch_size=1"]
    code, out, err = run_estimate([*args, "estimate.device_memory_gb=16"], monkeypatch, capsys)
    assert code == 0, err[-2000:]
    assert "ddp does not fit 16 GiB" in out
    lines = [line.split() for line in out.splitlines() if line.startswith("  ")]
    assert [line[0] for line in lines] == [
        "model.activation_checkpointing=true",
        "optim=adamw_8bit",
        "adapter=qlora",
    ]
    totals = [float(line[1]) for line in lines]
    assert totals == sorted(totals, reverse=True) and totals[-1] <= 16 < totals[-2]
    command = next(line for line in out.splitlines() if line.startswith("toolkit-train"))
    assert command.endswith("model.activation_checkpointing=true optim=adamw_8bit adapter=qlora")
    # and what it says is what a rerun with those overrides estimates
    code, out, _ = run_estimate([*command.split()[1:], "estimate.device_memory_gb=16"], monkeypatch, capsys)
    assert printed_rows(out)["ddp"][4] == pytest.approx(totals[-1], abs=0.01)


def test_checkpointing_keeps_one_block_and_the_block_inputs():
    cfg = compose_config(["recipe=nlp/llama3_8b_lora_sft", "data.max_length=2048", "data.batch_size=1"])
    hf_config = memory.model_config(cfg)
    s, h, layers, heads = 2048, 4096, 32, 32
    block = s * h * (34 + 5 * heads * s / h)
    logits = s * 128256 * (2 + 4)
    assert memory.activation_bytes(cfg, hf_config, causal_lm=True) == int(layers * block + logits)
    cfg.model.activation_checkpointing = True
    assert memory.activation_bytes(cfg, hf_config, causal_lm=True) == int(layers * 2 * s * h + block + logits)
