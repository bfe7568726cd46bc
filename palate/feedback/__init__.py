"""Step 2b — AI feedback: a judge under a written constitution (RLAIF), critique-and-revise
(SL-CAI), and the judge as a reward.

- :mod:`~palate.feedback.constitution` — principles (comparison, critique, revision, rating);
- :mod:`~palate.feedback.backend` / :mod:`~palate.feedback.remote` — where answers come from:
  a local causal LM or an OpenAI-compatible server;
- :mod:`~palate.feedback.judge` — soft labels with position bias removed; the judge as reward;
- :mod:`~palate.feedback.label` — ``palate judge``: label a campaign or a file, quality report;
- :mod:`~palate.feedback.cai` — ``palate cai revise``.
"""

from palate.feedback.cai import CAIConfig, cai_revise
from palate.feedback.config import JudgeSettings
from palate.feedback.constitution import Constitution, Principle, load_constitution
from palate.feedback.judge import Judge, JudgeScorer, Verdict, load_judge
from palate.feedback.label import JudgeConfig, judge, judge_quality, label_campaign

__all__ = [
    "CAIConfig",
    "Constitution",
    "Judge",
    "JudgeConfig",
    "JudgeScorer",
    "JudgeSettings",
    "Principle",
    "Verdict",
    "cai_revise",
    "judge",
    "judge_quality",
    "label_campaign",
    "load_constitution",
    "load_judge",
]
