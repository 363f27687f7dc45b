"""The command line starts fast: `--help` of the tool and of every command imports no heavy library.

Checked by what gets imported rather than by a stopwatch (timings belong in benchmarks): torch, transformers,
open_clip, timm, faiss and h5py each cost seconds or hundreds of milliseconds at import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "open_clip", "timm", "faiss", "h5py", "matplotlib", "PIL")

PROBE = """
import json, sys
from stages.cli import app
commands = sorted(c.name for c in app.registered_commands)
for args in [["--help"]] + [[c, "--help"] for c in commands]:
    try:
        app(args, standalone_mode=False)
    except SystemExit:
        pass
print(json.dumps({"commands": commands, "heavy": sorted(m for m in %r if m in sys.modules)}))
""" % (HEAVY,)


def test_help_of_every_command_imports_no_heavy_library():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out["commands"]) >= 14 and "distill" in out["commands"]
    assert out["heavy"] == [], f"--help imported {out['heavy']}; import them inside the command instead"
