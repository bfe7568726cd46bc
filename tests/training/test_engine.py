"""accelerate set-up: the engines palate supports."""

from __future__ import annotations

import pytest
from accelerate.utils import DistributedType

from palate.errors import ConfigError
from palate.training import check_engine


def test_sharded_engines_are_refused_with_the_way_out() -> None:
    for fine in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        check_engine(fine)
    for sharded in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        with pytest.raises(ConfigError, match=f"{sharded.value} is not supported.*ddp.yaml"):
            check_engine(sharded)
