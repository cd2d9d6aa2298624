"""The short chaos run (`make chaos` runs the long one): about a minute on a private node."""

from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path

import pytest

from .harness import Config, run


@pytest.mark.integration
@pytest.mark.chaos
@pytest.mark.timeout(240)
async def test_nothing_is_lost_stuck_or_dead_lettered_under_kills_restarts_and_cuts(
    tmp_path: Path,
) -> None:
    seed = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(1_000_000))
    result = await run(dataclasses.replace(Config.short(seed), workdir=tmp_path))
    print(result.report())
    assert result.confirmed, "nothing was confirmed: the run tested nothing"
    assert result.faults, "no fault was injected"
    assert not result.failures(), result.report()
