"""Stage 1 through the Ray engine on a local cluster the test starts (files in a temporary folder): the same cache
as the local path array for array, a killed worker's shard retried, a rerun that writes nothing, the same rejects,
one line without the extra."""

from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.features.cache import FeatureCache
from pipeline.features.job import FeatureJob, run_feature_job
from tests.fake_teacher import FakeTeacher
from tests.test_cache import make_manifest

ray = pytest.importorskip("ray")
ROOT = Path(__file__).resolve().parents[1]
# Ray waits 30 s for its GCS server to start; on a loaded shared 2-core machine that took longer
SLOW_START = "RAY_gcs_server_port_wait_time_s"


@pytest.fixture(scope="module")
def cluster():
    """A 2-CPU local Ray instance; its session files, and the auth token Ray 2.60 writes under HOME, in /tmp
    (a short path: Ray's sockets live there)."""
    folder = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    saved = {k: os.environ.get(k) for k in ("HOME", "PYTHONPATH", "OMP_NUM_THREADS", SLOW_START, "RAY_AUTH_MODE")}
    os.environ.update({"HOME": folder, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",  # actors import tests.*
                       SLOW_START: "120",
                       # a cluster of this test process on loopback: no token (Ray caches the first one it
                       # reads per process, so a second cluster in the same process with a new token fails)
                       "RAY_AUTH_MODE": "disabled"})
    try:
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=folder, log_to_driver=False)
        yield
    finally:
        ray.shutdown()
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        subprocess.run(["rm", "-rf", folder])


class KillOnce(FakeTeacher):
    """The first actor to encode its third image batch SIGKILLs its own process (a worker dying mid-shard);
    the marker file makes it happen once across all actors."""

    def __init__(self, marker: str, **kw):
        super().__init__(**kw)
        self.marker = marker

    def _encode_images(self, pixels):
        if self.image_batches >= 2 and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return super()._encode_images(pixels)


class LostMachine(FakeTeacher):
    """The first actor to encode its third image batch acts out its machine being lost mid-shard: its shard's
    lock becomes another host's (renewed now, lease 2 s; a pid there means nothing here), then its process dies.
    The retry finds the shard busy until that lease runs out."""

    def __init__(self, marker: str, out: str, **kw):
        super().__init__(**kw)
        self.marker, self.out = marker, out

    def _encode_images(self, pixels):
        if self.image_batches >= 2 and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            from pipeline.common import io

            for lock in Path(self.out).glob("*.h5.lock"):
                held = io.read_lock(lock)
                if held and held.pid == os.getpid():
                    lock.write_text(io.LockHolder(os.getpid(), "lost-machine", time.time(), 2.0, "lost").line())
            os.kill(os.getpid(), signal.SIGKILL)
        return super()._encode_images(pixels)


def _job(manifest, out):
    return FeatureJob(manifest=manifest, dataset="gen", split="test", out_dir=out, num_workers=0, batch_size=4,
                      shard_size=5)


def _engine(source, **kw):
    from pipeline.features.engines.ray import RayEngine, RayOptions

    return RayEngine(source, RayOptions(workers=2, **kw), echo=lambda _: None)


def _rows(path: Path) -> list[dict]:
    """A rejects file's rows, less the object address PIL puts in its message (differs per process)."""
    return [{k: re.sub(r" at 0x[0-9a-f]+", "", v or "") for k, v in r.items()} for r in pq.read_table(path).to_pylist()]


def _same_cache(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir() if p.suffix in (".h5", ".parquet"))
    assert names == sorted(p.name for p in b.iterdir() if p.suffix in (".h5", ".parquet"))
    for name in names:
        if name.endswith(".parquet"):
            assert _rows(a / name) == _rows(b / name), name
            continue
        with h5py.File(a / name) as fa, h5py.File(b / name) as fb:
            assert sorted(fa) == sorted(fb)
            for key in fa:
                np.testing.assert_array_equal(fa[key][()], fb[key][()], err_msg=f"{name}:{key}")


def test_ray_cache_equals_the_local_cache_and_a_rerun_writes_nothing(tmp_path, cluster):
    manifest = make_manifest(tmp_path, n_images=23)
    local = run_feature_job(_job(manifest, tmp_path / "local"), FakeTeacher(), progress=False)
    engine = _engine(functools.partial(FakeTeacher))
    try:
        s = engine.run(_job(manifest, tmp_path / "ray"), progress=False)
        assert s.complete and (s.images, s.texts, len(s.shards_written)) == (local.images, local.texts, 5)
        _same_cache(tmp_path / "local", tmp_path / "ray")
        again = engine.run(_job(manifest, tmp_path / "ray"), progress=False)
        assert again.shards_written == [] and len(again.shards_skipped) == 5 and again.complete
    finally:
        engine.shutdown()


def test_bad_rows_give_the_same_rejects_as_the_local_path(tmp_path, cluster):
    manifest = make_manifest(tmp_path, n_images=12, corrupt=(3, 8), empty_caption=4)
    local = run_feature_job(_job(manifest, tmp_path / "local"), FakeTeacher(), progress=False)
    engine = _engine(FakeTeacher)
    try:
        s = engine.run(_job(manifest, tmp_path / "ray"), progress=False)
    finally:
        engine.shutdown()
    assert s.rejects == local.rejects == 7 and s.complete  # 2 images x 3 captions + 1 empty caption
    _same_cache(tmp_path / "local", tmp_path / "ray")


