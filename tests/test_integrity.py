"""Stored data proves its integrity: damaged, truncated, missing or foreign cache shards are refused with the
file and the problem; checkpoints and exports carry checksums; a full disk leaves the previous files intact."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.common import io
from pipeline.common.errors import PipelineError
from pipeline.data.manifest import Manifest
from pipeline.features.cache import FeatureCache
from pipeline.features.cache.integrity import STAMP_SUFFIX, is_stamped
from pipeline.features.job import FeatureJob, run_feature_job
from pipeline.train.state import atomic_save, load_checkpoint
from tests.fake_teacher import FakeTeacher
from tests.gen_cache import make_dataset

ROOT = Path(__file__).resolve().parents[1]
ARRAYS = ("image", "text", "image_id", "sample_id", "text_image_id", "image_norm", "text_norm")


def build(root: Path, seed: int = 0) -> Path:
    """The train split of a generated dataset cached in 3 shards (4 images each)."""
    manifests = make_dataset(root / "data", n_images=20)
    out = root / "cache" / "train"
    job = FeatureJob(Manifest.read(manifests / "train.parquet"), "shapes", "train", out, shard_size=4,
                     num_workers=0)
    run_feature_job(job, FakeTeacher(width=8, seed=seed), progress=False)
    return out


def cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "stages.cli", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def change(shard: Path, name: str) -> None:
    """Rewrite one dataset in place (the file stays valid HDF5): swap two rows, or nudge a 1-row array."""
    with h5py.File(shard, "r+") as f:
        data = f[name][()]
        if len(data) > 1 and not np.array_equal(data[0], data[1]):
            data[[0, 1]] = data[[1, 0]]
        else:
            data = data + 1
        f[name][...] = data


@pytest.fixture
def cache(tmp_path) -> Path:
    return build(tmp_path)


def test_a_new_cache_is_checked_in_full_once_then_cheaply(cache):
    shards = sorted(cache.glob("shard-*.h5"))
    assert len(shards) == 3 and all(is_stamped(s) for s in shards)  # the job read its shards back when done
    for s in cache.glob(f"*{STAMP_SUFFIX}"):
        s.unlink()
    FeatureCache(cache)
    assert all(is_stamped(s) for s in shards)
    result = cli("verify", cache.parent)
    assert result.returncode == 0 and result.stdout.count("ok ") == 3, result.stdout


@pytest.mark.parametrize("name", ARRAYS)
def test_a_changed_array_is_refused_by_open_and_reported_by_verify(cache, name):
    FeatureCache(cache)  # stamped while intact
    shard = sorted(cache.glob("shard-*.h5"))[1]
    change(shard, name)
    with pytest.raises(PipelineError, match=f"damaged cache shard {shard}: {name} differs") as err:
        FeatureCache(cache)
    assert "\n" not in str(err.value)
    result = cli("verify", cache)
    assert result.returncode == 1
    assert f"damaged   {shard}: {name} differs" in result.stdout and result.stdout.count("ok ") == 2


def test_verify_flag_rechecks_a_stamped_shard(cache):
    FeatureCache(cache)
    shard = sorted(cache.glob("shard-*.h5"))[0]
    stat = shard.stat()
    change(shard, "text")
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and mtime: the stamp still matches
    FeatureCache(cache, verify=False)  # cheap open: attributes and shard list only
    with pytest.raises(PipelineError, match="text differs"):
        FeatureCache(cache, verify=True)


def test_truncated_missing_and_foreign_shards_name_the_file(tmp_path, cache):
    shards = sorted(cache.glob("shard-*.h5"))
    other = build(tmp_path / "other", seed=1)  # another teacher: same layout, other fingerprint
    copy = tmp_path / "copy"
    shutil.copytree(cache, copy)
    shutil.copy(sorted(other.glob("shard-*.h5"))[2], copy / shards[2].name)
    with pytest.raises(PipelineError, match=f"{copy / shards[2].name} belongs to another cache.*teacher_fingerprint"):
        FeatureCache(copy)
    (copy / shards[2].name).unlink()
    with pytest.raises(PipelineError, match=f"incomplete: 2 of 3 shards \\(missing {shards[2].name}\\)"):
        FeatureCache(copy)
    result = cli("verify", copy)
    assert result.returncode == 1 and f"missing   {copy / shards[2].name}" in result.stdout
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])
    with pytest.raises(PipelineError, match=f"unreadable cache shard {shards[1]}"):
        FeatureCache(cache)


def test_a_copied_cache_is_checked_again_where_it_lands(tmp_path, cache):
    FeatureCache(cache)
    copy = tmp_path / "elsewhere"
    shutil.copytree(cache, copy)  # the stamps travel, but they describe the original files
    assert not any(is_stamped(s) for s in copy.glob("shard-*.h5"))
    change(sorted(copy.glob("shard-*.h5"))[0], "image_id")
    with pytest.raises(PipelineError, match="image_id differs"):
        FeatureCache(copy)
    FeatureCache(cache)  # the original is untouched


def test_checkpoints_carry_checksums_and_a_damaged_one_is_refused(tmp_path):
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    atomic_save({"model": {"w": torch.arange(1000.0)}, "state": {"global_step": 3}}, path)
    assert io.verify_file(path) is None and load_checkpoint(path)["state"]["global_step"] == 3
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(PipelineError, match="damaged checkpoint .*differs from its checksum"):
        load_checkpoint(path)
    result = cli("verify", tmp_path / "run")
    assert result.returncode == 1 and f"damaged   {path}" in result.stdout


@pytest.mark.parametrize("when", ["before the rename", "after the rename"])
def test_a_kill_while_a_checked_file_is_replaced_leaves_a_file_its_checksum_accepts(tmp_path, monkeypatch, when):
    """atomic_path renames the file and rewrites its sidecar in two steps; dying between them (a kill, here an
    exception at that point) must leave a pair that verifies, whichever file won: never an unchecked checkpoint."""
    path = tmp_path / "last.pt"
    with io.atomic_path(path, checksum=True) as tmp:
        tmp.write_bytes(b"epoch 1")
    real = os.replace

    def dies(src, dst):
        if Path(dst) == path:
            if when == "after the rename":
                real(src, dst)
            raise KeyboardInterrupt  # the process stops here
        real(src, dst)

    monkeypatch.setattr(io.os, "replace", dies)
    with pytest.raises(KeyboardInterrupt):
        with io.atomic_path(path, checksum=True) as tmp:
            tmp.write_bytes(b"epoch 2")
    monkeypatch.setattr(io.os, "replace", real)
    assert path.read_bytes() == (b"epoch 2" if when == "after the rename" else b"epoch 1")
    assert io.verify_file(path) is None
    path.write_bytes(b"epoch 3")  # and a third content is still refused
    assert io.verify_file(path) is not None


def test_a_full_disk_leaves_the_previous_file_and_no_partial_one(tmp_path, monkeypatch, cache):
    path = tmp_path / "last.pt"
    atomic_save({"step": torch.tensor(1)}, path)
    before = path.read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(PipelineError, match="no space left on the device writing") as err:
        atomic_save({"step": torch.tensor(2)}, path)
    assert "\n" not in str(err.value) and path.read_bytes() == before
    assert io.verify_file(path) is None and not io.tmp_path(path).exists()

    from pipeline.features.cache import writer

    shard = sorted(cache.glob("shard-*.h5"))[0]
    intact = shard.read_bytes()
    meta = FeatureCache(cache).meta
    monkeypatch.setattr(writer.h5py, "File", full)
    with pytest.raises(PipelineError, match="no space left"):
        writer.write_shard(shard, meta, np.zeros((1, 8)), [1], np.zeros((1, 8)), [1], [1])
    assert shard.read_bytes() == intact and not io.tmp_path(shard).exists()
    assert not list(cache.glob(f"*{STAMP_SUFFIX}*.tmp"))


def test_temporaries_are_per_process_and_a_dead_writers_are_removed(tmp_path):
    path = tmp_path / "summary.json"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = [path.with_name(f"summary.json.{int(dead.stdout)}.tmp"), path.with_name("summary.json.tmp")]
    live = path.with_name(f"summary.json.{os.getppid()}.tmp")  # a writer that is still running
    for f in stale + [live]:
        f.write_text("half-written")
    assert io.tmp_path(path) not in stale + [live]
    io.write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    assert not any(f.exists() for f in stale) and live.read_text() == "half-written"


def test_a_shard_held_by_a_live_process_is_left_to_it_and_a_stale_lock_is_taken_over(tmp_path):
    manifests = make_dataset(tmp_path / "data", n_images=20)
    out = tmp_path / "cache" / "train"
    job = FeatureJob(Manifest.read(manifests / "train.parquet"), "shapes", "train", out, shard_size=4,
                     num_workers=0)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out.mkdir(parents=True)
        (out / "shard-00001-of-00003.h5.lock").write_text(str(holder.pid))
        s = run_feature_job(job, FakeTeacher(width=8), progress=False)
        assert s.shards_busy == ["shard-00001-of-00003.h5"] and not s.complete
        assert not (out / "shard-00001-of-00003.h5").exists()
    finally:
        holder.kill()
        holder.wait()
    s = run_feature_job(job, FakeTeacher(width=8), progress=False)  # the holder is gone: its lock is stale
    assert s.shards_written == ["shard-00001-of-00003.h5"] and s.complete
    assert not list(out.glob("*.lock"))
    FeatureCache(out, verify=True)


def test_two_processes_writing_the_same_cache_at_once_leave_a_sound_cache(tmp_path):
    manifests = make_dataset(tmp_path / "data", n_images=40)
    out = tmp_path / "cache" / "train"
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
            "from pipeline.data.manifest import Manifest\n"
            "from pipeline.features.job import FeatureJob, run_feature_job\n"
            "from tests.fake_teacher import FakeTeacher\n"
            f"job = FeatureJob(Manifest.read({str(manifests / 'train.parquet')!r}), 'shapes', 'train', "
            f"__import__('pathlib').Path({str(out)!r}), shard_size=2, num_workers=0)\n"
            "s = run_feature_job(job, FakeTeacher(width=8), progress=False)\n"
            "print(len(s.shards_written), len(s.shards_busy), len(s.shards_skipped))\n")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    written = sum(int(o.strip().splitlines()[-1].split()[0]) for o in outs)
    cache = FeatureCache(out, verify=True)  # every shard complete and matching its checksums
    assert written == cache.meta.total_shards and len(cache.image) > 0  # each shard written once
    assert not list(out.glob("*.lock")) and not list(out.glob("*.tmp"))


def test_eval_verify_flag_rechecks_stamped_shards_through_the_command(tmp_path):
    """`clipdistill eval --verify` reads every shard back even when its stamp says it was checked."""
    manifests = make_dataset(tmp_path / "data", n_images=20)
    out = tmp_path / "cache"
    m = Manifest.read(manifests / "test.parquet")
    run_feature_job(FeatureJob(m, "shapes", "test", out / "test", num_workers=0), FakeTeacher(width=8),
                    progress=False)
    shard = next((out / "test").glob("shard-*.h5"))
    stat = shard.stat()
    change(shard, "text")
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the damage keeps size and mtime
    args = ["eval", "--cache-dir", out, "--manifest-dir", manifests, "--runs-dir", tmp_path / "none",
            "--out", tmp_path / "eval", "--latency-repeats", 0, "--workers", 0]
    plain = cli(*args)
    assert plain.returncode == 0, plain.stderr[-1500:]  # the stamp vouches for the unchanged identity
    checked = cli(*args, "--verify")
    assert checked.returncode == 2 and "damaged cache shard" in checked.stderr and "text differs" in checked.stderr


def test_distill_verify_flag_refuses_a_damaged_stamped_cache(tmp_path):
    from tests.gen_cache import make_cache

    manifests = make_dataset(tmp_path / "data")
    cache_dir = make_cache(manifests, tmp_path / "cache")
    shard = next((cache_dir / "train").glob("shard-*.h5"))
    stat = shard.stat()
    change(shard, "image")
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    sets = [f"data.manifest_dir={manifests}", f"data.cache_dir={cache_dir}", f"runs_dir={tmp_path / 'runs'}",
            "student=tiny", "max_steps=1", "optim.batch_size=8", "queue.size=16", "data.workers=0"]
    args = ["distill", "--no-progress", "--verify"] + [a for s in sets for a in ("--set", s)]
    result = cli(*args)
    assert result.returncode == 2 and "damaged cache shard" in result.stderr and "image differs" in result.stderr


@pytest.fixture
def small_disk(tmp_path):
    """A 60 MiB tmpfs: room for one epoch's checkpoints of the tiny student, not for the next one's."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=60m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and tmpfs mounts to fill a real disk")
    yield mount
    subprocess.run(["umount", str(mount)], capture_output=True)


