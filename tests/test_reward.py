from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from palate.config import load_config
from palate.data import Comparison, read_records, write_jsonl
from palate.reward import (
    RewardConfig,
    RewardEvalConfig,
    RewardModel,
    RewardScoreConfig,
    evaluate_reward,
    expected_calibration_error,
    preference_loss,
    score_file,
    train_reward,
)
from palate.training import resolve_precision


def sp(x: float) -> float:  # softplus: -log σ(-x)
    return math.log1p(math.exp(x))


T = torch.tensor

# ---------------------------------------------------------------- the loss, by hand


def test_hard_label_is_minus_log_sigmoid() -> None:
    loss = preference_loss(T([1.0, 0.0]), T([0.0, 2.0]))
    assert loss.tolist() == pytest.approx([sp(-1.0), sp(2.0)], rel=1e-6)


def test_margin_shifts_the_gap() -> None:
    loss = preference_loss(T([1.0]), T([0.0]), margin=T([0.5]))
    assert loss.item() == pytest.approx(sp(-0.5), rel=1e-6)  # -log σ(1 - 0.5)


def test_tie_targets_one_half_and_ignores_margin() -> None:
    loss = preference_loss(T([1.0, 0.3]), T([0.0, 0.3]), margin=T([5.0, 5.0]), tie=T([True, True]))
    expected = 0.5 * sp(-1.0) + 0.5 * sp(1.0)  # -(½ log σ(1) + ½ log σ(-1))
    assert loss[0].item() == pytest.approx(expected, rel=1e-6)
    assert loss[1].item() == pytest.approx(math.log(2), rel=1e-6)  # equal scores: the minimum
    d = torch.tensor([0.7], requires_grad=True)
    preference_loss(d, T([0.0]), tie=T([True])).sum().backward()
    assert d.grad.item() > 0  # pushes the gap back toward 0


def test_soft_label_vote_fraction() -> None:
    loss = preference_loss(T([2.0]), T([0.0]), prob_chosen=T([0.75]))
    assert loss.item() == pytest.approx(0.75 * sp(-2.0) + 0.25 * sp(2.0), rel=1e-6)


def test_label_smoothing() -> None:
    loss = preference_loss(T([1.0]), T([0.0]), label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.9 * sp(-1.0) + 0.1 * sp(1.0), rel=1e-6)


def test_centering_term() -> None:
    loss = preference_loss(T([1.0]), T([0.5]), center_coef=0.01)
    assert loss.item() == pytest.approx(sp(-0.5) + 0.01 * 1.5**2, rel=1e-6)


def test_ece_hand_computed() -> None:
    p = np.array([0.9, 0.9, 0.1, 0.1])
    y = np.array([1.0, 0.0, 0.0, 0.0])
    # bin 0.9: |0.9 - 0.5| · 2/4 ; bin 0.1: |0.1 - 0| · 2/4
    assert expected_calibration_error(p, y, bins=10) == pytest.approx(0.25)


# ---------------------------------------------------------------- the model


@pytest.fixture(scope="module")
def tiny_rm() -> RewardModel:
    torch.manual_seed(0)
    return RewardModel.from_backbone("tiny", max_length=64)


def test_causal_score_is_read_at_eos(tiny_rm: RewardModel) -> None:
    rm = tiny_rm
    assert rm.kind == "causal"
    enc = [rm.encode("Hi", "Hello there friend"), rm.encode("A much longer prompt here", "Yo")]
    assert all(e.input_ids[-1] == rm.tokenizer.eos_token_id for e in enc)
    batch = rm.collate(enc)  # right-padded with pad != EOS
    with torch.no_grad():
        scores = rm.forward(batch)
        hidden = rm.model.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        )
        h = hidden.last_hidden_state
        for i, e in enumerate(enc):
            manual = rm.model.score(h[i, len(e.input_ids) - 1]).item()
            assert scores[i].item() == pytest.approx(manual, rel=1e-4, abs=1e-5)
    # and padding does not change a score
    with torch.no_grad():
        alone = rm.forward(rm.collate([enc[1]]))
    assert alone.item() == pytest.approx(scores[1].item(), rel=1e-4, abs=1e-5)


