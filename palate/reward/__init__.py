"""Step 3 — the reward model: a scalar picture of what the raters prefer.

It is trained on comparisons with the Bradley-Terry model: the probability that ``chosen`` beats
``rejected`` is ``σ(r_chosen − r_rejected)`` (see :func:`preference_loss` for ties, margins, soft
labels, label smoothing and the centring term). After training, scores are shifted so the mean
score of a reference set (the chosen training responses) is 0, and the shift is stored with the
model, so PPO sees centred rewards.

Where things are:

* :mod:`palate.reward.loss` — :func:`preference_loss`, the Bradley-Terry loss.
* :mod:`palate.reward.model` — :class:`RewardModel` (backbone + scalar head: load / encode /
  score / save), :class:`RewardEnsemble`, :func:`load_reward_model` (what PPO and raters load).
* :mod:`palate.reward.train` — :class:`RewardTrainer` and :func:`train_reward`
  (``palate reward train``), ensembles.
* :mod:`palate.reward.metrics` — accuracy, calibration and length-bias checks
  (:func:`evaluate_reward`, ``palate reward eval``) and :func:`score_file`
  (``palate reward score``).
* :mod:`palate.reward.config` — the configs.
"""

from palate.reward.config import (
    RewardConfig,
    RewardEvalConfig,
    RewardLossSettings,
    RewardRecipe,
    RewardScoreConfig,
    RewardTrainSettings,
)
from palate.reward.loss import preference_loss
from palate.reward.metrics import (
    evaluate_reward,
    expected_calibration_error,
    preference_metrics,
    score_comparisons,
    score_file,
)
from palate.reward.model import (
    RewardEnsemble,
    RewardModel,
    RewardModelScorer,
    ScoreFn,
    load_reward_model,
)
from palate.reward.train import RewardTrainer, train_reward

__all__ = [
    "RewardConfig",
    "RewardEnsemble",
    "RewardEvalConfig",
    "RewardLossSettings",
    "RewardModel",
    "RewardModelScorer",
    "RewardRecipe",
    "RewardScoreConfig",
    "RewardTrainSettings",
    "RewardTrainer",
    "ScoreFn",
    "evaluate_reward",
    "expected_calibration_error",
    "preference_loss",
    "preference_metrics",
    "score_comparisons",
    "score_file",
    "train_reward",
    "load_reward_model",
]
