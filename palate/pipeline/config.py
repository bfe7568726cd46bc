"""The config of ``palate run``: every stage of the loop in one file.

The stage sections reuse the stage configs' *recipes* (:class:`~palate.sft.SFTRecipe`,
:class:`~palate.reward.RewardRecipe`, :class:`~palate.ppo.PPORecipe`): every field of
``palate sft``/``reward train``/``ppo`` but the inputs and output directory, which the run
supplies.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from palate.config import ADDED_LATER, Config
from palate.data import DEFAULT_CRITERION
from palate.eval.gold import GoldConfig
from palate.eval.overopt import OveroptSettings
from palate.feedback.config import JudgeSettings
from palate.label.quality import QualitySettings
from palate.ppo.config import PPORecipe, RewardShaping
from palate.raters.people import PeopleSettings
from palate.raters.simulated import PanelConfig
from palate.reward.config import RewardRecipe
from palate.sampling import SamplingConfig
from palate.sft.config import SFTRecipe

__all__ = [
    "EvalSettings",
    "PairSettings",
    "PromptFile",
    "PromptSettings",
    "RaterSettings",
    "RunConfig",
    "RunPPO",
    "RunReward",
    "OveroptSettings",
    "RunSFT",
    "SycophancySettings",
]


# --------------------------------------------------------------------------- config


class PromptFile(Config):
    """A further prompt file, with the criterion its prompts are judged on."""

    file: str = Field(description="Prompts JSONL (any palate data file or HH-RLHF transcripts).")
    criterion: str = Field(
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="What its prompts test (e.g. harmlessness for red-team prompts): "
        "raters.routes sends their pairs to the raters for it.",
    )
    max_prompts: int | None = Field(
        None, ge=1, description="Take at most this many of its prompts (seeded, before the split)."
    )


class PromptFlag(Config):
    """Prompts whose text matches a pattern are judged on another criterion (e.g. requests for
    a person's private details, where refusing is right, among other red-team prompts)."""

    pattern: str = Field(
        description="Regular expression (Python syntax, case-insensitive), searched in the "
        "prompt's text."
    )
    criterion: str = Field(
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="The criterion matching prompts get (see gold.rubric.refusal_right).",
    )
    share: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Order the training prompts so that this criterion makes up this share of "
        "every stretch of them (each round's pairs prompts), while its prompts last; null: "
        "where the seeded shuffle puts them.",
    )

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"not a regular expression: {e}") from None
        return v


class PromptSettings(Config):
    """Where prompts come from and how they are split."""

    file: str = Field(description="Prompts JSONL (any palate data file or HH-RLHF transcripts).")
    criterion: str = Field(
        DEFAULT_CRITERION,
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="What the prompts of `file` test (see raters.routes).",
    )
    more: list[PromptFile] = Field(
        default_factory=list,
        description="More prompt files mixed in, each with its own criterion (e.g. red-team "
        "prompts for harmlessness next to helpful ones).",
    )
    flags: list[PromptFlag] = Field(
        default_factory=list,
        description="Per-request criteria: a prompt (from any file) matching a flag's pattern "
        "gets its criterion; the first matching flag wins.",
        json_schema_extra=ADDED_LATER,
    )
    eval_prompts: int = Field(
        64, ge=1, description="Prompts held out (seeded) for the final evaluation."
    )
    max_prompts: int | None = Field(
        None, ge=1, description="Use at most this many training prompts (after the hold-out)."
    )
    max_tokens: int | None = Field(
        128, ge=8, description="Drop prompts longer than this many tokens (null = keep all)."
    )


