"""Transfer images (issue 13): caption-less images distilled next to the pairs in the image-only terms.

The stream of transfer rows, the pool (sources, duplicates, teacher checks), the losses against simple
reference computations, and stage 2 through the real CLI: image-only manifest rows and another dataset's
cache survive manifest -> cache -> training, fill the image queue, and a killed run resumes exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.common.errors import PipelineError
from pipeline.data.manifest import Manifest
from pipeline.distill.losses import LossConfig, MultiscaleDistillLoss
from pipeline.distill.losses.contrastive import queue_contrastive
from pipeline.distill.losses.hard_negative import max_violation_triplet
from pipeline.distill.queue import ActiveQueue
from pipeline.distill.transfer import TransferStream, load_transfer_data, transfer_batch_size
from pipeline.features.cache import FeatureCache
from pipeline.features.job import FeatureJob, run_feature_job
from pipeline.train.contrastive import false_negative_mask
from tests.fake_teacher import FakeTeacher
from tests.gen_cache import make_cache, make_dataset
from tests.test_distill import cli, distill_args, final_weights, kill_after_first_checkpoint


# ---- the stream ---------------------------------------------------------------------------------


def test_stream_walks_seeded_permutations_and_never_repeats_a_position():
    s = TransferStream(n=10, per_step=4, seed=3)
    pos = np.concatenate([s.positions(k) for k in range(5)])
    assert pos.tolist() == list(range(20))  # consecutive steps take consecutive positions
    rows = s.rows(pos)
    assert sorted(rows[:10].tolist()) == list(range(10)) and sorted(rows[10:20].tolist()) == list(range(10))
    assert rows[:10].tolist() != rows[10:20].tolist()  # each pass is its own permutation
    again = TransferStream(n=10, per_step=4, seed=3)
    assert again.rows(again.positions(3)).tolist() == rows[12:16].tolist()  # a pure function of the step
    r0, r1 = TransferStream(10, 4, 3, rank=0, world=2), TransferStream(10, 4, 3, rank=1, world=2)
    both = np.concatenate([r0.positions(1), r1.positions(1)])
    assert len(set(both.tolist())) == 8  # ranks never share a position
    assert transfer_batch_size(0.5, 64) == 32 and transfer_batch_size(0, 64) == 0
    with pytest.raises(PipelineError, match="transfer_ratio"):
        transfer_batch_size(-1, 8)


# ---- the pool -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """Two shape datasets cached by the same fake teacher: the pairs, and the transfer images' source."""
    root = tmp_path_factory.mktemp("transfer")
    pairs = make_dataset(root / "pairs", n_images=40)
    other = make_dataset(root / "other", n_images=30, seed=1)
    return (pairs, make_cache(pairs, root / "pairs-cache")), (other, make_cache(other, root / "other-cache"))


def test_pool_takes_every_cached_image_of_a_source_and_skips_images_that_are_pairs(worlds):
    (pairs, pairs_cache), (other, other_cache) = worlds
    own = Manifest.read(pairs / "train.parquet")
    own_locs = [own.resolve(p) for p in own.table.column("image_path").to_pylist()]
    pool = load_transfer_data([{"manifest_dir": str(other), "cache_dir": str(other_cache)}], None, own_locs)[0]
    other_train = Manifest.read(other / "train.parquet")
    assert len(pool) == len(set(other_train.column("image_id").tolist())) == 18
    assert pool.per_source == [(f"{other}/train", 18)] and pool.skipped_paired == 0
    ref = FeatureCache(other_cache / "train").images_by_id(pool.image_ids[[3, 0]]).astype(np.float32)
    assert np.array_equal(pool.targets(np.array([3, 0])), ref)  # targets are the source cache's rows
    # the pairs' own split as a transfer source: every image is already a pair, so nothing is left
    with pytest.raises(PipelineError, match="no transfer image left"):
        load_transfer_data([{"manifest_dir": str(pairs), "cache_dir": str(pairs_cache)}], None, own_locs)[0]
    with pytest.raises(PipelineError, match=r"data.transfer\[0\] must be a mapping"):
        load_transfer_data([{"manifest": "x"}], None, own_locs)[0]
    with pytest.raises(PipelineError, match="need .* and a cache"):
        load_transfer_data([{"manifest_dir": str(other), "cache_dir": str(other_cache), "split": "nope"}], None, [])[0]


