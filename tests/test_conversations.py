"""Multi-turn chat data: every format read, bad rows named, and exactly the assistant tokens trained on, for
four chat templates, packed and unpacked; long conversations lose whole earlier turns, never the answer."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from toolkit.data.assets import asset_path
from toolkit.data.chat import ChatSFTData
from toolkit.data.conversations import (
    IGNORE,
    SHAREGPT_ROLES,
    alpaca_messages,
    encode_conversation,
    fit_by_turns,
    parse_messages,
)
from toolkit.errors import ToolkitError

TEMPLATES = Path(__file__).parent / "golden" / "chat_templates"
# Special tokens of the Llama-3 and Gemma templates, added to SmolLM2's tokenizer: one vocabulary renders all
EXTRA_SPECIAL = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
EXTRA_SPECIAL += ["<start_of_turn>", "<end_of_turn>"]
END_OF_TURN = {
    "smollm2": "<|im_end|>",
    "llama3": "<|eot_id|>",
    "mistral": "<|im_end|>",
    "gemma": "<end_of_turn>",
}
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there, who are you?"},
    {"role": "assistant", "content": "I am a small model."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4, of course."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You're welcome."},
]
ANSWERS = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]


def tokenizer_with(template: str, directory: Path | None = None):
    tokenizer = AutoTokenizer.from_pretrained(asset_path("smollm2_135m_instruct"))
    tokenizer.add_special_tokens({"additional_special_tokens": EXTRA_SPECIAL})
    if template != "smollm2":  # SmolLM2's own ChatML template otherwise
        tokenizer.chat_template = (TEMPLATES / f"{template}.jinja").read_text()
    if directory is not None:
        tokenizer.save_pretrained(directory)
    return tokenizer


def labelled_runs(tokenizer, input_ids: list[int], labels: list[int]) -> list[str]:
    """The decoded runs of consecutive labelled tokens."""
    runs, current = [], []
    for token, label in zip(input_ids, labels, strict=True):
        if label != IGNORE:
            current.append(token)
        elif current:
            runs, current = [*runs, tokenizer.decode(current)], []
    return runs + ([tokenizer.decode(current)] if current else [])


@pytest.mark.parametrize("template", list(END_OF_TURN))
def test_labels_are_exactly_the_assistant_turns_and_their_end_of_turn_token(template):
    tokenizer = tokenizer_with(template)
    encoded = encode_conversation(tokenizer, CONVERSATION)
    runs = labelled_runs(tokenizer, encoded["input_ids"], encoded["labels"])
    assert [r.strip() for r in runs] == [f"{a}{END_OF_TURN[template]}" for a in ANSWERS]
    last = encode_conversation(tokenizer, CONVERSATION, train_on="last_assistant")
    assert [r.strip() for r in labelled_runs(tokenizer, last["input_ids"], last["labels"])] == [
        f"{ANSWERS[-1]}{END_OF_TURN[template]}"
    ]
    everything = encode_conversation(tokenizer, CONVERSATION, train_on="all")
    assert everything["labels"] == everything["input_ids"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat_data(path: Path, tokenizer_dir: Path, **kwargs) -> ChatSFTData:
    options = {"format": "messages", "max_length": 256, "val_size": 0.1, "test_size": 0.1, "seed": 0}
    data = ChatSFTData(path=str(path), tokenizer=str(tokenizer_dir), **{**options, **kwargs})
    data.setup()
    return data


def numbered_conversations(n: int) -> list[dict]:
    """`n` distinct copies of the 3-turn conversation (the number in every turn tells them apart)."""
    rows = []
    for i in range(n):
        turns = [
            dict(m, content=m["content"].replace("?", f" ({i})?").replace(".", f" #{i}."))
            for m in CONVERSATION
        ]
        rows.append({"messages": turns, "id": i})
    return rows


@pytest.mark.parametrize("packing", [False, True], ids=["unpacked", "packed"])
@pytest.mark.parametrize("template", list(END_OF_TURN))
def test_data_module_trains_on_assistant_turns_only(template, packing, tmp_path):
    tokenizer = tokenizer_with(template, tmp_path / "tokenizer")
    rows = numbered_conversations(20)
    data = chat_data(write_jsonl(tmp_path / "chat.jsonl", rows), tmp_path / "tokenizer", packing=packing)
    train = data.splits["train"]
    runs = [r.strip() for row in train for r in labelled_runs(tokenizer, row["input_ids"], row["labels"])]
    expected = {
        f"{m['content']}{END_OF_TURN[template]}"
        for row in rows
        for m in row["messages"]
        if m["role"] == "assistant"
    }
    assert len(runs) == 3 * 16 and set(runs) <= expected  # 16 training conversations, 3 answers each
    batch = data.collate([train[0], train[1]])
    assert batch["input_ids"].shape == batch["labels"].shape
    assert ("position_ids" in batch) == packing


def test_sharegpt_and_alpaca_rows_read_as_conversations(tmp_path):
    tokenizer_with("smollm2", tmp_path / "tok")
    share = [
        {
            "conversations": [
                {"from": "human", "value": f"Question {i}?"},
                {"from": "gpt", "value": f"Answer {i}."},
            ]
        }
        for i in range(10)
    ]
    data = chat_data(write_jsonl(tmp_path / "share.jsonl", share), tmp_path / "tok", format="sharegpt")
    tokenizer = data.tokenizer
    row = data.splits["train"][0]
    (run,) = labelled_runs(tokenizer, row["input_ids"], row["labels"])
    assert run.startswith("Answer ") and run.endswith(".<|im_end|>")
    alpaca = [
        {"instruction": f"Add {i} and 1.", "input": "" if i % 2 else f"{i}", "output": f"{i + 1}"}
        for i in range(10)
    ]
    data = chat_data(write_jsonl(tmp_path / "alpaca.json", alpaca), tmp_path / "tok", format="alpaca")
    texts = [tokenizer.decode(r["input_ids"]) for r in data.splits["train"]]
    assert any("Add 2 and 1.\n\n2" in t for t in texts) and any("Add 3 and 1.<|im_end|>" in t for t in texts)


@pytest.mark.parametrize(
    "bad,why",
    [
        ({"messages": []}, "empty conversation"),
        (
            {"messages": [{"role": "bot", "content": "x"}]},
            "turn 0 has unknown role 'bot' (valid: system, user, assistant, tool)",
        ),
        ({"messages": [{"role": "user", "content": None}]}, "turn 0 content is not a string (NoneType)"),
        ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant turn to train on"),
    ],
    ids=["empty", "unknown role", "non-string content", "no assistant turn"],
)
def test_a_bad_row_is_named_with_its_file_index(bad, why, tmp_path):
    tokenizer_with("smollm2", tmp_path / "tok")
    rows = [
        {"messages": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": f"A{i}"}]}
        for i in range(30)
    ]
    rows[7] = bad
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    message = rf"data row 7 of '{re.escape(str(path))}': {re.escape(why)}; 1 of \d+ rows are bad, more than "
    with pytest.raises(ToolkitError, match=message + re.escape("data.max_bad_fraction=0.0 allows")):
        chat_data(path, tmp_path / "tok")
    tolerant = chat_data(path, tmp_path / "tok", max_bad_fraction=0.5)  # the bad row is skipped instead
    assert sum(len(s) for s in tolerant.splits.values()) == 29


def test_a_conversation_that_ends_with_a_user_turn_cannot_train_on_its_last_answer(tmp_path):
    tokenizer_with("smollm2", tmp_path / "tok")
    rows = [{"messages": CONVERSATION[:-1]} for _ in range(10)]
    with pytest.raises(ToolkitError, match="does not end with an assistant turn"):
        chat_data(write_jsonl(tmp_path / "chat.jsonl", rows), tmp_path / "tok", train_on="last_assistant")


def test_long_conversations_lose_whole_earlier_turns_and_keep_the_system_prompt():
    tokenizer = tokenizer_with("smollm2")
    full = encode_conversation(tokenizer, CONVERSATION)
    budget = len(full["input_ids"]) - 5  # one token pair too long: the first exchange must go
    encoded, dropped = fit_by_turns(tokenizer, CONVERSATION, budget, "assistant")
    assert dropped == 2 and len(encoded["input_ids"]) <= budget
    text = tokenizer.decode(encoded["input_ids"])
    assert text.startswith("<|im_start|>system\nYou are terse.") and "who are you" not in text
    assert [r.strip() for r in labelled_runs(tokenizer, encoded["input_ids"], encoded["labels"])] == [
        f"{a}<|im_end|>" for a in ANSWERS[1:]
    ]
    assert fit_by_turns(tokenizer, CONVERSATION, 8, "assistant") == (
        None,
        6,
    )  # not even the last exchange fits


def test_text_format_trains_on_every_token(tmp_path):
    tokenizer_with("smollm2", tmp_path / "tok")
    path = tmp_path / "corpus.jsonl"
    write_jsonl(path, [{"text": f"Line number {i} of a plain corpus."} for i in range(20)])
    data = chat_data(path, tmp_path / "tok", format="text")
    row = data.splits["train"][0]
    assert row["labels"] == row["input_ids"] and len(row["input_ids"]) > 5


def read_jsonl(path: str) -> list[dict]:
    # split on newlines only: str.splitlines() also breaks at U+2028 and friends, which turns contain
    return [json.loads(line) for line in Path(path).read_text().split("\n") if line]


def test_the_chat_assets_read_as_conversations():
    """ShareGPT (cleaned of its cut-off record, empty and continuation chunks), chitchat (two humans, the
    first one the user) and LLaMA-Factory's alpaca demo: every row parses."""
    rows = read_jsonl(asset_path("sharegpt"))
    assert len(rows) == 11205  # of 17,671 complete records: 126 empty, 6,340 continuation chunks dropped
    assert all(parse_messages(r["conversations"], "from", "value", SHAREGPT_ROLES)[0] for r in rows)
    chats = read_jsonl(asset_path("chitchat"))
    assert len(chats) == 7168 and sum(len(c["messages"]) for c in chats) == 138737
    assert all(c["messages"][0]["role"] == "user" for c in chats if c["messages"])
    alpaca = json.loads(Path(asset_path("alpaca_en_demo")).read_text())
    assert len(alpaca) == 999 and all(alpaca_messages(r)[0] for r in alpaca)
    assert len(json.loads(Path(asset_path("dpo_en_demo")).read_text())) == 300


