"""The stage loop every trainer shares: logging, checkpoints, stop_after, halts, Ctrl-C."""

from __future__ import annotations

from typing import Any

import pytest

from palate.training import StepOutcome, run_steps


class Log:
    def __init__(self) -> None:
        self.rows: list[tuple[int, dict[str, Any]]] = []
        self.closed = False

    def log(self, step: int, row: dict[str, Any]) -> None:
        self.rows.append((step, row))

    def close(self) -> None:
        self.closed = True


def loop(
    total: int,
    *,
    start: int = 0,
    every: int = 3,
    halt_at: int | None = None,
    log_every: int = 1,
    **kw: Any,
) -> tuple[Any, list[int], Log, list[int]]:
    saved: list[int] = []
    updates: list[int] = []
    metrics = Log()

    def update(step: int) -> int:
        updates.append(step)
        return step * 10

    def finish(step: int, done: int) -> StepOutcome:
        assert done == (step - 1) * 10  # the update of the steps done before it
        return StepOutcome(
            {"x": float(step)},
            bar={"x": float(step)},
            log=step % log_every == 0,
            halt=step == halt_at,
            seconds=0.5,
        )

    result = run_steps(
        update,
        finish,
        start=start,
        total=total,
        checkpoint_every=every,
        checkpoint=saved.append,
        metrics=metrics,
        desc="test",
        **kw,
    )
    return result, saved, metrics, updates


def test_runs_every_step_logs_and_checkpoints_on_schedule_and_at_the_end() -> None:
    result, saved, metrics, updates = loop(7, log_every=2)
    assert updates == list(range(7))
    assert [s for s, _ in metrics.rows] == [2, 4, 6]
    assert saved == [3, 6, 7]
    assert (result.step, result.stopped, result.halted) == (7, False, False)
    assert result.last == {"x": 7.0} and result.seconds == 3.5


def test_resumes_from_start_and_stops_after_with_a_checkpoint() -> None:
    result, saved, _, updates = loop(7, start=2, stop_after=4)
    assert updates == [2, 3]
    assert saved == [3, 4] and result.stopped and result.step == 4
    result, saved, _, _ = loop(7, stop_after=7)  # stopping at the end is not stopping early
    assert not result.stopped and saved == [3, 6, 7]


def test_a_halting_step_ends_training_with_a_checkpoint() -> None:
    result, saved, _, updates = loop(7, halt_at=2)
    assert updates == [0, 1] and saved == [2]
    assert result.halted and not result.stopped and result.step == 2


@pytest.mark.parametrize("save", [True, False])
def test_ctrl_c_saves_the_steps_done_closes_the_log_and_reraises(save: bool) -> None:
    saved: list[int] = []
    metrics = Log()

    def update(step: int) -> None:
        if step == 4:
            raise KeyboardInterrupt

    def finish(step: int, done: None) -> StepOutcome:
        return StepOutcome({}, bar={})

    with pytest.raises(KeyboardInterrupt):
        run_steps(
            update,
            finish,
            start=0,
            total=9,
            checkpoint_every=100,
            checkpoint=saved.append,
            metrics=metrics,
            desc="test",
            checkpoint_on_interrupt=save,
        )
    assert saved == ([4] if save else []) and metrics.closed
