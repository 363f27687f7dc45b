"""A sweep's results archive: the few files per finished run that its tables read (the experiment record and the
stage-3 result, or a classification run's results.json), kept apart from the runs folder so they can be committed.

Runs folders hold exports and checkpoints (hundreds of MB a run) and stay on the machine that trained them; a sweep
of a hundred runs spread over several machines or sessions would otherwise be trained again wherever its folder
is missing. With an archive, every finished run is copied there after evaluation, and a run that is missing from
the runs folder (or not finished there) is restored from it: its record is marked ``results_from`` and it counts as
finished without an export (records.is_results_only), so it is neither trained nor evaluated again.

An archived run is found by its folder name (``x`` + the first 12 hex digits of its run key); the record's full
key must match the planned run's, so a stale or foreign entry is refused, not used; and its result must have been
measured with the plan's settings (the same teacher cache, manifest and split), else the run trains again: the run
key names the config, not the teacher it was distilled from.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from pipeline.common.errors import PipelineError
from pipeline.experiments.records import (
    CLASSIFY_RESULTS, RECORD_FILE, Log, classification_results, is_evaluated, read_record, write_record,
)
from pipeline.experiments.sweep import EVAL_DIR, Plan

RESULT_FILE = f"{EVAL_DIR}/result.json"
ARCHIVED_FILES = (RECORD_FILE, RESULT_FILE, CLASSIFY_RESULTS)


def _finished(run_dir: Path) -> bool:
    record = read_record(run_dir)
    return record.get("status") == "done" and is_evaluated(run_dir) or classification_results(run_dir) is not None


def archive_results(plan: Plan, archive: Path, log: Log = print) -> int:
    """Copy the archived files of every finished run of the plan into ``archive/<run name>/``; returns how many
    runs were new or changed there."""
    archive, changed = Path(archive), 0
    for key, run in plan.runs.items():
        run_dir = plan.run_dir(key)
        if not _finished(run_dir) or read_record(run_dir).get("results_from"):
            continue  # restored runs are already archived (and may sit in another archive)
        dest, wrote = archive / run.name, False
        for name in ARCHIVED_FILES:
            src = run_dir / name
            if not src.is_file():
                continue
            data = src.read_bytes()
            if name == RECORD_FILE:
                record = {**json.loads(data), "key": key}  # the full key: restore checks it
                data = (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()
            target = dest / name
            if not target.is_file() or target.read_bytes() != data:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
                wrote = True
        changed += wrote
    if changed:
        log(f"archived the results of {changed} run(s) in {archive}")
    return changed


def restore_results(plan: Plan, archive: Path, log: Log = print, settings: Optional[dict] = None) -> int:
    """Restore every planned run that is not finished in the runs folder but is in ``archive``; returns how many.

    ``settings``: what a stage-3 result must have been measured with (split, manifest hash, teacher fingerprint;
    the adapter's result_settings): a run archived under another teacher or data is left to train again.
    Raises PipelineError when an archived record's key is not the planned run's (same name, other config)."""
    archive, restored, other = Path(archive), 0, []
    for key, run in plan.runs.items():
        src = archive / run.name
        run_dir = plan.run_dir(key)
        if not (src / RECORD_FILE).is_file() or _finished(run_dir):
            continue
        record = read_record(src)
        if record.get("key") != key:
            raise PipelineError(f"{src / RECORD_FILE}: archived for run key {str(record.get('key'))[:16]}..., "
                                f"but this sweep plans {key[:16]}... under that name; remove the entry")
        if record.get("status") != "done" and not (src / CLASSIFY_RESULTS).is_file():
            continue
        if settings is not None and (src / RESULT_FILE).is_file():
            stored = json.loads((src / RESULT_FILE).read_text()).get("settings")
            if stored != settings:
                other.append(run.name)
                continue
        if run_dir.exists():  # an unfinished attempt (partial training, checkpoints): the archive supersedes it
            shutil.rmtree(run_dir)
        for name in ARCHIVED_FILES:
            if (src / name).is_file() and name != RECORD_FILE:
                (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src / name, run_dir / name)
        write_record(run_dir, {**record, "results_from": str(archive)})
        restored += 1
    if restored:
        log(f"restored the results of {restored} finished run(s) from {archive} (not trained again)")
    if other:
        log(f"{len(other)} archived run(s) measured with another teacher cache, manifest or split: not restored "
            f"(they train again): {', '.join(other[:5])}{' ...' if len(other) > 5 else ''}")
    return restored
