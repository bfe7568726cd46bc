"""The PPO trainer: models, optimiser, KL controller, and the update loop.

One update (:meth:`PPOTrainer.step`) reads like the paper:

    sample → score → KL-penalised reward → advantages → clipped update → log → adapt KL

* **sample** (:meth:`PPOTrainer.rollout`): the policy answers a batch of prompts through a
  rollout engine (KV cache, temperature, stop at EOS); one forward then gives log π_θ and V(s)
  at every response position (:func:`palate.lm.policy_forward`), and the same forward with the
  LoRA adapters switched off gives log π_ref (no second copy of the weights).
* **score**: the reward model (or any ``score(prompts, responses)`` callable) scores each
  response; a response that never emits EOS can be penalised (``reward.missing_eos_penalty``).
* **KL-penalised reward** (:func:`palate.ppo_math.penalised_rewards`): −β·KL_t on every token,
  plus the score on the last one.
* **advantages** (:func:`palate.ppo_math.gae`): GAE(γ, λ), then whitened over real tokens.
* **clipped update** (:meth:`PPOTrainer.ppo_epochs`): epochs × minibatches of the clipped
  surrogate + clipped value loss (− entropy bonus, + optional SFT/pretraining loss), with an
  optional early stop on approx-KL.
* **adapt KL**: β follows a fixed value or the adaptive controller of Ziegler et al. (2019).

In several processes each rank samples its share of the prompts and everything from the
reward on is computed on the gathered global batch; see :mod:`palate.ppo.distributed`.
"""

from __future__ import annotations

import copy
import importlib
import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from palate.compiling import compile_layers, wanted
from palate.data import Prompt, prompt_text, read_records, write_jsonl
from palate.errors import ConfigError
from palate.formatting import pad_batch, prompt_ids
from palate.lm import (
    base_model,
    policy_forward,
    position_ids,
    response_cross_entropy,
    trimmed_by_prompt_length,
)
from palate.models import load_model
from palate.monitors import Alarm, Monitor
from palate.ppo.config import PPOConfig, RewardSource
from palate.ppo.critic import SeparateCritic, ValueHead
from palate.ppo.distributed import (
    all_reduce_gradients,
    broadcast_list,
    broadcast_parameters,
    gather_episodes,
    gather_objects,
)
from palate.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    gae,
    kl_estimate,
    masked_mean,
    masked_var,
    masked_whiten,
    penalised_rewards,
    policy_loss,
    value_loss,
)
from palate.progress import console, progress_bar
from palate.reward.model import RewardModelScorer, ScoreFn, load_reward_model
from palate.reward.routed import RoutedScorer, reward_models
from palate.sampling import MergedCopyEngine, PolicyEngine, RolloutEngine, episode_seed
from palate.training import (
    apply_lora,
    autocast,
    begin_stage,
    build_optimizer,
    disable_dropout,
    epoch_order,
    prune_checkpoints,
    resume_training,
    rng_state,
    save_training_state,
    seed_everything,
    store_frozen_linears,
)

__all__ = ["PPOTrainer", "Rollout", "adapters_disabled", "load_score_fn", "merged_policy", "ppo"]


def ppo(
    cfg: PPOConfig,
    *,
    score_fn: ScoreFn | None = None,
    stop_after: int | None = None,
    gold_fn: ScoreFn | None = None,
) -> dict[str, Any]:
    """``palate ppo``: run ``ppo.updates`` PPO updates; returns the summary.

    ``score_fn`` overrides ``cfg.reward`` with a Python callable (rule-based rewards, remote
    judges). ``stop_after=k`` stops after update k with a checkpoint, as if interrupted.
    ``gold_fn`` (a held-out gold, e.g. ``palate run``'s) lets the monitors watch for reward
    hacking.
    """
    return PPOTrainer(cfg, score_fn, gold_fn).train(stop_after=stop_after)


# --------------------------------------------------------------------------- dataflow

# what each minibatch of the clipped update logs (means over the update's minibatches)
_UPDATE_STATS = (
    "policy/loss",
    "policy/clipfrac",
    "policy/approxkl",
    "value/loss",
    "value/clipfrac",
    "objective/entropy",
)


