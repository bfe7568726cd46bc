"""PPO behaviour on the tiny model: it learns a rule reward, the KL leash holds, resume is exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from palate.config import load_config
from palate.data import write_jsonl
from palate.errors import ConfigError
from palate.ppo import PPOConfig, PPOTrainer, ppo
from palate.ppo.rewards import shape_scores
from palate.rundir import RunDir
from palate.sft import SFTConfig, sft

from ..test_sft import demos


def bright(prompts, responses) -> torch.Tensor:
    """Rule reward: +1 per occurrence of the word 'bright'."""
    return torch.tensor([float(r.lower().count("bright")) for r in responses])


def nothing(prompts, responses) -> torch.Tensor:
    """A reward model with no opinion: every response scores 0."""
    return torch.zeros(len(responses))


@pytest.fixture(scope="module")
def sft_policy(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """The tiny model fine-tuned on the demonstrations: a peaked policy that still explores a little
    (sampled at temperature 1, about one response in eight says 'bright')."""
    d = tmp_path_factory.mktemp("ppo-sft")
    write_jsonl(d / "demos.jsonl", demos(24))
    cfg = load_config(
        SFTConfig,
        None,
        [
            "model=tiny",
            f"data={d / 'demos.jsonl'}",
            f"output_dir={d / 'sft'}",
            "eval_fraction=0",
            "finetune=full",
            "optim.lr=3e-3",
            "optim.warmup_ratio=0",
            "train.epochs=100",
            "train.batch_size=8",
            "precision=fp32",
            "sample_prompts=0",
        ],
    )
    return sft(cfg)["final"], str(d / "demos.jsonl")


def make_cfg(tmp_path: Path, policy: tuple[str, str], *overrides: str) -> PPOConfig:
    model, prompts = policy
    return load_config(
        PPOConfig,
        None,
        [
            f"model={model}",
            f"prompts={prompts}",
            f"output_dir={tmp_path / 'run'}",
            "reward.function=tests.ppo.test_trainer:bright",
            "sampling.max_new_tokens=16",
            "sampling.temperature=1.0",
            "ppo.batch_size=16",
            "ppo.mini_batch_size=8",
            "finetune=full",
            "optim.lr=2e-4",
            "precision=fp32",
            "kl.adaptive=false",
            "kl.coef=0.01",
            "checkpoint_every=100",
            *overrides,
        ],
    )


def scores(tmp_path: Path) -> list[float]:
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return [r["objective/score"] for r in rows]


def test_rule_reward_rises_threefold(tmp_path: Path, sft_policy) -> None:
    summary = ppo(make_cfg(tmp_path, sft_policy, "ppo.updates=14"), score_fn=bright)
    s = scores(tmp_path)
    first, last = sum(s[:3]) / 3, sum(s[-3:]) / 3
    assert last >= 3 * max(first, 0.1), s
    assert summary["updates"] == 14 and Path(summary["final"], "config.json").is_file()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    documented = {
        "objective/score",
        "objective/kl",
        "objective/kl_coef",
        "objective/entropy",
        "objective/rlhf_reward",
        "policy/approxkl",
        "policy/clipfrac",
        "policy/loss",
        "value/loss",
        "value/clipfrac",
        "value/explained_variance",
        "response/length",
        "response/eos_rate",
        "timing/rollout",
        "timing/update",
        "throughput/episodes_per_s",
    }
    assert documented <= set(rows[0])
    assert (tmp_path / "run" / "samples" / "update-00001.jsonl").is_file()


def test_huge_beta_keeps_policy_on_the_leash(tmp_path: Path, sft_policy) -> None:
    # Same settings as the test above except β: there KL passes 5 nats by update 8 and the
    # score triples; here the mean KL (a noisy k1 estimate on 16 samples) stays near 0.
    ppo(make_cfg(tmp_path, sft_policy, "ppo.updates=8", "kl.coef=20"), score_fn=bright)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    kl = [r["objective/kl"] for r in rows]
    assert sum(kl) / len(kl) < 0.3 and max(kl) < 1.0, kl
    s = [r["objective/score"] for r in rows]
    assert abs(sum(s[-3:]) / 3 - sum(s[:3]) / 3) < 0.25, s  # reward barely moves


def test_first_minibatch_is_on_policy(tmp_path: Path, sft_policy) -> None:
    """Recomputed log-probs equal the rollout's: ratio 1, nothing clipped, approx-KL 0."""
    cfg = make_cfg(
        tmp_path,
        sft_policy,
        "ppo.updates=1",
        "ppo.epochs=1",
        "ppo.mini_batch_size=16",
        "optim.lr=1e-12",
    )
    trainer = PPOTrainer(cfg, score_fn=bright)
    row, ro = trainer.step(trainer.prompts[:16])
    assert row["policy/approxkl"] < 1e-8 and row["policy/clipfrac"] == 0
    # reference = the initial policy: KL is 0 before any update
    assert abs(row["objective/kl"]) < 1e-5
    # padding after EOS is masked everywhere
    assert (ro.logprobs[ro.mask == 0] == 0).all()
    ends = ro.mask.sum(1).long() - 1
    finished = ro.finished
    last_tokens = ro.response_ids[torch.arange(16), ends]
    assert (last_tokens[finished] == trainer.tok.eos_token_id).all()


