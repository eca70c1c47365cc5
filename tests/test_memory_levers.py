"""The memory levers: QLoRA's 4-bit base, activation checkpointing, the attention implementation and
bitsandbytes' 8-bit and paged optimizers, each proven to compute what the plain run computes."""

from __future__ import annotations

from pathlib import Path

import bitsandbytes as bnb
import lightning as L
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from toolkit.run.build import build_data_and_task, build_module
from toolkit.run.pipeline import run_pipeline
from toolkit.run.report import adapter_summary
from toolkit.tasks.base import model_inputs
from toolkit.training.checkpoints import read_state_dict
from toolkit.training.memory import estimate, held_states

from .helpers import TINY_SFT, compose_config, kill_after_a_checkpoint, toolkit_train, train


def sft_cfg(base: Path, *overrides: str):
    return compose_config([*TINY_SFT, f"model.name_or_path={base}", "model.config=null", *overrides])


def built_module(cfg, **kwargs):
    data, task = build_data_and_task(cfg)
    data.setup("fit")
    module = build_module(cfg, task, data.pad_token_id, **kwargs)
    return module, data


def lora_grads(module, batch) -> tuple[float, dict[str, torch.Tensor]]:
    module.model.zero_grad()
    torch.manual_seed(0)  # the same LoRA dropout masks for both runs
    loss = module.model(**model_inputs(batch)).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.model.named_parameters() if p.requires_grad}
    return loss.item(), grads


class LoraGradients(L.Callback):
    """The LoRA parameters that have no gradient at each optimizer step."""

    def __init__(self) -> None:
        self.without_grad: list[list[str]] = []

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        names = [n for n, p in module.model.named_parameters() if p.requires_grad and p.grad is None]
        self.without_grad.append(names)


def test_qlora_base_is_4bit_only_lora_trains_and_grads_survive_validation(tiny_llama_dir):
    """Validation between steps runs the 4-bit layers in eval mode without grad, where bitsandbytes would
    repack them (on AVX512-BF16 CPUs) into a layout with no backward: every step must still reach every
    LoRA weight."""
    torch.manual_seed(0)
    module, data = built_module(sft_cfg(tiny_llama_dir, "adapter=qlora"))
    module.configure_model()
    base = module.model.get_base_model()
    four_bit = {n: p.data.clone() for n, p in base.named_parameters() if isinstance(p, bnb.nn.Params4bit)}
    linears = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit and len(linears) == 2 * 7  # every projection of both blocks; the tied head stays
    assert all(m.quant_state.quant_type == "nf4" and m.quant_state.nested for m in linears)
    assert not any(p.requires_grad for p in base.parameters() if not is_lora_name_of(base, p))
    lora_before = {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}

    spy = LoraGradients()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        val_check_interval=1,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[spy],
    )
    trainer.fit(module, datamodule=data)
    assert spy.without_grad == [[], [], []]
    after = dict(module.model.get_base_model().named_parameters())
    assert all(torch.equal(after[n].data, packed) for n, packed in four_bit.items())
    changed = [n for n, p in module.model.named_parameters() if p.requires_grad and "lora_B" in n]
    assert changed and all(
        not torch.equal(dict(module.model.named_parameters())[n], lora_before[n]) for n in changed
    )


def is_lora_name_of(model, param) -> bool:
    return any(p is param and "lora_" in n for n, p in model.named_parameters())


def test_qlora_exports_an_adapter_for_the_full_precision_base(tmp_path, tiny_llama_dir):
    """The adapter applies to the unquantized base and the merged model equals it there; nothing 4-bit is
    exported."""
    cfg = sft_cfg(tiny_llama_dir, "adapter=qlora", "stages=[train,export]")
    run_pipeline(cfg, tmp_path)
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert saved and all("lora_" in k for k in saved)  # the base is rebuilt from its source

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "model").eval()
    assert getattr(merged.config, "quantization_config", None) is None
    assert merged.dtype == torch.float32
    assert all(type(m) is torch.nn.Linear for n, m in merged.named_modules() if n.endswith("q_proj"))
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    adapted = PeftModel.from_pretrained(base, tmp_path / "export" / "adapter").eval()
    ids = torch.tensor([[1, 504, 2126, 314, 2], [1, 9226, 1023, 2, 2]])
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=ids).logits, merged(input_ids=ids).logits)
        plain = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()(input_ids=ids).logits
    assert (merged(input_ids=ids).logits - plain).abs().max() > 1e-4  # the adapter did change the model


