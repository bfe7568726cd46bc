"""Benchmark: palate PPO vs TRL 1.12.0's PPOTrainer, side by side in one run.

Same policy (smollm2-135m-instruct), same reward model (a SmolLM2 sequence-classification model
built once by this script and loaded by both sides), same 8 prompts (chat-templated token ids,
cut to --max-prompt-length), batch 8, 48 new tokens at temperature 1 stopping at EOS, 4 PPO
epochs of one minibatch of 8, --updates updates each. Reported per setting: episodes/s over the
timed updates (rollout + update, model loading excluded) and the peak RSS of each side's process,
with the ratios.

Settings:
  like-for-like  both sides: full fine-tuning, fp32, a separate critic initialised from the
                 reward model, a frozen reference copy.
  best           each side at its fastest CPU set-up. palate: LoRA (the reference is the
                 base with adapters off), bf16 autocast with the frozen base stored in bf16,
                 value head on the policy's backbone. TRL: LoRA via peft_config (its reference
                 is the adapter-disabled policy too), bf16=False (see --trl-bf16), and the
                 separate value model it always needs.

Usage (from the repo root, after `make setup`):
    python3 -m venv bench/.venv-trl-ppo
    bench/.venv-trl-ppo/bin/pip install -r bench/requirements-trl-ppo.txt
    .venv/bin/python bench/ppo_vs_trl.py [--updates 3] [--settings like-for-like,best]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, compare_sides, peak_rss_mb, run_side  # noqa: E402 - bench/ is on sys.path

TRL_PY = ROOT / "bench" / ".venv-trl-ppo" / "bin" / "python"
HH = ROOT.parent / "shared" / "data" / "hh-harmless-dev.jsonl"


# --------------------------------------------------------------------------- children


def run_palate(args: argparse.Namespace) -> dict:
    from palate.config import load_config
    from palate.data import PromptRecord, write_jsonl
    from palate.ppo import PPOConfig, PPOTrainer

    work = Path(tempfile.mkdtemp(prefix="bench-palate-ppo-"))
    prompts = json.loads(Path(args.prompts).read_text())
    write_jsonl(work / "prompts.jsonl", [PromptRecord(prompt=p["messages"]) for p in prompts])
    best = args.setting == "best"
    cfg = load_config(
        PPOConfig,
        None,
        [
            f"model={args.model}",
            f"prompts={work / 'prompts.jsonl'}",
            f"output_dir={work / 'run'}",
            f"reward.model={args.reward_model}",
            f"max_prompt_length={args.max_prompt_length}",
            f"finetune={'lora' if best else 'full'}",
            f"critic.mode={'shared' if best else 'separate'}",
            "critic.init=reward_model",
            f"precision={'auto' if best else 'fp32'}",
            f"sampling.max_new_tokens={args.new_tokens}",
            "sampling.temperature=1.0",
            f"ppo.batch_size={args.batch_size}",
            f"ppo.mini_batch_size={args.batch_size}",
            f"ppo.epochs={args.epochs}",
            f"ppo.updates={args.updates}",
            "kl.adaptive=false",
            "kl.coef=0.05",
            f"optim.lr={args.lr}",
        ],
    )
    trainer = PPOTrainer(cfg)
    records = trainer.prompts
    t0 = time.perf_counter()
    rows = []
    for _ in range(args.updates):
        row, _ro = trainer.step(records[: args.batch_size])
        rows.append(row)
    seconds = time.perf_counter() - t0
    return {
        "side": "palate",
        "setting": args.setting,
        "precision": trainer.precision,
        "episodes_per_s": args.updates * args.batch_size / seconds,
        "seconds": seconds,
        "rollout_s": sum(r["timing/rollout"] for r in rows),
        "update_s": sum(r["timing/update"] for r in rows),
        "mean_response_length": sum(r["response/length"] for r in rows) / len(rows),
        "peak_rss_mb": peak_rss_mb(),
    }


def run_trl(args: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    best = args.setting == "best"
    prompts = json.loads(Path(args.prompts).read_text())
    tok = AutoTokenizer.from_pretrained(args.reward_model, padding_side="left")
    ds = Dataset.from_list([{"input_ids": p["input_ids"]} for p in prompts])
    policy = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    rm = AutoModelForSequenceClassification.from_pretrained(args.reward_model, num_labels=1)
    value = AutoModelForSequenceClassification.from_pretrained(args.reward_model, num_labels=1)
    peft_config = None
    if best:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
    cfg = PPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-ppo-"),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        num_mini_batches=1,
        num_ppo_epochs=args.epochs,
        total_episodes=args.updates * args.batch_size,
        local_rollout_forward_batch_size=args.batch_size,
        response_length=args.new_tokens,
        temperature=1.0,
        stop_token="eos",
        kl_coef=0.05,
        learning_rate=args.lr,
        num_sample_generations=0,
        bf16=best and args.trl_bf16,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1000,
        seed=0,
    )
    trainer = PPOTrainer(
        args=cfg,
        processing_class=tok,
        model=policy,
        ref_model=None,
        reward_model=rm,
        train_dataset=ds,
        value_model=value,
        peft_config=peft_config,
    )
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    return {
        "side": "trl",
        "setting": args.setting,
        "precision": "bf16" if cfg.bf16 else "fp32",
        "episodes_per_s": args.updates * args.batch_size / seconds,
        "seconds": seconds,
        "peak_rss_mb": peak_rss_mb(),
    }


# --------------------------------------------------------------------------- orchestration


def prepare(args: argparse.Namespace, work: Path) -> None:
    """The shared reward model and prompts (token ids as palate renders them)."""
    import torch

    from palate.data import read_records
    from palate.formatting import prompt_ids
    from palate.models import resolve_model
    from palate.reward import RewardModel

    args.model = resolve_model(args.model)
    torch.manual_seed(0)
    # palate's reward model re-renders the prompt itself; cut it to what the policy (and TRL's
    # reward model) sees: the prompt tokens after --max-prompt-length, plus the response + EOS
    rm = RewardModel.from_backbone(
        args.model, max_length=args.max_prompt_length + args.new_tokens + 1
    )
    rm.save(work / "rm")
    args.reward_model = str(work / "rm")
    prompts = []
    for r in read_records(HH, "prompts").records:
        ids = prompt_ids(rm.tokenizer, r.prompt)[-args.max_prompt_length :]
        msgs = r.prompt if isinstance(r.prompt, str) else [m.model_dump() for m in r.prompt]
        prompts.append({"messages": msgs, "input_ids": ids})
        if len(prompts) == args.batch_size:
            break
    (work / "prompts.json").write_text(json.dumps(prompts))
    args.prompts = str(work / "prompts.json")


def child(python: str, args: argparse.Namespace, side: str, setting: str) -> dict:
    argv = [
        "--model",
        args.model,
        "--reward-model",
        args.reward_model,
        "--prompts",
        args.prompts,
        "--updates",
        str(args.updates),
        "--batch-size",
        str(args.batch_size),
        "--epochs",
        str(args.epochs),
        "--new-tokens",
        str(args.new_tokens),
        "--max-prompt-length",
        str(args.max_prompt_length),
        "--lr",
        str(args.lr),
    ]
    if args.trl_bf16:
        argv.append("--trl-bf16")
    return run_side(python, __file__, argv, side, setting)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--child", choices=["palate", "trl"])
    ap.add_argument("--setting", default="best", choices=["like-for-like", "best"])
    ap.add_argument("--settings", default="like-for-like,best")
    ap.add_argument("--sides", default="palate,trl")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--reward-model", default=None)
    ap.add_argument("--prompts", default=None)
    ap.add_argument("--updates", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--max-prompt-length", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--trl-bf16", action="store_true", help="TRL best setting with bf16=True")
    ap.add_argument("--json", action="store_true", help="print the results as one JSON line")
    args = ap.parse_args()
    if args.child == "palate":
        print(json.dumps(run_palate(args)))
        return
    if args.child == "trl":
        print(json.dumps(run_trl(args)))
        return
    sides = args.sides.split(",")
    if "trl" in sides and not TRL_PY.exists():
        raise SystemExit(
            "TRL venv missing: python3 -m venv bench/.venv-trl-ppo && "
            "bench/.venv-trl-ppo/bin/pip install -r bench/requirements-trl-ppo.txt"
        )
    work = Path(tempfile.mkdtemp(prefix="bench-ppo-"))
    prepare(args, work)
    print(
        f"{args.batch_size} prompts (<= {args.max_prompt_length} tokens), batch "
        f"{args.batch_size}, {args.new_tokens} new tokens, {args.epochs} PPO epochs, "
        f"{args.updates} updates per side",
        file=sys.stderr,
    )

    def run(side: str, setting: str) -> dict:
        return child(sys.executable if side == "palate" else str(TRL_PY), args, side, setting)

    settings = args.settings.split(",")
    results = compare_sides(settings, sides, run, "episodes_per_s", "episodes/s", echo=True)
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