def test_a_killed_worker_is_replaced_and_its_shard_retried(tmp_path, cluster):
    manifest = make_manifest(tmp_path, n_images=23)
    run_feature_job(_job(manifest, tmp_path / "local"), FakeTeacher(), progress=False)
    marker = tmp_path / "killed"
    engine = _engine(functools.partial(KillOnce, str(marker)))
    try:
        s = engine.run(_job(manifest, tmp_path / "ray"), progress=False)
        assert marker.exists() and engine.replaced == 1  # one worker process really died mid-shard
    finally:
        engine.shutdown()
    assert s.complete and len(s.shards_written) == 5
    FeatureCache(tmp_path / "ray", verify=True)  # every shard complete and matching its checksums
    _same_cache(tmp_path / "local", tmp_path / "ray")
    assert not list((tmp_path / "ray").glob("*.lock")) and not list((tmp_path / "ray").glob("*.tmp"))


def test_a_lost_machines_shard_is_retried_once_its_lease_runs_out_not_left(tmp_path, cluster):
    manifest = make_manifest(tmp_path, n_images=23)
    run_feature_job(_job(manifest, tmp_path / "local"), FakeTeacher(), progress=False)
    marker, notes = tmp_path / "lost", []
    engine = _engine(functools.partial(LostMachine, str(marker), str(tmp_path / "ray")))
    engine.echo = notes.append
    try:
        t = time.perf_counter()
        s = engine.run(_job(manifest, tmp_path / "ray"), progress=False)
        assert marker.exists() and engine.replaced == 1 and time.perf_counter() - t > 2.0
    finally:
        engine.shutdown()
    assert s.complete and len(s.shards_written) == 5 and s.shards_busy == [], notes
    _same_cache(tmp_path / "local", tmp_path / "ray")
    assert not list((tmp_path / "ray").glob("*.lock"))


def test_the_ray_engine_without_its_extra_is_one_line(tmp_path):
    manifest = make_manifest(tmp_path, n_images=3)
    (tmp_path / "m").mkdir()
    manifest.write(tmp_path / "m" / "test.parquet")
    code = ("import sys; sys.modules['ray'] = None\n"  # as if the extra were not installed
            "from stages.cli import main; main()")
    proc = subprocess.run([sys.executable, "-c", code, "teacher-features", "--manifest-dir", str(tmp_path / "m"),
                           "--out", str(tmp_path / "c"), "--splits", "test", "--engine", "ray"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "error: the Ray engine needs the 'cluster' extra: pip install '.[cluster]' -c constraints.txt "
        "(make install installs it)"]


class WaitForCompany(FakeTeacher):
    """The first actor built holds its second shard until shards from someone else appear in ``out`` (at most
    240 s): the job cannot end before a worker that joins mid-job has taken shards."""

    def __init__(self, folder: str, out: str, **kw):
        super().__init__(**kw)
        self.out, self.first = out, _first_to_claim(folder)

    def _encode_images(self, pixels):
        if self.first and self.image_batches == 1:
            deadline = time.time() + 240  # a loaded machine starts a node and an actor slowly
            while len(list(Path(self.out).glob("shard-*.h5"))) < 2 and time.time() < deadline:
                time.sleep(0.05)
        return super()._encode_images(pixels)


def _first_to_claim(folder: str) -> bool:
    try:
        os.close(os.open(os.path.join(folder, "first"), os.O_CREAT | os.O_EXCL))
        return True
    except FileExistsError:
        return False


def test_a_machine_that_joins_mid_job_takes_shards(tmp_path):
    """A head with one cpu (one actor), then a second node joins while the job runs: its actor takes shards."""
    from ray.cluster_utils import Cluster

    ray.shutdown()  # the module's instance, if one runs: this test needs its own two-node cluster
    folder = tempfile.mkdtemp(prefix="rayc", dir="/tmp")
    saved = {k: os.environ.get(k) for k in ("HOME", "PYTHONPATH", "OMP_NUM_THREADS", "RAY_TMPDIR", SLOW_START,
                                            "RAY_AUTH_MODE")}
    os.environ.update({"HOME": folder, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RAY_TMPDIR": folder,
                       SLOW_START: "120"})
    os.environ["RAY_AUTH_MODE"] = "disabled"  # as in the module's cluster: one auth mode per test process
    os.makedirs(os.path.join(folder, "ray"))  # Ray's files under RAY_TMPDIR/ray, for the head and the newcomer
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        ray.init(address=c.address, log_to_driver=False)
        manifest = make_manifest(tmp_path, n_images=12)
        run_feature_job(FeatureJob(manifest=manifest, dataset="gen", split="test", out_dir=tmp_path / "local",
                                   num_workers=0, batch_size=4, shard_size=2), FakeTeacher(), progress=False)
        from pipeline.features.engines.ray import RayEngine, RayOptions

        engine = RayEngine(functools.partial(WaitForCompany, str(tmp_path), str(tmp_path / "ray")), RayOptions(),
                           echo=lambda _: None)
        assert len(engine.actors) == 1  # one cpu: one actor
        result = {}
        job = FeatureJob(manifest=manifest, dataset="gen", split="test", out_dir=tmp_path / "ray", num_workers=0,
                         batch_size=4, shard_size=2)
        thread = threading.Thread(target=lambda: result.update(s=engine.run(job, progress=False)))
        thread.start()
        c.add_node(num_cpus=1)  # joins while the first actor holds its second shard
        thread.join(timeout=120)
        engine.shutdown()
        s = result["s"]
        assert s.complete and len(s.shards_written) == 6
        assert len(engine.written_by) == 2, engine.written_by  # the newcomer's actor wrote shards too
        _same_cache(tmp_path / "local", tmp_path / "ray")
    finally:
        try:
            ray.shutdown()
            c.shutdown()
        finally:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
            subprocess.run(["rm", "-rf", folder])
