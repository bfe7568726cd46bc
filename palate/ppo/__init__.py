"""Step 4 — PPO against the reward model, on a KL leash.

One update reads like the paper (:meth:`PPOTrainer.step`):

    sample → score → KL-penalised reward → advantages → clipped update → log → adapt KL

Where things are:

* :mod:`palate.ppo.trainer` — :class:`PPOTrainer` (models, the update, checkpoints) and
  :func:`ppo` (``palate ppo CONFIG.yaml``).
* :mod:`palate.ppo.rollout` — sample: :class:`Rollout` and the sampler (log π, log π_ref, V).
* :mod:`palate.ppo.rewards` — rule rewards and score shaping (the missing-EOS penalty,
  normalisation, clipping).
* :mod:`palate.ppo.update` — the clipped update (epochs × minibatches, PPO-ptx).
* :mod:`palate.ppo.monitors` — alarms while PPO runs (reward hacking, KL budget, collapse).
* :mod:`palate.ppo_math` — the maths as pure functions: the KL penalty
  (:func:`~palate.ppo_math.penalised_rewards`), GAE, the clipped losses, the KL controllers.
* :mod:`palate.lm` — log π and V from one forward (:func:`~palate.lm.policy_forward`).
* :mod:`palate.ppo.critic` — the value head and the separate critic (and its set-up).
* :mod:`palate.ppo.distributed` — several processes: rollouts sharded by rank, episodes gathered,
  gradients summed.
* :mod:`palate.ppo.config` — the config.
"""

from palate.ppo.config import (
    CriticSettings,
    KLSettings,
    PPOConfig,
    PPORecipe,
    PPOSettings,
    RewardShaping,
    RewardSource,
)
from palate.ppo.critic import SeparateCritic, ValueHead
from palate.ppo.rollout import Rollout
from palate.ppo.trainer import PPOTrainer, ppo

__all__ = [
    "CriticSettings",
    "KLSettings",
    "PPOConfig",
    "PPORecipe",
    "PPOSettings",
    "PPOTrainer",
    "RewardShaping",
    "RewardSource",
    "Rollout",
    "SeparateCritic",
    "ValueHead",
    "ppo",
]