def test_a_full_disk_during_training_ends_in_one_line_and_keeps_the_last_checkpoint(tmp_path, small_disk):
    from tests.gen_cache import make_cache

    manifests = make_dataset(tmp_path / "data")
    cache_dir = make_cache(manifests, tmp_path / "cache")
    sets = [f"data.manifest_dir={manifests}", f"data.cache_dir={cache_dir}", f"runs_dir={small_disk}",
            "student=tiny", "optim.epochs=3", "optim.batch_size=8", "queue.size=16", "data.workers=0"]
    result = cli(*(["distill", "--no-progress"] + [a for s in sets for a in ("--set", s)]))
    last = small_disk / "default" / "checkpoints" / "last.pt"
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "no space left on the device writing" in errors[0], \
        result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert io.verify_file(last) is None  # the previous complete checkpoint, intact
    assert load_checkpoint(last)["state"]["epoch"] >= 1
    assert not list(small_disk.rglob("*.tmp"))


class _TokenTeacher(FakeTeacher):
    """FakeTeacher with image tokens: the pixels' 4x4 average-pooled grid as 16 tokens."""

    def image_tokens(self, pixels):
        tokens = F.adaptive_avg_pool2d(pixels.float(), 4).flatten(2).transpose(1, 2)  # (B, 16, 3)
        pooled = tokens.mean(1)
        return tokens, pooled, self.encode_images(pixels)

    def token_arch(self) -> dict:
        return {"kind": "timm", "name": "fake", "kwargs": {}}


