"""The kill-and-resume tests' switches: a count from the environment, or one line saying what is wanted."""

from __future__ import annotations

import pytest

from pipeline.common.errors import PipelineError
from pipeline.common.kill_switch import read_switch


def test_a_kill_switch_reads_a_count_or_says_in_one_line_what_it_wants(monkeypatch):
    monkeypatch.delenv("CLIPDISTILL_TEST_SWITCH", raising=False)
    assert read_switch("CLIPDISTILL_TEST_SWITCH", "a step number") is None
    monkeypatch.setenv("CLIPDISTILL_TEST_SWITCH", "3")
    assert read_switch("CLIPDISTILL_TEST_SWITCH", "a step number") == 3
    for bad in ("0", "x", "-2"):
        monkeypatch.setenv("CLIPDISTILL_TEST_SWITCH", bad)
        with pytest.raises(PipelineError, match="expected a step number >= 1") as err:
            read_switch("CLIPDISTILL_TEST_SWITCH", "a step number")
        assert "\n" not in str(err.value)
