"""Sequence packing: no attention across examples (packed loss = the examples' own losses), labels masked at
boundaries, a deterministic packing, and exact resume on packed rows."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM

from toolkit.data.chat import ChatSFTData
from toolkit.data.packing import IGNORE, pack_dataset, pack_rows
from toolkit.errors import ToolkitError
from toolkit.run.pipeline import run_pipeline
from toolkit.tasks.base import model_inputs

from .helpers import TINY_SFT, compose_config

PROMPT = "Is the following movie review positive or negative? Answer with one word.\n\nReview: {text}"


def sft_data(**kwargs) -> ChatSFTData:
    from toolkit.data.assets import asset_path

    return ChatSFTData(
        path=asset_path("rotten_tomatoes"),
        tokenizer=asset_path("smollm2_135m_instruct"),
        prompt_template=PROMPT,
        label_column="category",
        answers={"rotten": "negative", "fresh": "positive"},
        ignore_labels=["plot"],
        max_length=96,
        max_train_examples=24,
        max_eval_examples=8,
        batch_size=2,
        **kwargs,
    )


@pytest.fixture(scope="module")
def plain_and_packed() -> tuple[ChatSFTData, ChatSFTData]:
    plain, packed = sft_data(), sft_data(packing=True, pack_length=320)
    plain.setup()
    packed.setup()
    return plain, packed


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    # a wide init makes attention far from uniform, so any leak across examples moves the loss visibly
    config = LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=49152,
        max_position_embeddings=512,
        initializer_range=0.3,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def test_packed_rows_lose_exactly_what_their_examples_lose_separately(plain_and_packed):
    """The no-leakage proof: the mean loss over a batch of packed rows equals the token-weighted mean of each
    example's loss computed alone; letting attention cross the boundaries changes it by far more."""
    plain, packed = plain_and_packed
    model = tiny_llama()
    examples = plain.splits["train"]
    rows = pack_rows([len(ids) for ids in examples["input_ids"]], 320)[:2]
    assert all(len(row) >= 3 for row in rows), "the check needs several examples per row"
    total, targets = 0.0, 0
    with torch.no_grad():
        for i in [i for row in rows for i in row]:
            ids, labels = torch.tensor([examples[i]["input_ids"]]), torch.tensor([examples[i]["labels"]])
            n = int((labels[:, 1:] != IGNORE).sum())
            total += model(input_ids=ids, labels=labels).loss.item() * n
            targets += n
        batch = packed.collate([packed.splits["train"][r] for r in range(2)])
        assert "attention_mask" not in batch
        packed_loss = model(**model_inputs(batch)).loss.item()
        # the same rows through a plain causal mask (the KV cache disables transformers' packed-mask path)
        leaky = model(**{k: batch[k] for k in ("input_ids", "labels", "position_ids")})
    separate = total / targets
    assert packed_loss == pytest.approx(separate, rel=1e-5, abs=1e-6)
    assert abs(leaky.loss.item() - separate) > 100 * max(abs(packed_loss - separate), 1e-6)


def test_labels_are_masked_at_every_boundary_and_in_padding(plain_and_packed):
    plain, packed = plain_and_packed
    batch = packed.collate([packed.splits["train"][r] for r in range(len(packed.splits["train"]))])
    starts = batch["position_ids"] == 0
    assert (batch["labels"][starts] == IGNORE).all()
    # every answer token of every example is still a target, and nothing else is
    answer_tokens = sum(sum(1 for x in labels if x != IGNORE) for labels in plain.splits["train"]["labels"])
    assert int((batch["labels"] != IGNORE).sum()) == answer_tokens
    # a row whose examples have no prompt mask (continued pretraining): the first token is masked anyway
    examples = Dataset.from_dict({"input_ids": [[5, 6, 7], [8, 9]], "labels": [[5, 6, 7], [8, 9]]})
    rows = pack_dataset(examples, 8)
    assert rows["labels"] == [[IGNORE, 6, 7, IGNORE, 9]] and rows["position_ids"] == [[0, 1, 2, 0, 1]]