class PairSettings(Config):
    """Sampling the A/B pairs raters compare."""

    prompts: int = Field(64, ge=1, description="Training prompts answered for pairs.")
    samples_per_prompt: int = Field(2, ge=2, description="k responses sampled per prompt.")
    pairing: Literal["all", "disjoint"] = Field(
        "all",
        description="all: every two of a prompt's k responses form a pair, k(k-1)/2 pairs (as "
        "InstructGPT turned rankings of K into comparisons; more labels per generated token); "
        "disjoint: k/2 pairs, each response in one.",
    )
    sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(max_new_tokens=48, temperature=1.0),
        description="How the responses are sampled.",
    )
    batch_size: int = Field(
        64,
        ge=1,
        description="Sequences generated together (on 2 CPU cores 64 samples ~1.4× as fast as 16).",
    )
    budget: int | None = Field(
        None,
        ge=1,
        description="Comparisons labelled per round (null: every pair). When there are more "
        "candidate pairs, `select` chooses which.",
        json_schema_extra=ADDED_LATER,
    )
    select: Literal["random", "uncertainty", "disagreement"] = Field(
        "random",
        description="Which pairs fill the budget (palate/label/active.py): random; uncertainty (the "
        "last reward model's P(a ≻ b) nearest ½); disagreement (the spread of an ensemble's "
        "members, needs reward.ensemble ≥ 2). The first round has no reward model yet: random.",
        json_schema_extra=ADDED_LATER,
    )
    random_share: float = Field(
        0.25,
        ge=0,
        le=1,
        description="Share of each budget drawn at random before `select` chooses the rest "
        "(an unbiased sample: it also measures how stale the last reward model is).",
        json_schema_extra=ADDED_LATER,
    )


class RaterGroup(Config):
    """A population of simulated raters with its own taste (``raters.groups``)."""

    name: str = Field(
        pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,39}$",
        description="The group's name: its raters are `sim-<name>-0` …, with the attribute "
        "`group: <name>`.",
    )
    panel: PanelConfig | None = Field(
        None, description="The group's panel (default: raters.panel)."
    )
    gold: GoldConfig | None = Field(
        None, description="The group's gold preference (default: the run's `gold`)."
    )


class RaterSettings(Config):
    """Who labels the pairs."""

    kind: Literal["simulated", "people", "judge", "file"] = Field(
        "simulated",
        description="simulated (a panel driven by the gold preference), people (the labeling "
        "app), judge (an AI judge under the constitution) or file (existing comparisons).",
    )
    routes: dict[str, Literal["simulated", "people", "judge"]] = Field(
        default_factory=dict,
        description="Hybrid labels: criterion → who labels its pairs, e.g. {harmlessness: "
        "judge, helpfulness: simulated}; criteria not listed go to `kind`. Each criterion gets "
        "its own campaign in the one labels database; exports carry each label's source.",
    )
    judge: JudgeSettings = Field(
        default_factory=JudgeSettings,
        description="The AI judge (kind or a route = judge); its principles default to those "
        "of the route's criterion.",
    )
    overlap: int = Field(
        3, ge=1, description="Raters per pair (simulated and people; a judge labels once)."
    )
    db: str | None = Field(
        None, description="Labels database URL or SQLite path (default: RUN/labels/labels.db)."
    )
    panel: PanelConfig = Field(
        default_factory=PanelConfig, description="Simulated panel (noise, biases, raters)."
    )
    people: PeopleSettings = Field(default_factory=PeopleSettings, description="People.")
    file: str | None = Field(None, description="kind=file: comparisons JSONL to train on.")
    aggregate: Literal["majority", "reliability"] = Field(
        "majority",
        description="How a pair's votes become the reward model's label: the vote fraction "
        "(majority), or the Dawid-Skene posterior, each rater weighted by their estimated "
        "reliability (palate/label/quality.py).",
        json_schema_extra=ADDED_LATER,
    )
    drop_flagged: bool = Field(
        False,
        description="Leave out the labels of raters the quality checks flag (random, "
        "one_side, too_fast) before the reward model sees them.",
        json_schema_extra=ADDED_LATER,
    )
    quality: QualitySettings = Field(
        default_factory=QualitySettings,
        description="When a rater is flagged (labels/quality.json and the report list them).",
        json_schema_extra=ADDED_LATER,
    )
    groups: list[RaterGroup] = Field(
        default_factory=list,
        description="Rater populations (simulated): each group's panel labels every pair with "
        "its own gold; the export carries each label's group, the report each group's "
        "agreement and the trained policy's win rate under each group's gold.",
        json_schema_extra=ADDED_LATER,
    )
    train_groups: list[str] | None = Field(
        None,
        description="Whose labels the run's reward model trains on (group names; default: "
        "every group, pooled).",
        json_schema_extra=ADDED_LATER,
    )
    per_group_reward: bool = Field(
        False,
        description="Also train one reward model per group (reward/groups/<name>); the "
        "evaluation reports how well each reward model agrees with each group's gold.",
        json_schema_extra=ADDED_LATER,
    )

    @model_validator(mode="after")
    def _check(self) -> RaterSettings:
        if self.kind == "file" and not self.file:
            raise ValueError("raters.kind=file needs raters.file")
        if self.kind == "file" and self.routes:
            raise ValueError("raters.routes cannot be used with raters.kind=file")
        names = [g.name for g in self.groups]
        if self.groups:
            if self.kind != "simulated" or self.routes:
                raise ValueError(
                    "raters.groups are simulated populations: use raters.kind simulated, "
                    "without routes (for people, set rater attributes on the dashboard)"
                )
            if len(set(names)) != len(names):
                raise ValueError(f"raters.groups: names must differ (got {names})")
        unknown = sorted(set(self.train_groups or []) - set(names))
        if unknown:
            raise ValueError(f"raters.train_groups: no groups named {unknown} (groups: {names})")
        if self.train_groups == []:
            raise ValueError("raters.train_groups: name at least one group (or leave it out)")
        if self.per_group_reward and not self.groups:
            raise ValueError("raters.per_group_reward needs raters.groups")
        used = {self.kind, *self.routes.values()}
        if "simulated" in used and not self.groups and self.overlap > self.panel.raters:
            raise ValueError("raters.overlap is larger than raters.panel.raters")
        if "people" in used and self.overlap > len(self.people.raters):
            raise ValueError("raters.overlap is larger than the number of raters.people.raters")
        return self