@pytest.mark.parametrize(("mode", "precision"), [("shared", "bf16"), ("separate", "fp32")])
def test_critic_modes_and_lora(tmp_path: Path, sft_policy, mode: str, precision: str) -> None:
    from safetensors.torch import load_file

    summary = ppo(
        make_cfg(
            tmp_path,
            sft_policy,
            "ppo.updates=2",
            f"critic.mode={mode}",
            "critic.init=policy",
            "finetune=lora",
            f"precision={precision}",
            "optim.lr=1e-3",
        ),
        score_fn=bright,
    )
    assert summary["updates"] == 2
    ckpt = next((tmp_path / "run" / "checkpoints").glob("step-*"))
    name = "value_head.safetensors" if mode == "shared" else "critic.safetensors"
    assert (ckpt / name).is_file() and (ckpt / "policy" / "adapter_model.safetensors").is_file()
    # final/ = the fp32 initial weights + the adapter delta, even when the frozen base ran in bf16
    init = load_file(Path(sft_policy[0]) / "model.safetensors")
    final = load_file(Path(summary["final"]) / "model.safetensors")
    ad = load_file(ckpt / "policy" / "adapter_model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    a = next(v for k, v in ad.items() if "layers.0.self_attn.q_proj.lora_A" in k)
    b = next(v for k, v in ad.items() if "layers.0.self_attn.q_proj.lora_B" in k)
    assert final[key].dtype == torch.float32 and b.abs().max() > 0
    torch.testing.assert_close(final[key], init[key] + 2.0 * b @ a, rtol=0, atol=1e-6)


def test_resume_reproduces_uninterrupted_metrics(tmp_path: Path, sft_policy) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    args = ["ppo.updates=4", "kl.adaptive=true", "reward.normalize=true"]
    ppo(make_cfg(tmp_path / "a", sft_policy, *args), score_fn=bright)
    part = ppo(make_cfg(tmp_path / "b", sft_policy, *args), score_fn=bright, stop_after=2)
    assert part["stopped_at"] == 2
    ppo(make_cfg(tmp_path / "b", sft_policy, *args), score_fn=bright)
    ra = [json.loads(x) for x in (tmp_path / "a/run/metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (tmp_path / "b/run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == [1, 2, 3, 4]
    for x, y in zip(ra, rb, strict=True):
        for key in (
            "objective/score",
            "objective/kl",
            "objective/kl_coef",
            "policy/loss",
            "value/loss",
            "response/length",
        ):
            assert x[key] == pytest.approx(y[key], abs=1e-5), (x["step"], key)


def test_config_needs_one_reward_source(tmp_path: Path) -> None:
    from palate.errors import ConfigError

    base = ["prompts=p.jsonl", f"output_dir={tmp_path}"]
    with pytest.raises(ConfigError, match="reward: Field required"):
        load_config(PPOConfig, None, base)
    with pytest.raises(ConfigError, match="exactly one"):
        load_config(PPOConfig, None, [*base, "reward.model=rm", "reward.function=m:f"])
    with pytest.raises(ConfigError, match="reward.routes needs reward.model"):
        load_config(PPOConfig, None, [*base, "reward.function=m:f", "reward.routes={a: rm}"])
    with pytest.raises(ConfigError, match="multiple of ppo.mini_batch_size"):
        load_config(PPOConfig, None, [*base, "reward.model=rm", "ppo.batch_size=6"])


def test_chunked_forward_equals_one_forward(tiny) -> None:
    from palate.lm import policy_forward, trimmed_by_prompt_length
    from palate.ppo import ValueHead

    model, tok = tiny
    torch.manual_seed(0)
    head = ValueHead(model.config.hidden_size)
    torch.nn.init.normal_(head.linear.weight)
    B, tq, T = 5, 9, 6
    ids = torch.randint(3, 200, (B, tq + T))
    mask = torch.ones_like(ids)
    for i, (lead, resp) in enumerate([(0, 6), (4, 2), (7, 6), (2, 1), (5, 3)]):
        mask[i, :lead] = 0  # left padding of the prompt
        mask[i, tq + resp :] = 0  # response ended
        ids[i, :lead] = tok.pad_token_id
    want = policy_forward(model, head, ids, mask, tq, 0.7, with_entropy=True)
    for chunks in (1, 2, 3, 5, 9):
        got = trimmed_by_prompt_length(
            lambda i, m, t: policy_forward(model, head, i, m, t, 0.7, True), ids, mask, tq, chunks
        )
        for w, g in zip(want, got, strict=True):
            torch.testing.assert_close(g * mask[:, tq:], w * mask[:, tq:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "bad", ["sampling.top_p=0.9", "sampling.top_k=5", "sampling.temperature=0"]
)
def test_ppo_sampling_must_be_plain_temperature(tmp_path: Path, bad: str) -> None:
    base = [f"prompts={tmp_path}/p.jsonl", f"output_dir={tmp_path}/run", "reward.model=rm"]
    with pytest.raises(ConfigError, match="sampling: .*plain temperature"):
        load_config(PPOConfig, None, [*base, bad])


def test_lora_dropout_is_off_so_the_first_minibatch_is_on_policy(
    tmp_path: Path, sft_policy
) -> None:
    cfg = make_cfg(
        tmp_path,
        sft_policy,
        "finetune=lora",
        "lora.dropout=0.5",
        "ppo.updates=1",
        "ppo.epochs=1",
        "ppo.mini_batch_size=16",
        "optim.lr=1e-12",
    )
    trainer = PPOTrainer(cfg, score_fn=bright)
    torch.manual_seed(0)
    with torch.no_grad():  # adapters that do something (B starts at zero)
        for name, p in trainer.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    row, _ = trainer.step(trainer.prompts[:16])
    assert row["policy/approxkl"] < 1e-8 and row["policy/clipfrac"] == 0
    assert row["objective/kl"] > 1e-3  # the adapters moved the policy off the reference


def test_kl_horizon_defaults_to_the_runs_length(tmp_path: Path, sft_policy) -> None:
    cfg = make_cfg(tmp_path, sft_policy, "kl.adaptive=true", "ppo.updates=3")
    assert PPOTrainer(cfg, score_fn=bright).kl_ctl.horizon == 3 * 16
    cfg = make_cfg(tmp_path, sft_policy, "kl.adaptive=true", "kl.horizon=500")
    assert PPOTrainer(cfg, score_fn=bright).kl_ctl.horizon == 500


def test_separate_critic_starts_from_the_reward_models_score(tmp_path: Path, sft_policy) -> None:
    from palate.reward import RewardModel

    torch.manual_seed(0)
    rm = RewardModel.from_backbone("tiny", max_length=64)
    rm.offset, rm.gain = 0.7, 2.0
    rm.save(tmp_path / "rm")
    cfg = make_cfg(
        tmp_path,
        sft_policy,
        "reward.function=null",
        f"reward.model={tmp_path / 'rm'}",
        "critic.mode=separate",
        "critic.init=reward_model",
    )
    trainer = PPOTrainer(cfg)
    assert trainer.critic is not None
    h = torch.randn(3, 5, rm.model.config.hidden_size)
    with torch.no_grad():
        want = rm.model.score(h).squeeze(-1) * 2.0 + 0.7
        got = trainer.critic.head(h.to(trainer.device)).cpu()  # the critic is on the GPU if any
        torch.testing.assert_close(got, want)


def test_reference_defaults_adam_eps_and_missing_eos_penalty(tmp_path: Path, sft_policy) -> None:
    """Pinned reference choices (Huang et al. 2024; openai/lm-human-preferences): Adam eps 1e-5
    even when the optim section is given, and a reply cut off without EOS scores 1 lower."""
    trainer = PPOTrainer(make_cfg(tmp_path, sft_policy), score_fn=bright)
    assert trainer.optimizer.param_groups[0]["eps"] == 1e-5
    shaped = shape_scores(
        torch.tensor([2.0, 2.0]),
        torch.tensor([True, False]),
        trainer.cfg.reward,
        trainer.score_moments,
    )
    torch.testing.assert_close(shaped, torch.tensor([2.0, 1.0]))


def test_init_adapter_continues_a_previous_run_against_the_same_reference(
    tmp_path: Path, sft_policy
) -> None:
    """Round 2 of iterated RLHF: PPO starts from round 1's adapter (trainable), while the
    reference stays the base model (adapters off), so the first rollout's KL is already > 0."""
    from safetensors.torch import load_file

    first = make_cfg(tmp_path / "a", sft_policy, "finetune=lora", "ppo.updates=1")
    trainer = PPOTrainer(first, score_fn=bright)
    with torch.no_grad():  # adapters that do something (B starts at zero)
        for name, p in trainer.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    trainer.checkpoint(trainer.step_no)
    adapter = RunDir(tmp_path / "a" / "run").latest_checkpoint() / "policy"
    saved = load_file(adapter / "adapter_model.safetensors")

    cont = make_cfg(tmp_path / "b", sft_policy, "finetune=lora", f"init_adapter={adapter}")
    second = PPOTrainer(cont, score_fn=bright)
    lora = {n: p for n, p in second.policy.named_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad for p in lora.values())  # trainable
    for name, p in lora.items():  # the same weights as saved
        key = name.replace(".default", "")
        assert torch.equal(p.detach().cpu(), saved[key].to(p.dtype)), name
    row, _ = second.step(second.prompts[:16])
    assert row["objective/kl"] > 1e-3  # off the reference from the start

    with pytest.raises(ConfigError, match="init_adapter needs finetune: lora"):
        make_cfg(tmp_path / "c", sft_policy, f"init_adapter={adapter}")
    bad = make_cfg(tmp_path / "d", sft_policy, "finetune=lora", f"init_adapter={tmp_path}")
    with pytest.raises(ConfigError, match="no LoRA adapter"):
        PPOTrainer(bad, score_fn=bright)


def test_ptx_pulls_the_policy_toward_its_demonstrations(tmp_path: Path, sft_policy) -> None:
    """PPO-ptx (InstructGPT §3.5: an SFT loss mixed into the PPO objective): with ptx on a
    reply the policy never gives, the demonstrations' loss (``policy/ptx_loss``) falls while PPO
    runs; without ptx the metric is absent. The reward ('bright') has nothing to do with the
    demonstration, so only the ptx term can teach it."""
    write_jsonl(
        tmp_path / "ptx.jsonl",
        [{"prompt": "Describe zebras.", "response": "Stripes stripes stripes. No more."}],
    )
    ptx = [f"ppo.ptx_data={tmp_path / 'ptx.jsonl'}", "ppo.ptx_coef=1.0"]
    ppo(make_cfg(tmp_path, sft_policy, "ppo.updates=6", *ptx), score_fn=bright)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    loss = [r["policy/ptx_loss"] for r in rows]
    assert loss[-1] < 0.5 * loss[0], loss

    plain = tmp_path / "plain"
    plain.mkdir()
    ppo(make_cfg(plain, sft_policy, "ppo.updates=1"), score_fn=bright)
    row = json.loads((plain / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert "policy/ptx_loss" not in row


def test_decline_bonus_is_a_rule_reward_on_its_criterion(
    tmp_path: Path, sft_policy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``reward.decline_bonus`` (Rule Based Rewards, Mu et al. 2024): a response that declines,
    to a prompt of a listed criterion, earns the bonus on top of the reward model's score, and
    PPO learns it with a reward model that has no opinion. The tiny model cannot write a
    decline, so palate.text.declines (tested on its own in tests/test_text.py) is replaced
    by "says 'bright'", a word it says about one reply in eight."""
    import palate.text

    monkeypatch.setattr(palate.text, "declines", lambda text: "bright" in text.lower())
    fn = "reward.function=tests.ppo.test_trainer:nothing"
    bonus = "reward.decline_bonus={helpfulness: 1.0}"
    ppo(make_cfg(tmp_path, sft_policy, fn, "ppo.updates=12", bonus))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rule = [r["objective/rule_reward"] for r in rows]
    assert all(r["objective/score"] == 0 for r in rows)  # the reward model's part
    first, last = sum(rule[:3]) / 3, sum(rule[-3:]) / 3
    assert last >= 2 * max(first, 0.1), rule
    sample = [json.loads(x) for x in (tmp_path / "run" / "samples" / "update-00001.jsonl").open()]
    for row in sample:
        assert row["rule"] == (1.0 if "bright" in row["response"].lower() else 0.0)

    # another criterion's bonus: these prompts (helpfulness) earn nothing
    other = tmp_path / "other"
    other.mkdir()
    ppo(make_cfg(other, sft_policy, fn, "ppo.updates=2", "reward.decline_bonus={privacy: 1.0}"))
    rows = [json.loads(x) for x in (other / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["objective/rule_reward"] for r in rows] == [0.0, 0.0]
