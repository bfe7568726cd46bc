"""The HTML reports: ``build_report`` for ``palate run``, ``build_eval_report`` for ``palate eval``.

Each is one self-contained page (plots inline as base64 PNG, no external files or scripts).
Layout: ``plots`` draws the figures, ``sections`` (run) and ``evaluation`` (eval) shape the
inputs into the rows each table shows, ``render`` holds the autoescaping Jinja2 environment,
and the markup lives in ``templates/`` (``base.html``, ``run.html``, ``eval.html``,
``macros.html``).
"""

from palate.report.evaluation import build_eval_report
from palate.report.plots import EVAL_PLOTS, OPTIONAL_PLOTS, PLOTS, TITLES
from palate.report.run import build_report

__all__ = ["EVAL_PLOTS", "OPTIONAL_PLOTS", "PLOTS", "TITLES", "build_eval_report", "build_report"]
