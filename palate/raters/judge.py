"""An AI judge as the raters of a campaign (:func:`palate.feedback.label_campaign` labels it
through the store, as user ``ai:<model>``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from palate.feedback import Judge, label_campaign

__all__ = ["JudgeRaters"]


@dataclass
class JudgeRaters:
    """The judge labels every pair once (soft labels; ``tie_band``: a tie when P(a) is that
    close to ½ and the campaign allows ties)."""

    judge: Judge
    tie_band: float = 0.0

    def label(self, db_url: str, campaign: str) -> dict[str, Any]:
        return label_campaign(db_url, campaign, self.judge, tie_band=self.tie_band)
