"""clipped update: ``ppo.epochs`` passes over the rollout batch in minibatches, each a gradient
step on the clipped surrogate + the clipped value loss (− an entropy bonus, + the PPO-ptx SFT
loss on demonstrations), with an optional early stop on approx-KL (:class:`ClippedUpdate`).

In W processes each minibatch is split between the ranks; a rank's loss is its share of the
minibatch's token mean and the gradients are summed over ranks before the step.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from palate.data import read_records
from palate.lm import response_cross_entropy
from palate.ppo.config import PPOConfig
from palate.ppo.distributed import all_reduce_gradients, broadcast_list
from palate.ppo.rollout import ActorCritic, Rollout
from palate.ppo_math import masked_mean, policy_loss, value_loss
from palate.sft import Example, collate, tokenize_demonstration
from palate.training import autocast

__all__ = ["ClippedUpdate", "ptx_examples"]

# what each minibatch of the clipped update logs (means over the update's minibatches)
_UPDATE_STATS = (
    "policy/loss",
    "policy/clipfrac",
    "policy/approxkl",
    "value/loss",
    "value/clipfrac",
    "objective/entropy",
)


def ptx_examples(cfg: PPOConfig, tok: Any) -> list[Example]:
    """``ppo.ptx_data`` tokenized for the PPO-ptx loss (none when ``ppo.ptx_coef`` is 0)."""
    if cfg.ppo.ptx_data is None or cfg.ppo.ptx_coef <= 0:
        return []
    demos = read_records(cfg.ppo.ptx_data, "demonstrations").records
    return [tokenize_demonstration(tok, d, 512) for d in demos]


class ClippedUpdate:
    """The clipped update of one PPO update over the trainable ``params`` (see the module's
    docstring); ``ptx``: the PPO-ptx demonstrations (:func:`ptx_examples`)."""

    def __init__(
        self,
        cfg: PPOConfig,
        *,
        acc: Any,
        nets: ActorCritic,
        optimizer: torch.optim.Optimizer,
        params: list[torch.nn.Parameter],
        ptx: list[Example],
        pad_id: int,
        precision: str,
    ):
        self.settings, self.max_grad_norm = cfg.ppo, cfg.optim.max_grad_norm
        self.acc, self.nets, self.optimizer, self.params = acc, nets, optimizer, params
        self.ptx, self.pad_id, self.precision = ptx, pad_id, precision
        self.device = acc.device
        self.world, self.rank = acc.num_processes, acc.process_index

    def __call__(
        self,
        rollout: Rollout,
        advantages: torch.Tensor,  # (B, T)
        returns: torch.Tensor,  # (B, T)
    ) -> dict[str, float]:
        """Clipped policy/value updates over minibatches for ``ppo.epochs`` passes.

        In W processes each minibatch is split between the ranks; a rank's loss is its share of
        the minibatch's token mean and the gradients are summed over ranks before the step.
        """
        cfg = self.settings
        B = rollout.response_ids.shape[0]
        full = torch.cat([rollout.query_ids, rollout.response_ids], 1)
        full_mask = torch.cat([rollout.query_mask, rollout.mask.long()], 1)
        minibatches = math.ceil(B / cfg.mini_batch_size)
        # kept on the device and read once at the end: a float() per minibatch would make the
        # host wait for the GPU seven times per step
        stats: dict[str, list[torch.Tensor]] = {}  # each minibatch's, weighted by this rank's share
        grad_norms: list[torch.Tensor] = []  # the same on every rank
        ptx_losses: list[torch.Tensor] = []  # this rank's PPO-ptx SFT losses
        self.nets.policy.train()
        stop = False
        epochs_done = 0
        for _epoch in range(cfg.epochs):
            epochs_done += 1
            perm = torch.randperm(B).tolist()
            if self.world > 1:
                perm = broadcast_list(perm)  # one permutation: rank 0's, as in one process
            for start in range(0, B, cfg.mini_batch_size):
                idx = perm[start : start + cfg.mini_batch_size]
                terms = self._minibatch(rollout, advantages, returns, (full, full_mask), idx)
                if "ptx" in terms:
                    ptx_losses.append(terms.pop("ptx"))
                norm = self._optimiser_step()
                if norm is not None:
                    grad_norms.append(norm)
                for key, val in terms.items():
                    stats.setdefault(key, []).append(val)
            if cfg.target_approx_kl is not None:
                recent = torch.stack(stats["policy/approxkl"][-minibatches:]).mean()
                if self.world > 1:
                    recent = self.acc.reduce(recent, "sum")
                if recent.item() > cfg.target_approx_kl:
                    stop = True
                    break
        return self._update_stats(stats, grad_norms, ptx_losses, epochs_done, stop)

    def _minibatch(
        self,
        rollout: Rollout,
        advantages: torch.Tensor,  # (B, T)
        returns: torch.Tensor,  # (B, T)
        sequences: tuple[torch.Tensor, torch.Tensor],  # (B, Tq + T) ids and attention mask
        idx: list[int],
    ) -> dict[str, torch.Tensor]:
        """Backward of this rank's share of one minibatch's loss: the clipped surrogate +
        ``vf_coef`` × the clipped value loss − ``ent_coef`` × entropy (+ ``ptx_coef`` × the
        SFT loss). Returns its terms (0 where this rank has no share; ``ptx``: the SFT loss)."""
        cfg = self.settings
        zero = torch.zeros((), device=self.device)
        terms = dict.fromkeys(_UPDATE_STATS, zero)
        mine = idx[self.rank :: self.world]
        if not mine:
            return terms
        full, full_mask = sequences
        width = rollout.query_ids.shape[1]
        mask = rollout.mask[mine]
        # this rank's tokens over the minibatch's: 1 in one process
        share = mask.sum() / rollout.mask[idx].sum().clamp(min=1)
        with autocast(self.device, self.precision):
            logp, values, entropy = self.nets.forward(
                self.nets.policy, full[mine], full_mask[mine], width, with_entropy=True
            )
        pg_loss, clipfrac, approxkl = policy_loss(
            logp, rollout.logprobs[mine], advantages[mine], mask, cfg.cliprange
        )
        vf_loss, vf_clipfrac = value_loss(
            values.float(), rollout.values[mine], returns[mine], mask, cfg.cliprange_value
        )
        mean_entropy = masked_mean(entropy, mask)
        loss = pg_loss + cfg.vf_coef * vf_loss - cfg.ent_coef * mean_entropy
        if self.world > 1:
            loss = loss * share
        out: dict[str, torch.Tensor] = {}
        if cfg.ptx_coef > 0 and self.ptx:
            ptx = self._ptx_loss()
            loss = loss + cfg.ptx_coef * ptx / self.world
            out["ptx"] = ptx.detach().float()
        self.acc.backward(loss)
        values_now = (pg_loss, clipfrac, approxkl, vf_loss, vf_clipfrac, mean_entropy)
        for key, val in zip(_UPDATE_STATS, values_now, strict=True):
            val = val.detach().float()
            terms[key] = val * share if self.world > 1 else val
        return {**terms, **out}

    def _optimiser_step(self) -> torch.Tensor | None:
        """Sum the gradients over ranks, clip them, step; returns the gradient norm (if
        clipped)."""
        if self.world > 1:
            all_reduce_gradients(self.params)
        norm = None
        if self.max_grad_norm is not None:
            clipped = self.acc.clip_grad_norm_(self.params, self.max_grad_norm)
            norm = torch.as_tensor(clipped).detach().float()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def _update_stats(
        self,
        stats: dict[str, list[torch.Tensor]],
        grad_norms: list[torch.Tensor],
        ptx_losses: list[torch.Tensor],
        epochs_done: int,
        stop: bool,
    ) -> dict[str, float]:
        """The update's means over its minibatches (and ranks), read from the device once."""
        means = torch.stack([torch.stack(v).mean().to(self.device) for v in stats.values()])
        if self.world > 1:  # each rank's shares of the token means add up to the global ones
            means = self.acc.reduce(means, "sum")
        out = dict(zip(stats, means.tolist(), strict=True))
        if grad_norms:
            out["policy/grad_norm"] = torch.stack(grad_norms).mean().item()
        if self.settings.ptx_coef > 0 and self.ptx:
            zero = torch.zeros((), device=self.device)
            ptx_mean = torch.stack(ptx_losses).mean() if ptx_losses else zero
            if self.world > 1:
                ptx_mean = self.acc.reduce(ptx_mean, "mean")
            out["policy/ptx_loss"] = ptx_mean.item()
        out["policy/epochs"] = epochs_done
        out["policy/early_stop"] = float(stop)
        return out

    def _ptx_loss(self) -> torch.Tensor:
        """PPO-ptx: the SFT loss on a random minibatch of demonstrations."""
        rows = torch.randint(len(self.ptx), (self.settings.mini_batch_size,)).tolist()
        batch = collate([self.ptx[i] for i in rows], self.pad_id)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with autocast(self.device, self.precision):
            ce, n = response_cross_entropy(self.nets.policy, batch, fast=True)
        return ce / n.clamp(min=1)
