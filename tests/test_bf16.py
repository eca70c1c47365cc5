"""bf16-mixed training: ZeRO-3 with LoRA on a CPU rank (default suite), and the scale strategies on one CUDA
device (`pytest -m gpu` on a GPU machine, skipped without CUDA).

Each run trains the tiny pretrained BERT with LoRA for a few steps in bf16-mixed, resumes from its
sharded checkpoint, and exports an adapter that reproduces the merged model; the first loss agrees with the
fp32 CPU run of the same batch to bf16 precision.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from toolkit.training.checkpoints import existing_checkpoint, read_state_dict

from .helpers import checkpoint_step, train

BF16 = ["trainer.precision=bf16-mixed", "data.batch_size=16"]
GPU = ["trainer.accelerator=gpu", "trainer.devices=1"]


@pytest.fixture(scope="module")
def fp32_losses(tmp_path_factory, base_dir) -> list[float]:
    return train(tmp_path_factory.mktemp("cpu") / "run", base_dir, "data.batch_size=16")


def check_bf16_run(run_dir, base_dir, fp32_losses, *overrides: str) -> None:
    losses = train(run_dir, base_dir, *overrides, *BF16)
    assert abs(losses[0] - fp32_losses[0]) < 2e-2, (losses[0], fp32_losses[0])  # bf16: ~3 significant digits
    assert all(torch.isfinite(torch.tensor(losses)))

    lora_b = [v for k, v in read_state_dict(run_dir / "checkpoints" / "last.ckpt").items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b), "LoRA weights in the checkpoint are empty"
    inputs = {
        "input_ids": torch.tensor([[101, 2307, 3185, 102]]),
        "attention_mask": torch.ones(1, 4, dtype=int),
    }
    with torch.no_grad():
        merged = AutoModelForSequenceClassification.from_pretrained(run_dir / "export" / "model").eval()
        base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=2)
        adapted = PeftModel.from_pretrained(base, run_dir / "export" / "adapter").eval()
        torch.testing.assert_close(adapted(**inputs).logits, merged(**inputs).logits, atol=1e-4, rtol=1e-3)

    # the sharded checkpoint resumes: 2 more steps (the first run's epoch counts as done)
    more = ["trainer.max_steps=5", "trainer.max_epochs=3", "stages=[train]"]
    train(run_dir, base_dir, *overrides, *BF16, *more, f"from_run={run_dir}", "resume=last")
    assert checkpoint_step(existing_checkpoint(run_dir / "checkpoints" / "last.ckpt")) == 5


def test_bf16_zero3_lora_on_cpu(tmp_path, base_dir, fp32_losses):
    """transformers builds the base inside zero.Init in bf16 while PEFT adds an fp32 adapter: without the
    cast in DeepSpeedStrategy, DeepSpeed's ZeRO-3 optimizer fails on the mixed dtypes."""
    check_bf16_run(tmp_path / "run", base_dir, fp32_losses, "strategy=deepspeed_zero3", "trainer.devices=1")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("strategy", ["single", "deepspeed_zero3", "fsdp2"])
def test_bf16_on_one_gpu_trains_resumes_and_exports(strategy, tmp_path, base_dir, fp32_losses):
    check_bf16_run(tmp_path / "run", base_dir, fp32_losses, f"strategy={strategy}", *GPU)
