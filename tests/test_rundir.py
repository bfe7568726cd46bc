from __future__ import annotations

import json
from pathlib import Path

import pytest

from palate.config import load_config
from palate.generate import GenerateConfig
from palate.rundir import MetricsLogger, RunDir


def test_metrics_rows_and_namespacing(tmp_path: Path) -> None:
    log = MetricsLogger(tmp_path / "metrics.jsonl")
    log.log(1, {"train/loss": 1.5, "timing/step": 0.1})
    with pytest.raises(ValueError, match="namespaced"):
        log.log(2, {"loss": 1.0})
    log.close()
    (row,) = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert row["step"] == 1 and row["train/loss"] == 1.5


def test_resume_drops_rows_after_checkpoint(tmp_path: Path) -> None:
    p = tmp_path / "metrics.jsonl"
    log = MetricsLogger(p)
    for s in range(1, 6):
        log.log(s, {"train/loss": float(s)})
    log.close()
    log = MetricsLogger(p, resume_step=3)
    log.log(4, {"train/loss": 40.0})
    log.close()
    steps = [json.loads(x)["step"] for x in p.read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_rundir_config_summary_checkpoints(tmp_path: Path) -> None:
    cfg = load_config(GenerateConfig, None, ["prompts=p.jsonl", f"output_dir={tmp_path / 'r'}"])
    run = RunDir(cfg.output_dir).create(cfg)
    assert "max_new_tokens: 128" in run.config_path.read_text()  # defaults resolved
    assert not run.is_complete()
    run.write_summary({"x": 1.0})
    assert run.is_complete() and run.read_summary() == {"x": 1.0}
    assert run.latest_checkpoint() is None
    run.checkpoint_dir(2).mkdir(parents=True)
    run.checkpoint_dir(5).mkdir(parents=True)  # incomplete: no state.json
    (run.checkpoint_dir(2) / "state.json").write_text("{}")
    assert run.latest_checkpoint() == run.checkpoint_dir(2)