def test_a_flipped_byte_in_the_token_cache_is_reported_by_verify_and_refused(tmp_path):
    """The classification token cache is written like a stage-1 shard (lock, atomic publish, checksums): verify
    checks it, and a byte flipped in its tokens is named by verify and refused when the split is opened."""
    from pipeline.features.cache.tokens import TokenSplit
    from pipeline.features.tokens import run_token_job

    manifests = make_dataset(tmp_path / "data", n_images=12)
    s = run_token_job(_TokenTeacher(width=8), Manifest.read(manifests / "train.parquet"), "train",
                      tmp_path / "tokens", workers=0, progress=False)
    assert s.images > 0 and s.shape == (16, 3) and not list((tmp_path / "tokens").glob("*.lock"))
    assert s.read_seconds > 0 and s.model_seconds > 0 and s.write_seconds > 0
    ok = cli("verify", tmp_path / "tokens")
    assert ok.returncode == 0 and f"ok        {s.path}" in ok.stdout, ok.stdout + ok.stderr
    with h5py.File(s.path, "r") as f:
        offset = f["tokens"].id.get_offset()
    with open(s.path, "r+b") as fh:
        fh.seek(offset + 5)
        byte = fh.read(1)
        fh.seek(offset + 5)
        fh.write(bytes([byte[0] ^ 0x01]))
    bad = cli("verify", tmp_path / "tokens")
    assert bad.returncode == 1 and "damaged" in bad.stdout and "tokens differs from its checksum" in bad.stdout
    with pytest.raises(PipelineError, match="damaged.*rerun teacher-tokens"):
        TokenSplit(s.path)


