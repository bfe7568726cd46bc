"""Who labels a campaign: simulated raters, an AI judge or people, behind one signature.

Each kind is an object with ``label(db_url, campaign) -> dict`` that labels a campaign of the
store through its assignment path (:mod:`palate.label.store`), the way people do in the app,
and returns what it did:

* :class:`palate.raters.simulated.SimulatedRaters`: panels that label with a gold preference
  under Bradley-Terry noise;
* :class:`palate.raters.judge.JudgeRaters`: an AI judge under a constitution
  (:mod:`palate.feedback`);
* :class:`palate.raters.people.PeopleRaters`: people, through the labelling app served until the
  campaign is complete (or a :class:`~palate.raters.people.WaitingForLabels` saying how).

``palate run``'s labels stage builds one per campaign from ``raters:``
(:func:`palate.pipeline.stages.labels.raters_for`).
"""

from __future__ import annotations

from typing import Any, Protocol

__all__ = ["Raters"]


class Raters(Protocol):
    """Anything that labels a campaign in a palate store."""

    def label(self, db_url: str, campaign: str) -> dict[str, Any]:
        """Label campaign ``campaign`` of the store at ``db_url``; returns a short summary."""
        ...
