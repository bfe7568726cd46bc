"""The ``palate label`` commands (palate/label/campaign.py): create a campaign from pairs or from
model samples, export it, add users."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from palate.errors import ConfigError
from palate.label.db import open_db


def test_label_commands_create_export_user(tmp_path: Path) -> None:
    from palate.errors import DataError
    from palate.label.campaign import (
        LabelCreateConfig,
        LabelExportConfig,
        LabelUserConfig,
        add_label_user,
        create_label_campaign,
        export_label_campaign,
    )

    db = str(tmp_path / "cli.db")
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text(
        '{"prompt": "hi", "response_a": "x", "response_b": "y"}\n'
        '{"prompt": "yo", "chosen": "c", "rejected": "r"}\n'
    )
    user = add_label_user(LabelUserConfig(db=db, name="admin", role="admin"))
    assert user["api_token"] and user["invite_path"].startswith("/invite/")
    made = create_label_campaign(LabelCreateConfig(db=db, name="p", pairs=str(pairs_file)))
    assert made["pairs"] == 2
    with pytest.raises(ConfigError, match="already exists"):
        create_label_campaign(LabelCreateConfig(db=db, name="p", pairs=str(pairs_file)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(DataError, match="bad.jsonl:1"):
        create_label_campaign(LabelCreateConfig(db=db, name="q", pairs=str(bad)))
    out = export_label_campaign(LabelExportConfig(db=db, campaign="p", output=str(tmp_path / "o")))
    assert out["comparisons"] == 0
    with pytest.raises(ValueError):
        LabelCreateConfig(db=db, name="r")  # neither pairs nor prompts


def test_campaign_from_model_samples(tmp_path: Path) -> None:
    from palate.label.campaign import LabelCreateConfig, create_label_campaign
    from palate.label.db import Pair

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Say hi"}\n{"prompt": "Name a colour"}\n')
    db = str(tmp_path / "s.db")
    made = create_label_campaign(
        LabelCreateConfig(
            db=db,
            name="sampled",
            prompts=str(prompts),
            model="tiny",
            samples_per_prompt=4,
            max_new_tokens=5,
        )
    )
    assert made["pairs"] == 4  # 2 prompts x 4 samples / 2
    with open_db(db)() as s:
        rows = list(s.scalars(select(Pair)))
    assert [r.prompt for r in rows] == ["Say hi"] * 2 + ["Name a colour"] * 2
    assert all(r.source_a == "tiny" and r.response_a is not None for r in rows)
