"""The ``palate`` command line: a thin layer over the library.

Every stage command has the same shape::

    palate <stage> CONFIG.yaml [--set key.sub=value]... [--json]

It loads and validates the config (unknown keys are errors), calls one library function, shows
progress on stderr, and prints a summary: a table for people, or with ``--json`` a single JSON
object as the last line of stdout. Input errors print one ``error:`` line and exit with code 2.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from palate.config import Config, describe_config, load_config
from palate.data import RecordKind, validate_file
from palate.errors import PalateError
from palate.eval.compare import EvalConfig, compare_policies
from palate.feedback import CAIConfig, JudgeConfig, cai_revise, judge
from palate.generate import GenerateConfig, generate
from palate.label.campaign import (
    LabelAccessConfig,
    LabelCreateConfig,
    LabelExportConfig,
    LabelQualityConfig,
    LabelUserConfig,
    add_label_user,
    create_label_campaign,
    export_label_campaign,
    label_access,
    label_quality,
)
from palate.models import BUILTIN_MODELS
from palate.pipeline import STAGES as RUN_STAGES
from palate.pipeline import RunConfig, WaitingForLabels, run_pipeline
from palate.ppo import PPOConfig, ppo
from palate.reward import (
    RewardConfig,
    RewardEvalConfig,
    RewardScoreConfig,
    evaluate_reward,
    score_file,
    train_reward,
)
from palate.sft import SFTConfig, sft

app = typer.Typer(
    name="palate",
    help="The whole RLHF loop - SFT, preferences, reward model, PPO, evaluation - on a laptop CPU.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
models_app = typer.Typer(help="Built-in and local models.", no_args_is_help=True)
data_app = typer.Typer(help="Data files: validate and inspect.", no_args_is_help=True)
config_app = typer.Typer(
    help="Stage configs: fields, defaults, descriptions.", no_args_is_help=True
)
app.add_typer(models_app, name="models")
app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")

out = Console()  # stdout: results
err = Console(stderr=True)  # stderr: progress, messages

JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON summary as the last line.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config value: --set train.lr=1e-4 (repeatable)."),
]

# name -> (config class, library function); filled by `stage`.
COMMANDS: dict[str, tuple[type[Config], Callable[[Any], dict[str, Any]]]] = {}


def emit(summary: dict[str, Any], as_json: bool, title: str = "summary") -> None:
    """Print a summary: a table for people, or one JSON line (the last line of stdout)."""
    if as_json:
        sys.stdout.write(json.dumps(summary, default=str) + "\n")
        sys.stdout.flush()
        return
    table = Table(title=title, show_header=False)
    for k, v in summary.items():
        table.add_row(str(k), f"{v:.4g}" if isinstance(v, float) else str(v))
    out.print(table)


def stage(
    name: str, config_cls: type[Config], help: str, group: typer.Typer | None = None
) -> Callable[[Callable[[Any], dict[str, Any]]], Callable[[Any], dict[str, Any]]]:
    """Register ``palate NAME CONFIG.yaml [--set k=v]... [--json]`` calling ``fn(config)``.

    ``name`` may be ``"group sub"`` (e.g. ``"reward train"``) with ``group`` the sub-app.
    The config file is optional when every required field is given with ``--set``.
    """

    def register(fn: Callable[[Any], dict[str, Any]]) -> Callable[[Any], dict[str, Any]]:
        COMMANDS[name] = (config_cls, fn)

        def command(
            config: Annotated[
                Path | None, typer.Argument(help="Stage config (YAML); optional with --set.")
            ] = None,
            set_: SetOpt = None,
            as_json: JsonOpt = False,
        ) -> None:
            cfg = load_config(config_cls, config, set_ or [])
            summary = fn(cfg)
            if os.environ.get("RANK", "0") == "0":  # one summary under multi-process launches
                emit(summary, as_json, title=f"palate {name}")

        command.__doc__ = help
        (group or app).command(name.split()[-1], help=help)(command)
        return fn

    return register


# --------------------------------------------------------------------------- models


@models_app.command("list")
def models_list(as_json: JsonOpt = False) -> None:
    """Show the built-in model names and whether their packages are installed."""

    rows: list[dict[str, Any]] = [
        {
            "name": m.name,
            "kind": m.kind,
            "installed": m.available(),
            "install": m.pip or "",
            "description": m.description,
        }
        for m in BUILTIN_MODELS.values()
    ]
    if as_json:
        emit({"models": rows}, True)
        return
    table = Table(title="built-in models (any HF hub id, local HF directory or .gguf also works)")
    for col in ("name", "kind", "installed", "description"):
        table.add_column(col)
    for r in rows:
        ok = "yes" if r["installed"] else f"no: {r['install']}"
        table.add_row(r["name"], r["kind"], ok, r["description"])
    out.print(table)


# --------------------------------------------------------------------------- data


@data_app.command("validate")
def data_validate(
    file: Annotated[Path, typer.Argument(help="JSONL / JSONL.gz file to check.")],
    kind: Annotated[
        str | None,
        typer.Option(help="Expected record kind: prompts, demonstrations or comparisons."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check every row of a data file; report counts and each bad row's line and field."""

    record_kinds: tuple[RecordKind, ...] = ("prompts", "demonstrations", "comparisons")
    expected = next((k for k in record_kinds if k == kind), None)
    if kind is not None and expected is None:
        raise PalateError(f"--kind {kind!r}: expected prompts, demonstrations or comparisons")
    report = validate_file(file, expected)
    for line in report.errors[:50]:
        err.print(f"[red]{line}[/red]", highlight=False, markup=True)
    if report.n_errors > 50:
        err.print(f"... and {report.n_errors - 50} more errors")
    emit(report.summary(), as_json, title=f"palate data validate {file}")
    if report.n_errors:
        raise typer.Exit(1)


