"""``palate run``'s training stages in several processes (``launch:`` in a run config).

The run process builds the stage's command, ``accelerate launch ... -m palate.pipeline.launch
RUN/config.yaml STAGE ROUND [PART]``, and waits for it. Each launched process rebuilds the run
from its config and runs the same trainer call the run process would have made (the same stage
config, and for PPO the run's gold watching for reward hacking); the trainers shard the data and
write from rank 0 (see :mod:`palate.ppo.distributed` and :func:`palate.training.run_steps`). The
run process then reads the stage's ``summary.json``. Other stages (pairs, labels, eval, report)
stay in the run process.

On a machine without a GPU the processes are CPU processes talking over gloo (there to test
the mechanics and a config before it goes to GPUs); with GPUs, one process per GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from palate.config import load_config
from palate.errors import ConfigError
from palate.pipeline.config import RunConfig
from palate.pipeline.recipes import ppo_config, reward_config, sft_config
from palate.pipeline.run import Run
from palate.ppo import ppo
from palate.progress import console
from palate.reward import train_reward
from palate.rundir import RunDir
from palate.sft import sft

__all__ = ["launch_command", "launched", "main"]


def inside_launch() -> bool:
    """True in a process started by a launcher (torchrun / accelerate set WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ


def launch_command(run: Run, stage: str, r: int = 0, part: str | None = None) -> list[str]:
    """The ``accelerate launch`` command line for one training stage of ``run``."""
    settings = run.cfg.launch
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if settings.config_file is not None:
        if not Path(settings.config_file).is_file():
            raise ConfigError(f"launch.config_file {settings.config_file}: no such file")
        cmd += ["--config_file", settings.config_file]
    else:
        # no accelerate config: plain data-parallel processes (torchrun underneath)
        cmd += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no"]
        cmd += ["--dynamo_backend", "no"]
    if settings.num_processes > 1 or settings.config_file is None:
        cmd += ["--num_processes", str(settings.num_processes)]
    cmd += ["-m", "palate.pipeline.launch", str(run.root / "config.yaml"), stage, str(r)]
    return cmd + ([part] if part else [])


def launched(run: Run, stage: str, r: int = 0, part: str | None = None) -> dict[str, Any] | None:
    """Run a training stage through ``accelerate launch`` when the run's ``launch`` settings
    ask for it (returns its summary); None: run it in this process."""
    settings = run.cfg.launch
    if not settings.active or stage not in settings.stages or inside_launch():
        return None

    out = Path(_stage_config(run, stage, r, part).output_dir)  # checked before launching
    cmd = launch_command(run, stage, r, part)
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "1"  # gloo processes on the CPU
        env.setdefault("OMP_NUM_THREADS", "1")

    n = settings.num_processes
    count = f"{n} processes" if n > 1 else f"the processes of {settings.config_file}"
    console.print(f"[dim]launching {stage}: accelerate launch, {count}[/dim]")
    done = subprocess.run(cmd, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"stage {stage}: the launched processes failed (exit code {done.returncode}); the "
            f"stage is left partial and continues on the next run. Command: {' '.join(cmd)}"
        )

    summary = RunDir(out).read_summary()
    if not summary:
        raise RuntimeError(f"stage {stage}: the launched processes wrote no {out}/summary.json")
    return summary


def _stage_config(run: Run, stage: str, r: int, part: str | None) -> Any:

    if stage == "sft":
        return sft_config(run)
    if stage == "reward":
        return reward_config(run, r, part)
    if stage == "ppo":
        return ppo_config(run, r)
    raise ValueError(f"not a training stage: {stage!r}")


def run_here(
    run: Run,
    stage: str,
    r: int = 0,
    part: str | None = None,
    *,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """The trainer call of a training stage, in this process (and, launched, in each);
    ``part``: one more reward model (``groups/<g>``, ``criteria/<c>``: see
    :func:`palate.pipeline.recipes.comparisons_file`); ``stop_after``: PPO stops after that
    update (the library's "as if interrupted")."""
    cfg = _stage_config(run, stage, r, part)
    if stage == "sft":
        return sft(cfg)
    if stage == "reward":
        return train_reward(cfg)

    # the gold watches for reward hacking during training (the policy never sees it)
    return ppo(cfg, stop_after=stop_after, gold_fn=run.gold())


def main(argv: list[str] | None = None) -> None:
    """``python -m palate.pipeline.launch RUN/config.yaml STAGE ROUND [PART]`` (one process of
    a launch)."""

    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (3, 4):
        raise SystemExit("usage: python -m palate.pipeline.launch CONFIG STAGE ROUND [PART]")
    config, stage, r = args[0], args[1], int(args[2])
    run = Run(load_config(RunConfig, config, []))
    run_here(run, stage, r, args[3] if len(args) == 4 else None)


if __name__ == "__main__":
    main()
