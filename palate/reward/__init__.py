"""Step 3 — the reward model: a scalar picture of what the raters prefer.

It is trained on comparisons with the Bradley-Terry model: the probability that ``chosen`` beats
``rejected`` is ``σ(r_chosen − r_rejected)`` (see :func:`preference_loss` for ties, margins, soft
labels, label smoothing and the centring term). After training, an affine map (gain, offset) is
fitted so the rewards of the initial policy's own samples have mean 0 and std 1, and stored with
the model, so PPO sees rewards in the same units whatever the reward model.

Where things are:

* :mod:`palate.reward.loss` — :func:`preference_loss`, the Bradley-Terry loss.
* :mod:`palate.reward.model` — :class:`RewardModel` (backbone + scalar head: load / encode /
  score / save), :class:`RewardEnsemble`, :func:`load_reward_model` (what PPO and raters load).
* :mod:`palate.reward.train` — :class:`RewardTrainer` and :func:`train_reward`
  (``palate reward train``), ensembles.
* :mod:`palate.reward.scoring` — :func:`load_score_fn`: a ``score(prompts, responses)``
  callable from a configured source (reward model, function, AI judge, routes).
* :mod:`palate.reward.routed` — :class:`RoutedScorer`: one reward model per prompt criterion
  (Llama 2's safety and helpfulness reward models), each prompt scored by its own.
* :mod:`palate.reward.normalize` — :func:`fit_normalisation`: the gain and offset, fitted on
  the initial policy's samples (lm-human-preferences' ``normalize_before``).
* :mod:`palate.reward.metrics` — accuracy, calibration and length-bias checks
  (:func:`evaluate_reward`, ``palate reward eval``) and :func:`score_file`
  (``palate reward score``).
* :mod:`palate.reward.config` — the configs.
"""

from palate.reward.config import (
    RewardConfig,
    RewardEvalConfig,
    RewardLossSettings,
    RewardNormalization,
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
from palate.reward.normalize import fit_normalisation
from palate.reward.routed import RoutedScorer
from palate.reward.scoring import ScoreSource, load_score_fn
from palate.reward.train import RewardTrainer, train_reward

__all__ = [
    "RewardConfig",
    "RewardEnsemble",
    "RewardEvalConfig",
    "RewardLossSettings",
    "RewardModel",
    "RewardModelScorer",
    "RewardNormalization",
    "RewardRecipe",
    "RewardScoreConfig",
    "RewardTrainSettings",
    "RewardTrainer",
    "RoutedScorer",
    "ScoreFn",
    "ScoreSource",
    "evaluate_reward",
    "expected_calibration_error",
    "fit_normalisation",
    "load_score_fn",
    "preference_loss",
    "preference_metrics",
    "score_comparisons",
    "score_file",
    "train_reward",
    "load_reward_model",
]
