"""Fingerprints that a behaviour-preserving refactor must not change (used for the issue-11 restructure):

  * the sha256 over the final weights of a short CPU `distill` run (tiny student, generated data, 2 epochs);
  * the run keys of every run in sweeps/openmoji.yaml (they name the runs of the experiment tables).

    .venv/bin/python tools/reference_run.py            # prints one JSON line; compare before and after
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    import torch

    from pipeline.common import config as cfgio
    from pipeline.distill.trainer import DistillConfig, train
    from pipeline.experiments.sweep import load_sweep, plan_sweep
    from tests.gen_cache import make_cache, make_dataset

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifests = make_dataset(tmp / "data")
        cache = make_cache(manifests, tmp / "cache")
        cfg = cfgio.load(DistillConfig, None, [
            f"data.manifest_dir={manifests}", f"data.cache_dir={cache}", f"runs_dir={tmp / 'runs'}",
            "student=tiny", "optim.batch_size=8", "optim.epochs=2", "queue.size=24", "data.workers=0", "name=ref"])
        run = train(cfg, progress=False)
        weights = torch.load(run.run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    h = hashlib.sha256()
    for key in sorted(weights):
        h.update(key.encode())
        h.update(weights[key].numpy().tobytes())
    keys = sorted(plan_sweep(load_sweep(ROOT / "sweeps" / "openmoji.yaml"), ROOT / "runs" / "experiments").runs)
    print(json.dumps({"distill_weights_sha256": h.hexdigest(), "sweep_runs": len(keys),
                      "sweep_keys_sha256": hashlib.sha256("\n".join(keys).encode()).hexdigest()}))


if __name__ == "__main__":
    main()