def test_sources_mix_by_weight_and_each_keeps_its_own_split(tmp_path):
    """A messages file and an alpaca file, weights 0.7 / 0.3: the first 10,000 training rows are within 2%
    of the weights; the held-out splits are each source's own; data_split.json's record lists both."""
    tokenizer_with("smollm2", tmp_path / "tok")
    chats = [
        {"messages": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": f"A{i}"}]}
        for i in range(10000)
    ]
    tasks = [{"instruction": f"Say {i}.", "input": "", "output": f"{i}"} for i in range(5000)]
    sources = [
        {"path": str(write_jsonl(tmp_path / "chats.jsonl", chats)), "format": "messages", "weight": 0.7},
        {"path": str(write_jsonl(tmp_path / "tasks.jsonl", tasks)), "format": "alpaca", "weight": 0.3},
    ]
    data = ChatSFTData(path=None, tokenizer=str(tmp_path / "tok"), sources=sources, max_length=64, seed=0)
    data.setup()
    drawn = data.splits["train"]["_source"][:10000]
    assert len(drawn) == 10000 and abs(drawn.count(1) / 10000 - 0.3) < 0.02
    assert sorted(set(data.splits["test"]["_source"])) == [0, 1]
    assert len(data.splits["test"]) == 1000 + 500  # each source's own 10% test split
    record = data.split_fingerprints()
    assert [s["format"] for s in record["sources"]] == ["messages", "alpaca"]
    assert [s["test"]["rows"] for s in record["sources"]] == [1000, 500]
    again = ChatSFTData(path=None, tokenizer=str(tmp_path / "tok"), sources=sources, max_length=64, seed=0)
    assert again.split_fingerprints() == record  # the same mixture, in the same order, every time


@pytest.mark.parametrize(
    "sources,message",
    [
        (
            [{"format": "messages"}],
            "data.sources[0] has no path; each source needs path (and format, weight)",
        ),
        ([{"path": "x.jsonl", "weight": 0}], "data.sources[0].weight=0 must be a positive number"),
    ],
)
def test_a_bad_source_is_refused(sources, message):
    with pytest.raises(ToolkitError, match=re.escape(message)):
        ChatSFTData(path=None, tokenizer="unused", sources=sources)


def write_conversations(path: Path, rows: list[dict], kind: str) -> Path:
    """The same conversations as jsonl, gzip- or xz-compressed json lines, parquet, or a dataset repository
    laid out as the hub stores one (data/<split>-*.parquet): what `load_dataset(<hub id>)` reads after its
    download, offline."""
    import gzip
    import lzma

    import pandas as pd

    if kind == "jsonl":
        return write_jsonl(path / "chat.jsonl", rows)
    lines = "".join(json.dumps(r) + "\n" for r in rows).encode()
    if kind == "jsonl.gz":
        (path / "chat.jsonl.gz").write_bytes(gzip.compress(lines))
        return path / "chat.jsonl.gz"
    if kind == "json.xz":
        (path / "chat.json.xz").write_bytes(lzma.compress(lines))
        return path / "chat.json.xz"
    if kind == "parquet":
        pd.DataFrame(rows).to_parquet(path / "chat.parquet")
        return path / "chat.parquet"
    repo = path / "org" / "chat-dataset"
    (repo / "data").mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(repo / "data" / "train-00000-of-00001.parquet")
    (repo / "README.md").write_text("---\nlicense: mit\n---\n# chat-dataset\n")
    return repo


@pytest.mark.parametrize("kind", ["jsonl.gz", "json.xz", "parquet", "hub_repository"])
def test_conversations_read_the_same_from_every_file_kind(kind, tmp_path, monkeypatch):
    tokenizer_with("smollm2", tmp_path / "tok")
    rows = numbered_conversations(20)
    (tmp_path / "plain").mkdir()
    (tmp_path / kind).mkdir()
    expected = chat_data(write_conversations(tmp_path / "plain", rows, "jsonl"), tmp_path / "tok").splits
    path = write_conversations(tmp_path / kind, rows, kind)
    if kind == "hub_repository":  # named as a hub id, `org/name`, not as a path
        monkeypatch.chdir(tmp_path / kind)
        path = Path("org/chat-dataset")
    read = chat_data(path, tmp_path / "tok").splits
    for split in ("train", "validation", "test"):
        assert read[split]["input_ids"] == expected[split]["input_ids"]
        assert read[split]["labels"] == expected[split]["labels"]


def test_settings_the_encoding_does_not_read_reuse_the_tokenized_cache(tmp_path):
    """datasets keys its cache on the map function and its arguments: a new batch size, packing or eval
    limit must find the conversations already tokenized (ShareGPT takes minutes), a new max_length not."""
    tokenizer_with("smollm2", tmp_path / "tok")
    path = write_jsonl(tmp_path / "chat.jsonl", numbered_conversations(20))

    def cache_files(**options):
        test = chat_data(path, tmp_path / "tok", **options).splits["test"]
        return [f["filename"] for f in test.cache_files]

    first = cache_files(batch_size=2)
    assert first and cache_files(batch_size=8, packing=True, eval_batch_size=4) == first
    assert cache_files(max_length=200) != first