def test_chunked_forward_gives_the_same_scores(tiny_rm: RewardModel) -> None:
    from palate.reward.model import encode_pairs, forward_pairs

    pairs = encode_pairs(tiny_rm, marker_pairs(7), use_margin=False)
    with torch.no_grad():
        one = forward_pairs(tiny_rm, pairs, chunks=1)
        for chunks in (2, 3, 14, 50):
            many = forward_pairs(tiny_rm, pairs, chunks=chunks)
            for a, b in zip(one, many, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_reply_in_several_pairs_is_encoded_once(tiny_rm: RewardModel) -> None:
    """4 replies to one prompt make 6 pairs (12 sequences): 4 are forwarded, and the scores and
    the loss's gradient equal those of every pair encoded on its own."""
    from palate.reward.model import encode_pairs, forward_pairs

    replies = ["red apple", "green pear here", "blue", "a yellow lemon"]
    comps = [
        Comparison(prompt="Name a fruit", chosen=replies[i], rejected=replies[j])
        for i in range(4)
        for j in range(i + 1, 4)
    ]
    pairs = encode_pairs(tiny_rm, comps, use_margin=False)
    model = tiny_rm.model
    rows_seen: list[int] = []

    def count(_m: object, _a: object, kw: dict[str, torch.Tensor], _out: object) -> None:
        rows_seen.append(kw["input_ids"].shape[0])

    hook = model.register_forward_hook(count, with_kwargs=True)
    try:
        model.zero_grad()
        r_c, r_r = forward_pairs(tiny_rm, pairs, chunks=1)
        preference_loss(r_c, r_r).mean().backward()
    finally:
        hook.remove()
    assert rows_seen == [4]
    shared = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    alone = [forward_pairs(tiny_rm, [p], chunks=1) for p in pairs]  # no reply repeats
    a_c = torch.cat([c for c, _ in alone])
    a_r = torch.cat([r for _, r in alone])
    torch.testing.assert_close(r_c, a_c, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(r_r, a_r, rtol=1e-4, atol=1e-5)
    preference_loss(a_c, a_r).mean().backward()
    separate = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(shared) == len(separate) > 0
    for g1, g2 in zip(shared, separate, strict=True):
        torch.testing.assert_close(g1, g2, rtol=1e-3, atol=1e-6)
    model.zero_grad()
    # score() too: a repeated (prompt, response) is scored once, in its own row
    with torch.no_grad():
        once = tiny_rm.score(["Name a fruit"] * 3, ["blue", "red apple", "blue"])
    assert (
        once[0].item() == once[2].item() == pytest.approx(float(a_r[1]), rel=1e-4)
    )  # (0, 2): "blue"


def test_zero_head_init_is_seed_independent() -> None:
    heads = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        heads.append(RewardModel.from_backbone("tiny", head_init="zero").model.score.weight)
    assert torch.equal(heads[0], heads[1]) and heads[0].abs().sum() == 0


def test_truncation_keeps_the_response(tiny_rm: RewardModel) -> None:
    long_prompt = " ".join(["context"] * 300)
    e = tiny_rm.encode(long_prompt, "the answer")
    assert e.truncated and len(e.input_ids) == 64
    tail = tiny_rm.tokenizer("the answer", add_special_tokens=False).input_ids
    assert (
        e.input_ids[-len(tail) - 1 : -1] == tail
        and e.input_ids[-1] == tiny_rm.tokenizer.eos_token_id
    )


def test_encoder_pair_encoding() -> None:
    rm = RewardModel.from_backbone("minilm-l6", max_length=32)
    assert rm.kind == "encoder"
    tok = rm.tokenizer
    e = rm.encode(" ".join(["word"] * 100) + " last", "a reply")
    assert e.truncated and len(e.input_ids) == 32
    assert e.input_ids[0] == tok.cls_token_id and e.input_ids[-1] == tok.sep_token_id
    reply = tok("a reply", add_special_tokens=False).input_ids
    assert e.input_ids[-len(reply) - 1 : -1] == reply
    assert e.token_type_ids[-len(reply) - 1 :] == [1] * (len(reply) + 1)
    assert tok.decode(e.input_ids).split("[SEP]")[0].strip().endswith("word last")  # left-cut
    scores = rm.score(["q1", "q2"], ["r1", "r2 longer"])
    assert scores.shape == (2,) and torch.isfinite(scores).all()


# ---------------------------------------------------------------- training


WORDS = [
    "river",
    "stone",
    "cloud",
    "lamp",
    "paper",
    "window",
    "garden",
    "music",
    "coffee",
    "forest",
    "candle",
    "mirror",
]


def marker_pairs(n: int, seed: int = 0) -> list[Comparison]:
    """Chosen responses contain the word 'banana'; rejected ones never do."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        base = [rng.choice(WORDS) for _ in range(rng.randint(3, 7))]
        other = [rng.choice(WORDS) for _ in range(rng.randint(3, 7))]
        chosen = list(base)
        chosen.insert(rng.randint(0, len(chosen)), "banana")
        out.append(
            Comparison(
                prompt=f"Say something {i}", chosen=" ".join(chosen), rejected=" ".join(other)
            )
        )
    return out


def cfg_for(tmp_path: Path, *overrides: str, n: int = 240) -> RewardConfig:
    data = tmp_path / "pairs.jsonl"
    write_jsonl(data, marker_pairs(n))
    base = ["model=tiny", f"data={data}", f"output_dir={tmp_path / 'run'}", "max_length=48"]
    return load_config(RewardConfig, None, [*base, *overrides])


def test_tiny_reward_model_learns_marker(tmp_path: Path) -> None:
    cfg = cfg_for(
        tmp_path,
        "eval_fraction=0.25",
        "optim.lr=3e-3",
        "train.epochs=6",
        "train.batch_size=16",
        "precision=fp32",
    )
    summary = train_reward(cfg)
    assert summary["eval_accuracy"] >= 0.95, summary
    assert summary["eval_accuracy_before"] < 0.8
    # normalised without a policy: the responses of the first 128 training comparisons (256,
    # chosen and rejected) score mean 0, std 1 (what was saved)
    rm = RewardModel.load(summary["final"])
    assert (rm.offset, rm.gain) == pytest.approx((summary["offset"], summary["gain"]))
    assert summary["normalize_source"] == "training comparisons"
    held = read_records(tmp_path / "run/heldout.jsonl").records
    ref = [c for c in marker_pairs(240) if c not in held][:128]
    r = rm.score(
        [c.prompt for c in ref for _ in (0, 1)], [x for c in ref for x in (c.chosen, c.rejected)]
    )
    assert r.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert r.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert {"train/accuracy", "train/margin", "train/pairs_per_s", "eval/accuracy"} <= set(
        k for r in rows for k in r
    )


def test_group_by_prompt_batches_a_prompts_pairs_together_and_learns(tmp_path: Path) -> None:
    from palate.reward.train import RewardTrainer

    # 30 prompts × 4 replies (one with the marker): 6 pairs per prompt, 180 pairs, the 3 with
    # the marker decided
    rng = random.Random(1)
    comps = []
    for i in range(30):
        replies = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 6))) for _ in range(4)]
        replies[0] += " banana"
        comps += [
            Comparison(
                prompt=f"Say something {i}", chosen=replies[a], rejected=replies[b], tie=a > 0
            )  # only the marker reply is preferred; the others tie
            for a in range(4)
            for b in range(a + 1, 4)
        ]
    data = tmp_path / "grouped.jsonl"
    write_jsonl(data, comps)
    cfg = load_config(
        RewardConfig,
        None,
        [
            "model=tiny",
            f"data={data}",
            f"output_dir={tmp_path / 'run'}",
            "max_length=48",
            "eval_fraction=0.2",
            "split_by=prompt",
            "train.group_by_prompt=true",
            "train.batch_size=6",
            "train.epochs=8",
            "optim.lr=3e-3",
            "precision=fp32",
        ],
    )
    trainer = RewardTrainer(cfg)
    order = trainer.batches(epoch=0)
    assert sorted(order) == list(range(len(trainer.train_comps)))
    prompts = [trainer.train_comps[j].prompt for j in order]
    batches = [set(prompts[k : k + 6]) for k in range(0, len(prompts), 6)]
    assert all(len(b) == 1 for b in batches)  # batch_size 6 = one prompt's pairs
    assert trainer.batches(epoch=1) != order
    summary = trainer.train()
    assert summary["eval_accuracy"] >= 0.9, summary


def test_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    common = [
        "train.max_steps=5",
        "train.batch_size=8",
        "train.grad_accum=2",
        "checkpoint_every=100",
        "optim.lr=1e-3",
    ]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    train_reward(cfg_for(tmp_path / "a", *common, n=120))
    part = train_reward(cfg_for(tmp_path / "b", *common, n=120), stop_after=2)
    assert part["stopped_at"] == 2
    train_reward(cfg_for(tmp_path / "b", *common, n=120))
    wa = load_file(tmp_path / "a/run/final/model.safetensors")
    wb = load_file(tmp_path / "b/run/final/model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0)


def test_lora_reward_model_saves_merged(tmp_path: Path) -> None:
    s = train_reward(cfg_for(tmp_path, "finetune=lora", "train.max_steps=3", "optim.lr=1e-3", n=60))
    rm = RewardModel.load(s["final"])
    assert not hasattr(rm.model, "peft_config")
    assert rm.score(["q"], ["a"]).shape == (1,)


def test_eval_and_score_commands(tmp_path: Path) -> None:
    s = train_reward(cfg_for(tmp_path, "train.max_steps=4", "optim.lr=1e-3", n=80))
    ev = evaluate_reward(
        RewardEvalConfig(model=s["final"], data=str(tmp_path / "run/heldout.jsonl"))
    )
    for key in (
        "accuracy",
        "mean_margin",
        "ece",
        "length_reward_spearman",
        "accuracy_rejected_longer",
        "pairs_rejected_longer",
    ):
        assert key in ev
    assert ev["pairs"] == 16
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        '{"prompt": "p", "response": "banana river"}\n{"prompt": "p", "response": "x"}\n'
    )
    out = tmp_path / "scored.jsonl"
    summary = score_file(RewardScoreConfig(model=s["final"], data=str(rows), output=str(out)))
    scored = [json.loads(x) for x in out.read_text().splitlines()]
    assert summary["rows"] == 2 and all(isinstance(r["reward"], float) for r in scored)
    rm = RewardModel.load(s["final"])
    rm.precision = resolve_precision("auto")  # what score_file uses
    direct = rm.score(["p", "p"], ["banana river", "x"]).tolist()
    assert [r["reward"] for r in scored] == pytest.approx(direct, abs=1e-5)


def test_encoder_mean_pooling_matches_manual_and_survives_save(tmp_path: Path) -> None:
    rm = RewardModel.from_backbone("minilm-l6", max_length=32, pooling="mean")
    batch = rm.collate([rm.encode("q", "a short reply"), rm.encode("question two", "b")])
    with torch.no_grad():
        got = rm.forward(batch)
        h = rm.model.bert(**batch).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).float()
        manual = rm.model.classifier((h * m).sum(1) / m.sum(1)).squeeze(-1)
    torch.testing.assert_close(got, manual)
    rm.save(tmp_path / "rm")
    back = RewardModel.load(tmp_path / "rm")
    assert back.pooling == "mean"
    torch.testing.assert_close(
        back.score(["q"], ["a short reply"]), rm.score(["q"], ["a short reply"])
    )
    with pytest.raises(Exception, match="encoder"):
        RewardModel.from_backbone("tiny", pooling="mean")


@pytest.mark.parametrize("pooling", ["last", "mean_last"])
def test_encoder_last_pooling_reads_each_rows_closing_token(pooling: str, tmp_path: Path) -> None:
    rm = RewardModel.from_backbone("minilm-l6", max_length=32, pooling=pooling)
    # rows of different lengths in one right-padded batch: "last" is each row's own [SEP]
    batch = rm.collate([rm.encode("q", "a much longer reply than the other"), rm.encode("q", "b")])
    lengths = batch["attention_mask"].sum(1)
    assert lengths[0] > lengths[1]
    with torch.no_grad():
        got = rm.forward(batch)
        h = rm.model.bert(**batch).last_hidden_state
        last = torch.stack([h[0, lengths[0] - 1], h[1, lengths[1] - 1]])
        m = batch["attention_mask"].unsqueeze(-1).float()
        mean = (h * m).sum(1) / m.sum(1)
        pooled = last if pooling == "last" else mean + last
        manual = rm.model.classifier(pooled).squeeze(-1)
        # the padded row's score ignores its padding: scored alone it is the same
        alone = rm.forward(rm.collate([rm.encode("q", "b")]))
    torch.testing.assert_close(got, manual)
    torch.testing.assert_close(got[1:], alone, atol=1e-5, rtol=1e-5)
    rm.save(tmp_path / "rm")
    assert RewardModel.load(tmp_path / "rm").pooling == pooling
    with pytest.raises(Exception, match="encoder"):
        RewardModel.from_backbone("tiny", pooling=pooling)


def test_ensemble_trains_members_on_one_split_and_averages(tmp_path: Path) -> None:
    from palate.reward import RewardEnsemble, load_reward_model

    args = [
        "ensemble=2",
        "train.max_steps=3",
        "optim.lr=1e-3",
        "precision=fp32",
        "freeze_layers=1",
        "head_init=zero",
    ]
    part = train_reward(cfg_for(tmp_path, *args, n=80), stop_after=2)  # interrupted in member 0
    assert part["member"] == 0 and part["stopped_at"] == 2
    s = train_reward(cfg_for(tmp_path, *args, n=80))
    run = tmp_path / "run"
    # both members used the parent's held-out split, and different data orders / seeds
    held = [(run / "members" / f"member-{k}" / "heldout.jsonl").read_text() for k in (0, 1)]
    assert held[0] == held[1] == (run / "heldout.jsonl").read_text()
    ens = load_reward_model(s["final"])
    assert isinstance(ens, RewardEnsemble) and len(ens.members) == 2
    members = [RewardModel.load(run / "members" / f"member-{k}" / "final") for k in (0, 1)]
    w = [m.model.score.weight for m in members]
    assert not torch.equal(w[0], w[1])
    prompts, responses = ["p", "q"], ["banana river", "x"]
    expected = sum(m.score(prompts, responses) for m in members) / 2 * ens.gain + ens.offset
    assert ens.gain != 1.0 and all((m.gain, m.offset) == (1.0, 0.0) for m in members)
    torch.testing.assert_close(ens.score(prompts, responses), expected)
    assert s["ensemble"] == 2 and len(s["member_eval_accuracy"]) == 2 and "eval_accuracy" in s
    # frozen bottom: the embeddings did not move
    from palate.models import load_model

    base, _ = load_model("tiny")
    emb = base.get_input_embeddings().weight
    torch.testing.assert_close(members[0].model.model.embed_tokens.weight, emb)
    # eval works on an ensemble directory; a re-run finds every member complete
    ev = evaluate_reward(RewardEvalConfig(model=s["final"], data=str(run / "heldout.jsonl")))
    assert ev["accuracy"] == pytest.approx(s["eval_accuracy"])
    again = train_reward(cfg_for(tmp_path, *args, n=80))
    assert again["member_eval_accuracy"] == s["member_eval_accuracy"]


# --------------------------------------------------------------------------- normalisation


class FixedScorer:
    """Raw scores 1, 2, 3, 4 (whatever the responses): the maths of the map alone."""

    def __init__(self) -> None:
        self.gain, self.offset = 5.0, 3.0  # stale values: fitting must ignore them

    def score(self, prompts, responses, *, batch_size: int = 16) -> torch.Tensor:
        return torch.tensor([1.0, 2.0, 3.0, 4.0]) * self.gain + self.offset


def test_fit_normalisation_hand_computed() -> None:
    from palate.reward import fit_normalisation

    scorer = FixedScorer()
    fitted = fit_normalisation(scorer, ["p"] * 4, ["a", "b", "c", "d"])
    # mean 2.5, population std √1.25 = 1.118034; gain 1/1.118034, offset −2.5·gain
    assert fitted["raw_mean"] == pytest.approx(2.5)
    assert fitted["raw_std"] == pytest.approx(1.118034, abs=1e-6)
    assert scorer.gain == pytest.approx(0.894427, abs=1e-6)
    assert scorer.offset == pytest.approx(-2.236068, abs=1e-6)
    torch.testing.assert_close(
        scorer.score([], []), torch.tensor([-1.341641, -0.447214, 0.447214, 1.341641])
    )
    fit_normalisation(scorer, ["p"] * 4, ["a"] * 4, target_mean=1.0, target_std=2.0)
    assert (scorer.gain, scorer.offset) == pytest.approx((1.788854, 1.0 - 2.5 * 1.788854))


def test_normalisation_on_the_initial_policys_samples(tmp_path: Path) -> None:
    """lm-human-preferences' normalize_before: the reward of the initial policy's own samples
    is mean 0, std 1 (not the chosen training responses')."""
    from palate.reward.normalize import reference_set

    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(prompts, [{"prompt": f"Tell me about topic {i}."} for i in range(5)])
    args = [
        "train.max_steps=2",
        "precision=fp32",
        "normalize.policy=tiny",
        f"normalize.prompts={prompts}",
        "normalize.samples=12",
        "normalize.sampling.max_new_tokens=6",
        "normalize.batch_size=4",
    ]
    cfg = cfg_for(tmp_path, *args, n=40)
    summary = train_reward(cfg)
    assert summary["normalize_source"] == "tiny" and summary["normalize_samples"] == 12
    rm = RewardModel.load(summary["final"])
    # the same seed draws the same samples again: on them the saved model is mean 0, std 1
    ps, rs, _ = reference_set(cfg.normalize, [], precision="fp32", seed=cfg.seed)
    assert len(rs) == 12 and {str(p) for p in ps} <= {f"Tell me about topic {i}." for i in range(5)}
    r = rm.score(ps, rs)
    assert r.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert r.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    # ... while the chosen training responses are not what it was centred on
    comps = marker_pairs(40)
    assert abs(rm.score([c.prompt for c in comps], [c.chosen for c in comps]).mean().item()) > 0.05


def test_normalisation_on_given_responses_and_bad_rows(tmp_path: Path) -> None:
    rows = [{"prompt": f"q{i}", "response": "banana " * (i % 4 + 1)} for i in range(10)]
    rows[3]["response"] = ""  # a policy that ended its reply at once: a sample like any other
    write_jsonl(tmp_path / "samples.jsonl", rows)
    cfg = cfg_for(
        tmp_path,
        "train.max_steps=2",
        "precision=fp32",
        f"normalize.responses={tmp_path / 'samples.jsonl'}",
        n=40,
    )
    rm = RewardModel.load(train_reward(cfg)["final"])
    r = rm.score([x["prompt"] for x in rows], [x["response"] for x in rows])
    assert r.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "q"}\n')
    bad = cfg.model_copy(
        update={
            "normalize": cfg.normalize.model_copy(
                update={"responses": str(tmp_path / "bad.jsonl")}
            ),
            "output_dir": str(tmp_path / "run2"),
        }
    )
    from palate.errors import PalateError

    with pytest.raises(PalateError, match="bad.jsonl:1: field response"):
        train_reward(bad)


# ---------------------------------------------------------------- one reward model per criterion


def test_routed_scorer_scores_each_prompt_with_its_criterions_model() -> None:
    """Hand-built scorers: each prompt gets its criterion's score, in the input order; a
    criterion without a route and an unknown prompt get the default's."""
    from palate.reward import RoutedScorer
    from palate.reward.routed import reward_models

    calls: list[tuple[str, int]] = []

    def scorer(name: str, base: float):
        def score(prompts, responses):
            calls.append((name, len(prompts)))
            return [base + len(r) for r in responses]

        return score

    routed = RoutedScorer(
        {"harmlessness": scorer("harm", 100.0), "helpfulness": scorer("help", 10.0)},
        scorer("pooled", 0.0),
        {"bomb?": "harmlessness", "poem?": "helpfulness", "tea?": "honesty"},
    )
    prompts = ["poem?", "bomb?", "tea?", "poem?", "unseen?", "bomb?"]
    responses = ["a", "bb", "ccc", "dddd", "eeeee", "ffffff"]
    got = routed(prompts, responses)
    assert got.tolist() == [11.0, 102.0, 3.0, 14.0, 5.0, 106.0]
    # one call per route, each with its own prompts only
    assert sorted(calls) == [("harm", 2), ("help", 2), ("pooled", 2)]
    assert routed.route([{"role": "user", "content": "bomb?"}]) is None  # another text
    assert reward_models(routed) == [] and reward_models(len) == []
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        routed(["a", "b"], ["x"])


def test_per_criterion_reward_models_learn_opposite_tastes(tmp_path: Path) -> None:
    """Helpfulness raters want 'banana' in a reply, harmlessness raters want it absent, on
    prompts that look alike (the criterion is only in the prompts' metadata). One reward model
    per criterion, routed by criterion, orders held-out pairs of both kinds as their raters do;
    the pooled model, trained on the same labels, cannot (they contradict)."""
    from palate.reward import RoutedScorer, load_reward_model

    pairs = marker_pairs(320, seed=1)
    crit = {c.prompt: ("helpfulness" if i % 2 else "harmlessness") for i, c in enumerate(pairs)}

    def labelled(c: Comparison) -> Comparison:  # harmlessness: the reply without banana wins
        if crit[c.prompt] == "helpfulness":
            return c
        return Comparison(prompt=c.prompt, chosen=c.rejected, rejected=c.chosen)

    train, held = pairs[:240], pairs[240:]  # held-out prompts, the same for every model
    models = {}
    for name in ("helpfulness", "harmlessness", "pooled"):
        mine = [c for c in train if name in ("pooled", crit[c.prompt])]
        write_jsonl(tmp_path / f"{name}.jsonl", [labelled(c) for c in mine])
        write_jsonl(
            tmp_path / f"{name}-eval.jsonl",
            [labelled(c) for c in held if name in ("pooled", crit[c.prompt])],
        )
        cfg = load_config(
            RewardConfig,
            None,
            [
                "model=tiny",
                f"data={tmp_path / name}.jsonl",
                f"eval_data={tmp_path / name}-eval.jsonl",
                f"output_dir={tmp_path / name}",
                "max_length=48",
                "optim.lr=3e-3",
                "train.epochs=6",
                "train.batch_size=16",
                "precision=fp32",
            ],
        )
        models[name] = load_reward_model(train_reward(cfg)["final"])

    def score_with(name: str):
        return lambda p, r: models[name].score(p, r)

    routed = RoutedScorer(
        {c: score_with(c) for c in ("helpfulness", "harmlessness")}, score_with("pooled"), crit
    )
    want = [crit[c.prompt] == "helpfulness" for c in held]  # True: the banana reply should win
    prompts = [c.prompt for c in held]

    def agreement(fn) -> float:
        banana = torch.as_tensor(fn(prompts, [c.chosen for c in held]))
        plain = torch.as_tensor(fn(prompts, [c.rejected for c in held]))
        right = [(d > 0) == w for d, w in zip((banana - plain).tolist(), want, strict=True)]
        return sum(right) / len(held)

    routed_ok, pooled_ok = agreement(routed), agreement(score_with("pooled"))
    print(f"\nheld-out agreement: routed {routed_ok:.2f}, pooled {pooled_ok:.2f}")
    assert routed_ok >= 0.9 and pooled_ok < 0.7
