"""The CLI, run as a real subprocess (the installed console script)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PALATE = shutil.which("palate") or str(Path(sys.executable).parent / "palate")


def run(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([PALATE, *args], capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr)
    return proc


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_models_list() -> None:
    proc = run("models", "list", check=True)
    assert "smollm2-135m-instruct" in proc.stdout and "minilm-l6" in proc.stdout
    names = [m["name"] for m in last_json(run("models", "list", "--json").stdout)["models"]]
    assert {"smollm2-135m-instruct", "minilm-l6", "tiny"} <= set(names)


def test_validate_shared_hh(hh_file: Path) -> None:
    proc = run("data", "validate", str(hh_file), "--json", check=True)
    summary = last_json(proc.stdout)
    assert summary["rows"] == 1588 and summary["errors"] == 0


def test_validate_broken_file_exits_nonzero(tmp_path: Path) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": 3}\n')
    proc = run("data", "validate", str(p))
    assert proc.returncode == 1
    assert f"{p}:2" in proc.stderr and "response" in proc.stderr


def test_bad_config_is_one_error_line(tmp_path: Path) -> None:
    cfg = tmp_path / "g.yaml"
    cfg.write_text("prompts: x.jsonl\noutput_dir: out\nbatchsize: 3\n")
    proc = run("generate", str(cfg))
    assert proc.returncode == 2
    assert "batchsize" in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_option_is_a_usage_error_not_a_traceback() -> None:
    """click's usage errors: typer >= 0.29 raises them from its own copy of click, which
    the entry point must recognise too (it printed a traceback before)."""
    proc = run("config", "show", "--sett", "x=1")
    assert proc.returncode == 2
    assert "No such option" in proc.stderr and "--sett" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_generate_stage_with_tiny_model(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Say hi"}\n{"prompt": "Count to three"}\n')
    cfg = tmp_path / "g.yaml"
    cfg.write_text(f"model: tiny\nprompts: {prompts}\noutput_dir: {tmp_path / 'run'}\n")
    proc = run("generate", str(cfg), "--set", "sampling.max_new_tokens=5", "--json", check=True)
    summary = last_json(proc.stdout)
    assert summary["responses"] == 2
    run_dir = tmp_path / "run"
    assert (run_dir / "config.yaml").read_text().count("max_new_tokens: 5") == 1
    rows = [json.loads(x) for x in (run_dir / "responses.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["metadata"]["tokens"] <= 5 for r in rows)
    assert json.loads((run_dir / "summary.json").read_text())["responses"] == 2


@pytest.mark.parametrize("stage", ["generate", "sft", "reward train", "reward eval", "ppo"])
def test_config_show(stage: str) -> None:
    out = run("config", "show", stage, check=True).stdout
    assert "model:" in out and "???  # REQUIRED" in out and "(int)" in out


def test_sft_command_writes_run_dir(tmp_path: Path) -> None:
    data = tmp_path / "demos.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"Say {w}", "response": f"{w} {w}."}) + "\n"
            for w in ["one", "two", "three", "four", "five", "six"]
        )
    )
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(f"model: tiny\ndata: {data}\noutput_dir: {tmp_path / 'run'}\n")
    proc = run(
        "sft",
        str(cfg),
        "--set",
        "train.max_steps=2",
        "--set",
        "eval_fraction=0.34",
        "--json",
        check=True,
    )
    summary = last_json(proc.stdout)
    assert summary["steps"] == 2 and summary["eval_examples"] == 2
    run_dir = tmp_path / "run"
    for f in ("config.yaml", "metrics.jsonl", "summary.json", "final/config.json"):
        assert (run_dir / f).is_file(), f
    assert list((run_dir / "checkpoints").glob("step-*/state.json"))


EXAMPLE_COMMANDS = {
    "eval": "eval",
    "generate": "generate",
    "hacking": "run",
    "hh-reward-smollm2": "reward train",
    "hh-reward": "reward train",
    "hybrid": "run",
    "people": "run",
    "populations": "run",
    "ppo-hh": "ppo",
    "quickstart": "run",
    "sft-hh": "sft",
}


def test_every_shipped_example_config_validates() -> None:
    from palate.cli import COMMANDS
    from palate.config import load_config

    examples = Path(__file__).resolve().parents[1] / "examples"
    found = sorted(p.stem for p in examples.glob("*.yaml"))
    assert found == sorted(EXAMPLE_COMMANDS), "map each example to its command here"
    for stem, command in EXAMPLE_COMMANDS.items():
        load_config(COMMANDS[command][0], examples / f"{stem}.yaml", [])
