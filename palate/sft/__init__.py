"""Step 1 — supervised fine-tuning (SFT) on demonstrations.

The model learns to produce the demonstrated response given the prompt: cross-entropy on the
*response* tokens only (prompt tokens are masked out of the labels), with EOS appended to every
response so the model learns to stop. This is the starting point (π_SFT) that RLHF refines and
the reference the PPO KL penalty keeps the policy close to.

Where things are:

* :mod:`palate.sft.data` — :func:`tokenize_demonstration` (prompt via the chat template +
  response + EOS, labels masked, truncation from the left of the prompt) and :func:`collate`.
* :mod:`palate.sft.loss` — :func:`sft_loss`, a pure function of logits and labels.
* :mod:`palate.sft.train` — :class:`SFTTrainer` and :func:`sft` (``palate sft CONFIG.yaml``).
* :mod:`palate.sft.config` — the config.
"""

from palate.lm import IGNORE_INDEX
from palate.sft.config import SFTConfig, SFTRecipe, SFTTrainSettings
from palate.sft.data import Example, collate, tokenize_demonstration
from palate.sft.loss import sft_loss
from palate.sft.train import SFTTrainer, evaluate_loss, load_demonstrations, save_model, sft

__all__ = [
    "IGNORE_INDEX",
    "Example",
    "SFTConfig",
    "SFTRecipe",
    "SFTTrainSettings",
    "SFTTrainer",
    "collate",
    "evaluate_loss",
    "load_demonstrations",
    "save_model",
    "sft",
    "sft_loss",
    "tokenize_demonstration",
]