@dataclass
class Rollout:
    """One batch of episodes and everything PPO derives from it."""

    query_ids: torch.Tensor  # (B, Tq) prompt ids, left-padded
    query_mask: torch.Tensor  # (B, Tq)
    response_ids: torch.Tensor  # (B, T) sampled tokens, pad after EOS
    mask: torch.Tensor  # (B, T) 1 on real response tokens (through EOS)
    logprobs: torch.Tensor  # (B, T) log π_old(a_t | s_t)
    ref_logprobs: torch.Tensor  # (B, T) log π_ref(a_t | s_t)
    values: torch.Tensor  # (B, T) V_old(s_t)
    scores: torch.Tensor  # (B,) reward score after shaping
    raw_scores: torch.Tensor  # (B,) reward score as returned
    finished: torch.Tensor  # (B,) bool: emitted EOS
    texts: list[str]  # decoded responses
    prompts: list[Prompt]
    rule_scores: torch.Tensor | None = None  # (B,) reward.decline_bonus, added before shaping
    rewards: torch.Tensor | None = None  # (B, T) −β·KL_t (+ score at the last token)
    kl: torch.Tensor | None = None  # (B, T) per-token KL estimate used in the reward
    advantages: torch.Tensor | None = None  # (B, T)
    returns: torch.Tensor | None = None  # (B, T)


def load_score_fn(
    source: RewardSource,
    device: torch.device,
    precision: str,
    criteria: Mapping[str, str] | None = None,
) -> ScoreFn:
    """A ``score(prompts, responses)`` callable for the configured reward source: a
    :class:`palate.reward.RewardModelScorer` for a reward model, the named function, or an AI
    judge's ratings (:class:`palate.feedback.JudgeScorer`). With ``source.routes``, a
    :class:`palate.reward.RoutedScorer` over one model per criterion; ``criteria`` maps each
    prompt's text to its criterion."""
    if source.function:
        module_name, _, name = source.function.partition(":")
        try:
            fn: ScoreFn = getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"reward.function {source.function!r}: {err}") from err
        return fn
    if source.judge is not None:
        from palate.feedback.judge import JudgeScorer, load_judge

        return JudgeScorer(load_judge(source.judge))
    assert source.model is not None  # RewardSource checks that exactly one is set

    def scorer(path: str) -> RewardModelScorer:
        rm = load_reward_model(path)
        for module in rm.modules():
            module.to(device).requires_grad_(False)
        rm.precision = precision
        return RewardModelScorer(rm, batch_size=source.batch_size)

    if not source.routes:
        return scorer(source.model)
    if criteria is None:
        raise ConfigError("reward.routes: the prompts' criteria are needed to route them")
    routes = {c: scorer(path) for c, path in source.routes.items()}
    return RoutedScorer(routes, scorer(source.model), criteria)


@contextmanager
def adapters_disabled(model: Any) -> Iterator[None]:
    """Run a LoRA policy as its frozen base: π_ref, without a second copy of the weights."""
    unwrapped = model.module if hasattr(model, "module") else model
    if not hasattr(unwrapped, "disable_adapter"):
        raise ConfigError("finetune: lora needs a peft model for the reference policy")
    with unwrapped.disable_adapter():
        yield


def merged_policy(spec: str, peft_policy: Any) -> Any:
    """The fp32 initial weights with the trained adapters merged in.

    The policy in memory may hold its frozen base in bf16 (see
    :func:`palate.training.store_frozen_linears`); merging there would round the update away,
    so the adapters are merged into a fresh fp32 load of the initial model.
    """
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    base, _ = load_model(spec)
    fresh = get_peft_model(base, copy.deepcopy(peft_policy.peft_config["default"]))
    set_peft_model_state_dict(fresh, get_peft_model_state_dict(peft_policy))
    return fresh.merge_and_unload()


# --------------------------------------------------------------------------- the trainer


