"""Preference losses equal TRL's (the reference implementation) on the same model, batch and reference
log-probabilities: loss, rewards and parameter gradients to 1e-5. TRL 1.16's batches (chosen rows, then
rejected rows, a completion mask) are converted to ours (labels on the answer tokens)."""

from __future__ import annotations

import copy
import tempfile
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from toolkit.tasks.preference import Preference, completion_logps
from toolkit.tasks.preference_losses import dpo_loss, orpo_odds_ratio

VOCAB, BETA = 1000, 0.1


def word_tokenizer() -> PreTrainedTokenizerFast:
    """TRL tokenizes its own datasets: a word-level vocabulary (w0 ... w995) keeps token counts exact."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {f"w{i}": i + 4 for i in range(VOCAB - 4)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    return LlamaForCausalLM(config).float()


def words(generator: torch.Generator, n: int) -> str:
    return " ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 4, (n,), generator=generator))


def pairs(n: int = 4) -> Dataset:
    g = torch.Generator().manual_seed(0)
    rows = [{"prompt": words(g, 3 + i % 3), "chosen": " " + words(g, 2 + i % 4),
             "rejected": " " + words(g, 3 + (i + 1) % 3)} for i in range(n)]  # fmt: skip
    return Dataset.from_list(rows)


def trl_args(config_class, **kwargs):
    options = dict(bf16=False, gradient_checkpointing=False, use_cpu=True, report_to=[], save_strategy="no")
    return config_class(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=2, **options, **kwargs)


def ours(batch: dict, prefix: str = "", trl_prefix: str = "") -> dict:
    """A TRL batch in our shape: labels are the completion tokens, -100 elsewhere."""
    mask = batch[f"{trl_prefix}completion_mask"]
    return {
        f"{prefix}input_ids": batch[f"{trl_prefix}input_ids"],
        f"{prefix}attention_mask": batch[f"{trl_prefix}attention_mask"],
        f"{prefix}labels": batch[f"{trl_prefix}input_ids"].masked_fill(mask == 0, -100),
    }


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return grads


def assert_same_gradients(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("loss", ["dpo", "ipo"])
def test_dpo_and_ipo_equal_trl(loss):
    from trl import DPOConfig, DPOTrainer

    policy, reference = tiny_llama(0), tiny_llama(1)  # different weights: rewards are not zero
    loss_type = {"dpo": "sigmoid", "ipo": "ipo"}[loss]
    args = trl_args(DPOConfig, beta=BETA, loss_type=loss_type)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=pairs(),
                         processing_class=word_tokenizer())  # fmt: skip
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_loss.backward()
    trl_grads = gradients(trainer.model)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    task = Preference(tokenizer="unused", loss=loss, beta=BETA)
    task.reference = trainer.ref_model
    our_loss, our_logged = task.training_loss(trainer.model, ours(batch))
    our_loss.backward()
    torch.testing.assert_close(our_loss, trl_loss.detach(), atol=1e-5, rtol=1e-5)
    assert_same_gradients(gradients(trainer.model), trl_grads)
    names = {"rewards_chosen": "rewards/chosen", "rewards_rejected": "rewards/rejected",
             "reward_margin": "rewards/margins", "reward_accuracy": "rewards/accuracies",
             "logps_chosen": "logps/chosen", "logps_rejected": "logps/rejected"}  # fmt: skip
    for ours_name, trl_name in names.items():
        assert float(our_logged[ours_name]) == pytest.approx(logged[trl_name], abs=1e-5), ours_name


def test_kto_equals_trl():
    from trl import KTOConfig, KTOTrainer

    g = torch.Generator().manual_seed(0)
    rows = [{"prompt": words(g, 3 + i % 2), "completion": " " + words(g, 2 + i % 3), "label": i % 2 == 0}
            for i in range(4)]  # fmt: skip
    args = trl_args(KTOConfig, beta=BETA, desirable_weight=1.3, undesirable_weight=0.7)
    trainer = KTOTrainer(model=tiny_llama(0), ref_model=tiny_llama(1), args=args,
                         train_dataset=Dataset.from_list(rows),
                         processing_class=word_tokenizer())  # fmt: skip
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])  # one TRL batch: its KL pairs
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_loss.backward()
    trl_grads = gradients(trainer.model)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    task = Preference(tokenizer="unused", loss="kto", beta=BETA, desirable_weight=1.3, undesirable_weight=0.7)
    task.reference = trainer.ref_model
    our_batch = ours(batch) | ours(batch, "kl_", "KL_") | {"desirable": batch["label"].bool()}
    our_loss, our_logged = task.training_loss(trainer.model, our_batch)
    our_loss.backward()
    torch.testing.assert_close(our_loss, trl_loss.detach(), atol=1e-5, rtol=1e-5)
    assert_same_gradients(gradients(trainer.model), trl_grads)
    assert float(our_logged["kl"]) == pytest.approx(logged["kl"], abs=1e-5)
    assert float(our_logged["rewards_desirable"]) == pytest.approx(logged["rewards/chosen"], abs=1e-5)
    assert float(our_logged["rewards_undesirable"]) == pytest.approx(logged["rewards/rejected"], abs=1e-5)


def test_orpo_odds_ratio_equals_trl():
    """ORPO = NLL of the chosen answer + the odds-ratio term. TRL's NLL also covers the prompt (ours, as our
    SFT loss, the answer only), so the odds-ratio term is compared: on the model, on TRL's own batch, with
    its log-probabilities and gradients, and on random log-probabilities with TRL's own function."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    args = trl_args(ORPOConfig, beta=BETA, max_length=64)
    trainer = ORPOTrainer(
        model=tiny_llama(0), args=args, train_dataset=pairs(), processing_class=word_tokenizer()
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    model = trainer.model.train()
    trl_loss = trainer.compute_loss(model, batch)
    logits = model(input_ids=batch["chosen_input_ids"], attention_mask=batch["chosen_attention_mask"]).logits
    prompt_and_chosen = batch["chosen_input_ids"].masked_fill(batch["chosen_attention_mask"] == 0, -100)
    trl_nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), prompt_and_chosen[:, 1:].flatten())
    (trl_loss - trl_nll).backward()
    trl_grads = gradients(model)
    logged = {k: v[-1] for k, v in trainer._stored_metrics["train"].items()}
    assert float(trl_nll.detach()) == pytest.approx(logged["nll_loss"], abs=1e-5)

    width = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
    pad = lambda t, v: F.pad(t, (0, width - t.shape[1]), value=v)  # noqa: E731
    ours_batch = {
        "input_ids": torch.cat([pad(batch[f"{k}_input_ids"], 0) for k in ("chosen", "rejected")]),
        "attention_mask": torch.cat([pad(batch[f"{k}_attention_mask"], 0) for k in ("chosen", "rejected")]),
        "labels": torch.cat([pad(batch[f"{k}_labels"], -100) for k in ("chosen", "rejected")]),
    }
    logps, lengths = completion_logps(model, ours_batch)
    (chosen, rejected), (chosen_length, rejected_length) = logps.chunk(2), lengths.chunk(2)
    losses, chosen_rewards, rejected_rewards = orpo_odds_ratio(
        chosen, rejected, chosen_length, rejected_length, BETA
    )
    losses.mean().backward()
    assert_same_gradients(gradients(model), trl_grads)
    assert float(chosen_rewards.mean()) == pytest.approx(logged["rewards/chosen"], abs=1e-5)
    assert float(rejected_rewards.mean()) == pytest.approx(logged["rewards/rejected"], abs=1e-5)

    torch.manual_seed(0)
    average_chosen, average_rejected = (-torch.rand(6) * 3 for _ in range(2))
    stub = SimpleNamespace(beta=BETA, accelerator=SimpleNamespace(device=torch.device("cpu")))
    trl_losses, *_ = ORPOTrainer.odds_ratio_loss(stub, average_chosen, average_rejected)
    ones = torch.ones(6)
    our_losses, *_ = orpo_odds_ratio(average_chosen, average_rejected, ones, ones, BETA)
    torch.testing.assert_close(our_losses, -trl_losses, atol=1e-6, rtol=1e-6)


