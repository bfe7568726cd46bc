"""GPU check for palate PPO: episodes/s, generation tokens/s and the update's share of the time.

SmolLM2-shaped policies with random weights (built here from the shape alone, so nothing large
has to travel) and the real SmolLM2 tokenizer; the function reward "about 25 words"
(−|words − 25| / 25). Settings as in issue #14: LoRA r16, bf16, batch 64 × 48 new tokens at
temperature 1, 4 PPO epochs × 4 minibatches of 16, shared value head, adaptive KL. One warm-up
update (allocator, kernels, any compilation), then ``--updates`` timed ones.

On the GPU machine, from a clean checkout plus what ``bench/gpu_prepare.sh`` put in ``.gpu/``
(the tokenizer and the wheels that machine lacks):

    bash bench/gpu_check.sh                      # both shapes; prints a table and JSON lines

Here (CPU), to check the script itself: ``.venv/bin/python bench/gpu.py --shapes tiny
--batch-size 4 --mini-batch-size 2 --new-tokens 8 --updates 1``. Targets (issue #14, one H100):
≥ 25 episodes/s at 135M and ≥ 35 at 1.7B.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Llama-architecture shapes (SmolLM2-135M and -1.7B as published; tiny for a CPU smoke run).
SHAPES: dict[str, dict[str, Any]] = {
    "135m": {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
    },
    "1.7b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
    },
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
}

TOPICS = ["the sea", "a city at night", "bread", "rain", "chess", "a garden", "trains", "music"]
ASKS = ["Tell me about", "Write two sentences on", "What do you like about", "Describe"]


def about_25_words(prompts: list[Any], responses: list[str]) -> torch.Tensor:
    """The function reward: 0 at 25 words, −1 per 25 words away."""
    return torch.tensor([-abs(len(r.split()) - 25) / 25 for r in responses])


def build_policy(shape: str, tokenizer_dir: Path, out: Path) -> Path:
    """A randomly initialised SmolLM2-shaped Llama saved with the tokenizer (fp32 weights);
    reused when ``out`` already holds one (``--policy-cache``)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from palate.models import ensure_pad_token

    if (out / "config.json").is_file():
        return out

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ensure_pad_token(tok)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        rope_theta=100000.0,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **SHAPES[shape],
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # 1.7B: faster init
        model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def run_shape(shape: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from palate.config import load_config
    from palate.data import PromptRecord, write_jsonl
    from palate.ppo import PPOConfig, PPOTrainer

    torch._dynamo.reset()  # each shape compiles afresh (a new process would too)
    cache = Path(args.policy_cache) if args.policy_cache else work
    policy = build_policy(shape, Path(args.tokenizer), cache / shape / "policy")
    prompts = [f"{a} {t}." for a in ASKS for t in TOPICS]
    prompts = [prompts[i % len(prompts)] for i in range(max(len(prompts), args.batch_size))]
    write_jsonl(work / shape / "prompts.jsonl", [PromptRecord(prompt=p) for p in prompts])
    cfg = load_config(
        PPOConfig,
        None,
        [
            f"model={policy}",
            f"prompts={work / shape / 'prompts.jsonl'}",
            f"output_dir={work / shape / 'run'}",
            "reward.function=gpu:about_25_words",
            "finetune=lora",
            "precision=auto",
            f"sampling.max_new_tokens={args.new_tokens}",
            "sampling.temperature=1.0",
            f"ppo.batch_size={args.batch_size}",
            f"ppo.mini_batch_size={args.mini_batch_size}",
            f"ppo.epochs={args.epochs}",
            f"ppo.updates={args.updates + 1}",
            "checkpoint_every=1000",
            "sample_every=1000",
            *args.set,
        ],
    )
    trainer = PPOTrainer(cfg, score_fn=about_25_words)
    generate, gen_seconds, gen_tokens = trainer.engine.generate, [0.0], [0]

    def timed_generate(query_ids: torch.Tensor, *a: Any, **kw: Any) -> torch.Tensor:
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = generate(query_ids, *a, **kw)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        gen_seconds[0] += time.perf_counter() - t0
        gen_tokens[0] += out.shape[0] * (out.shape[1] - query_ids.shape[1])
        return out

    trainer.engine.generate = timed_generate  # type: ignore[method-assign]
    batch = trainer.prompts[: args.batch_size]
    t_warm = time.perf_counter()
    trainer.step(batch)  # warm-up (and compilation, where on)
    warmup = time.perf_counter() - t_warm
    gen_seconds[0], gen_tokens[0] = 0.0, 0
    rows, t0 = [], time.perf_counter()
    for _ in range(args.updates):
        row, _ = trainer.step(batch)
        rows.append(row)
    seconds = time.perf_counter() - t0
    rollout = sum(r["timing/rollout"] for r in rows)
    update = sum(r["timing/update"] for r in rows)
    return {
        "label": args.label,
        "shape": shape,
        "settings": args.set,
        "warmup_s": warmup,
        "device": torch.cuda.get_device_name() if trainer.device.type == "cuda" else "cpu",
        "precision": trainer.precision,
        "episodes_per_s": args.updates * args.batch_size / seconds,
        "generation_tokens_per_s": gen_tokens[0] / max(gen_seconds[0], 1e-9),
        "update_share": update / max(rollout + update, 1e-9),
        "rollout_s_per_update": rollout / args.updates,
        "update_s_per_update": update / args.updates,
        "mean_response_tokens": sum(r["response/length"] for r in rows) / len(rows),
        "peak_gpu_mem_gb": torch.cuda.max_memory_allocated() / 2**30
        if trainer.device.type == "cuda"
        else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="135m,1.7b")
    ap.add_argument("--tokenizer", default=str(ROOT / ".gpu" / "smollm2-tokenizer"))
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--mini-batch-size", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--updates", type=int, default=3, help="timed updates after the warm-up")
    ap.add_argument("--label", default="", help="names this run in the output")
    ap.add_argument(
        "--set", action="append", default=[], help="extra config override KEY=VALUE (repeat)"
    )
    ap.add_argument("--policy-cache", help="build the random policies here once, reuse after")
    ap.add_argument(
        "--palate", help="import palate from this directory (e.g. .gpu/before: older code)"
    )
    args = ap.parse_args()
    if args.palate:
        sys.path.insert(0, str(Path(args.palate).resolve()))
    if not (Path(args.tokenizer) / "tokenizer.json").is_file():
        raise SystemExit(
            f"{args.tokenizer}: no tokenizer.json. Run bench/gpu_prepare.sh first (it saves "
            "SmolLM2's tokenizer there), or pass --tokenizer DIR"
        )
    os.environ.setdefault("PALATE_PROGRESS", "0")
    sys.path.insert(0, str(Path(__file__).parent))  # reward.function=gpu:about_25_words
    work = Path(tempfile.mkdtemp(prefix="palate-gpu-"))
    results = [run_shape(s, args, work) for s in args.shapes.split(",")]
    print(
        f"{'label':>12} {'shape':>6} {'eps/s':>8} {'gen tok/s':>10} {'update share':>13} "
        f"{'rollout s':>9} {'update s':>8} {'warm-up s':>9} {'device'}"
    )
    for r in results:
        print(
            f"{r['label']:>12} {r['shape']:>6} {r['episodes_per_s']:8.2f} "
            f"{r['generation_tokens_per_s']:10.0f} {r['update_share']:13.2f} "
            f"{r['rollout_s_per_update']:9.2f} {r['update_s_per_update']:8.2f} "
            f"{r['warmup_s']:9.1f} {r['device']}"
        )
    for r in results:
        print(json.dumps(r))
    if os.environ.get("OUT"):
        with Path(os.environ["OUT"], "gpu.jsonl").open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)


if __name__ == "__main__":
    main()