class RunSFT(SFTRecipe):
    """The optional SFT stage (``palate sft`` fields; the output directory is the run's)."""

    model: str | None = Field(None, description="Default: the run's model.")


class RunReward(RewardRecipe):
    """The reward-model stage (``palate reward train`` fields; the comparisons and the output
    directory are the run's)."""

    split_by: Literal["comparison", "prompt"] = Field(
        "prompt", description="Held-out accuracy on whole prompts (k samples → several pairs each)."
    )
    per_criterion: bool = Field(
        False,
        description="Also train one reward model per prompt criterion (reward/criteria/<name>, "
        "each on its own criterion's labels, normalised on the policy's samples of its own "
        "prompts); PPO and the evaluation's proxy score each prompt with its criterion's model "
        "(Llama 2's separate safety and helpfulness reward models). Pair selection still uses "
        "the pooled model.",
        json_schema_extra=ADDED_LATER,
    )


class OwnDeclines(Config):
    """PPO-ptx on the policy's own declines (``ppo.ptx_own_declines``)."""

    criteria: list[str] = Field(
        min_length=1,
        description="Criteria whose prompts' declines are kept (e.g. a prompts.flags "
        "criterion where refusing is right).",
    )
    coef: float = Field(0.1, gt=0, description="Weight of their SFT loss in PPO (ptx_coef).")


class DeclinesWarmStart(Config):
    """Fine-tuning on the initial model's own declines before round 0's PPO
    (``ppo.sft_own_declines``)."""

    criteria: list[str] = Field(
        min_length=1,
        description="Criteria whose prompts' declines are kept (e.g. a prompts.flags "
        "criterion where refusing is right).",
    )
    epochs: int = Field(2, ge=1, description="Passes over the declines.")
    lr: float = Field(2e-4, gt=0, description="Learning rate (AdamW, constant, no warm-up).")
    batch_size: int = Field(8, ge=1, description="Declines per optimiser step.")