@pytest.mark.parametrize("adapter", ["lora", "qlora"])
def test_activation_checkpointing_recomputes_and_keeps_loss_and_grads(tiny_llama_dir, adapter):
    cfg = sft_cfg(tiny_llama_dir, f"adapter={adapter}")
    modules = {}
    for checkpointing in (False, True):
        cfg.model.activation_checkpointing = checkpointing
        torch.manual_seed(0)
        module, data = built_module(cfg)
        module.configure_model()
        modules[checkpointing] = module
    batch = next(iter(data.train_dataloader()))
    calls = {False: 0, True: 0}
    for checkpointing, module in modules.items():
        mlp = module.model.get_base_model().model.layers[0].mlp
        forward = mlp.forward

        def counted(*args, _forward=forward, _key=checkpointing, **kwargs):
            calls[_key] += 1
            return _forward(*args, **kwargs)

        mlp.forward = counted
    (loss, grads), (loss_ac, grads_ac) = (lora_grads(modules[k], batch) for k in (False, True))
    assert modules[True].model.get_base_model().is_activation_checkpointing
    assert calls == {False: 1, True: 2}  # the block's forward runs again in backward
    assert loss_ac == pytest.approx(loss, abs=1e-6)
    assert grads.keys() == grads_ac.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads_ac[name], grads[name], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_activation_checkpointing_keeps_losses_and_weights_on_two_ranks(strategy, tmp_path, base_dir):
    """DDP recomputes through HF's checkpointing, FSDP2 through a per-block checkpoint inside each sharding
    unit: both train exactly as without it."""
    args = [f"strategy={strategy}", "trainer.devices=2", "data.batch_size=8"]
    plain = train(tmp_path / "plain", base_dir, *args)
    checkpointed = train(tmp_path / "ac", base_dir, *args, "model.activation_checkpointing=true")
    torch.testing.assert_close(checkpointed, plain, rtol=0, atol=1e-5)
    models = [
        AutoModelForSequenceClassification.from_pretrained(tmp_path / run / "export" / "model").state_dict()
        for run in ("plain", "ac")
    ]
    for name, value in models[0].items():
        torch.testing.assert_close(models[1][name], value, rtol=0, atol=1e-5)


def test_attention_implementations_agree_on_packed_batches(tiny_llama_dir):
    """sdpa and eager read the same packed rows (position_ids restart per example) identically: no kernel
    lets attention cross an example boundary."""
    from .test_packing import sft_data

    packed = sft_data(packing=True, pack_length=320)
    packed.setup()
    batch = model_inputs(packed.collate([packed.splits["train"][r] for r in range(2)]))
    losses = {}
    for attn in ("sdpa", "eager"):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation=attn).eval()
        assert model.config._attn_implementation == attn
        with torch.no_grad():
            losses[attn] = model(**batch).loss.item()
    assert losses["sdpa"] == pytest.approx(losses["eager"], rel=1e-5)


def test_model_attn_implementation_reaches_the_trained_model(tiny_llama_dir):
    module, _ = built_module(sft_cfg(tiny_llama_dir, "model.attn_implementation=eager"))
    module.configure_model()
    assert module.model.get_base_model().config._attn_implementation == "eager"


@pytest.mark.parametrize("optim", ["adamw_8bit", "paged_adamw", "paged_adamw_8bit"])
def test_bitsandbytes_optimizers_train_and_hold_their_states(optim, tiny_llama_dir):
    cfg = sft_cfg(tiny_llama_dir, "adapter=none", f"optim={optim}", "trainer.max_steps=3")
    torch.manual_seed(0)
    module, data = built_module(cfg)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=data)
    optimizer = trainer.optimizers[0]
    assert type(optimizer).__module__.startswith("bitsandbytes.optim")
    embedding = module.model.get_input_embeddings().weight
    state = optimizer.state[embedding]
    eight_bit = optim.endswith("8bit")
    assert state["state1"].dtype == (torch.uint8 if eight_bit else torch.float32)
    assert state["step"] == 3


def test_bitsandbytes_optimizer_under_deepspeed_zero2(tmp_path, base_dir):
    """DeepSpeed steps a client optimizer on its flat fp32 partition: the 8-bit states then cover it all."""
    losses = train(
        tmp_path / "run",
        base_dir,
        "strategy=deepspeed_zero2",
        "optim=adamw_8bit",
        "trainer.devices=2",
        "data.batch_size=8",
    )
    assert len(losses) == 3 and losses[-1] < losses[0]
    state = read_state_dict(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert any("lora_B" in k for k in state)


class HeldStates(L.Callback):
    """The bytes held at the second optimizer step: gradients present, the first step's optimizer state."""

    def __init__(self) -> None:
        self.states = None

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        if trainer.global_step == 1:
            self.states = held_states(module.model, optimizer)


SMOLLM2 = [
    "recipe=nlp/smollm2_lora_sft",
    "data.max_train_examples=8",
    "data.max_eval_examples=4",
    "data.batch_size=2",
    "data.max_length=64",
]


@pytest.mark.parametrize(
    "levers",
    [
        pytest.param(["adapter=lora"], id="lora"),
        pytest.param(["adapter=qlora"], id="qlora"),
        pytest.param(
            ["adapter=qlora", "model.activation_checkpointing=true", "optim=adamw_8bit"], id="qlora-ac-8bit"
        ),
        pytest.param(["adapter=none", "optim=adamw_8bit"], id="full-8bit"),
    ],
)
def test_estimated_model_states_match_the_tensors_held_in_training(levers):
    """SmolLM2-135M (the real checkpoint): the estimator's parameter, gradient and optimizer bytes against the
    tensors a training process holds, each within 10%."""
    cfg = compose_config([*SMOLLM2, *levers])
    estimated = estimate(cfg)["single"]
    module, data = built_module(cfg)
    spy = HeldStates()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[spy],
    )
    trainer.fit(module, datamodule=data)
    held = spy.states
    for kind in ("parameters", "gradients", "optimizer"):
        assert getattr(held, kind) == pytest.approx(estimated[kind], rel=0.10), kind


