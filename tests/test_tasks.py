"""CausalLM's training loss: the LM head runs on labelled positions only, and the loss and its gradients
equal the model's own loss over the full logits."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from toolkit.tasks.causal_lm import CausalLM


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    return LlamaForCausalLM(config)


def sft_batch() -> dict[str, torch.Tensor]:
    """Three rows, right-padded, each labelling a different short answer span."""
    ids = torch.randint(3, 97, (3, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    mask[2, 9:] = 0
    labels = torch.full_like(ids, -100)
    labels[0, 17:20] = ids[0, 17:20]
    labels[1, 12:15] = ids[1, 12:15]
    labels[2, 7:9] = ids[2, 7:9]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_labelled_positions_loss_equals_the_models_loss(lora):
    model = tiny_llama()
    if lora:
        lora_config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        model = get_peft_model(model, lora_config)
    batch = sft_batch()
    head_positions = []
    head = model.get_output_embeddings()
    head.register_forward_hook(lambda module, args, out: head_positions.append(args[0].shape[1]))

    reference = model(**batch).loss
    reference.backward()
    reference_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    loss = CausalLM("unused").training_loss(model, batch)
    loss.backward()

    torch.testing.assert_close(loss, reference, rtol=0, atol=1e-6)
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, reference_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    # positions 6-7, 11-13 and 16-18 predict a label: 8 of 20 positions reach the LM head
    assert head_positions == [20, 8]
