"""Every benchmark runs to the end in its --smoke size and prints its ratio, so none can rot unseen."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# benchmark -> a line it must print (its headline ratio against the baseline measured in the same run)
EXPECTED = {
    "bench_cache.py": "full verification of the",
    "bench_classify_student.py": "speed vs NCHW fp32 (its median step time",
    "bench_features.py": "ratio end to end / model only (items/s):",
    "bench_distill.py": "step overhead (cache gather",
    "bench_eval.py": "recall@10 vs exact",
    "bench_loader_memory.py": "worker private memory, now / old",
    "bench_reinforced.py": "view replay + transfer mixing vs the plain step",
    "bench_scale.py": "per-item time and peak RSS as ratios to the",
    "bench_startup.py": "slowest --help:",
}


def test_every_benchmark_is_listed():
    assert sorted(p.name for p in (ROOT / "bench").glob("bench_*.py")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_benchmark_smoke_runs_to_the_end(name, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / name), "--smoke"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert EXPECTED[name] in proc.stdout, proc.stdout[-3000:]


def test_the_ray_engine_benchmark_smoke_runs_to_the_end(tmp_path):
    pytest.importorskip("ray")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_features.py"), "--engine", "ray", "--smoke"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ratio Ray / local (items/s):" in proc.stdout, proc.stdout[-3000:]