# ---- one checksum rule for every stored kind (issue 35.1) ------------------------------------------------------
# Each maker writes a real file with the project's writer and returns (path, load): load reads it with the project's
# loader. Every kind: a flipped byte and a truncation are refused as damaged, a deleted checksum is refused unless
# --trust-unchecked (then the file loads), and a copy made with its checksum loads where it lands.


def _tiny_student():
    from pipeline.students import build_student, get_preset

    return build_student(get_preset("tiny", 16)).eval()


def _checkpoint(d: Path):
    path = d / "checkpoints" / "last.pt"
    atomic_save({"model": {"w": torch.arange(4000.0)}, "state": {"global_step": 3}}, path)
    return path, lambda p: load_checkpoint(p)["state"]["global_step"] == 3


def _student_export(d: Path):
    from pipeline.students import export_student, load_student

    path = export_student(_tiny_student(), None, d / "export" / "student.pt")
    return path, lambda p: load_student(p).width == 16


def _strong_teacher(d: Path):
    """The Makefile copies a run's export and its checksum to artifacts/teachers/; dual: loads the copy."""
    from pipeline.teachers import load_teacher

    src, _ = _student_export(d / "run")
    path = d / "teachers" / "strong.pt"
    path.parent.mkdir(parents=True)
    shutil.copy(io.checksum_path(src), io.checksum_path(path))
    shutil.copy(src, path)
    return path, lambda p: load_teacher(f"dual:{p}").width == 16