class PPOTrainer:
    """Holds the models, optimiser and controllers; :meth:`step` is one PPO update and
    :meth:`train` the stage."""

    def __init__(
        self, cfg: PPOConfig, score_fn: ScoreFn | None = None, gold_fn: ScoreFn | None = None
    ):
        self.cfg = cfg
        self.acc, self.run, self.device, self.precision = begin_stage(cfg)
        self.world, self.rank = self.acc.num_processes, self.acc.process_index
        if cfg.ppo.batch_size % self.world:
            raise ConfigError(
                f"ppo.batch_size {cfg.ppo.batch_size} is not a multiple of the "
                f"{self.world} processes (each samples batch_size / processes prompts)"
            )
        self.monitor = Monitor(cfg.monitors, gold=gold_fn)
        records = read_records(cfg.prompts, "prompts").records[: cfg.max_prompts]
        self.prompts = [r.prompt for r in records]
        # each prompt's criterion: reward.routes scores it with that criterion's reward model
        self.criteria = {
            prompt_text(r.prompt): r.metadata.get("criterion", "helpfulness") for r in records
        }
        if len(self.prompts) < cfg.ppo.batch_size:
            raise ConfigError(
                f"{cfg.prompts}: {len(self.prompts)} prompts, fewer than ppo.batch_size"
            )
        policy, self.tok = load_model(cfg.model)
        disable_dropout(policy)
        self.ref: Any = None  # a frozen copy for full fine-tuning; LoRA uses its own base
        if cfg.finetune == "lora":
            policy = self._lora(policy)
            disable_dropout(policy)  # LoRA's own dropout too: log π_old must be deterministic
            store_frozen_linears(policy, self.precision)  # the base is also π_ref
        else:
            self.ref = copy.deepcopy(policy).eval().requires_grad_(False).to(self.device)
            store_frozen_linears(self.ref, self.precision)
        self.policy = policy.to(self.device)
        hidden = base_model(policy).config.hidden_size
        self.value_head: ValueHead | None = None
        self.critic: SeparateCritic | None = None
        self.score_fn = score_fn or load_score_fn(
            cfg.reward, self.device, self.precision, self.criteria
        )
        if cfg.critic.mode == "shared":
            self.value_head = ValueHead(hidden).to(self.device)
        else:
            self.critic = self._separate_critic().to(self.device)
        for rm in reward_models(self.score_fn):  # after the critic copied fp32 weights
            for module in rm.modules():
                store_frozen_linears(module, self.precision)
        self.engine = self._rollout_engine()
        if wanted(cfg.compile.training, self.device):  # after the engine copied the policy
            for model in (self.policy, self.ref, self.critic.decoder if self.critic else None):
                if model is not None:
                    compile_layers(model)
        params = [p for p in self.policy.parameters() if p.requires_grad]
        params += list(self.value_head.parameters()) if self.value_head is not None else []
        params += [p for p in self.critic.parameters() if p.requires_grad] if self.critic else []
        self.params = params
        if self.world > 1:
            broadcast_parameters(params)  # fresh adapters / heads drawn per rank: rank 0's
            if self.rank > 0:  # rank 0 keeps the stream one process would have
                seed_everything(episode_seed(cfg.seed, self.rank))
        self.optimizer, self.scheduler = build_optimizer(params, cfg.optim, cfg.ppo.updates)
        kl = cfg.kl
        horizon = kl.horizon or cfg.ppo.updates * cfg.ppo.batch_size
        self.kl_ctl: FixedKLController = (
            AdaptiveKLController(kl.coef, kl.target, horizon)
            if kl.adaptive
            else FixedKLController(kl.coef)
        )
        self.score_moments = RunningMoments()
        self.ptx: list[Any] = []
        if cfg.ppo.ptx_data is not None and cfg.ppo.ptx_coef > 0:
            from palate.sft import tokenize_demonstration

            demos = read_records(cfg.ppo.ptx_data, "demonstrations").records
            self.ptx = [tokenize_demonstration(self.tok, d, 512) for d in demos]
        self.step_no = 0

    def _lora(self, policy: Any) -> Any:
        """Fresh LoRA adapters, or trainable ones loaded from ``init_adapter``."""
        if self.cfg.init_adapter is None:
            return apply_lora(policy, self.cfg.lora)
        from peft import PeftModel

        path = Path(self.cfg.init_adapter)
        if not (path / "adapter_config.json").is_file():
            raise ConfigError(f"init_adapter {path}: no LoRA adapter (adapter_config.json) there")
        return PeftModel.from_pretrained(policy, str(path), is_trainable=True)

    def _separate_critic(self) -> SeparateCritic:
        from transformers import AutoModelForCausalLM

        cfg = self.cfg
        scorer = self.score_fn if isinstance(self.score_fn, RewardModelScorer) else None
        if isinstance(self.score_fn, RoutedScorer) and isinstance(
            self.score_fn.default, RewardModelScorer
        ):
            scorer = self.score_fn.default  # V starts as the default route's reward model
        rm = scorer.reward_model if scorer is not None else None
        if cfg.critic.init == "reward_model" and rm is not None and rm.kind == "causal":
            src = copy.deepcopy(base_model(rm.model))
            decoder, score = src.model, src.score
            head = ValueHead(score.in_features)
            with torch.no_grad():  # V starts as the reward model's normalised score
                head.linear.weight.copy_(score.weight[:1] * rm.gain)
                bias = float(score.bias[0]) if score.bias is not None else 0.0
                head.linear.bias.fill_(bias * rm.gain + rm.offset)
        else:
            if cfg.critic.init == "reward_model" and rm is not None:
                console.print(
                    "[yellow]reward model is not a causal LM: critic starts from the policy"
                )
            model, _ = load_model(cfg.model, auto_class=AutoModelForCausalLM)
            decoder, head = model.get_decoder(), ValueHead(model.config.hidden_size)
        disable_dropout(decoder)
        if cfg.finetune == "lora":
            from peft import LoraConfig, get_peft_model

            lora = cfg.lora
            decoder = get_peft_model(
                decoder,
                LoraConfig(
                    r=lora.r,
                    lora_alpha=lora.alpha,
                    lora_dropout=0.0,
                    target_modules=lora.target_modules,
                ),
            )
            store_frozen_linears(decoder, self.precision)
        return SeparateCritic(decoder, head)

    def _rollout_engine(self) -> RolloutEngine:
        engine = self.cfg.rollout_engine
        if engine == "auto":
            lora_or_bf16 = self.cfg.finetune == "lora" or self.precision == "bf16"
            engine = "merged" if lora_or_bf16 else "policy"

        def autocast_here() -> Any:
            return autocast(self.device, self.precision)

        if engine == "merged":
            policy = self.acc.unwrap_model(self.policy)
            static = wanted(self.cfg.compile.generation, self.device)
            bucket = self.cfg.compile.prompt_bucket
            return MergedCopyEngine(
                policy, self.precision, autocast_here, static_cache=static, prompt_bucket=bucket
            )
        return PolicyEngine(autocast_here)

    # ----------------------------------------------------------------- the stage

    def train(self, *, stop_after: int | None = None) -> dict[str, Any]:
        """Run the updates (resuming from the newest checkpoint), then save ``final/``."""
        cfg, run = self.cfg, self.run
        ckpt = run.latest_checkpoint() if cfg.resume else None
        self.step_no, metrics = resume_training(
            acc=self.acc,
            run=run,
            ckpt=ckpt,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            total=cfg.ppo.updates,
            cfg=cfg,
            project="palate-ppo",
            restore=self.restore,
            unit="update",
        )
        per_epoch = len(self.prompts) // cfg.ppo.batch_size
        rows: list[dict[str, Any]] = []
        t_start = time.perf_counter()
        stopped = halted = False
        alarms: list[Alarm] = []
        halting: list[Alarm] = []  # the alarms that end training (ppo.monitors.stop_on)
        with progress_bar("ppo", total=cfg.ppo.updates, completed=self.step_no) as bar:
            try:
                while self.step_no < cfg.ppo.updates:
                    row, rollout = self.step(self.next_prompts(per_epoch))
                    alarms = self.watch(rollout, row)
                    rows.append(row)
                    metrics.log(self.step_no, row)
                    write = self.step_no % cfg.sample_every == 0 or self.step_no == 1
                    if write and self.acc.is_main_process:
                        self.write_samples(rollout)
                    bar.update(
                        self.step_no,
                        score=row["objective/score"],
                        kl=row["objective/kl"],
                        beta=row["objective/kl_coef"],
                    )
                    stopped = (
                        stop_after is not None and stop_after <= self.step_no < cfg.ppo.updates
                    )
                    halting = self.monitor.halts(alarms)
                    halted = bool(halting)
                    if (
                        self.step_no % cfg.checkpoint_every == 0
                        or stopped
                        or halted
                        or self.step_no == cfg.ppo.updates
                    ):
                        self.checkpoint()
                    if stopped or halted:
                        break
            except KeyboardInterrupt:
                if self.world == 1:  # several ranks cannot agree on one here: the last stands
                    self.checkpoint()
                metrics.close()
                raise
        metrics.close()
        self.acc.wait_for_everyone()  # rank 0 has closed the log
        history = run.metrics()
        first, last = (history[0], history[-1]) if history else ({}, {})
        seconds = time.perf_counter() - t_start
        summary: dict[str, Any] = {
            "stage": "ppo",
            "output_dir": str(run.path),
            "updates": self.step_no,
            "score_first": first.get("objective/score"),
            "score_last": last.get("objective/score"),
            "kl_last": last.get("objective/kl"),
            "kl_coef_last": last.get("objective/kl_coef"),
            "eos_rate_last": last.get("response/eos_rate"),
            "length_last": last.get("response/length"),
            "episodes_per_s": len(rows) * cfg.ppo.batch_size / seconds if rows else None,
            "precision": self.precision,
            "processes": self.world,
            "alarms": [a.name for a in self.monitor.fired],
        }
        if halted:
            summary["halted_by"] = [a.name for a in halting]
        if stopped:
            summary["stopped_at"] = self.step_no
            return summary
        if self.acc.is_main_process:
            final = self.acc.unwrap_model(self.policy)
            if cfg.finetune == "lora":
                final = merged_policy(cfg.model, final)
            final.save_pretrained(run.final, safe_serialization=True)
            self.tok.save_pretrained(run.final)
        summary["final"] = str(run.final)
        if self.acc.is_main_process:
            run.write_summary(summary)
        self.acc.wait_for_everyone()
        self.acc.end_training()
        return summary

    def watch(self, rollout: Rollout, row: dict[str, Any]) -> list[Alarm]:
        """Run the monitors on this update (adds ``monitor/*``, ``alarm/*`` to ``row``); print
        and record each alarm the first time it fires."""
        known = len(self.monitor.fired)
        alarms = self.monitor.observe(self.step_no, rollout.prompts, rollout.texts, row)
        if len(self.monitor.fired) > known and self.acc.is_main_process:
            for a in self.monitor.fired[known:]:
                console.print(f"[bold red]alarm[/] {a.name} at update {a.update}: {a.message}")
            write_jsonl(self.run.path / "alarms.jsonl", self.monitor.records())
        return alarms

    def next_prompts(self, per_epoch: int) -> list[Prompt]:
        """The next update's prompts: a seeded permutation per epoch, so resuming is exact."""
        size = self.cfg.ppo.batch_size
        epoch, k = divmod(self.step_no, per_epoch)
        order = epoch_order(len(self.prompts), self.cfg.seed, epoch)
        return [self.prompts[i] for i in order[k * size : (k + 1) * size]]

    def write_samples(self, rollout: Rollout) -> None:
        rows = [
            {"prompt": prompt_text(p), "response": t, "score": s}
            for p, t, s in zip(
                rollout.prompts, rollout.texts, rollout.raw_scores.tolist(), strict=True
            )
        ]
        if self.cfg.reward.decline_bonus and rollout.rule_scores is not None:
            for row, rule in zip(rows, rollout.rule_scores.tolist(), strict=True):
                row["rule"] = rule  # reward.decline_bonus, beside the reward model's score
        write_jsonl(self.run.path / "samples" / f"update-{self.step_no:05d}.jsonl", rows)

    # ----------------------------------------------------------------- one update

    def step(self, prompts: list[Prompt]) -> tuple[dict[str, float], Rollout]:
        """One PPO update, as in the paper."""
        cfg = self.cfg
        t0 = time.perf_counter()
        rollout = self.rollout(prompts)  # sample + score
        t_rollout = time.perf_counter() - t0
        beta = self.kl_ctl.value
        mask = rollout.mask
        kl = kl_estimate(rollout.logprobs, rollout.ref_logprobs, cfg.kl.estimator) * mask
        rewards = penalised_rewards(rollout.scores, kl, mask, beta)  # KL-penalised reward
        advantages, returns = gae(rewards, rollout.values, mask, cfg.ppo.gamma, cfg.ppo.lam)
        if cfg.ppo.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        rollout.kl, rollout.rewards = kl, rewards
        rollout.advantages, rollout.returns = advantages, returns
        t1 = time.perf_counter()
        stats = self.ppo_epochs(rollout, advantages, returns)  # clipped update
        self.scheduler.step()
        t_update = time.perf_counter() - t1
        kl_per_response = kl.sum(1).mean().item()
        kl_k3 = (kl_estimate(rollout.logprobs, rollout.ref_logprobs, "k3") * mask).sum(1)
        explained_var = 1 - masked_var(returns - rollout.values, mask) / masked_var(
            returns, mask
        ).clamp(min=1e-8)
        row = {  # log
            "objective/score": rollout.raw_scores.mean().item(),
            "objective/score_shaped": rollout.scores.mean().item(),
            **(
                {"objective/rule_reward": rollout.rule_scores.mean().item()}
                if cfg.reward.decline_bonus and rollout.rule_scores is not None
                else {}
            ),
            "objective/kl": kl_per_response,
            "objective/kl_k3": kl_k3.mean().item(),
            "objective/kl_coef": beta,
            "objective/rlhf_reward": rewards.sum(1).mean().item(),
            "objective/non_score_reward": (-beta * kl).sum(1).mean().item(),
            **stats,
            "value/explained_variance": explained_var.item(),
            "value/mean": masked_mean(rollout.values, mask).item(),
            "response/length": mask.sum(1).mean().item(),
            "response/eos_rate": rollout.finished.float().mean().item(),
            "timing/rollout": t_rollout,
            "timing/update": t_update,
            "throughput/episodes_per_s": len(prompts) / (t_rollout + t_update),
        }
        self.kl_ctl.update(kl_per_response, len(prompts))  # adapt KL
        self.step_no += 1
        return row, rollout

    # ----------------------------------------------------------------- pieces

    def _forward(
        self,
        model: Any,
        input_ids: torch.Tensor,  # (B, Tq + T)
        attention_mask: torch.Tensor,  # (B, Tq + T)
        prompt_width: int,
        *,
        with_entropy: bool = False,
        reference: bool = False,
    ) -> tuple[Any, ...]:
        """log π, V and entropy at the T response positions: ``(B, T)`` each (V, entropy may be
        None), in ``ppo.forward_chunks`` length-sorted groups."""
        temperature = self.cfg.sampling.temperature or 1.0
        head = None if reference else self.value_head

        def forward(ids: torch.Tensor, mask: torch.Tensor, width: int) -> tuple[Any, ...]:
            logp, values, entropy = policy_forward(
                model, head, ids, mask, width, temperature, with_entropy
            )
            if self.critic is not None and not reference:
                values = self.critic(ids, mask, position_ids(mask), width - 1, ids.shape[1] - width)
            return logp, values, entropy

        chunks = self.cfg.ppo.forward_chunks or (1 if self.device.type == "cuda" else 2)
        return trimmed_by_prompt_length(forward, input_ids, attention_mask, prompt_width, chunks)

    @torch.no_grad()
    def rollout(self, prompts: list[Prompt]) -> Rollout:
        """Sample responses, then log π_old, log π_ref and V_old in one pass each; score them.

        In W processes this rank samples ``prompts[rank::W]`` and the episodes of all ranks are
        gathered (:mod:`palate.ppo.distributed`): the returned rollout is the global batch.
        """
        tok = self.tok
        episodes = list(range(len(prompts)))[self.rank :: self.world]  # this rank's share
        mine = [prompts[i] for i in episodes]
        local = self._local_rollout(mine, episodes)
        if self.world > 1:
            pad = tok.pad_token_id
            texts = gather_objects(local.pop("texts"), self.world)
            gathered: dict[str, Any] = gather_episodes(
                local,
                world=self.world,
                pad={
                    "query_ids": ("left", pad),
                    "query_mask": ("left", 0),
                    "response_ids": ("right", pad),
                    "mask": ("right", 0),
                    "logprobs": ("right", 0.0),
                    "ref_logprobs": ("right", 0.0),
                    "values": ("right", 0.0),
                },
            )
            local = {**gathered, "texts": texts}
        raw, finished = local.pop("raw_scores"), local["finished"]
        rule = self._rule_rewards(prompts, local["texts"])  # (B,) reward.decline_bonus
        scores = self._shape_scores(raw.to(self.device) + rule, finished)  # on the global batch
        return Rollout(**local, scores=scores, raw_scores=raw, prompts=prompts, rule_scores=rule)

    def _local_rollout(self, prompts: list[Prompt], episodes: list[int]) -> dict[str, Any]:
        """This process's episodes: sampled ids, masks, log π_old, log π_ref, V_old, raw
        scores, decoded texts (``episodes``: their indices in the update's batch)."""
        cfg, tok = self.cfg, self.tok
        query_ids, query_mask = pad_batch(
            [prompt_ids(tok, p)[-cfg.max_prompt_length :] for p in prompts], tok.pad_token_id
        )
        width = query_ids.shape[1]
        query_ids, query_mask = query_ids.to(self.device), query_mask.to(self.device)
        self.engine.sync(self.acc.unwrap_model(self.policy))
        seeds = None
        if cfg.episode_seeds:  # each episode's noise from (seed, update, episode)
            seeds = [episode_seed(cfg.seed, self.step_no, i) for i in episodes]
        sampled = self.engine.generate(
            query_ids,
            query_mask,
            cfg.sampling,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            seeds=seeds,
        )
        response = sampled[:, width:]
        if response.shape[1] == 0:
            response = torch.full((len(prompts), 1), tok.eos_token_id, device=self.device)
        is_eos = response == tok.eos_token_id
        finished = is_eos.any(1)
        first_eos = torch.where(
            finished,
            is_eos.float().argmax(1),
            torch.full_like(finished, response.shape[1], dtype=torch.long),
        )
        positions = torch.arange(response.shape[1], device=self.device)
        mask = (positions[None, :] <= first_eos[:, None]).long()
        mask[~finished] = 1
        response = torch.where(mask.bool(), response, torch.full_like(response, tok.pad_token_id))
        full = torch.cat([query_ids, response], 1)
        full_mask = torch.cat([query_mask, mask], 1)
        with autocast(self.device, self.precision):
            logprobs, values, _ = self._forward(self.policy, full, full_mask, width)
            if self.ref is not None:
                ref_logprobs, _, _ = self._forward(self.ref, full, full_mask, width, reference=True)
            else:
                with adapters_disabled(self.policy):
                    ref_logprobs, _, _ = self._forward(
                        self.policy, full, full_mask, width, reference=True
                    )
        texts = [
            tok.decode(r[m.bool()], skip_special_tokens=True).strip()
            for r, m in zip(response, mask, strict=True)
        ]
        raw = torch.as_tensor(self.score_fn(prompts, texts), dtype=torch.float32).reshape(-1)
        mask = mask.float()
        return {
            "query_ids": query_ids,
            "query_mask": query_mask,
            "response_ids": response,
            "mask": mask,
            "logprobs": logprobs * mask,
            "ref_logprobs": ref_logprobs * mask,
            "values": (values.float() * mask) if values is not None else torch.zeros_like(mask),
            "raw_scores": raw.to(self.device),
            "finished": finished,
            "texts": texts,
        }

    def _rule_rewards(self, prompts: list[Prompt], texts: list[str]) -> torch.Tensor:
        """``reward.decline_bonus``: each response's rule-based reward, its prompt criterion's
        bonus when it declines (:func:`palate.text.declines`), else 0. ``(B,)``"""
        bonus = self.cfg.reward.decline_bonus
        out = torch.zeros(len(texts), device=self.device)
        if bonus:
            from palate.text import declines

            for i, (p, t) in enumerate(zip(prompts, texts, strict=True)):
                b = bonus.get(self.criteria.get(prompt_text(p), "helpfulness"))
                if b is not None and declines(t):
                    out[i] = b
        return out

    def _shape_scores(self, scores: torch.Tensor, finished: torch.Tensor) -> torch.Tensor:
        shaping = self.cfg.reward
        if shaping.missing_eos_penalty is not None:
            scores = torch.where(finished, scores, scores - shaping.missing_eos_penalty)
        if shaping.normalize:
            self.score_moments.update(scores)
            scores = (scores - self.score_moments.mean) / self.score_moments.std
        if shaping.clip is not None:
            scores = scores.clamp(-shaping.clip, shaping.clip)
        return scores

    def ppo_epochs(
        self,
        rollout: Rollout,
        advantages: torch.Tensor,  # (B, T)
        returns: torch.Tensor,  # (B, T)
    ) -> dict[str, float]:
        """Clipped policy/value updates over minibatches for ``ppo.epochs`` passes.

        In W processes each minibatch is split between the ranks; a rank's loss is its share of
        the minibatch's token mean and the gradients are summed over ranks before the step.
        """
        cfg = self.cfg.ppo
        B = rollout.response_ids.shape[0]
        width = rollout.query_ids.shape[1]
        full = torch.cat([rollout.query_ids, rollout.response_ids], 1)
        full_mask = torch.cat([rollout.query_mask, rollout.mask.long()], 1)
        minibatches = math.ceil(B / cfg.mini_batch_size)
        # kept on the device and read once at the end: a float() per minibatch would make the
        # host wait for the GPU seven times per step
        stats: dict[str, list[torch.Tensor]] = {}  # each minibatch's, weighted by this rank's share
        grad_norms: list[torch.Tensor] = []  # the same on every rank
        ptx_losses: list[torch.Tensor] = []  # this rank's PPO-ptx SFT losses
        self.policy.train()
        stop = False
        epochs_done = 0
        zero = torch.zeros((), device=self.device)
        for _epoch in range(cfg.epochs):
            epochs_done += 1
            perm = torch.randperm(B).tolist()
            if self.world > 1:
                perm = broadcast_list(perm)  # one permutation: rank 0's, as in one process
            for start in range(0, B, cfg.mini_batch_size):
                idx = perm[start : start + cfg.mini_batch_size]
                mine = idx[self.rank :: self.world]
                terms = dict.fromkeys(_UPDATE_STATS, zero)
                if mine:
                    mask = rollout.mask[mine]
                    # this rank's tokens over the minibatch's: 1 in one process
                    share = mask.sum() / rollout.mask[idx].sum().clamp(min=1)
                    with autocast(self.device, self.precision):
                        logp, values, entropy = self._forward(
                            self.policy, full[mine], full_mask[mine], width, with_entropy=True
                        )
                    pg_loss, clipfrac, approxkl = policy_loss(
                        logp, rollout.logprobs[mine], advantages[mine], mask, cfg.cliprange
                    )
                    vf_loss, vf_clipfrac = value_loss(
                        values.float(),
                        rollout.values[mine],
                        returns[mine],
                        mask,
                        cfg.cliprange_value,
                    )
                    mean_entropy = masked_mean(entropy, mask)
                    loss = pg_loss + cfg.vf_coef * vf_loss - cfg.ent_coef * mean_entropy
                    if self.world > 1:
                        loss = loss * share
                    if cfg.ptx_coef > 0 and self.ptx:
                        ptx = self._ptx_loss()
                        loss = loss + cfg.ptx_coef * ptx / self.world
                        ptx_losses.append(ptx.detach().float())
                    self.acc.backward(loss)
                    values_now = (pg_loss, clipfrac, approxkl, vf_loss, vf_clipfrac, mean_entropy)
                    for key, val in zip(_UPDATE_STATS, values_now, strict=True):
                        val = val.detach().float()
                        terms[key] = val * share if self.world > 1 else val
                if self.world > 1:
                    all_reduce_gradients(self.params)
                if self.cfg.optim.max_grad_norm is not None:
                    norm = self.acc.clip_grad_norm_(self.params, self.cfg.optim.max_grad_norm)
                    grad_norms.append(torch.as_tensor(norm).detach().float())
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                for key, val in terms.items():
                    stats.setdefault(key, []).append(val)
            if cfg.target_approx_kl is not None:
                recent = torch.stack(stats["policy/approxkl"][-minibatches:]).mean()
                if self.world > 1:
                    recent = self.acc.reduce(recent, "sum")
                if recent.item() > cfg.target_approx_kl:
                    stop = True
                    break
        means = torch.stack([torch.stack(v).mean().to(self.device) for v in stats.values()])
        if self.world > 1:  # each rank's shares of the token means add up to the global ones
            means = self.acc.reduce(means, "sum")
        out = dict(zip(stats, means.tolist(), strict=True))
        if grad_norms:
            out["policy/grad_norm"] = torch.stack(grad_norms).mean().item()
        if cfg.ptx_coef > 0 and self.ptx:
            ptx_mean = torch.stack(ptx_losses).mean() if ptx_losses else zero
            if self.world > 1:
                ptx_mean = self.acc.reduce(ptx_mean, "mean")
            out["policy/ptx_loss"] = ptx_mean.item()
        out["policy/epochs"] = epochs_done
        out["policy/early_stop"] = float(stop)
        return out

    def _ptx_loss(self) -> torch.Tensor:
        """PPO-ptx: the SFT loss on a random minibatch of demonstrations."""
        from palate.sft import collate

        rows = torch.randint(len(self.ptx), (self.cfg.ppo.mini_batch_size,)).tolist()
        batch = collate([self.ptx[i] for i in rows], self.tok.pad_token_id)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with autocast(self.device, self.precision):
            ce, n = response_cross_entropy(self.policy, batch, fast=True)
        return ce / n.clamp(min=1)

    # ----------------------------------------------------------------- state

    def checkpoint(self) -> None:
        """Save a resumable checkpoint of the current update; older ones pruned. Written by
        rank 0, with every rank's RNG state (each samples from its own stream)."""
        rng_by_rank = gather_objects([rng_state()], self.world) if self.world > 1 else None
        if self.acc.is_main_process:
            self._write_checkpoint(rng_by_rank)
        self.acc.wait_for_everyone()

    def _write_checkpoint(self, rng_by_rank: list[Any] | None) -> None:
        from safetensors.torch import save_file

        path = self.run.checkpoint_dir(self.step_no)
        path.mkdir(parents=True, exist_ok=True)
        policy = self.acc.unwrap_model(self.policy)
        policy.save_pretrained(path / "policy", safe_serialization=True)
        self.tok.save_pretrained(path / "policy")
        extra: dict[str, Any] = {
            "kl_ctl": self.kl_ctl.state_dict(),
            "score_moments": self.score_moments.state_dict(),
        }
        if rng_by_rank is not None:
            extra["rng_by_rank"] = rng_by_rank
        if self.value_head is not None:
            save_file(self.value_head.state_dict(), path / "value_head.safetensors")
        if self.critic is not None:
            trainable = {
                n: p.detach().cpu().contiguous()
                for n, p in self.critic.named_parameters()
                if p.requires_grad
            }
            save_file(trainable, path / "critic.safetensors")
        save_training_state(
            path,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            state={"step": self.step_no, "stage": "ppo"},
            extra=extra,
        )
        prune_checkpoints(self.run, self.cfg.keep_checkpoints)

    def restore(self, path: Path, blob: dict[str, Any]) -> None:
        """What a checkpoint holds beyond the optimiser, scheduler and RNG state (those are
        restored by :func:`palate.training.resume_training`)."""
        from safetensors.torch import load_file

        policy = self.acc.unwrap_model(self.policy)
        if self.cfg.finetune == "lora":
            from peft import set_peft_model_state_dict

            adapter = load_file(path / "policy" / "adapter_model.safetensors")
            set_peft_model_state_dict(policy, adapter)
        else:
            policy.load_state_dict(load_file(path / "policy" / "model.safetensors"), strict=False)
        if self.value_head is not None:
            self.value_head.load_state_dict(load_file(path / "value_head.safetensors"))
        if self.critic is not None:
            self.critic.load_state_dict(load_file(path / "critic.safetensors"), strict=False)
        self.kl_ctl.load_state_dict(blob["kl_ctl"])
        self.score_moments.load_state_dict(blob["score_moments"])
