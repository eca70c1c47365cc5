"""report.md: what ran, the training curve, the evaluation table, every artifact with a working load line."""

from __future__ import annotations

import json

from omegaconf import OmegaConf

from toolkit.layout import STAGE_FOLDERS
from toolkit.run.pipeline import run_pipeline
from toolkit.run.report import CURVE

from .helpers import copy_run, run_load_lines

# What a run can write; present ones are found on disk, this list checks that absent ones are not listed.
ARTIFACTS = [
    "checkpoints/best.ckpt",
    "checkpoints/last.ckpt",
    "export/adapter",
    "export/model",
    "prune/model",
    "distill/model",
    "quantize/model",
    "evaluate/metrics.json",
    CURVE,
    "data_split.json",
]


def test_report_lists_every_artifact_and_each_load_line_works(classifier_run, tmp_path, capsys):
    cfg, _ = classifier_run
    run_dir = copy_run(classifier_run, tmp_path)
    cfg = OmegaConf.merge(
        cfg, {"stages": ["quantize", "evaluate", "report"], "quantize": {"max_metric_drop": None}}
    )
    assert run_pipeline(cfg, run_dir) == ["quantize", "evaluate", "report"]
    out = capsys.readouterr().out
    report = (run_dir / "report.md").read_text()

    written = [p.relative_to(run_dir).as_posix() for f in STAGE_FOLDERS for p in (run_dir / f).glob("*")]
    present = written + [a for a in (CURVE, "data_split.json") if (run_dir / a).exists()]
    assert {"export/model", "quantize/model", "quantize/gate.json", CURVE, "checkpoints/last.ckpt"} <= set(
        present
    )
    for artifact in present:
        assert f"`{run_dir / artifact}`" in report, f"{artifact} exists but report.md does not list it"
    for artifact in set(ARTIFACTS) - set(present):
        assert str(run_dir / artifact) not in report, f"report.md lists {artifact}, which does not exist"
    assert (run_dir / CURVE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"![training curve]({CURVE})" in report

    metrics = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    header = next(line for line in report.splitlines() if line.startswith("| metric |"))
    assert header == "| metric | " + " | ".join(metrics) + " |"
    assert f"| accuracy | {metrics['base']['accuracy']:.4f} |" in report
    for text in (
        "recipe: `quickstart",
        "strategy: `",
        "accelerator=cpu",
        "torch ",
        "torchao ",
        "int8_dynamic",
    ):
        assert text in report, text

    # every python load line from the table runs as written
    model_lines = [c for c in run_load_lines(report) if "from_pretrained" in c]
    assert len(model_lines) == 3  # adapter, fine-tuned, quantized

    # the run ends by printing the table: the variants' columns are in the last lines printed
    tail = out.strip().splitlines()[-20:]
    assert any("quantized" in line and "fine_tuned" in line for line in tail)
    assert tail[-1] == f"report: {run_dir / 'report.md'}"


def test_report_without_a_csv_log_says_so(sft_run, tmp_path):
    cfg, _ = sft_run
    run_dir = copy_run(sft_run, tmp_path)
    assert run_pipeline(OmegaConf.merge(cfg, {"stages": ["report"]}), run_dir) == ["report"]
    report = (run_dir / "report.md").read_text()
    assert "No training metrics in a CSV log here" in report
    assert not (run_dir / CURVE).exists()
    assert "| perplexity |" in report and "| gen_accuracy |" in report
    assert "AutoModelForCausalLM.from_pretrained" in report