# --------------------------------------------------------------------------- config


@config_app.command("show")
def config_show(
    stage_name: Annotated[
        str | None,
        typer.Argument(metavar="STAGE", help="Stage name, e.g. sft or 'reward train'."),
    ] = None,
) -> None:
    """Print a stage's config as commented YAML: every field, its default and description."""
    import yaml

    if stage_name is None:
        out.print("palate config show STAGE — stages: " + ", ".join(sorted(COMMANDS)))
        return
    stage_name = stage_name.replace("-", " ").replace(".", " ")
    if stage_name not in COMMANDS:
        raise PalateError(f"unknown stage {stage_name!r}; stages: {', '.join(sorted(COMMANDS))}")
    lines = [f"# palate {stage_name} CONFIG.yaml  (override any field with --set a.b=value)"]
    for name, type_name, default, desc in describe_config(COMMANDS[stage_name][0]):
        depth = name.count(".")
        key = name.rsplit(".", 1)[-1]
        if type_name == "section":
            lines.append(f"{'  ' * depth}{key}:  # {desc}")
            continue
        if default == "(required)":
            value = "???  # REQUIRED."
        else:
            try:
                value = yaml.safe_dump(ast.literal_eval(default), default_flow_style=True).strip()
                value = value.removesuffix("\n...").strip()
            except (ValueError, SyntaxError):
                value = default
            value += "  #"
        lines.append(f"{'  ' * depth}{key}: {value} ({type_name}) {desc}")
    sys.stdout.write("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- stages


stage(
    "generate",
    GenerateConfig,
    "Sample responses from a model for a file of prompts (writes responses.jsonl).",
)(generate)


stage(
    "sft",
    SFTConfig,
    "Supervised fine-tuning on demonstrations (loss on response tokens only; LoRA by default).",
)(sft)


reward_app = typer.Typer(help="Step 3: reward model (train, eval, score).", no_args_is_help=True)
app.add_typer(reward_app, name="reward")
stage(
    "reward train",
    RewardConfig,
    "Train a reward model on comparisons (Bradley-Terry), normalise it, evaluate held-out.",
    reward_app,
)(train_reward)
stage(
    "reward eval",
    RewardEvalConfig,
    "Accuracy, margin, calibration (ECE) and length-bias checks of a reward model.",
    reward_app,
)(evaluate_reward)
stage(
    "reward score",
    RewardScoreConfig,
    "Score a JSONL of {prompt, response} rows with a reward model.",
    reward_app,
)(score_file)


stage(
    "ppo",
    PPOConfig,
    "PPO against a reward model (or a Python reward function) with a KL penalty to the reference.",
)(ppo)


stage(
    "eval",
    EvalConfig,
    "Step 5: policies against a baseline - win rates by a reward model, a gold rubric, an AI "
    "judge or people (a labeling campaign), length-controlled win rates, KL, length, diversity, "
    "repetition, EOS and refusal rates; JSON + HTML report.",
)(compare_policies)


label_app = typer.Typer(
    help="Step 2: preference collection (campaigns, raters, export).", no_args_is_help=True
)
app.add_typer(label_app, name="label")
stage(
    "label create",
    LabelCreateConfig,
    "Create a labeling campaign from ready pairs or from a model's samples.",
    label_app,
)(create_label_campaign)
stage(
    "label export",
    LabelExportConfig,
    "Export a campaign's labels as comparisons JSONL (soft labels, ties, raters).",
    label_app,
)(export_label_campaign)
stage(
    "label quality",
    LabelQualityConfig,
    "Rater quality: gold accuracy, Dawid-Skene reliability, first-shown and too-fast shares, "
    "flags; agreement within and between rater groups.",
    label_app,
)(label_quality)
stage(
    "label user",
    LabelUserConfig,
    "Add a rater or admin; prints their invite link path and API token (shown once).",
    label_app,
)(add_label_user)
stage(
    "label access",
    LabelAccessConfig,
    "A user's access: new invite link, revoke it, new API token, (de)activate, sign out.",
    label_app,
)(label_access)


stage(
    "judge",
    JudgeConfig,
    "AI feedback: a judge under a constitution labels a campaign (rater ai:<model>) or a "
    "pairs file; on human-labelled pairs it reports agreement and position bias.",
)(judge)
cai_app = typer.Typer(
    help="Step 2b: Constitutional AI (critique and revise).", no_args_is_help=True
)
app.add_typer(cai_app, name="cai")
stage(
    "cai revise",
    CAIConfig,
    "SL-CAI: answer red-team prompts, critique and revise under the constitution; writes "
    "demonstrations (for sft) and revision-over-original comparisons (for reward train).",
    cai_app,
)(cai_revise)


@app.command("run")
def run(
    config: Annotated[
        Path | None, typer.Argument(help="Run config (YAML); optional with --set.")
    ] = None,
    from_stage: Annotated[
        str | None,
        typer.Option(
            "--from", help=f"Re-run this stage and all after it: {', '.join(RUN_STAGES)}."
        ),
    ] = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The whole loop: [sft] → pairs → labels → reward → ppo → eval → report.

    Finished stages are skipped on a re-run; an interrupted one continues (PPO from its newest
    checkpoint). Exit code 3: waiting for people's labels (raters.people.wait: false).
    """
    cfg = load_config(RunConfig, config, set_ or [])
    try:
        summary = run_pipeline(cfg, from_stage=from_stage)
    except WaitingForLabels as w:
        err.print(f"[yellow]waiting for labels:[/yellow] {w}")
        emit(w.summary, as_json, title="palate run")
        raise typer.Exit(3) from None
    if not as_json and summary.get("gold_win_rate") is not None:
        lo, hi = summary["gold_win_rate_low"], summary["gold_win_rate_high"]
        out.print(
            f"[bold]gold win rate: {summary['gold_win_rate']:.3f}[/bold] "
            f"(95% CI {lo:.3f}-{hi:.3f}, final vs initial policy, "
            f"{summary['prompts']} held-out prompts)"
        )
    if not as_json:
        out.print(f"report: {summary['report']}")
    emit(summary, as_json, title="palate run")


COMMANDS["run"] = (RunConfig, run_pipeline)


@app.command("serve")
def serve(
    db: Annotated[str, typer.Option(help="Database URL or SQLite file path.")] = "palate-labels.db",
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    secure_cookies: Annotated[
        bool, typer.Option(help="Send session cookies over HTTPS only (behind TLS).")
    ] = False,
    workers: Annotated[
        int,
        typer.Option(min=1, help="Worker processes (uvicorn; use PostgreSQL for more than one)."),
    ] = 1,
    graceful_timeout: Annotated[
        float,
        typer.Option(min=0, help="On SIGTERM/Ctrl-C, seconds to let requests in flight finish."),
    ] = 30.0,
) -> None:
    """Run the labeling web app (raters compare responses; admins see the dashboard).

    Set PALATE_SECRET_KEY to keep sessions valid across restarts. GET /healthz answers 200
    while the database is reachable (503 otherwise).
    """
    # the web app (FastAPI, Jinja2) loads only for `palate serve`
    from palate.label.app import serve as serve_app

    serve_app(
        db,
        host=host,
        port=port,
        workers=workers,
        secure_cookies=secure_cookies,
        graceful_timeout=graceful_timeout,
        say=err.print,
    )


def main() -> None:
    """Console-script entry point: run the app, turning PalateErrors into one clean line."""
    logging.basicConfig(level=os.environ.get("PALATE_LOG", "WARNING"), format="%(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        rc = app(standalone_mode=False)
    except PalateError as e:
        err.print(f"[bold red]error:[/bold red] {e}", highlight=False)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        err.print("interrupted")
        sys.exit(130)
    except Exception as e:
        # a usage error (unknown option, missing argument): click's, or the copy of click that
        # typer >= 0.29 carries as typer._click, whose classes are not click's
        show, code = getattr(e, "show", None), getattr(e, "exit_code", None)
        if callable(show) and isinstance(code, int):
            show()
            sys.exit(code)
        raise
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
