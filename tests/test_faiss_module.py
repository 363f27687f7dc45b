"""Exactly one installed distribution ships the ``faiss`` module, and ``import faiss`` is that one: faiss-cpu and
faiss-gpu-cu12 both install ``faiss/``, so with both one silently overwrites the other's files."""

from __future__ import annotations

import importlib.metadata as md
from pathlib import Path

import pytest


def test_one_faiss_distribution_and_import_faiss_is_it():
    owners = sorted(set(md.packages_distributions().get("faiss", [])))
    assert len(owners) == 1, (f"{owners} all install the faiss module; install one: the default (faiss-cpu) or, "
                              "on CUDA, the gpu extra (faiss-gpu-cu12) instead of it")
    faiss = pytest.importorskip("faiss")
    files = {Path(f.locate()).resolve() for f in md.files(owners[0]) or ()}
    assert Path(faiss.__file__).resolve() in files, f"import faiss gives {faiss.__file__}, not {owners[0]}'s"
    gpu_build = "gpu" in owners[0].lower()
    assert hasattr(faiss, "StandardGpuResources") == gpu_build  # the GPU build is the one with GPU indexes


def test_without_faiss_what_never_searches_still_runs_and_a_search_is_one_line(tmp_path):
    """FAISS is an extra: the runner and its tables import without it; building an index says what to install."""
    import subprocess
    import sys

    code = ("import builtins, numpy as np\n"
            "real = builtins.__import__\n"
            "def hide(name, *a, **k):\n"
            "    if name == 'faiss': raise ImportError('hidden')\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = hide\n"
            "import pipeline.experiments.runner, pipeline.experiments.classify_runs\n"
            "from pipeline.common.errors import PipelineError\n"
            "from pipeline.retrieval.index import IndexSpec, build_index\n"
            "try:\n"
            "    build_index(np.eye(4, dtype=np.float32), IndexSpec('Flat'), gpu=False)\n"
            "except PipelineError as e:\n"
            "    print('refused:', e)\n")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("refused: FAISS is not installed: pip install '.[cpu]'"), out.stdout
    assert out.stdout.count("\n") == 1