def _classifier_export(d: Path):
    from pipeline.classify.student import ImageClassifier, export_classifier, load_classifier

    model = ImageClassifier({"kind": "timm", "name": "test_efficientnet", "kwargs": {}}, 32, 3)
    path = export_classifier(model, d / "export" / "classifier.pt", ["a", "b", "c"], {})
    return path, lambda p: load_classifier(p)[1] == ["a", "b", "c"]


def _lit_heads(d: Path):
    from pipeline.teachers.lit import LitHeads, load_heads, save_heads

    path = save_heads(d / "teachers" / "lit-x.pt", LitHeads(8, 16, 12), {"epochs": 1})
    return path, lambda p: load_heads(p)[1] == {"epochs": 1}


def _torchscript(d: Path):
    from pipeline.students.export import export_torchscript, load_torchscript

    image, _ = export_torchscript(_tiny_student(), d / "export")
    return image, lambda p: load_torchscript(p)(torch.zeros(1, 3, 32, 32)).shape == (1, 16)


def _faiss_index(d: Path):
    from pipeline.retrieval.index import IndexSpec, build_index, load_index, save_index

    vectors = F.normalize(torch.randn(50, 8, generator=torch.Generator().manual_seed(0)), dim=-1).numpy()
    path = d / "eval" / "image.index"
    save_index(build_index(vectors, IndexSpec("Flat"), gpu=False), path)
    return path, lambda p: load_index(p, gpu=False).index.ntotal == 50


SIDECAR_KINDS = {"checkpoint": _checkpoint, "student export": _student_export, "strong teacher": _strong_teacher,
                 "classifier export": _classifier_export, "LiT teacher checkpoint": _lit_heads,
                 "TorchScript encoder": _torchscript, "FAISS index": _faiss_index}
REFUSED_AS = {"strong teacher": "student export"}


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])


@pytest.mark.parametrize("kind", list(SIDECAR_KINDS))
def test_every_stored_kind_refuses_damage_and_a_missing_checksum_unless_trusted(tmp_path, monkeypatch, kind):
    monkeypatch.delenv(io.TRUST_ENV, raising=False)
    path, load = SIDECAR_KINDS[kind](tmp_path / "a")
    what = REFUSED_AS.get(kind, kind)
    assert io.checksum_path(path).is_file() and load(path)
    copy = tmp_path / "elsewhere" / path.name  # copied with its checksum (and sidecars): still checked, still fine
    copy.parent.mkdir()
    for companion in path.parent.glob(path.name + "*"):
        shutil.copy(companion, copy.parent / companion.name)
    assert load(copy)
    good = path.read_bytes()
    for fault in (_flip, _truncate):
        fault(path)
        with pytest.raises(PipelineError, match=f"damaged {what} .*differs from its checksum") as err:
            load(path)
        assert "\n" not in str(err.value)
        path.write_bytes(good)
    io.checksum_path(path).unlink()  # deleted (or never written: a file from before checksums)
    with pytest.raises(PipelineError, match=f"refusing {what} .*no checksum recorded.*--trust-unchecked"):
        load(path)
    monkeypatch.setenv(io.TRUST_ENV, "1")
    assert load(path)  # the user said so
    _flip(copy)  # trust covers a missing checksum, never a wrong one
    with pytest.raises(PipelineError, match=f"damaged {what}"):
        load(copy)


def _strip_checksums(path: Path) -> None:
    """What a file from before checksums looks like (or one whose checksums were removed)."""
    with h5py.File(path, "r+") as f:
        for key in [k for k in f.attrs if k.startswith("checksum:")]:
            del f.attrs[key]