def test_a_source_can_give_its_captions_without_its_images(worlds):
    (pairs, pairs_cache), (other, other_cache) = worlds
    own = Manifest.read(pairs / "train.parquet")
    own_locs = [own.resolve(p) for p in own.table.column("image_path").to_pylist()]
    src = {"manifest_dir": str(other), "cache_dir": str(other_cache), "captions": True, "images": False}
    caps = load_transfer_data([src], None, own_locs)[1]
    other_train = Manifest.read(other / "train.parquet")
    assert caps.captions == other_train.table.column("caption").to_pylist()
    assert caps.per_source == [(f"{other}/train", len(other_train))]
    cache = FeatureCache(other_cache / "train")
    want = cache.texts_by_sample_id(caps.sample_ids[[4, 1]]).astype(np.float32)
    assert np.array_equal(caps.targets(np.array([4, 1])), want)
    assert load_transfer_data([src], None, own_locs)[0] is None  # images: false
    # the pairs' own captions are never transfer captions: their images are training pairs
    mine = {"manifest_dir": str(pairs), "cache_dir": str(pairs_cache), "captions": True, "images": False}
    assert load_transfer_data([mine], None, own_locs)[1] is None
    with pytest.raises(PipelineError, match="captions must be true or false"):
        load_transfer_data([{**src, "captions": "yes"}], None, own_locs)[1]


def test_pool_refuses_a_source_cached_by_another_teacher(worlds, tmp_path):
    (pairs, pairs_cache), (other, _) = worlds
    m = Manifest.read(other / "train.parquet")
    run_feature_job(FeatureJob(m, "other", "train", tmp_path / "c" / "train", num_workers=0),
                    FakeTeacher(width=16, seed=5), progress=False)
    own = (Manifest.read(pairs / "train.parquet"), FeatureCache(pairs_cache / "train"))
    with pytest.raises(PipelineError, match="same|teacher fingerprints"):
        load_transfer_data([{"manifest_dir": str(other), "cache_dir": str(tmp_path / "c")}], own, [])[0]


# ---- the losses ---------------------------------------------------------------------------------


def _unit(*shape, seed=0):
    return torch.nn.functional.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_transfer_images_join_the_image_terms_and_nothing_else():
    B, T, K, D = 6, 4, 10, 8
    s_img, s_txt, t_img, t_txt = (_unit(B, D, seed=i) for i in range(4))
    x_s, x_t = _unit(T, D, seed=7), _unit(T, D, seed=8)
    ids, x_ids = torch.arange(B), torch.arange(100, 100 + T)
    queue = ActiveQueue(img=_unit(K, D, seed=9), img_ids=torch.arange(K) + 50, txt=_unit(K, D, seed=10),
                        txt_ids=torch.arange(K) + 50, txt_hash=None)
    crit = MultiscaleDistillLoss(LossConfig(pair=True))
    plain = crit(s_img, s_txt, t_img, t_txt, ids, queue=queue)
    mixed = crit(s_img, s_txt, t_img, t_txt, ids, queue=queue, transfer=(x_s, x_t, x_ids))
    parts = {n: crit.parts[n].of for n in crit.names}
    from pipeline.distill.losses.common import LossInputs
    full = {n: f(LossInputs(s_img, s_txt, t_img, t_txt, ids, queue, None, x_s, x_t, x_ids)) for n, f in parts.items()}
    alone = {n: f(LossInputs(s_img, s_txt, t_img, t_txt, ids, queue)) for n, f in parts.items()}
    all_s, all_t, all_ids = torch.cat([s_img, x_s]), torch.cat([t_img, x_t]), torch.cat([ids, x_ids])
    # references over the concatenated images
    assert torch.allclose(full["fd"]["fd_img"], (all_s - all_t).abs().mean())
    assert torch.allclose(full["sd"]["sd_img"], (1 - (all_s * all_t).sum(1)).mean())
    ref_cd = queue_contrastive(all_s, all_t, queue.img, 0.05, false_negative_mask(all_ids, queue.img_ids))
    assert torch.allclose(full["cd"]["cd_img"], ref_cd)
    ref_hnd = max_violation_triplet(all_s, all_t, 0.0, false_negative_mask(all_ids, all_ids))
    assert torch.allclose(full["hnd"]["hnd_img_img"], ref_hnd)
    # text and cross-modal terms are those of the pairs alone
    for loss, part in (("cd", "cd_txt"), ("fd", "fd_txt"), ("sd", "sd_txt"), ("hnd", "hnd_txt_txt"),
                       ("hnd", "hnd_img_txt"), ("hnd", "hnd_txt_img"), ("pair", "pair")):
        assert torch.equal(full[loss][part], alone[loss][part]), part
    assert torch.equal(mixed["pair"], plain["pair"]) and not torch.equal(mixed["fd"], plain["fd"])