class RunOnlyPPO(Config):
    """PPO settings only ``palate run`` has: they prepare the PPO stage's inputs across rounds
    (its prompts, PPO-ptx demonstrations, a warm-start adapter, the later rounds' β).
    :func:`palate.pipeline.recipes.ppo_config` reads them and leaves them out of the plain
    ``palate ppo`` config it builds."""

    later_rounds_kl_coef: float | None = Field(
        None,
        gt=0,
        description="With rounds > 1: the KL coefficient β of every later round, held fixed "
        "(the adaptive controller is off there). A later round starts from a policy already "
        "near the KL budget, where the adaptive controller moves β by at most "
        "0.2·batch/horizon per update, too slowly to pull KL back. null: each later round "
        "continues at the previous round's last β (adaptive) or at kl.coef. Unused with "
        "rounds: 1 (so --set rounds=1 runs a config's first round alone).",
        json_schema_extra=ADDED_LATER,
    )
    ptx_own_declines: OwnDeclines | None = Field(
        None,
        description="PPO-ptx on the run's own declines: the pairs samples (of this round and "
        "the ones before) on prompts of these criteria that refuse and say they cannot or will "
        "not help, each cut after the first sentence that does (palate.text.decline_opening), "
        "are each round's ptx demonstrations. Keeps refusals that PPO would otherwise unlearn, "
        "in the model's own words; a round with none runs without ptx. Replaces ppo.ptx_data "
        "and ppo.ptx_coef. null: off.",
        json_schema_extra=ADDED_LATER,
    )

    sft_own_declines: DeclinesWarmStart | None = Field(
        None,
        description="A warm start for round 0's PPO: the LoRA adapters are first fine-tuned "
        "on the initial model's own declines among round 0's pairs samples on prompts of these "
        "criteria (cut as for ptx_own_declines; written to ppo/warm-start-declines.jsonl, the "
        "adapter to ppo/warm-start/), and PPO starts from that adapter; the KL reference stays "
        "the initial model. Rejection-sampling fine-tuning on a rule (RAFT, Dong et al. 2023) "
        "as the supervised step before RL of Constitutional AI (Bai et al. 2022): PPO's "
        "rule reward (reward.decline_bonus) can only pay for declines the policy samples. No "
        "decline found: PPO starts fresh. Needs finetune lora. null: off.",
        json_schema_extra=ADDED_LATER,
    )

    prompt_shares: dict[str, float] = Field(
        default_factory=dict,
        description="{criterion: share}: PPO's prompts repeat each listed criterion's training "
        "prompts so that they make up about this share of them (PPO draws each epoch's batches "
        "in a seeded random order over all training prompts, so a rare criterion, e.g. a "
        "prompts.flags one, would barely reach it); written to the round's ppo/prompts.jsonl. "
        "Empty: every training prompt once.",
        json_schema_extra=ADDED_LATER,
    )

    @field_validator("prompt_shares")
    @classmethod
    def _shares(cls, v: dict[str, float]) -> dict[str, float]:
        if bad := {c: s for c, s in v.items() if not 0 < s < 1}:
            raise ValueError(f"each share must be between 0 and 1 (exclusive): {bad}")
        if sum(v.values()) >= 1:
            raise ValueError(f"the shares add up to {sum(v.values()):g}; they must stay under 1")
        return v


class RunPPO(PPORecipe, RunOnlyPPO):
    """The PPO stage (``palate ppo`` fields; the policy, prompts, reward model and output
    directory are the run's)."""

    reward: RewardShaping = Field(
        default_factory=RewardShaping, description="Reward shaping (the model is the run's)."
    )
    sample_every: int = Field(1, ge=1, description="Write rollouts every N updates.")
    keep_checkpoints: int = Field(
        100, ge=1, description="Checkpoints kept (evaluated along training by the eval stage)."
    )

    @model_validator(mode="after")
    def _own_declines(self) -> RunPPO:
        if self.ptx_own_declines is not None and (self.ppo.ptx_data or self.ppo.ptx_coef):
            raise ValueError(
                "ppo.ptx_own_declines replaces ppo.ppo.ptx_data and ppo.ppo.ptx_coef; set one"
            )
        if self.sft_own_declines is not None and self.finetune != "lora":
            raise ValueError(
                "ppo.sft_own_declines needs ppo.finetune lora (PPO starts from its adapter)"
            )
        return self