def _flip_dataset(path: Path, name: str) -> None:
    with h5py.File(path, "r") as f:
        offset = f[name].id.get_offset()
    with open(path, "r+b") as fh:
        fh.seek(offset + 3)
        byte = fh.read(1)
        fh.seek(offset + 3)
        fh.write(bytes([byte[0] ^ 0x01]))


def test_cache_shards_without_checksums_are_refused_unless_trusted(tmp_path, cache, monkeypatch):
    monkeypatch.delenv(io.TRUST_ENV, raising=False)
    shard = sorted(cache.glob("shard-*.h5"))[1]
    _strip_checksums(shard)
    with pytest.raises(PipelineError, match=f"refusing cache shard {shard}: no checksum recorded") as err:
        FeatureCache(cache)
    assert "\n" not in str(err.value)
    result = cli("verify", cache)
    assert result.returncode == 1 and f"unchecked {shard}" in result.stdout and "1 unchecked" in result.stdout
    assert cli("verify", cache, "--trust-unchecked").returncode == 0
    monkeypatch.setenv(io.TRUST_ENV, "1")
    assert len(FeatureCache(cache).image) > 0


def test_class_prompts_are_checked_on_read(tmp_path, monkeypatch):
    from pipeline.classify.prompts import prompts_path, read_prompts, write_prompts

    monkeypatch.delenv(io.TRUST_ENV, raising=False)
    classes, templates = ["cat", "dog"], ["a {label}"]
    path = prompts_path(tmp_path, classes, templates)
    emb = np.eye(2, 4, dtype=np.float32)
    write_prompts(path, emb, classes, templates, "fp")
    assert np.array_equal(read_prompts(tmp_path, classes, templates, "fp"), emb)
    _flip_dataset(path, "embedding")
    with pytest.raises(PipelineError, match=f"damaged class-prompt file {path}: embedding differs"):
        read_prompts(tmp_path, classes, templates, "fp")
    write_prompts(path, emb, classes, templates, "fp")
    _strip_checksums(path)
    with pytest.raises(PipelineError, match="refusing class-prompt file .*--trust-unchecked"):
        read_prompts(tmp_path, classes, templates, "fp")
    monkeypatch.setenv(io.TRUST_ENV, "1")
    assert np.array_equal(read_prompts(tmp_path, classes, templates, "fp"), emb)


def test_classification_soft_targets_are_checked_on_read_and_by_verify(tmp_path, monkeypatch):
    from pipeline.classify.teacher_training import load_targets, save_targets

    monkeypatch.delenv(io.TRUST_ENV, raising=False)
    path, ids, classes = tmp_path / "head" / "targets.h5", np.array([5, 3, 9]), ["cat", "dog"]
    path.parent.mkdir()
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]], np.float32)
    save_targets(path, ids, probs, classes, "head")
    assert np.array_equal(load_targets(path, np.array([9, 5]), classes), probs[[2, 0]])
    assert cli("verify", tmp_path).returncode == 0
    _flip_dataset(path, "probs")
    with pytest.raises(PipelineError, match=f"damaged soft targets {path}: probs differs") as err:
        load_targets(path, ids, classes)
    assert "\n" not in str(err.value)
    result = cli("verify", tmp_path)
    assert result.returncode == 1 and re.search(rf"damaged +{path}: probs differs", result.stdout)
    save_targets(path, ids, probs, classes, "head")
    _strip_checksums(path)
    with pytest.raises(PipelineError, match="refusing soft targets .*--trust-unchecked"):
        load_targets(path, ids, classes)
    monkeypatch.setenv(io.TRUST_ENV, "1")
    assert np.array_equal(load_targets(path, ids, classes), probs)


