"""The scale strategies on one CUDA device in bf16: `pytest -m gpu` on a GPU machine (skipped without CUDA).

Each strategy trains the tiny pretrained BERT with LoRA for a few steps in bf16-mixed, resumes from its
sharded checkpoint, and exports an adapter that reproduces the merged model; the first loss agrees with the
fp32 CPU run of the same batch to bf16 precision.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from toolkit.checkpoint import read_state_dict

from .test_strategies import train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
GPU = ["trainer.accelerator=gpu", "trainer.devices=1", "data.batch_size=16"]


@pytest.fixture(scope="module")
def cpu_losses(tmp_path_factory, base_dir) -> list[float]:
    return train(tmp_path_factory.mktemp("cpu") / "run", base_dir, "data.batch_size=16")


@pytest.mark.parametrize("strategy", ["single", "deepspeed_zero3", "fsdp2"])
def test_bf16_on_one_gpu_trains_resumes_and_exports(strategy, tmp_path, base_dir, cpu_losses):
    run_dir = tmp_path / "run"
    losses = train(run_dir, base_dir, f"strategy={strategy}", *GPU, "trainer.precision=bf16-mixed")
    assert abs(losses[0] - cpu_losses[0]) < 2e-2, (losses[0], cpu_losses[0])  # bf16 has ~3 significant digits
    assert all(torch.isfinite(torch.tensor(losses)))

    resumed = train(
        run_dir,
        base_dir,
        f"strategy={strategy}",
        *GPU,
        "trainer.precision=bf16-mixed",
        "trainer.max_steps=5",
        f"from_run={run_dir}",
        "resume=last",
    )
    assert len(resumed) >= 5, "the resumed run did not continue from step 3"

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