@pytest.fixture(scope="module")
def single_qlora_losses(tmp_path_factory, base_dir) -> list[float]:
    return train(tmp_path_factory.mktemp("qlora") / "run", base_dir, "adapter=qlora", "data.batch_size=16")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "deepspeed_zero2"])
def test_qlora_on_two_ranks_matches_one_and_exports(strategy, tmp_path, base_dir, single_qlora_losses):
    """Each rank quantizes the same pretrained weights alike; FSDP2 shards all but the 4-bit weights, ZeRO-2
    the LoRA gradients and optimizer states."""
    run_dir = tmp_path / "run"
    losses = train(
        run_dir, base_dir, "adapter=qlora", f"strategy={strategy}", "trainer.devices=2", "data.batch_size=8"
    )
    torch.testing.assert_close(losses, single_qlora_losses, rtol=0, atol=1e-4)
    merged = AutoModelForSequenceClassification.from_pretrained(run_dir / "export" / "model")
    assert getattr(merged.config, "quantization_config", None) is None
    base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=2)
    adapted = PeftModel.from_pretrained(base, run_dir / "export" / "adapter").eval()
    ids = torch.tensor([[101, 2307, 3185, 102]])
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=ids).logits, merged.eval()(input_ids=ids).logits)


def test_qlora_with_checkpointing_resumes_exactly_after_a_kill(tmp_path, base_dir):
    """Checkpoint every step, SIGKILL at a random moment after the first, resume: the adapter equals an
    uninterrupted run's, bit for bit."""
    common = [
        "adapter=qlora",
        "model.activation_checkpointing=true",
        "data.batch_size=8",
        "trainer.max_steps=60",  # long enough that a random kill after the first checkpoint lands mid-run
        "trainer.max_epochs=10",
        "checkpoint.every_n_train_steps=1",
        "stages=[train]",
    ]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train(straight, base_dir, *common)
    stopped_at = kill_after_a_checkpoint(killed, base_dir, *common)
    assert stopped_at < 60, "the run finished before it could be killed"
    train(killed, base_dir, *common, f"from_run={killed}", "resume=last")
    expected = read_state_dict(straight / "checkpoints" / "last.ckpt")
    resumed = read_state_dict(killed / "checkpoints" / "last.ckpt")
    assert resumed.keys() == expected.keys() and any("lora_B" in k for k in expected)
    for name, value in expected.items():
        assert torch.equal(resumed[name], value), f"{name}, killed after step {stopped_at}"


def test_llama3_70b_qlora_fsdp2_recipe_runs_on_two_ranks(tmp_path, tiny_llama_dir):
    """The 70B recipe as written (FSDP2 on 2 devices, QLoRA, checkpointing, bf16-mixed), a tiny saved Llama
    in place of the hub model."""
    run_dir = tmp_path / "run"
    args = [
        "recipe=nlp/llama3_70b_qlora_fsdp2",
        f"model.name_or_path={tiny_llama_dir}",
        "trainer.accelerator=cpu",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "trainer.accumulate_grad_batches=1",
        "data.max_train_examples=16",
        "data.max_eval_examples=4",
        "data.max_length=64",
        "logger=csv",
        "progress_bar=false",
        "stages=[train,export]",
        f"hydra.run.dir={run_dir}",
    ]
    result = toolkit_train(args, tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "QLoRA (NF4 base)" in adapter_summary(
        compose_config(["recipe=nlp/llama3_70b_qlora_fsdp2"]).adapter
    )
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "export" / "model")
    assert merged.dtype == torch.bfloat16  # the base's dtype, not 4-bit
    assert getattr(merged.config, "quantization_config", None) is None


def test_qlora_counts_parameters_by_the_weights_they_stand_for(tiny_llama_dir):
    from toolkit.models.adapters import trainable_summary

    counts = {}
    for adapter in ("lora", "qlora"):
        module, _ = built_module(sft_cfg(tiny_llama_dir, f"adapter={adapter}"))
        module.configure_model()
        counts[adapter] = trainable_summary(module.model)
    assert counts["qlora"] == counts["lora"]