def test_a_token_cache_without_checksums_is_refused_unless_trusted(tmp_path, monkeypatch):
    from pipeline.features.cache.tokens import TokenSplit
    from pipeline.features.tokens import run_token_job

    monkeypatch.delenv(io.TRUST_ENV, raising=False)
    manifests = make_dataset(tmp_path / "data", n_images=8)
    s = run_token_job(_TokenTeacher(width=8), Manifest.read(manifests / "train.parquet"), "train",
                      tmp_path / "tokens", workers=0, progress=False)
    _strip_checksums(s.path)
    with pytest.raises(PipelineError, match=f"refusing token cache {s.path}: no checksum recorded"):
        TokenSplit(s.path)
    monkeypatch.setenv(io.TRUST_ENV, "1")
    assert len(TokenSplit(s.path)) > 0
    data = s.path.read_bytes()
    s.path.write_bytes(data[: len(data) - 40])  # truncated: its arrays run past the end
    with pytest.raises(PipelineError, match=f"(cannot read|damaged) token cache {s.path}") as err:
        TokenSplit(s.path)
    assert "\n" not in str(err.value)


def test_the_token_job_records_empty_captions_and_never_overwrites_a_split_finished_meanwhile(tmp_path):
    import pyarrow.parquet as pq

    from pipeline.features.cache.tokens import TokenSplit, TokenWriter
    from pipeline.features.tokens import run_token_job

    manifests = make_dataset(tmp_path / "data", n_images=8)
    m = Manifest.read(manifests / "train.parquet")
    captions = m.table.column("caption").to_pylist()
    captions[1] = "   "  # an empty caption: stage 1 records it; so must the token cache
    m = Manifest(m.table.set_column(m.table.schema.get_field_index("caption"), "caption",
                                    pa_array(captions)), image_root=m.image_root)
    s = run_token_job(_TokenTeacher(width=8), m, "train", tmp_path / "tokens", workers=0, progress=False)
    rejects = pq.read_table(s.path.with_name("train.rejects.parquet")).to_pylist()
    assert [r["reason"] for r in rejects] == ["empty caption"] and s.captions == len(captions) - 1
    assert len(TokenSplit(s.path).caption_sample_ids) == len(captions) - 1
    meta = TokenSplit(s.path).meta
    with pytest.raises(PipelineError, match="was written by another process meanwhile"):
        TokenWriter(s.path, meta, np.arange(3))  # a second writer that looked before the first published


def test_lit_tower_features_are_recomputed_when_damaged_or_unchecked(tmp_path, monkeypatch, capsys):
    """The tower-feature file is a cache build-lit and the lit teacher can recompute: a damaged or unchecked one is
    not used (read_features says None and the caller encodes again), never read as it is."""
    from pipeline.teachers.lit_store import SplitFeatures, read_features, write_features

    monkeypatch.delenv(io.TRUST_ENV, raising=False)
    ids = np.arange(3, dtype=np.int64)
    sf = SplitFeatures(ids, np.ones((3, 4), np.float32), ids, np.array(["a", "b", "c"]), np.ones((3, 2), np.float32),
                       ids[:0], np.array([], dtype=str))
    path = tmp_path / "lit-x.train-features.npz"
    write_features(path, "key", sf)
    assert read_features(path, "key") is not None
    hashed = []
    real_verify = io.verify_file
    monkeypatch.setattr(io, "verify_file", lambda p: hashed.append(p) or real_verify(p))
    assert read_features(path, "another key") is None and not hashed  # made for something else: never hashed
    monkeypatch.setattr(io, "verify_file", real_verify)
    good = path.read_bytes()
    _flip(path)
    assert read_features(path, "key") is None and "differs from its checksum" in capsys.readouterr().out
    path.write_bytes(good)
    io.checksum_path(path).unlink()
    assert read_features(path, "key") is None and "no checksum recorded" in capsys.readouterr().out
    monkeypatch.setenv(io.TRUST_ENV, "1")
    assert np.array_equal(read_features(path, "key").image_feats, sf.image_feats)


def test_a_faiss_index_and_a_sidecar_from_two_writers_are_not_a_pair(tmp_path):
    from pipeline.retrieval.index import IndexSpec, build_index, load_index, save_index

    rng = np.random.default_rng(0)
    a, b = (F.normalize(torch.from_numpy(rng.standard_normal((n, 8)).astype(np.float32)), dim=-1).numpy()
            for n in (30, 40))
    save_index(build_index(a, IndexSpec("Flat"), gpu=False), tmp_path / "a.index")
    save_index(build_index(b, IndexSpec("Flat"), gpu=False), tmp_path / "b.index")
    # the second writer's index and checksum, the first writer's sidecar: each file is whole, the pair is not
    shutil.copy(tmp_path / "b.index", tmp_path / "a.index")
    shutil.copy(tmp_path / "b.index.blake2b", tmp_path / "a.index.blake2b")
    with pytest.raises(PipelineError, match="describes another index"):
        load_index(tmp_path / "a.index", gpu=False)


