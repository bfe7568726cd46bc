"""The PPO trainer: models, optimiser, KL controller, and the update loop.

One update (:meth:`PPOTrainer.step`) reads like the paper:

    sample → score → KL-penalised reward → advantages → clipped update → log → adapt KL

* **sample** (:class:`palate.ppo.rollout.RolloutSampler`): the policy answers a batch of prompts
  through a rollout engine (KV cache, temperature, stop at EOS); one forward then gives
  log π_θ and V(s) at every response position (:func:`palate.lm.policy_forward`), and the same
  forward with the LoRA adapters switched off gives log π_ref (no second copy of the weights).
* **score**: the reward model (or any ``score(prompts, responses)`` callable) scores each
  response; rule rewards and shaping — the missing-EOS penalty
  (``reward.missing_eos_penalty``), normalisation, clipping — are in :mod:`palate.ppo.rewards`.
* **KL-penalised reward** (:func:`palate.ppo_math.penalised_rewards`): −β·KL_t on every token,
  plus the score on the last one.
* **advantages** (:func:`palate.ppo_math.gae`): GAE(γ, λ), then whitened over real tokens.
* **clipped update** (:class:`palate.ppo.update.ClippedUpdate`): epochs × minibatches of the clipped
  surrogate + clipped value loss (− entropy bonus, + optional SFT/pretraining loss), with an
  optional early stop on approx-KL.
* **adapt KL**: β follows a fixed value or the adaptive controller of Ziegler et al. (2019).

The loop around the updates (progress, checkpoints, ``stop_after``, Ctrl-C) is the one every
stage shares (:func:`palate.training.run_steps`). In several processes each rank samples its
share of the prompts and everything from the reward on is computed on the gathered global
batch; see :mod:`palate.ppo.distributed`.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from palate.compiling import compile_layers, wanted
from palate.data import Prompt, prompt_text, read_records, write_jsonl
from palate.errors import ConfigError
from palate.lm import base_model
from palate.models import apply_adapter, load_model, merged_policy
from palate.ppo.config import PPOConfig
from palate.ppo.critic import SeparateCritic, ValueHead, separate_critic
from palate.ppo.distributed import broadcast_parameters, gather_objects
from palate.ppo.monitors import Alarm, Monitor
from palate.ppo.rollout import ActorCritic, Rollout, RolloutSampler
from palate.ppo.update import ClippedUpdate, ptx_examples
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
)
from palate.progress import console
from palate.reward.model import ScoreFn
from palate.reward.routed import reward_models
from palate.reward.scoring import load_score_fn
from palate.sampling import MergedCopyEngine, PolicyEngine, RolloutEngine, episode_seed
from palate.training import (
    LoopResult,
    StepOutcome,
    apply_lora,
    autocast,
    begin_stage,
    build_optimizer,
    disable_dropout,
    epoch_order,
    resume_training,
    rng_state,
    run_steps,
    seed_everything,
    store_frozen_linears,
    write_checkpoint,
)

__all__ = ["PPOTrainer", "ppo"]


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
        self.prompts, self.criteria = self._prompts()
        self.policy, self.tok, self.ref = self._policy()
        self.value_head: ValueHead | None = None
        self.critic: SeparateCritic | None = None
        self.score_fn = score_fn or load_score_fn(
            cfg.reward, self.device, self.precision, self.criteria
        )
        if cfg.critic.mode == "shared":
            hidden = base_model(self.policy).config.hidden_size
            self.value_head = ValueHead(hidden).to(self.device)
        else:
            self.critic = separate_critic(cfg, self.score_fn, self.precision).to(self.device)
        for rm in reward_models(self.score_fn):  # after the critic copied fp32 weights
            for module in rm.modules():
                store_frozen_linears(module, self.precision)
        self.engine = self._rollout_engine()
        if wanted(cfg.compile.training, self.device):  # after the engine copied the policy
            for model in (self.policy, self.ref, self.critic.decoder if self.critic else None):
                if model is not None:
                    compile_layers(model)
        self.params = self._trainable_parameters()
        self.optimizer, self.scheduler = build_optimizer(self.params, cfg.optim, cfg.ppo.updates)
        horizon = cfg.kl.horizon or cfg.ppo.updates * cfg.ppo.batch_size
        self.kl_ctl: FixedKLController = (
            AdaptiveKLController(cfg.kl.coef, cfg.kl.target, horizon)
            if cfg.kl.adaptive
            else FixedKLController(cfg.kl.coef)
        )
        self.score_moments = RunningMoments()
        self.ptx = ptx_examples(cfg, self.tok)
        # the same networks as the attributes above, as the rollouts and the update run them
        self.nets = ActorCritic(
            policy=self.policy,
            ref=self.ref,
            value_head=self.value_head,
            critic=self.critic,
            temperature=cfg.sampling.temperature or 1.0,
            chunks=cfg.ppo.forward_chunks or (1 if self.device.type == "cuda" else 2),
        )
        self.rollouts = RolloutSampler(
            cfg,
            acc=self.acc,
            tok=self.tok,
            nets=self.nets,
            engine=self.engine,
            score_fn=self.score_fn,
            criteria=self.criteria,
            score_moments=self.score_moments,
            precision=self.precision,
        )
        self.clipped_update = ClippedUpdate(
            cfg,
            acc=self.acc,
            nets=self.nets,
            optimizer=self.optimizer,
            params=self.params,
            ptx=self.ptx,
            pad_id=self.tok.pad_token_id,
            precision=self.precision,
        )
        self.step_no = 0
        self.halting: list[Alarm] = []  # the alarms that end training (ppo.monitors.stop_on)

    def _prompts(self) -> tuple[list[Prompt], dict[str, str]]:
        """The prompts, and each prompt's criterion (reward.routes scores it with that
        criterion's reward model)."""
        cfg = self.cfg
        records = read_records(cfg.prompts, "prompts").records[: cfg.max_prompts]
        prompts = [r.prompt for r in records]
        criteria = {
            prompt_text(r.prompt): r.metadata.get("criterion", "helpfulness") for r in records
        }
        if len(prompts) < cfg.ppo.batch_size:
            raise ConfigError(f"{cfg.prompts}: {len(prompts)} prompts, fewer than ppo.batch_size")
        return prompts, criteria

    def _policy(self) -> tuple[Any, Any, Any]:
        """(policy, tokenizer, reference): LoRA adapters on the initial model, whose base is
        also π_ref, or all its weights trainable beside a frozen copy."""
        cfg = self.cfg
        policy, tok = load_model(cfg.model)
        disable_dropout(policy)
        ref: Any = None  # a frozen copy for full fine-tuning; LoRA uses its own base
        if cfg.finetune == "lora":
            policy = self._lora(policy)
            disable_dropout(policy)  # LoRA's own dropout too: log π_old must be deterministic
            store_frozen_linears(policy, self.precision)  # the base is also π_ref
        else:
            ref = copy.deepcopy(policy).eval().requires_grad_(False).to(self.device)
            store_frozen_linears(ref, self.precision)
        return policy.to(self.device), tok, ref

    def _lora(self, policy: Any) -> Any:
        """Fresh LoRA adapters, or trainable ones loaded from ``init_adapter``."""
        if self.cfg.init_adapter is None:
            return apply_lora(policy, self.cfg.lora)
        path = Path(self.cfg.init_adapter)
        if not (path / "adapter_config.json").is_file():
            raise ConfigError(f"init_adapter {path}: no LoRA adapter (adapter_config.json) there")
        return apply_adapter(policy, str(path), is_trainable=True)

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

    def _trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The policy's, value head's and critic's trainable parameters, rank 0's on every
        rank; the other ranks then seed their own sampling streams."""
        params = [p for p in self.policy.parameters() if p.requires_grad]
        params += list(self.value_head.parameters()) if self.value_head is not None else []
        params += [p for p in self.critic.parameters() if p.requires_grad] if self.critic else []
        if self.world > 1:
            broadcast_parameters(params)  # fresh adapters / heads drawn per rank: rank 0's
            if self.rank > 0:  # rank 0 keeps the stream one process would have
                seed_everything(episode_seed(self.cfg.seed, self.rank))
        return params

    # ----------------------------------------------------------------- the stage

    def train(self, *, stop_after: int | None = None) -> dict[str, Any]:
        """Run the updates (resuming from the newest checkpoint), then save ``final/``.

        Each update is :meth:`step` — sample → score → KL-penalised reward → advantages →
        clipped update → log → adapt KL — followed by the monitors (:meth:`finish_update`).
        """
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
        start, t_start = self.step_no, time.perf_counter()
        result = run_steps(
            self.update,
            self.finish_update,
            start=start,
            total=cfg.ppo.updates,
            checkpoint_every=cfg.checkpoint_every,
            checkpoint=self.checkpoint,
            metrics=metrics,
            desc="ppo",
            stop_after=stop_after,
            # several ranks cannot agree on a checkpoint there: the last one stands
            checkpoint_on_interrupt=self.world == 1,
        )
        metrics.close()
        self.acc.wait_for_everyone()  # rank 0 has closed the log
        summary = self.summary(result, result.step - start, time.perf_counter() - t_start)
        if result.stopped:
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

    def update(self, step: int) -> tuple[dict[str, float], Rollout]:
        """The update after ``step``: its prompts, then :meth:`step`."""
        return self.step(self.next_prompts())

    def finish_update(self, step: int, done: tuple[dict[str, float], Rollout]) -> StepOutcome:
        """After update ``step``: the monitors (their ``monitor/*``, ``alarm/*`` join the row),
        samples every ``sample_every`` updates, and whether an alarm ends training."""
        row, rollout = done
        alarms = self.watch(rollout, row)
        write = step % self.cfg.sample_every == 0 or step == 1
        if write and self.acc.is_main_process:
            self.write_samples(rollout)
        self.halting = self.monitor.halts(alarms)
        bar = {
            "score": row["objective/score"],
            "kl": row["objective/kl"],
            "beta": row["objective/kl_coef"],
        }
        return StepOutcome(row, bar=bar, halt=bool(self.halting))

    def summary(self, result: LoopResult, ran: int, seconds: float) -> dict[str, Any]:
        """The stage's summary (``ran``: updates run in this process, in ``seconds``)."""
        history = self.run.metrics()
        first, last = (history[0], history[-1]) if history else ({}, {})
        summary: dict[str, Any] = {
            "stage": "ppo",
            "output_dir": str(self.run.path),
            "updates": result.step,
            "score_first": first.get("objective/score"),
            "score_last": last.get("objective/score"),
            "kl_last": last.get("objective/kl"),
            "kl_coef_last": last.get("objective/kl_coef"),
            "eos_rate_last": last.get("response/eos_rate"),
            "length_last": last.get("response/length"),
            "episodes_per_s": ran * self.cfg.ppo.batch_size / seconds if ran else None,
            "precision": self.precision,
            "processes": self.world,
            "alarms": [a.name for a in self.monitor.fired],
        }
        if result.halted:
            summary["halted_by"] = [a.name for a in self.halting]
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

    def next_prompts(self) -> list[Prompt]:
        """The next update's prompts: a seeded permutation per epoch, so resuming is exact."""
        size = self.cfg.ppo.batch_size
        epoch, k = divmod(self.step_no, len(self.prompts) // size)
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
        rollout = self.rollouts.sample(prompts, self.step_no)  # sample + score
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
        stats = self.clipped_update(rollout, advantages, returns)  # clipped update
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

    # ----------------------------------------------------------------- state

    def checkpoint(self, step: int) -> None:
        """Save a resumable checkpoint of update ``step``; older ones pruned. Written by rank
        0, with every rank's RNG state (each samples from its own stream)."""
        rng_by_rank = gather_objects([rng_state()], self.world) if self.world > 1 else None
        if self.acc.is_main_process:
            extra: dict[str, Any] = {
                "kl_ctl": self.kl_ctl.state_dict(),
                "score_moments": self.score_moments.state_dict(),
            }
            if rng_by_rank is not None:
                extra["rng_by_rank"] = rng_by_rank
            write_checkpoint(
                self.run,
                step,
                save_weights=self.save_weights,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                state={"stage": "ppo"},
                keep=self.cfg.keep_checkpoints,
                extra=extra,
            )
        self.acc.wait_for_everyone()

    def save_weights(self, path: Path) -> None:
        """The policy (adapter or full weights) with its tokenizer, the value head or the
        critic's trainable weights."""
        policy = self.acc.unwrap_model(self.policy)
        policy.save_pretrained(path / "policy", safe_serialization=True)
        self.tok.save_pretrained(path / "policy")
        if self.value_head is not None:
            save_file(self.value_head.state_dict(), path / "value_head.safetensors")
        if self.critic is not None:
            trainable = {
                n: p.detach().cpu().contiguous()
                for n, p in self.critic.named_parameters()
                if p.requires_grad
            }
            save_file(trainable, path / "critic.safetensors")

    def restore(self, path: Path, blob: dict[str, Any]) -> None:
        """What a checkpoint holds beyond the optimiser, scheduler and RNG state (those are
        restored by :func:`palate.training.resume_training`)."""
        policy = self.acc.unwrap_model(self.policy)
        if self.cfg.finetune == "lora":
            # heavy: loaded only when LoRA is used
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