def test_transfer_captions_join_the_text_terms_and_nothing_else():
    B, U, K, D = 6, 5, 10, 8
    s_img, s_txt, t_img, t_txt = (_unit(B, D, seed=i) for i in range(4))
    x_s, x_t = _unit(U, D, seed=17), _unit(U, D, seed=18)
    ids, x_ids = torch.arange(B), -2 - torch.arange(U)
    h, x_h = torch.arange(B) + 1000, torch.tensor([5, 5, 6, 7, 8])  # two identical transfer captions
    queue = ActiveQueue(img=_unit(K, D, seed=9), img_ids=torch.arange(K) + 50, txt=_unit(K, D, seed=10),
                        txt_ids=torch.arange(K) + 50, txt_hash=torch.arange(K) + 2000)
    from pipeline.distill.losses.common import LossInputs

    crit = MultiscaleDistillLoss(LossConfig(pair=True))
    parts = {n: crit.parts[n].of for n in crit.names}
    full = {n: f(LossInputs(s_img, s_txt, t_img, t_txt, ids, queue, h, more_s_txt=x_s, more_t_txt=x_t,
                            more_txt_ids=x_ids, more_txt_hash=x_h)) for n, f in parts.items()}
    alone = {n: f(LossInputs(s_img, s_txt, t_img, t_txt, ids, queue, h)) for n, f in parts.items()}
    all_s, all_t = torch.cat([s_txt, x_s]), torch.cat([t_txt, x_t])
    all_ids, all_h = torch.cat([ids, x_ids]), torch.cat([h, x_h])
    assert torch.allclose(full["fd"]["fd_txt"], (all_s - all_t).abs().mean())
    assert torch.allclose(full["sd"]["sd_txt"], (1 - (all_s * all_t).sum(1)).mean())
    ref_cd = queue_contrastive(all_s, all_t, queue.txt, 0.05,
                               false_negative_mask(all_ids, queue.txt_ids, all_h, queue.txt_hash))
    assert torch.allclose(full["cd"]["cd_txt"], ref_cd)
    mask = false_negative_mask(all_ids, all_ids, all_h, all_h)
    assert mask[B, B + 1] and not mask[B, B + 2]  # identical transfer captions are false negatives
    assert torch.allclose(full["hnd"]["hnd_txt_txt"], max_violation_triplet(all_s, all_t, 0.0, mask))
    for loss, part in (("cd", "cd_img"), ("fd", "fd_img"), ("sd", "sd_img"), ("hnd", "hnd_img_img"),
                       ("hnd", "hnd_img_txt"), ("hnd", "hnd_txt_img"), ("pair", "pair")):
        assert torch.equal(full[loss][part], alone[loss][part]), part


# ---- stage 2 through the CLI ----------------------------------------------------------------------


def _with_image_only_rows(manifest_dir, out_dir, cache_dir, n_image_only=6, n_caption_only=10):
    """The pairs' manifests with the captions of some train images removed and declared image-only, plus some
    caption-only train rows; cached."""
    out_dir.mkdir(parents=True)
    for split in ("train", "val", "test"):
        m = Manifest.read(manifest_dir / f"{split}.parquet")
        rows = m.table.to_pylist()
        if split == "train":
            drop = sorted({r["image_id"] for r in rows})[:n_image_only]
            kept = [r for r in rows if r["image_id"] not in drop]
            rows = kept + [{**r, "caption": None, "unpaired": True}
                           for r in {r["image_id"]: r for r in rows if r["image_id"] in drop}.values()]
            rows += [{"sample_id": 90000 + k, "image_id": 0, "image_path": None, "caption": f"a lone caption {k}",
                      "split": "train", "unpaired": True} for k in range(n_caption_only)]
        Manifest.from_rows(rows, source="shapes", image_root=m.image_root).write(out_dir / f"{split}.parquet")
        run_feature_job(FeatureJob(Manifest.read(out_dir / f"{split}.parquet"), "shapes", split,
                                   cache_dir / split, num_workers=0), FakeTeacher(width=16), progress=False)
    return out_dir, cache_dir


