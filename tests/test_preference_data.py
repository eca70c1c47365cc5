"""Preference data: every format read into prompt and answer tokens with the chat template, answers kept
whole and prompts cut from the front alike for both answers, equal pairs dropped, batches laid out as the
reference implementation lays them out (chosen rows, then rejected rows)."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset

from toolkit.data import preference
from toolkit.data.assets import asset_path
from toolkit.data.conversations import IGNORE
from toolkit.data.preference import PreferenceData
from toolkit.data.sources import numbered

preference_render = preference.render
SYSTEM = {"role": "system", "content": "You are terse."}
HISTORY = [SYSTEM, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
           {"role": "user", "content": "What is 2+2?"}]  # fmt: skip


def module(path: str, **kwargs) -> PreferenceData:
    options = dict(tokenizer=asset_path("smollm2_135m_instruct"), val_size=0.1, test_size=0.1, max_length=256)
    data = PreferenceData(path=path, **(options | kwargs))
    data.setup()
    return data


def prepared(rows: list[dict], **kwargs) -> tuple[PreferenceData, Dataset]:
    """The rows encoded as one split (no train/validation/test split of a handful of rows)."""
    options = dict(tokenizer=asset_path("smollm2_135m_instruct"), max_length=256)
    data = PreferenceData(path="rows.jsonl", **(options | kwargs))
    return data, data.prepare(numbered(Dataset.from_list(rows)))


def decode(data: PreferenceData, ids: list[int]) -> str:
    return data.tokenizer.decode(ids)


def test_pairs_with_a_string_prompt_or_a_history_render_with_the_chat_template():
    rows = [{"prompt": f"Question {i}?", "chosen": f"Good answer {i}.", "rejected": f"Bad answer {i}."}
            for i in range(10)]  # fmt: skip
    histories = [{"prompt": HISTORY, "chosen": [{"role": "assistant", "content": "4."}],
                  "rejected": [{"role": "assistant", "content": "5."}]} for _ in range(10)]  # fmt: skip
    data, train = prepared(rows)
    _, with_history = prepared(histories)
    by_prompt = {decode(data, r["prompt_ids"]): r for r in [*train, *with_history]}
    history = [p for p in by_prompt if "You are terse." in p]
    assert history and all(p.endswith("What is 2+2?<|im_end|>\n<|im_start|>assistant\n") for p in history)
    assert "<|im_start|>assistant\nHello.<|im_end|>" in history[0]  # earlier turns stay in the prompt
    row = by_prompt[history[0]]
    assert decode(data, row["chosen_ids"]) == "4.<|im_end|>\n"
    assert decode(data, row["rejected_ids"]) == "5.<|im_end|>\n"
    single = next(r for p, r in by_prompt.items() if "Question" in p)
    assert decode(data, single["chosen_ids"]).startswith("Good answer")


def test_llamafactory_dpo_shape_reads_its_system_prompt_and_history():
    data = module(asset_path("dpo_en_demo"), format="sharegpt_pairs", max_length=4096)
    assert sum(len(data.splits[s]) for s in data.splits) == 300  # every pair of the asset (none equal)
    prompts = [decode(data, ids) for ids in data.splits["train"]["prompt_ids"]]
    assert sum("<|im_start|>system" in p for p in prompts) > 0
    assert sum(p.count("<|im_start|>user") > 1 for p in prompts) > 0  # multi-turn histories


def test_kto_examples_get_a_mismatched_answer_for_their_reference_point():
    data = module(asset_path("kto_en_demo"), format="unpaired", max_length=4096)
    train = data.splits["train"]
    assert set(train["desirable"]) == {True, False}
    completions, mismatched = train["completion_ids"], train["kl_completion_ids"]
    assert mismatched == completions[-1:] + completions[:-1]
    batch = data.collate([train[i] for i in range(3)])
    assert batch["kl_input_ids"].shape[0] == batch["input_ids"].shape[0] == 3
    assert batch["desirable"].dtype == torch.bool
    # TRL's shape (prompt, completion, label) reads the same way
    rows = [{"prompt": f"Q{i}", "completion": f"A{i}", "label": i % 2 == 0} for i in range(10)]
    trl_shape, encoded = prepared(rows, format="unpaired")
    assert decode(trl_shape, encoded[0]["completion_ids"]) == "A0<|im_end|>\n"


def test_label_pairs_build_one_pair_per_wrong_answer():
    rows = [{"text": f"film {i}", "category": ["rotten", "fresh", "plot"][i % 3]} for i in range(30)]
    answers = {"rotten": "negative", "fresh": "positive"}
    options = dict(label_column="category", prompt_template="Review: {text}", ignore_labels=["plot"])
    data, train = prepared(rows, format="label_pairs", answers=answers, **options)
    assert len(train) == 20  # the plot rows are dropped
    for row in train:
        chosen, rejected = decode(data, row["chosen_ids"]), decode(data, row["rejected_ids"])
        assert {chosen, rejected} == {"negative<|im_end|>\n", "positive<|im_end|>\n"}


def test_truncation_keeps_both_answers_and_cuts_the_prompt_from_the_front():
    long_prompt = " ".join(f"word{i}" for i in range(300))
    rows = [{"prompt": long_prompt, "chosen": "A short answer.", "rejected": "A much longer answer " * 5}] * 4
    rows += [{"prompt": "Hi", "chosen": "x " * 400, "rejected": "y"}]  # an answer alone over the limit
    data, train = prepared(rows, max_length=64)
    assert len(train) == 4  # the over-long answer's pair is dropped, not cut
    row = train[0]
    assert len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"])) == 64
    prompt = decode(data, row["prompt_ids"])
    assert prompt.endswith("word299<|im_end|>\n<|im_start|>assistant\n") and "word0 " not in prompt
    assert decode(data, row["chosen_ids"]) == "A short answer.<|im_end|>\n"
    assert decode(data, row["rejected_ids"]) == "A much longer answer " * 5 + "<|im_end|>\n"


def test_equal_pairs_are_dropped_and_batches_put_chosen_then_rejected(caplog):
    rows = [
        {"prompt": f"Q{i}", "chosen": f"A{i}", "rejected": f"B{i}" if i % 4 else f"A{i}"} for i in range(20)
    ]
    data, train = prepared(rows)
    assert len(train) == 15
    assert "dropped 5 of 20 pairs whose chosen equals rejected" in caplog.text
    features = [train[i] for i in range(3)]
    batch = data.collate(features)
    assert batch["input_ids"].shape[0] == 6
    for i, feature in enumerate(features):
        for row, answer in ((i, feature["chosen_ids"]), (i + 3, feature["rejected_ids"])):
            labelled = batch["labels"][row][batch["labels"][row] != IGNORE].tolist()
            assert labelled == answer
            length = int(batch["attention_mask"][row].sum())
            assert batch["input_ids"][row, :length].tolist() == feature["prompt_ids"] + answer


@pytest.mark.parametrize("fmt", ["pairs", "unpaired"])
def test_precomputed_reference_columns_reach_the_batch(fmt):
    rows = [{"prompt": f"Q{i}", "chosen": f"A{i}", "rejected": f"B{i}", "completion": f"A{i}",
             "label": i % 2 == 0} for i in range(6)]  # fmt: skip
    data, table = prepared(rows, format=fmt)
    names = ("ref_chosen_logps", "ref_rejected_logps") if fmt == "pairs" else ("ref_logps", "kl_ref_logps")
    for k, name in enumerate(names):
        table = table.add_column(name, [float(-i - 10 * k) for i in range(len(table))])
    batch = data.collate([table[0], table[1]])
    expected = [0.0, -1.0, -10.0, -11.0] if fmt == "pairs" else [0.0, -1.0]
    assert batch["ref_logps"].tolist() == expected


def test_encoded_pairs_are_cached_beside_the_source_and_keyed_by_the_encoding(tmp_path, monkeypatch):
    """Rendering is the slow part (three chat-template renderings a pair): a second data module over the same
    file and options reads the encoded rows back without rendering any; a new max_length renders again."""
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"Question {i}?", "chosen": f"Good {i}.", "rejected": f"Bad {i}."} for i in range(40)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    first = module(str(path)).splits
    rendered = []
    monkeypatch.setattr(preference, "render", lambda *a: rendered.append(a) or preference_render(*a))
    again = module(str(path)).splits
    assert rendered == [] and all(again[s]["chosen_ids"] == first[s]["chosen_ids"] for s in again)
    assert any("preference-" in f["filename"] for f in again["train"].cache_files)
    shorter = module(str(path), max_length=64).splits
    assert rendered and shorter["train"]["chosen_ids"] == first["train"]["chosen_ids"]
