"""Two CPU processes (torchrun, gloo) train what one process trains with the same global batch.

SFT and the reward model, and PPO: for PPO each process samples half the prompts, so the runs
sample per-episode seeded noise (``episode_seeds``) to draw the same episodes in one process as
in two; the killed-and-resumed run keeps the default global-RNG sampling, where every rank's
RNG state must come back from the checkpoint.

Each run is a real ``python -m torch.distributed.run --nproc_per_node 2 -m palate.cli ...``;
the one-process run accumulates two micro-batches where the two processes take one each, so the
global batch, the loss normalisation (over the whole step's tokens or pairs) and the data order
are the same. Tolerance: fp32 gradients summed in another order (gloo's all-reduce vs
accumulation) differ by rounding, ~1e-7 relative per step, and Adam turns a near-zero gradient's
rounding into a full-size step, so the weights after a few steps at lr 3e-3 agree to 1e-4
(measured: max difference 3e-5 for the reward model, under 1e-5 for SFT).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from palate.data import write_jsonl
from palate.errors import ConfigError

from .ppo.test_trainer import bright
from .ppo.test_trainer import sft_policy as sft_policy  # the module-scoped fixture
from .test_reward import marker_pairs
from .test_sft import demos

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def palate_cli(
    processes: int, *args: str, env: dict[str, str] | None = None, ok: bool = True
) -> str:
    """``palate <args>`` in ``processes`` processes (torchrun), on the CPU; returns the output."""
    env = dict(
        os.environ,
        ACCELERATE_USE_CPU="1",
        OMP_NUM_THREADS="1",
        PALATE_PROGRESS="0",
        PYTHONPATH=str(ROOT),
        **(env or {}),
    )
    if processes == 1:
        cmd = [sys.executable, "-m", "palate.cli", *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={processes}",
            f"--master_port={free_port()}",
            "-m",
            "palate.cli",
            *args,
        ]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if ok:
        assert done.returncode == 0, done.stderr[-3000:]
    else:
        assert done.returncode != 0, "the run was meant to die"
    return done.stdout + done.stderr


def sets(*overrides: str) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


# what both tests train with: the tiny model in fp32, 2 epochs at a learning rate that moves it
SHARED = ("model=tiny", "precision=fp32", "optim.lr=3e-3", "train.epochs=2")


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_training(one: Path, two: Path, weights: str, keys: tuple[str, ...]) -> None:
    a, b = load_file(one / "final" / weights), load_file(two / "final" / weights)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-4, msg=name)
    ma, mb = metrics(one), metrics(two)
    # one line per logged step: only rank 0 writes the log
    assert [r["step"] for r in ma] == [r["step"] for r in mb] == sorted({r["step"] for r in mb})
    for ra, rb in zip(ma, mb, strict=True):
        for key in keys:  # the step's metrics are over both processes' shares
            if key in ra or key in rb:
                assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-6), (ra["step"], key)
    for key in keys:
        assert any(key in r for r in ma), key
    assert len(list((two / "checkpoints").glob("step-*"))) == len(
        list((one / "checkpoints").glob("step-*"))
    )


@pytest.mark.timeout(900)
def test_sft_in_two_processes_equals_one(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "demos.jsonl", demos(24))
    common = sets(
        *SHARED,
        f"data={tmp_path / 'demos.jsonl'}",
        "finetune=full",
        "eval_fraction=0",
        "sample_prompts=0",
        "train.batch_size=4",
        "checkpoint_every=3",
    )
    one, two = tmp_path / "one", tmp_path / "two"
    palate_cli(1, "sft", *common, *sets("train.grad_accum=2", f"output_dir={one}"))
    palate_cli(2, "sft", *common, *sets(f"output_dir={two}"))
    assert_same_training(one, two, "model.safetensors", ("train/loss", "train/response_tokens"))


@pytest.mark.timeout(900)
def test_reward_model_in_two_processes_equals_one(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "pairs.jsonl", marker_pairs(64))
    common = sets(
        *SHARED,
        f"data={tmp_path / 'pairs.jsonl'}",
        "max_length=48",
        "eval_fraction=0.25",
        "train.batch_size=8",
        "checkpoint_every=2",
    )
    one, two = tmp_path / "one", tmp_path / "two"
    args = ("reward", "train", *common)
    palate_cli(1, *args, *sets("train.grad_accum=2", f"output_dir={one}"))
    palate_cli(2, *args, *sets(f"output_dir={two}"))
    keys = ("train/loss", "train/accuracy", "train/margin", "eval/accuracy")
    assert_same_training(one, two, "model.safetensors", keys)


# ---------------------------------------------------------------------------------------- PPO


def bright_or_die(prompts, responses) -> torch.Tensor:
    """The ``bright`` rule reward; on its PALATE_TEST_DIE_AT-th call, rank 1 SIGKILLs itself
    (torchrun then stops the other rank): a run killed mid-update, for the resume test."""
    _calls.append(1)
    die_at = int(os.environ.get("PALATE_TEST_DIE_AT", "0"))
    if die_at and len(_calls) == die_at and os.environ.get("RANK") == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    return bright(prompts, responses)


_calls: list[int] = []


def ppo_sets(policy: tuple[str, str], out: Path, *overrides: str) -> list[str]:
    model, prompts = policy
    return sets(
        f"model={model}",
        f"prompts={prompts}",
        f"output_dir={out}",
        "reward.function=tests.test_distributed:bright_or_die",
        "reward.normalize=true",  # score moments over the global batch
        "kl.adaptive=true",  # the controller sees the global KL
        "kl.coef=0.05",
        "sampling.max_new_tokens=16",
        "sampling.temperature=1.0",
        "ppo.batch_size=8",
        "ppo.mini_batch_size=4",
        "ppo.epochs=2",
        "finetune=lora",
        "lora.r=4",
        "optim.lr=3e-3",
        "precision=fp32",
        "sample_every=1",
        *overrides,
    )


# compared update by update (timing/* and throughput/* differ)
PPO_KEYS = (
    "objective/score",
    "objective/score_shaped",
    "objective/kl",
    "objective/kl_coef",
    "objective/entropy",
    "policy/loss",
    "policy/clipfrac",
    "policy/approxkl",
    "policy/grad_norm",
    "value/loss",
    "value/mean",
    "value/explained_variance",
    "response/length",
    "response/eos_rate",
)


@pytest.mark.timeout(900)
def test_ppo_in_two_processes_equals_one(tmp_path: Path, sft_policy) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    common = ("ppo.updates=3", "episode_seeds=true", "checkpoint_every=2")
    palate_cli(1, "ppo", *ppo_sets(sft_policy, one, *common))
    palate_cli(2, "ppo", *ppo_sets(sft_policy, two, *common))
    assert_same_training(one, two, "model.safetensors", PPO_KEYS)
    # rank 0 alone wrote the samples: the global batch, in the one-process order
    for update in (1, 2, 3):
        name = f"samples/update-{update:05d}.jsonl"
        assert (one / name).read_text() == (two / name).read_text()
    assert json.loads((two / "summary.json").read_text())["updates"] == 3


@pytest.mark.timeout(900)
def test_two_process_ppo_killed_and_resumed_continues_exactly(tmp_path: Path, sft_policy) -> None:
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    common = ("ppo.updates=5", "checkpoint_every=2", "keep_checkpoints=5")
    palate_cli(2, "ppo", *ppo_sets(sft_policy, whole, *common))
    # rank 1 dies in update 4's rollout: the newest checkpoint is update 2's
    palate_cli(
        2, "ppo", *ppo_sets(sft_policy, killed, *common), env={"PALATE_TEST_DIE_AT": "4"}, ok=False
    )
    assert sorted(p.name for p in (killed / "checkpoints").glob("step-*")) == ["step-0000002"]
    assert not (killed / "final").exists()
    assert len(metrics(killed)) == 3  # update 3 was logged before the kill
    output = palate_cli(2, "ppo", *ppo_sets(sft_policy, killed, *common))
    assert "resuming from" in output and "update 2/5" in output
    a, b = metrics(whole), metrics(killed)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5]
    for ra, rb in zip(a, b, strict=True):
        for key in PPO_KEYS:
            if key in ra:
                assert ra[key] == pytest.approx(rb[key], rel=1e-6, abs=1e-7), (ra["step"], key)
    wa = load_file(whole / "final" / "model.safetensors")
    wb = load_file(killed / "final" / "model.safetensors")
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=1e-6, msg=name)


def test_global_order_undoes_the_rank_major_gather() -> None:
    from palate.ppo.distributed import global_order

    # 3 ranks, 6 episodes: rank 0 holds 0 and 3, rank 1 holds 1 and 4, rank 2 holds 2 and 5
    gathered = [0, 3, 1, 4, 2, 5]
    assert [gathered[k] for k in global_order(6, 3)] == [0, 1, 2, 3, 4, 5]
    assert global_order(4, 1) == [0, 1, 2, 3]


def test_each_rank_resumes_its_own_rng_stream() -> None:
    from palate.training import rank_rng

    blob = {"rng": "rank 0's", "rng_by_rank": ["r0", "r1"]}
    assert [rank_rng(blob, r, 2, seed=0) for r in (0, 1)] == ["r0", "r1"]
    assert rank_rng({"rng": "only"}, 1, 2, seed=0) == "only"  # SFT / reward checkpoints
    # resumed in 3 processes: rank 0 keeps its stream, rank 2 has none saved: a fresh one
    assert rank_rng(blob, 0, 3, seed=0) == "rank 0's"
    assert isinstance(rank_rng(blob, 2, 3, seed=0), dict)


@pytest.mark.timeout(900)
def test_palate_run_launches_its_training_stages_in_two_processes(
    tmp_path: Path, hh_file: Path
) -> None:
    """``launch: {num_processes: 2, config_file: ddp.yaml}``: the reward model and PPO train in
    two processes (accelerate launch; gloo on this CPU), the other stages in the run process;
    a re-run skips them all."""
    from tests.pipeline.test_pipeline import QUICKSTART, tiny_overrides

    out = tmp_path / "run"
    ddp = ROOT / "examples" / "accelerate" / "ddp.yaml"  # the shipped config, 2 processes
    launch = ("launch.num_processes=2", f"launch.config_file={ddp}")
    args = ["run", str(QUICKSTART), *sets(*tiny_overrides(out, hh_file), *launch)]
    palate_cli(1, *args, "--json")
    for stage in ("reward", "ppo"):
        assert json.loads((out / stage / "summary.json").read_text())["processes"] == 2, stage
    assert json.loads((out / "pairs" / "summary.json").read_text()).get("processes") is None
    assert [r["step"] for r in metrics(out / "ppo")] == [1, 2, 3, 4]  # rank 0's log alone
    assert json.loads((out / "summary.json").read_text())["status"] == "complete"
    again = palate_cli(1, *args)
    assert "launching" not in again and again.count("done, skipped") == 6


def test_launch_commands_and_the_shipped_accelerate_configs(tmp_path: Path) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    from palate.config import load_config
    from palate.pipeline import RunConfig
    from palate.pipeline.launch import launch_command
    from palate.pipeline.run import Run

    shipped = sorted((ROOT / "examples" / "accelerate").glob("*.yaml"))
    assert [p.stem for p in shipped] == ["ddp", "single_gpu"]
    kinds = {p.stem: load_config_from_file(str(p)).distributed_type for p in shipped}
    assert {k: v.value for k, v in kinds.items()} == {"ddp": "MULTI_GPU", "single_gpu": "NO"}

    def command(*launch: str) -> list[str]:
        base = [f"output_dir={tmp_path}", "prompts.file=p.jsonl"]
        return launch_command(Run(load_config(RunConfig, None, [*base, *launch])), "ppo", 1)

    plain = command("launch.num_processes=4")
    assert plain[1:3] == ["-m", "accelerate.commands.launch"] and "--multi_gpu" in plain
    assert plain[plain.index("--num_processes") + 1] == "4"
    tail = ["-m", "palate.pipeline.launch", str(tmp_path / "config.yaml"), "ppo", "1"]
    assert plain[-5:] == tail
    ddp = str(shipped[0])
    assert "--num_processes" not in command(f"launch.config_file={ddp}")  # the config's 8
    both = command(f"launch.config_file={ddp}", "launch.num_processes=2")
    assert both[both.index("--config_file") + 1] == ddp and "--multi_gpu" not in both
    with pytest.raises(ConfigError, match="launch.config_file nowhere.yaml: no such file"):
        command("launch.config_file=nowhere.yaml")


def test_gradient_buckets_put_every_gradient_back(tmp_path: Path) -> None:
    """One process (world 1: the all-reduce is the identity): the flattening into buckets of
    3 elements and back returns every gradient to its parameter, zeros where there was none."""
    import torch.distributed as dist

    from palate.ppo.distributed import all_reduce_gradients

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        params = [torch.nn.Parameter(torch.zeros(s)) for s in ((2, 2), (5,), (1,), (3,))]
        want = [torch.randn_like(p) for p in params]
        for p, g in zip(params, want, strict=True):
            p.grad = g.clone()
        params[2].grad = None
        before = [p.grad for p in params]
        all_reduce_gradients(params, bucket=3)
        want[2] = torch.zeros(1)
        for p, g, old in zip(params, want, before, strict=True):
            assert p.grad is not old and torch.equal(p.grad, g)  # reduced and put back
    finally:
        dist.destroy_process_group()
