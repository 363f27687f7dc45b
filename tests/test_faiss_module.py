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