def test_packing_is_deterministic_complete_and_within_the_row_length(plain_and_packed):
    plain, packed = plain_and_packed
    again = sft_data(packing=True, pack_length=320)
    again.setup()
    assert again.splits["train"]["input_ids"] == packed.splits["train"]["input_ids"]
    lengths = [len(ids) for ids in plain.splits["train"]["input_ids"]]
    rows = pack_rows(lengths, 320)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 320 for row in rows)
    assert len(rows) < len(lengths) / 2
    order = [b["input_ids"].tolist() for b in packed.train_dataloader()]
    assert order == [b["input_ids"].tolist() for b in again.train_dataloader()]


def test_pack_length_shorter_than_max_length_is_refused():
    with pytest.raises(ToolkitError, match=r"data.pack_length=64 is shorter than data.max_length=96"):
        sft_data(packing=True, pack_length=64)


class CrashAfter(L.Callback):
    """Dies like a killed run right after step `step` (a run that reaches max_steps instead marks its epoch
    done in the checkpoint, and Lightning resumes that at the next epoch)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise SystemExit("crash")


def mixture_overrides(tmp_path) -> list[str]:
    """The chat recipe on a mixture of two small local sources (multi-turn messages 0.7, alpaca 0.3)."""
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps(row) + "\n" for row in numbered_chats(120)))
    tasks = tmp_path / "tasks.jsonl"
    rows = [
        {"instruction": f"Spell {i} in words.", "input": "", "output": f"The number {i}."} for i in range(80)
    ]
    tasks.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return [
        "recipe=nlp/smollm2_chat_sft",
        "data.sources=[{path:" + str(chats) + ",format:messages,weight:0.7},"
        "{path:" + str(tasks) + ",format:alpaca,weight:0.3}]",
        "data.max_length=96",
        "data.max_eval_examples=8",
        "data.max_bad_fraction=0.0",
        *TINY_SFT[1:],
    ]


def numbered_chats(n: int) -> list[dict]:
    turns = ["Hello, number {i}?", "Hi, I am {i}.", "Twice {i}?", "That is {j}."]
    roles = ["user", "assistant"] * 2
    return [
        {
            "messages": [
                {"role": r, "content": t.format(i=i, j=2 * i)} for r, t in zip(roles, turns, strict=True)
            ]
        }
        for i in range(n)
    ]


@pytest.mark.parametrize("data", ["single_source", "mixture"])
def test_resume_on_packed_rows_is_exact(tmp_path, data):
    """A run killed after step 3 (checkpoint mid-epoch, LoRA dropout on) and resumed to step 6 ends with the
    same weights as a run straight to step 6: on one dataset, and on a weighted mixture of two."""
    source = (
        [*TINY_SFT, "data.max_train_examples=128"] if data == "single_source" else mixture_overrides(tmp_path)
    )
    args = [
        *source,  # about 20 packed rows: 10 batches in the epoch
        "data.packing=true",
        "data.pack_length=320",
        "data.batch_size=2",
        "scheduler=constant",
        "trainer.limit_val_batches=1",
        "trainer.val_check_interval=2",  # Lightning saves a monitored checkpoint only after a validation
        "checkpoint.every_n_train_steps=3",
        "stages=[train]",
    ]

    def train(run_dir, steps, *extra):
        run_pipeline(compose_config([*args, f"trainer.max_steps={steps}", *extra]), run_dir)
        return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)

    straight = train(tmp_path / "straight", 6)["state_dict"]
    with pytest.raises(SystemExit):
        train(tmp_path / "stopped", 6, f"+callbacks.crash={{_target_:{__name__}.CrashAfter,step:3}}")
    stopped = torch.load(tmp_path / "stopped" / "checkpoints" / "last.ckpt", weights_only=True)
    assert stopped["global_step"] == 3
    resumed = train(tmp_path / "resumed", 6, f"resume={tmp_path / 'stopped' / 'checkpoints' / 'last.ckpt'}")
    assert resumed["global_step"] == 6
    diff = max((resumed["state_dict"][k] - straight[k]).abs().max().item() for k in straight)
    assert diff == 0.0
    if data == "mixture":
        record = json.loads((tmp_path / "resumed" / "data_split.json").read_text())
        assert [s["format"] for s in record["sources"]] == ["messages", "alpaca"]