class SycophancySettings(Config):
    """Sycophancy before vs after (``palate/eval/sycophancy.py``), by log-probabilities."""

    caa: str | None = Field(
        "../shared/data/sycophancy-caa-ab.json",
        description="CAA's A/B sycophancy items (opinion sycophancy); null: skip.",
    )
    truthfulqa: str | None = Field(
        "../shared/data/truthfulqa-mc.json",
        description="TruthfulQA multiple choice (are-you-sure and feedback); null: skip both.",
    )
    caa_items: int | None = Field(
        None,
        ge=2,
        description="Use a seeded sample of this many CAA items (null: all 50).",
        json_schema_extra=ADDED_LATER,
    )
    truthfulqa_items: int = Field(
        100, ge=1, description="Questions for are-you-sure (seeded sample of TruthfulQA)."
    )
    feedback_items: int = Field(
        50, ge=1, description="Questions whose true and false answers the model rates (feedback)."
    )


class EvalSettings(Config):
    """Final vs initial policy on held-out prompts, and along PPO checkpoints."""

    sampling: SamplingConfig | None = Field(
        None, description="Sampling for evaluation (default: PPO's rollout sampling)."
    )
    checkpoints: bool = Field(
        True, description="Also evaluate every kept PPO checkpoint (gold vs proxy along PPO)."
    )
    checkpoint_prompts: int = Field(
        32, ge=1, description="Held-out prompts used for each intermediate checkpoint."
    )
    batch_size: int = Field(
        64,
        ge=1,
        description="Sequences generated together (on 2 CPU cores 64 samples ~1.4× as fast as 16).",
    )
    seed: int = Field(0, description="Sampling seed (both policies see the same random stream).")
    xstest: str | None = Field(
        None,
        description="XSTest prompts CSV (e.g. ../shared/data/xstest-prompts.csv): refusal rate "
        "on its unsafe prompts and compliance rate on its safe ones, initial vs final policy.",
    )
    xstest_per_label: int | None = Field(
        None, ge=1, description="Use at most this many safe and this many unsafe prompts (seeded)."
    )
    xstest_max_new_tokens: int = Field(
        40, ge=8, description="Greedy tokens per XSTest reply (refusals show early)."
    )
    overopt: OveroptSettings | None = Field(
        None,
        description="Best-of-n and PPO checkpoints against √KL, Gao et al.'s fits and the gold "
        "peak (e.g. overopt: {} for the defaults); null: skip.",
    )
    sycophancy: SycophancySettings | None = Field(
        None,
        description="Measure opinion, are-you-sure and feedback sycophancy of both policies "
        "(e.g. sycophancy: {} for the shared data sets); null: skip.",
    )


TrainingStage = Literal["sft", "reward", "ppo"]
TRAINING_STAGES: tuple[TrainingStage, ...] = ("sft", "reward", "ppo")


class LaunchSettings(Config):
    """Training stages in several processes: ``accelerate launch`` runs them (see
    docs/scaling.md); the other stages stay in the ``palate run`` process."""

    num_processes: int = Field(
        1,
        ge=1,
        description="Processes per training stage (one per GPU; on a CPU, gloo processes). "
        "1 with no config_file: every stage in this process.",
    )
    config_file: str | None = Field(
        None,
        description="An accelerate config (e.g. examples/accelerate/ddp.yaml) for the launch; "
        "num_processes, when above 1, overrides its count.",
    )
    stages: list[TrainingStage] = Field(
        default_factory=lambda: list(TRAINING_STAGES),
        description="Which training stages are launched (those of later rounds too).",
    )

    @property
    def active(self) -> bool:
        return self.num_processes > 1 or self.config_file is not None


