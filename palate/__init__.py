"""palate: the whole RLHF loop — SFT, preference collection, reward model, PPO, evaluation.

One module per step: :mod:`palate.sft`, :mod:`palate.reward`, :mod:`palate.ppo`, ... built on
:mod:`palate.models` (model specs), :mod:`palate.data` (records and JSONL IO),
:mod:`palate.config` (typed configs) and :mod:`palate.rundir` (run directories).
"""

__version__ = "0.1.0"

import warnings as _warnings

# Raised inside peft/transformers on every LoRA save; nothing a palate user can act on.
_warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
