"""Step 2 — the preference collection app (``palate serve``, ``palate label``)."""