def test_conservative_dpo_label_smoothing_matches_its_formula():
    """TRL 1.16's sigmoid loss ignores label_smoothing (only its `robust` loss reads it); ours is conservative
    DPO's -(1-e) log s(b d) - e log s(-b d) (Mitchell 2023), checked against values computed by hand:
    d = (-1 - -2) - (-3 - -2.5) = 1.5, b d = 0.15, log s(0.15) = -0.620957, log s(-0.15) = -0.770957."""
    one = lambda x: torch.tensor([x])  # noqa: E731
    losses, chosen, rejected = dpo_loss(one(-1.0), one(-3.0), one(-2.0), one(-2.5), BETA, label_smoothing=0.2)
    assert float(losses) == pytest.approx(0.8 * 0.620957 + 0.2 * 0.770957, abs=1e-5)
    assert (float(chosen), float(rejected)) == pytest.approx((0.1, -0.05))
    plain, *_ = dpo_loss(one(-1.0), one(-3.0), one(-2.0), one(-2.5), BETA)
    assert float(plain) == pytest.approx(0.620957, abs=1e-5)


def test_lora_reference_is_the_base_model_with_no_copy():
    """With LoRA the reference is the same model with its adapter disabled: its log-probabilities equal the
    base model's (before the adapter existed), and differ from the adapted model's."""
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(0)
    untouched = copy.deepcopy(base)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # a trained adapter: B is no longer zero
            torch.nn.init.normal_(parameter, std=0.5)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, VOCAB, (4, 12), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    batch["labels"][:, :5] = -100
    task = Preference(tokenizer="unused")
    reference = task.reference_logps(model, batch)
    torch.testing.assert_close(reference, completion_logps(untouched, batch)[0], atol=1e-5, rtol=1e-5)
    assert (completion_logps(model, batch)[0] - reference).abs().max() > 1e-3
    assert task.reference is None  # no second model was made


def test_held_out_scoring_at_answer_positions_equals_the_full_logits_forward():
    """eval_forward runs the LM head at answer positions only: the same per-row log-probabilities as the full
    logits, and a `loss` equal to the HF model's own loss on the same labels."""
    model = tiny_llama(0).eval()
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(4, VOCAB, (4, 12), generator=g)
    labels = input_ids.clone()
    labels[:, :5] = -100  # a prompt
    labels[1, 9:] = -100  # answers of different lengths
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    with torch.no_grad():
        scores = Preference(tokenizer="unused").eval_forward(model, batch)
        full = model(**batch)
    logits = full.logits[:, :-1].float()
    next_labels = labels[:, 1:]
    token_logps = logits.log_softmax(-1).gather(2, next_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(scores.logps, (token_logps * (next_labels != -100)).sum(-1), atol=1e-5, rtol=0)
    assert scores.lengths.tolist() == (next_labels != -100).sum(-1).tolist()
    torch.testing.assert_close(scores.loss, full.loss, atol=1e-6, rtol=0)