def test_two_processes_saving_one_checkpoint_leave_a_file_that_loads_or_is_refused(tmp_path):
    """Writers publish by rename and the checksum goes after the file: whatever the interleaving, a reader gets
    one writer's whole file with its checksum, or a mismatch that is refused, never an unchecked mix."""
    path = tmp_path / "last.pt"
    code = (f"import sys, torch; sys.path.insert(0, {str(ROOT)!r})\n"
            "from pipeline.train.state import atomic_save\n"
            "v = float(sys.argv[1])\n"
            f"for _ in range(30): atomic_save({{'w': torch.full((20000,), v)}}, __import__('pathlib').Path({str(path)!r}))\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(v)]) for v in (1, 2)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    try:
        w = load_checkpoint(path)["w"]
        assert float(w[0]) in (1.0, 2.0) and bool((w == w[0]).all())
    except PipelineError as exc:
        assert "differs from its checksum" in str(exc)
    assert not list(tmp_path.glob("*.tmp"))


def test_verify_reports_every_kind_it_finds(tmp_path, cache, monkeypatch):
    """`clipdistill verify artifacts/` walks every stored kind and says ok, damaged, missing or unchecked of each."""
    monkeypatch.delenv(io.TRUST_ENV, raising=False)
    root = tmp_path / "artifacts"
    shutil.copytree(cache, root / "cache" / "train")
    made = {kind: SIDECAR_KINDS[kind](root / kind.replace(" ", "-"))[0] for kind in SIDECAR_KINDS}
    (root / "checkpoint" / "queue").mkdir()
    (root / "checkpoint" / "queue" / "image_emb.bin").write_bytes(b"\0" * 64)
    ok = cli("verify", root)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    for path in made.values():
        assert f"ok        {path}" in ok.stdout
    assert "queue" not in ok.stdout and "all checked files are intact" in ok.stdout
    _flip(made["FAISS index"])
    io.checksum_path(made["LiT teacher checkpoint"]).unlink()
    made["TorchScript encoder"].unlink()  # its checksum stays: the file is missing
    result = cli("verify", root)
    assert result.returncode == 1
    assert f"damaged   {made['FAISS index']}: content differs" in result.stdout
    assert f"unchecked {made['LiT teacher checkpoint']}" in result.stdout
    assert f"missing   {made['TorchScript encoder']}" in result.stdout
    assert f"ok        {made['student export']}" in result.stdout


def test_a_manifest_whose_rows_differ_from_its_content_hash_is_refused(tmp_path):
    import pyarrow.parquet as pq

    path = make_dataset(tmp_path / "data", n_images=6) / "train.parquet"
    table = pq.read_table(path)
    captions = table.column("caption").to_pylist()
    captions[0] = captions[0][::-1] + "x"  # a changed row under the old metadata (what a flipped byte can do)
    changed = table.set_column(table.schema.get_field_index("caption"), "caption", pa_array(captions))
    pq.write_table(changed, path)
    with pytest.raises(PipelineError, match=f"damaged manifest {path}: its rows differ"):
        Manifest.read(path)
    from pipeline.data.manifest import MANIFEST_META_KEY

    meta = dict(table.schema.metadata)
    recorded = json.loads(meta[MANIFEST_META_KEY])["content_hash"]
    meta[MANIFEST_META_KEY] = b"{not json"
    pq.write_table(table.replace_schema_metadata(meta), path)
    with pytest.raises(PipelineError, match=f"damaged manifest {path}: its metadata is not JSON") as err:
        Manifest.read(path)
    assert "\n" not in str(err.value)
    pq.write_table(table, path)
    read = Manifest.read(path)  # intact: the hash verified on read is the one every caller is handed
    assert read.content_hash == recorded == Manifest(read.table).content_hash
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(PipelineError, match=f"cannot read manifest {path}"):
        Manifest.read(path)


def pa_array(values):
    import pyarrow as pa

    return pa.array(values, pa.string())
