"""Step 5, evaluation: did RLHF help, or did it cheat?

* :mod:`~palate.eval.stats` — win rates with bootstrap intervals, the length-controlled win
  rate, order agreement (plain functions of scores);
* :mod:`~palate.eval.gold` — the gold preference (a readable rubric, or a named reward model);
* :mod:`~palate.eval.policies` — a policy's answers sampled and scored (gold, proxy, KL), two
  policies head to head, gold vs proxy on PPO's own rollouts;
* :mod:`~palate.eval.compare` — ``palate eval``: any policies against a baseline, by any judges
  (:mod:`~palate.eval.people` for people as the judge);
* :mod:`~palate.eval.overopt` — over-optimisation: best-of-n and RL against √KL, Gao et al.'s fits;
* :mod:`~palate.eval.xstest` — harmlessness without over-refusal (XSTest);
* :mod:`~palate.eval.sycophancy` — opinion, "are you sure?" and feedback sycophancy.

``palate run``'s eval stage (:mod:`palate.pipeline.stages.eval`) and ``palate eval`` use the same
pieces. Text features (refusal matching, distinct-n, repetition) are in :mod:`palate.text`;
PPO's alarms during training in :mod:`palate.ppo.monitors`.
"""
