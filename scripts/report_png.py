"""Save one plot of a palate HTML report as a PNG (for docs): the report keeps its plots inline.

python scripts/report_png.py runs/hacking/report/report.html overopt docs/img/overopt-hacking.png
"""

from __future__ import annotations

import base64
import re
import sys
from pathlib import Path


def main(report: str, plot_id: str, out: str) -> None:
    page = Path(report).read_text()
    m = re.search(
        rf'<figure id="{re.escape(plot_id)}"><img [^>]*src="data:image/png;base64,([^"]+)"', page
    )
    if m is None:
        sys.exit(f"{report}: no plot {plot_id!r}")
    Path(out).write_bytes(base64.b64decode(m.group(1)))
    print(out)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
