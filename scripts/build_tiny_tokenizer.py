"""Rebuild ``palate/assets/tiny-tokenizer``: the small tokenizer of the built-in ``tiny`` model.

A byte-level BPE (every string encodes; 2,048 tokens) with ChatML special tokens, trained on
the public prompts and dialogues in ``../shared/data`` (HH-RLHF harmless dev, Self-Instruct seed
tasks, Vicuna questions). It ships inside the package so ``tiny`` — the model every fast test
uses — needs no optional download. Run from the repository root:

    python scripts/build_tiny_tokenizer.py
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "palate" / "assets" / "tiny-tokenizer"
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def corpus() -> list[str]:
    texts: list[str] = []
    for line in (DATA / "hh-harmless-dev.jsonl").read_text().splitlines():
        row = json.loads(line)
        texts += [row["chosen"], row["rejected"]]
    for line in (DATA / "helpful-prompts.jsonl").read_text().splitlines():
        texts.append(json.loads(line)["prompt"])
    return texts


def main() -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2048,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    OUT.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(OUT)
    print(f"{OUT}: {len(fast)} tokens")


if __name__ == "__main__":
    main()
