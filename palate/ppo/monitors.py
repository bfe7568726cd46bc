"""Alarms during PPO: the signs of a run going wrong, while it runs.

After every update :class:`Monitor` looks at the rollouts and the logged metrics and raises an
:class:`Alarm` when

- ``reward_hacking``: the proxy (reward model) keeps rising while a held-out gold falls — the
  gold's mean over the last ``window`` updates is ``gold_drop`` below its best window and the
  proxy has risen at least ``proxy_rise`` since then (needs a gold scorer: ``palate run``
  passes its gold);
- ``length_inflation``: mean response length over the last window is ``length_ratio`` × that of
  the first window;
- ``kl_budget``: KL(π ‖ π_ref) per response above ``kl_budget``;
- ``diversity_collapse``: distinct-2 (unique bigrams / bigrams, over the batch) of the last
  window below ``distinct_ratio`` × the first window's;
- ``same_answer``: one response given to at least ``same_answer`` of the batch's prompts;
- ``repetition``: mean share of repeated trigrams within a response above ``repetition``.

Each update logs ``monitor/*`` values and ``alarm/<name>`` (1 while firing); the first firing of
each alarm is printed and kept in ``alarms.jsonl``. With ``action: stop`` training ends at the
first alarm (or the first of those named in ``stop_on``) and the policy of that update becomes the
final one: ``kl_budget`` with ``stop_on: [kl_budget]`` is early stopping at a KL budget, the way
Gao et al. 2022 ("Scaling Laws for Reward Model Overoptimization") compare policies at equal KL,
while the other alarms still warn.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

from pydantic import Field

from palate.config import ADDED_LATER, Config
from palate.data import Prompt
from palate.text import distinct_n, repeated_trigrams

__all__ = ["ALARMS", "Alarm", "Monitor", "MonitorSettings"]

AlarmName = Literal[
    "reward_hacking",
    "length_inflation",
    "kl_budget",
    "diversity_collapse",
    "same_answer",
    "repetition",
]
ALARMS: tuple[str, ...] = get_args(AlarmName)


class MonitorSettings(Config):
    """Alarms during PPO (null disables one)."""

    action: Literal["warn", "stop"] = Field(
        "warn",
        description="warn: log and print; stop: end training at the first alarm (of stop_on).",
    )
    stop_on: list[AlarmName] | None = Field(
        None,
        description="With action stop, only these alarms end training; the others warn "
        "(null: every alarm stops).",
        json_schema_extra=ADDED_LATER,
    )
    window: int = Field(4, ge=1, description="Updates averaged for each trend.")
    gold_drop: float | None = Field(
        0.2, gt=0, description="reward_hacking: gold this far below its best window..."
    )
    proxy_rise: float = Field(
        0.2,
        ge=0,
        description="...while the proxy rose at least this much since that window (so batch "
        "noise with a flat proxy is not called hacking).",
    )
    length_ratio: float | None = Field(
        1.5, gt=1, description="length_inflation: last window's length / first window's."
    )
    kl_budget: float | None = Field(
        None, gt=0, description="kl_budget: KL per response (nats) above this."
    )
    distinct_ratio: float | None = Field(
        0.5, gt=0, lt=1, description="diversity_collapse: distinct-2 below this × the first's."
    )
    same_answer: float | None = Field(
        0.5, gt=0, le=1, description="same_answer: one response for this share of the batch."
    )
    repetition: float | None = Field(
        0.3, gt=0, le=1, description="repetition: mean share of repeated trigrams above this."
    )


@dataclass
class Alarm:
    name: str
    update: int
    message: str


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


class Monitor:
    """Watches PPO updates; :meth:`observe` after each returns the alarms firing now."""

    def __init__(self, settings: MonitorSettings, gold: Any = None):
        self.s = settings
        self.gold = gold  # ScoreFn or None
        self.history: list[dict[str, float]] = []
        self.fired: list[Alarm] = []

    def observe(
        self,
        update: int,
        prompts: Sequence[Prompt],
        responses: Sequence[str],
        row: dict[str, Any],
    ) -> list[Alarm]:
        """Add ``monitor/*`` and ``alarm/*`` keys to ``row``; return the alarms firing now."""
        stats = {
            "length": float(row.get("response/length", _mean([len(r) for r in responses]))),
            "kl": float(row.get("objective/kl", 0.0)),
            "proxy": float(row.get("objective/score", 0.0)),
            "distinct_2": distinct_n(responses, 2),
            "repetition": _mean([repeated_trigrams(r) for r in responses]) if responses else 0.0,
            "same_answer": (
                Counter(r.strip() for r in responses).most_common(1)[0][1] / len(responses)
                if responses
                else 0.0
            ),
        }
        if self.gold is not None:
            stats["gold"] = _mean([float(g) for g in self.gold(list(prompts), list(responses))])
        self.history.append(stats)
        firing = self._check(update)
        for key in ("distinct_2", "repetition", "same_answer", "gold"):
            if key in stats:
                row[f"monitor/{key}"] = stats[key]
        names = {a.name for a in firing}
        for name in ALARMS:
            row[f"alarm/{name}"] = float(name in names)
        known = {a.name for a in self.fired}
        self.fired += [a for a in firing if a.name not in known]
        return firing

    def halts(self, alarms: Sequence[Alarm]) -> list[Alarm]:
        """Those of ``alarms`` that end training under these settings."""
        if self.s.action != "stop":
            return []
        return [a for a in alarms if self.s.stop_on is None or a.name in self.s.stop_on]

    def _check(self, update: int) -> list[Alarm]:
        s, h, w = self.s, self.history, self.s.window
        now = h[-1]
        out: list[Alarm] = []

        def alarm(name: str, message: str) -> None:
            out.append(Alarm(name, update, message))

        if s.kl_budget is not None and now["kl"] > s.kl_budget:
            alarm("kl_budget", f"KL {now['kl']:.2f} nats above the budget {s.kl_budget:g}")
        if s.same_answer is not None and now["same_answer"] >= s.same_answer:
            alarm("same_answer", f"one response for {now['same_answer']:.0%} of the batch")
        if s.repetition is not None and now["repetition"] > s.repetition:
            alarm("repetition", f"{now['repetition']:.0%} of trigrams repeated")
        if len(h) < 2 * w:
            return out  # trends need a first window and a separate last one
        first, last = h[:w], h[-w:]

        def avg(rows: list[dict[str, float]], key: str) -> float:
            return _mean([r[key] for r in rows])

        if s.length_ratio is not None and avg(last, "length") > s.length_ratio * avg(
            first, "length"
        ):
            alarm(
                "length_inflation",
                f"length {avg(last, 'length'):.1f} vs {avg(first, 'length'):.1f} at the start",
            )
        if s.distinct_ratio is not None and avg(last, "distinct_2") < s.distinct_ratio * avg(
            first, "distinct_2"
        ):
            alarm(
                "diversity_collapse",
                f"distinct-2 {avg(last, 'distinct_2'):.2f} vs {avg(first, 'distinct_2'):.2f} "
                "at the start",
            )
        if s.gold_drop is not None and "gold" in now:
            windows = [h[i : i + w] for i in range(len(h) - w + 1)]
            best = max(range(len(windows)), key=lambda i: avg(windows[i], "gold"))
            g_best, g_now = avg(windows[best], "gold"), avg(last, "gold")
            p_best, p_now = avg(windows[best], "proxy"), avg(last, "proxy")
            if g_now < g_best - s.gold_drop and p_now >= p_best + s.proxy_rise:
                alarm(
                    "reward_hacking",
                    f"gold {g_now:.2f} down from {g_best:.2f} while the proxy rose "
                    f"{p_best:.2f} → {p_now:.2f}",
                )
        return out

    def records(self) -> list[dict[str, Any]]:
        """The first firing of each alarm; ``stopped`` marks the one that ended training."""
        return [{**asdict(a), "stopped": bool(self.halts([a]))} for a in self.fired]
