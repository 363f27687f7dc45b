"""Stage 1's device input path (features/device_input.py), run on the CPU: same pixels as the PIL path within
the rounding of one resize step, the same cache within fp16 rounding, the same rejects; the shard writer thread."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import pipeline.features.shard_writer as writer_module
from pipeline.common.errors import PipelineError
from pipeline.data.loader import iter_image_batches
from pipeline.data.manifest import Manifest
from pipeline.features.device_input import choose_decode, decode_jpegs, iter_device_batches
from pipeline.teachers.preprocess import TensorPreprocess
from pipeline.features.job import FeatureJob, run_feature_job
from pipeline.teachers.openclip import OpenClipTeacher
from tests.fake_teacher import FakeTeacher

TINY = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": 1, "width": 32, "patch_size": 16,
                                        "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
# COCO-like shapes (landscape, portrait, odd sizes), one smaller than the model input, one very wide.
SIZES = [(640, 480), (480, 640), (500, 375), (333, 500), (48, 48), (300, 60)]


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return OpenClipTeacher("device-input-tiny", None, model_cfg=TINY)


def _photo(w: int, h: int, seed: int) -> np.ndarray:
    """Smooth gradients plus noise: JPEG-like content with detail that resizing must average correctly."""
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    arr = np.stack([128 + 100 * np.sin(xx / 17 + seed), 128 + 100 * np.cos(yy / 13), (xx + yy) % 256], -1)
    return np.clip(arr + rng.normal(0, 12, arr.shape), 0, 255).astype(np.uint8)


def make_images(root: Path) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (w, h) in enumerate(SIZES):
        paths.append(root / f"photo{i}.jpg")
        Image.fromarray(_photo(w, h, i)).save(paths[-1], quality=90)
    paths.append(root / "gray.jpg")
    Image.fromarray(_photo(200, 150, 9)[..., 0]).save(paths[-1])  # 1-channel JPEG -> RGB
    rgba = np.zeros((300, 200, 4), np.uint8)
    rgba[50:250, 40:160] = (200, 30, 30, 255)  # transparent elsewhere: composited on white in both paths
    paths.append(root / "alpha.png")
    Image.fromarray(rgba).save(paths[-1])
    return [str(p) for p in paths]


def test_device_path_pixels_match_the_pil_path(tmp_path, teacher):
    locations = make_images(tmp_path)
    pil = next(iter_image_batches(locations, teacher.image_transform(), 16, 0))
    dev = next(iter_device_batches(locations, teacher.tensor_preprocess(), torch.device("cpu"), 16, 0))
    assert pil.positions == dev.positions == list(range(len(locations)))
    std = torch.tensor(teacher.tensor_preprocess().std).view(1, 3, 1, 1)
    diff = (pil.pixels - dev.pixels).abs() * std * 255  # in 0..255 steps
    # The stated tolerance: the same JPEG decoder, and a resize that differs from PIL's by at most the
    # rounding to uint8 (one step) at a few per mille of the pixels.
    assert diff.max().item() <= 1.0 + 1e-3
    assert diff.mean().item() < 0.01
    a, b = teacher.encode_images(pil.pixels), teacher.encode_images(dev.pixels)
    assert torch.all((a * b).sum(-1) > 0.9999)


def test_student_preprocess_matches_its_transform(tmp_path):
    from pipeline.students.config import get_preset
    from pipeline.students.export import StudentEncoder
    from pipeline.students.model import build_student

    torch.manual_seed(0)
    student = StudentEncoder(build_student(get_preset("tiny", 32), load_weights=False))
    locations = make_images(tmp_path)
    pre = student.tensor_preprocess()
    assert pre.resize > pre.crop  # resize to size / crop_pct, then the center crop, as ImageTransform does
    pil = next(iter_image_batches(locations, student.image_transform(), 16, 0))
    dev = next(iter_device_batches(locations, pre, torch.device("cpu"), 16, 0))
    std = torch.tensor(pre.std).view(1, 3, 1, 1)
    assert ((pil.pixels - dev.pixels).abs() * std * 255).max().item() <= 1.0 + 1e-3


def _manifest(tmp_path: Path, locations: list[str]) -> Manifest:
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")  # JPEG magic, corrupt body
    rows = [{"sample_id": 10 * i + c, "image_id": i, "image_path": p, "split": "test",
             "caption": f"image {i} caption {c}"} for i, p in enumerate(locations) for c in range(2)]
    rows += [{"sample_id": 999, "image_id": 99, "image_path": str(tmp_path / "broken.jpg"), "split": "test",
              "caption": "a broken file"},
             {"sample_id": 998, "image_id": 98, "image_path": str(tmp_path / "missing.jpg"), "split": "test",
              "caption": "a missing file"}]
    return Manifest.from_rows(rows, source="device-input test", image_root=str(tmp_path))


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (nvJPEG); bench/gpu_check.sh")


@CUDA
def test_nvjpeg_pixels_match_the_pil_path(tmp_path, teacher):
    locations = make_images(tmp_path)
    pil = next(iter_image_batches(locations, teacher.image_transform(), 16, 0))
    dev = next(iter_device_batches(locations, teacher.tensor_preprocess(), torch.device("cuda"), 16, 0))
    assert pil.positions == dev.positions
    std = torch.tensor(teacher.tensor_preprocess().std).view(1, 3, 1, 1)
    diff = (pil.pixels - dev.pixels.cpu()).abs() * std * 255
    # nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's: a few steps at edges, well under one on average
    assert diff.mean().item() < 0.5 and diff.max().item() <= 8


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_cache_from_both_paths_agrees_within_fp16_rounding(tmp_path, teacher, device):
    teacher.to(device)
    manifest = _manifest(tmp_path, make_images(tmp_path / "img"))
    caches = {}
    for decode in ("cpu", "device"):
        out = tmp_path / decode
        summary = run_feature_job(FeatureJob(manifest, "t", "test", out, shard_size=3, num_workers=0, batch_size=4,
                                             decode=decode), teacher, progress=False)
        assert summary.complete and summary.rejects == 2  # the broken and the missing file, in both paths
        with h5py.File(sorted(out.glob("shard-*.h5"))[0], "r") as f:
            assert f["image"].dtype == np.float16
        caches[decode] = _read_images(out)
    (ids_a, a), (ids_b, b) = caches["cpu"], caches["device"]
    np.testing.assert_array_equal(ids_a, ids_b)
    assert len(ids_a) == len(SIZES) + 2
    # within fp16 rounding: no component moves by more than one fp16 step at the vector's largest magnitude
    ulp = np.spacing(np.abs(a).max(axis=1)).astype(np.float32)[:, None]
    assert np.all(np.abs(a.astype(np.float32) - b.astype(np.float32)) <= ulp)
    teacher.to("cpu")


def _read_images(out: Path) -> tuple[np.ndarray, np.ndarray]:
    ids, emb = [], []
    for p in sorted(out.glob("shard-*.h5")):
        with h5py.File(p, "r") as f:
            ids.append(f["image_id"][:])
            emb.append(f["image"][:])
    return np.concatenate(ids), np.concatenate(emb)


def test_a_corrupt_jpeg_fails_alone_in_a_batched_decode(tmp_path):
    good = make_images(tmp_path)[:2]
    datas = [torch.frombuffer(bytearray(Path(p).read_bytes()), dtype=torch.uint8) for p in good]
    datas.insert(1, torch.frombuffer(bytearray(b"\xff\xd8\xff\xe0 junk"), dtype=torch.uint8))
    images, errors = decode_jpegs(datas, [good[0], "junk.jpg", good[1]], torch.device("cpu"))
    assert errors[0] is None and errors[2] is None and "junk.jpg" in errors[1]
    assert images[0].shape == (3, 480, 640) and images[1] is None and images[2].shape == (3, 640, 480)


def test_decode_choice(teacher):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    pre = teacher.tensor_preprocess()
    assert choose_decode("auto", cuda, pre) and not choose_decode("auto", cpu, pre)
    assert choose_decode("device", cpu, pre) and not choose_decode("cpu", cuda, pre)
    assert not choose_decode("auto", cuda, None)  # a teacher without a tensor form keeps the workers path
    with pytest.raises(PipelineError, match="no tensor form"):
        choose_decode("device", cpu, None)
    with pytest.raises(PipelineError, match="--decode must be one of"):
        choose_decode("gpu", cpu, pre)
    with pytest.raises(PipelineError, match="larger than"):
        TensorPreprocess(32, 64, "bicubic", (0, 0, 0), (1, 1, 1))


def test_a_failed_shard_write_surfaces_and_releases_its_lock(tmp_path, monkeypatch):
    from tests.gen_cache import make_dataset

    manifest = Manifest.read(make_dataset(tmp_path / "data", n_images=20) / "train.parquet")
    real, calls = writer_module.write_shard, []

    def failing_once(path, *args, **kwargs):
        calls.append(Path(path).name)
        if len(calls) == 1:
            raise OSError("disk full (simulated)")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(writer_module, "write_shard", failing_once)
    job = FeatureJob(manifest, "shapes", "train", tmp_path / "cache", shard_size=4, num_workers=0)
    with pytest.raises(OSError, match="disk full"):
        run_feature_job(job, FakeTeacher(), progress=False)
    assert not list((tmp_path / "cache").glob("*.lock"))  # the writer thread released the shard it held
    again = run_feature_job(job, FakeTeacher(), progress=False)
    assert again.complete and "shard-00000-of-00003.h5" in again.shards_written


def test_summary_reports_read_model_and_write_time_apart(tmp_path, monkeypatch):
    """The runner's parts are timed apart: slow image reads show as read time, a slow teacher as model time,
    a slow writer as write time."""
    import time

    import pipeline.data.loader as loader_module
    from tests.gen_cache import make_dataset

    manifest = Manifest.read(make_dataset(tmp_path / "data", n_images=12) / "train.parquet")
    teacher, real_write, real_load = FakeTeacher(), writer_module.write_shard, loader_module.load_rgb
    real_images = teacher._encode_images

    def slow(seconds, fn):
        def wrapped(*args, **kwargs):
            time.sleep(seconds)
            return fn(*args, **kwargs)
        return wrapped

    teacher._encode_images = slow(0.05, real_images)  # per batch of 2
    monkeypatch.setattr(writer_module, "write_shard", slow(0.2, real_write))  # per shard
    monkeypatch.setattr(loader_module, "load_rgb", slow(0.06, real_load))  # per image, read in this process
    s = run_feature_job(FeatureJob(manifest, "shapes", "train", tmp_path / "cache", shard_size=4, num_workers=0,
                                   batch_size=2, decode="cpu"), teacher, progress=False)
    shards, batches = len(s.shards_written), (s.images + 1) // 2
    assert s.complete and shards >= 2 and s.images >= 6
    assert s.read_seconds >= s.images * 0.06 and s.model_seconds >= batches * 0.05 and s.write_seconds >= shards * 0.2
    assert s.read_seconds + s.model_seconds <= s.seconds
    assert s.model_seconds < (batches + shards) * 0.05 + s.images * 0.03  # the slow reads (0.06 s) are not model


def test_device_path_reads_webdataset_tar_members(tmp_path, teacher):
    import tarfile

    from pipeline.data.readers.webdataset import read_webdataset

    images = make_images(tmp_path / "img")[:3]
    (tmp_path / "shards").mkdir()
    with tarfile.open(tmp_path / "shards" / "000000.tar", "w") as tf:
        for i, path in enumerate(images):
            tf.add(path, arcname=f"{i:06d}.jpg")
            caption = tmp_path / f"{i}.txt"
            caption.write_text(f"photo number {i}")
            tf.add(caption, arcname=f"{i:06d}.txt")
    manifest = read_webdataset(tmp_path / "shards", split_fractions="test=1")
    assert all("::" in p for p in manifest.table.column("image_path").to_pylist())
    out = tmp_path / "cache"
    summary = run_feature_job(FeatureJob(manifest, "wds", "test", out, num_workers=0, decode="device"), teacher,
                              progress=False)
    assert summary.complete and summary.images == 3 and summary.rejects == 0