class RunConfig(Config):
    """Config for ``palate run``: every stage of the loop in one file."""

    output_dir: str = Field(description="Run directory; each stage writes a subfolder.")
    model: str = Field(
        "smollm2-135m-instruct", description="Initial policy (before the optional SFT)."
    )
    seed: int = Field(0, description="Seed of the prompt split and pair sampling.")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="Sampling precision for pairs and evaluation (auto: bf16 on CPU)."
    )
    prompts: PromptSettings = Field(description="Prompts.")
    sft: RunSFT | None = Field(None, description="Optional SFT stage (omit to skip it).")
    pairs: PairSettings = Field(default_factory=PairSettings, description="Pairs to label.")
    raters: RaterSettings = Field(default_factory=RaterSettings, description="Raters.")
    gold: GoldConfig = Field(
        default_factory=GoldConfig,
        description="The gold preference: drives simulated raters, judges the evaluation; "
        "never shown to the reward model.",
    )
    reward: RunReward = Field(default_factory=RunReward, description="Reward model stage.")
    ppo: RunPPO = Field(default_factory=RunPPO, description="PPO stage.")
    eval: EvalSettings = Field(default_factory=EvalSettings, description="Evaluation stage.")
    launch: LaunchSettings = Field(
        default_factory=LaunchSettings,
        description="Run the training stages multi-process (accelerate launch); how a run is "
        "executed, not what it computes: not part of any stage's fingerprint.",
    )
    rounds: int = Field(
        1,
        ge=1,
        description="Rounds of RLHF (iterated online RLHF, as InstructGPT and Anthropic's HH "
        "work): after PPO, the newest policy answers fresh training prompts, pairs are chosen "
        "(pairs.budget, pairs.select) and labelled by the same raters, the reward model is "
        "retrained on every label so far, and PPO continues from the newest policy for "
        "ppo.ppo.updates more updates; the KL reference stays the initial policy. Needs "
        "ppo.finetune lora.",
    )

    @model_validator(mode="after")
    def _ppo_criteria(self) -> RunConfig:
        """The criteria PPO settings name are among the prompts' criteria."""
        known = {self.prompts.criterion, *(m.criterion for m in self.prompts.more)}
        known |= {f.criterion for f in self.prompts.flags}
        own, warm = self.ppo.ptx_own_declines, self.ppo.sft_own_declines
        for name, named in (
            ("ppo.ptx_own_declines.criteria", own.criteria if own is not None else []),
            ("ppo.sft_own_declines.criteria", warm.criteria if warm is not None else []),
            ("ppo.reward.decline_bonus", list(self.ppo.reward.decline_bonus)),
            ("ppo.prompt_shares", list(self.ppo.prompt_shares)),
        ):
            if unknown := sorted(set(named) - known):
                raise ValueError(
                    f"{name}: no prompt has criterion {unknown} (the prompts' criteria: "
                    f"{sorted(known)})"
                )
        return self

    @model_validator(mode="after")
    def _rounds(self) -> RunConfig:
        if self.pairs.select == "disagreement" and self.reward.ensemble < 2:
            raise ValueError("pairs.select disagreement needs reward.ensemble ≥ 2")
        if self.rounds > 1:
            if self.ppo.finetune != "lora":
                raise ValueError("rounds > 1 needs ppo.finetune lora (PPO continues the adapter)")
            if self.raters.kind == "file":
                raise ValueError("rounds > 1 needs raters who can label new pairs, not a file")
            if self.ppo.monitors.action == "stop":
                # rounds count updates per round (checkpoints, report): an early stop breaks that
                raise ValueError(
                    "rounds > 1 cannot be combined with ppo.monitors.action stop (a round's "
                    "early stop would shift every later round's update numbers); use warn"
                )
        return self