def test_stage2_distils_on_image_only_rows_and_another_cache_and_resumes_exactly(worlds, tmp_path):
    (pairs, _), (other, other_cache) = worlds
    shapes = _with_image_only_rows(pairs, tmp_path / "m", tmp_path / "c")
    runs = tmp_path / "runs"
    extra = (f'data.transfer=[{{manifest_dir: "{other}", cache_dir: "{other_cache}"}}]', "data.transfer_ratio=0.5")
    ref = cli(distill_args(shapes, runs, "straight", *extra), stdout=-1, text=True)
    out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, out
    # 6 image-only rows of the training manifest + the other dataset's 18 train images, 4 per step of 8 pairs
    assert f"transfer: 24 caption-less images (image-only rows of the training manifest 6, {other}/train 18)" in out
    assert "transfer: 10 image-less captions (caption-only rows of the training manifest 10), 4 per step" in out
    ckpt = final_weights(runs / "straight")
    steps = ckpt["state"]["global_step"]
    q = ckpt["queue"][0]
    assert q["img"]["fill"] == min(24, steps * 12) and q["txt"]["fill"] == min(24, steps * 12)
    # a killed run resumes to the same weights: the transfer rows are a function of the step
    killed = kill_after_first_checkpoint(distill_args(shapes, runs, "killed", *extra), runs / "killed", stdout=-3)
    assert killed.returncode != 0 and not (runs / "killed" / "export" / "student.pt").exists()
    resumed = cli(distill_args(shapes, runs, "killed", *extra) + ["--resume"], stdout=-3)
    assert resumed.wait(timeout=300) == 0
    b = final_weights(runs / "killed")
    assert b["state"] == ckpt["state"]
    for key, value in ckpt["model"].items():
        assert torch.equal(value, b["model"][key]), f"{key} differs after resume"
    assert torch.equal(ckpt["queue"][0]["img"]["emb"], b["queue"][0]["img"]["emb"])


def test_transfer_errors_are_one_line(worlds, tmp_path):
    shapes = worlds[0]
    runs = tmp_path / "runs"
    for extra, msg in (
        (("data.transfer_ratio=0.5",), "no transfer data"),
        (("data.transfer_ratio=0.5", "losses.cd=false", "losses.fd=false", "losses.sd=false", "losses.hnd=false",
          "losses.pair=true"), "needs a distillation loss"),
    ):
        proc = cli(distill_args(shapes, runs, "bad", *extra), stdout=-1, stderr=-2, text=True)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode != 0 and msg in out and "Traceback" not in out, out


def test_a_transfer_image_is_the_same_file_whatever_the_path_spelling():
    from pipeline.distill.transfer import _same_file

    assert _same_file("data/corpus/../openmoji/images/a.png") == _same_file("data/openmoji/images/a.png")
    assert _same_file("x/shard.tar::a.png") != _same_file("x/shard.tar::b.png")


def _objective(tmp_path, *overrides):
    """A stage-2 objective built in this process (what the trainer steps on), with ``overrides`` as --set."""
    from pipeline.common import config as cfgio
    from pipeline.common.distributed import DistEnv
    from pipeline.distill.trainer import DistillConfig, DistillObjective

    cfg = cfgio.load(DistillConfig, None, list(overrides) + [f"runs_dir={tmp_path / 'runs'}"])
    run_dir = tmp_path / "runs" / cfg.name
    run_dir.mkdir(parents=True)
    return DistillObjective(cfg, run_dir, torch.device("cpu"), DistEnv())


def test_two_datasets_whose_ids_overlap_never_mask_an_unrelated_image(worlds, tmp_path):
    """Both shape datasets number their images 0, 1, 2, ...: the ids the trainer gives the pairs and the transfer
    images (the queue's ids and the false-negative masks) must still name one image each."""
    (pairs, pairs_cache), (other, other_cache) = worlds
    assert set(Manifest.read(pairs / "train.parquet").column("image_id").tolist()) & set(
        Manifest.read(other / "train.parquet").column("image_id").tolist())  # the premise: ids overlap
    from tests.test_distill import settings

    obj = _objective(tmp_path, *settings((pairs, pairs_cache), tmp_path / "runs"), "data.transfer_ratio=0.5",
                     f'data.transfer=[{{manifest_dir: "{other}", cache_dir: "{other_cache}"}}]')
    file_of: dict[int, str] = {}  # every id the trainer used -> the one image file it stands for
    for step, batch in enumerate(obj.epoch_batches(0, 0)):
        obj.step(batch, step)
        q_ids = obj._pending[1].tolist()  # the ids enqueued: the pairs', then the transfer images'
        locs = [obj.rows.locations[i] for i in batch.rows.tolist()]
        locs += [obj.transfer.locations[r] for r in batch.transfer_rows.tolist()]
        assert len(q_ids) == len(locs)
        for image_id, loc in zip(q_ids, locs):
            assert file_of.setdefault(image_id, loc) == loc, f"id {image_id} names {file_of[image_id]} and {loc}"
    assert len(set(file_of.values())) == len(file_of)
    mask = false_negative_mask(torch.tensor(list(file_of)), torch.tensor(list(file_of)))
    assert torch.equal(mask, torch.eye(len(file_of), dtype=torch.bool))  # masks only an image against itself
