"""open_clip and Hugging Face teachers on tiny random models built offline from configs."""

from __future__ import annotations

import json
import os
import pickle
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.common.errors import PipelineError  # noqa: E402
from pipeline.teachers import load_teacher  # noqa: E402
from pipeline.teachers.hf import HFTeacher  # noqa: E402
from pipeline.teachers.openclip import OpenClipTeacher  # noqa: E402

torch.set_num_threads(1)

ARCH = "clipdistill-test-tiny-vit"
OC_CFG = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    # open_clip's default SimpleTokenizer vocabulary ships with the package (49408 tokens).
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
CAPTIONS = ["a red square in the top left", "blue", "a much longer caption: a green picture with a square"]


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(32, 32), (40, 57), (64, 20)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def _encode_all(teacher) -> tuple[torch.Tensor, torch.Tensor]:
    tf = teacher.image_transform()
    pixels = torch.stack([tf(im) for im in _images()])
    return teacher.encode_images(pixels), teacher.encode_texts(teacher.tokenize(CAPTIONS))


def _check_embeddings(teacher) -> None:
    """Declared width, unit norm, deterministic, independent of batch composition, not constant."""
    img, txt = _encode_all(teacher)
    for e in (img, txt):
        assert e.shape == (3, teacher.width) and e.dtype == torch.float32
        torch.testing.assert_close(e.norm(dim=-1), torch.ones(3))
        assert (e[0] - e[1]).abs().max() > 1e-3  # different inputs -> different embeddings
    img2, txt2 = _encode_all(teacher)
    torch.testing.assert_close(img, img2, rtol=0, atol=0)
    torch.testing.assert_close(txt, txt2, rtol=0, atol=0)
    # The short caption alone (no padding to the long one) must embed the same as inside the batch.
    alone = teacher.encode_texts(teacher.tokenize(CAPTIONS[1:2]))[0]
    torch.testing.assert_close(alone, txt[1], atol=1e-5, rtol=0)
    tf = teacher.image_transform()
    torch.testing.assert_close(teacher.encode_images(tf(_images()[2])[None])[0], img[2], atol=1e-5, rtol=0)


def _check_pickled_transform(teacher) -> None:
    tf = teacher.image_transform()
    clone = pickle.loads(pickle.dumps(tf))
    for im in _images():
        out = clone(im)
        assert out.shape == (3, 32, 32)
        torch.testing.assert_close(out, tf(im), rtol=0, atol=0)


def _normalised(im: Image.Image, mean, std) -> torch.Tensor:
    """Naive reference for a 32x32 input (resize and crop are no-ops): scale to [0, 1], (x - mean) / std."""
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


# ---------------------------------------------------------------------------------------------- open_clip


@pytest.fixture(scope="module")
def oc_teacher() -> OpenClipTeacher:
    torch.manual_seed(0)
    return OpenClipTeacher(ARCH, model_cfg=OC_CFG)


@pytest.fixture(scope="module")
def oc_ckpt(oc_teacher, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("oc") / "tiny.pt"
    torch.save(oc_teacher.model.state_dict(), path)
    return str(path)


def test_openclip_embeddings(oc_teacher):
    assert oc_teacher.width == OC_CFG["embed_dim"]
    assert oc_teacher.tokenize(CAPTIONS).shape == (3, OC_CFG["text_cfg"]["context_length"])
    _check_embeddings(oc_teacher)
    assert all(not p.requires_grad for p in oc_teacher.model.parameters()) and not oc_teacher.model.training


def test_openclip_transform_is_eval_preprocess_and_picklable(oc_teacher):
    _check_pickled_transform(oc_teacher)
    im = _images()[0]
    cfg = oc_teacher.preprocess_cfg
    expected = _normalised(im, cfg["mean"], cfg["std"])
    torch.testing.assert_close(oc_teacher.image_transform()(im), expected, atol=1e-5, rtol=0)
    parts = oc_teacher.fingerprint_parts()
    assert parts["arch"] == ARCH and parts["preprocess"]["size"] in ((32, 32), [32, 32], 32)
    assert {"mean", "std", "resize_mode", "interpolation"} <= set(parts["preprocess"])


def test_openclip_checkpoint_file_and_load_teacher(oc_teacher, oc_ckpt, tmp_path):
    moved = tmp_path / "elsewhere.pt"
    shutil.copy(oc_ckpt, moved)
    for teacher in (OpenClipTeacher(ARCH, oc_ckpt), load_teacher(f"openclip:{ARCH}/{moved}")):
        assert isinstance(teacher, OpenClipTeacher)
        # Same weights and preprocessing -> same embeddings and fingerprint, wherever the file lives.
        assert teacher.fingerprint() == oc_teacher.fingerprint()
        for a, b in zip(_encode_all(teacher), _encode_all(oc_teacher)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_openclip_fingerprint_tracks_weights(oc_teacher, oc_ckpt, tmp_path):
    sd = torch.load(oc_ckpt)
    sd["visual.proj"] = sd["visual.proj"].clone()
    sd["visual.proj"][0, 0] += 1e-3  # one scalar
    torch.save(sd, tmp_path / "perturbed.pt")
    perturbed = OpenClipTeacher(ARCH, str(tmp_path / "perturbed.pt"))
    assert perturbed.fingerprint() != oc_teacher.fingerprint()
    assert perturbed.fingerprint_parts()["weights"] != oc_teacher.fingerprint_parts()["weights"]
    torch.manual_seed(1)
    other_seed = OpenClipTeacher(ARCH)
    assert other_seed.fingerprint() != oc_teacher.fingerprint()


def test_openclip_local_dir_and_preprocessing_fingerprint(oc_teacher, oc_ckpt, tmp_path):
    mean, std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    preprocess = {"mean": mean, "std": std, "resize_mode": "squash"}
    config = {"model_cfg": OC_CFG, "preprocess_cfg": preprocess}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    shutil.copy(oc_ckpt, tmp_path / "open_clip_pytorch_model.bin")
    teacher = load_teacher(f"openclip:{ARCH}/{tmp_path}")
    parts, base = teacher.fingerprint_parts(), oc_teacher.fingerprint_parts()
    assert parts["weights"] == base["weights"]  # same weights ...
    assert parts["preprocess"] != base["preprocess"] and teacher.fingerprint() != oc_teacher.fingerprint()
    im = _images()[0]
    torch.testing.assert_close(teacher.image_transform()(im), _normalised(im, mean, std), atol=1e-5, rtol=0)
    # ... so text embeddings agree exactly.
    tokens = teacher.tokenize(CAPTIONS)
    torch.testing.assert_close(teacher.encode_texts(tokens), oc_teacher.encode_texts(tokens), rtol=0, atol=0)


def test_openclip_bf16_autocast_close_to_fp32(oc_teacher, oc_ckpt):
    bf16 = OpenClipTeacher(ARCH, oc_ckpt, precision="bf16")
    assert bf16.fingerprint() != oc_teacher.fingerprint()
    for a, b in zip(_encode_all(bf16), _encode_all(oc_teacher)):
        assert a.dtype == torch.float32
        cos = (a * b).sum(-1)
        assert cos.min() > 0.98 and (a - b).abs().max() > 0  # autocast really ran, and stayed close


def test_openclip_bad_inputs(oc_teacher, tmp_path):
    with pytest.raises(PipelineError, match="unknown open_clip architecture"):
        OpenClipTeacher("no-such-arch")
    with pytest.raises(PipelineError, match="neither a pretrained tag"):
        OpenClipTeacher(ARCH, str(tmp_path / "missing.pt"))
    with pytest.raises(PipelineError, match="no open_clip_config.json"):
        OpenClipTeacher(ARCH, str(tmp_path))
    with pytest.raises(PipelineError, match="different config"):
        OpenClipTeacher(ARCH, model_cfg={**OC_CFG, "embed_dim": 8})
    with pytest.raises(PipelineError, match="precision"):
        OpenClipTeacher(ARCH, precision="int3")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(PipelineError, match="cannot load"):
        OpenClipTeacher(ARCH, str(tmp_path / "junk.pt"))


# ---------------------------------------------------------------------------------------------- Hugging Face


def _tiny_tokenizer():
    """Byte-level BPE with no merges: every byte is a token, so it needs no downloaded vocabulary."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({a: i + 2 for i, a in enumerate(alphabet)})
    vocab.update({a + "</w>": i + 2 + len(alphabet) for i, a in enumerate(alphabet)})
    return CLIPTokenizer(vocab=vocab, merges=[])


SPECIAL_IDS = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}


def _tower(**extra) -> dict:
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, **extra)


def _save_hf_clip(path, seed: int = 0, image_mean=None) -> str:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tok = _tiny_tokenizer()
    text = _tower(vocab_size=len(tok), max_position_embeddings=32, **SPECIAL_IDS)
    cfg = CLIPConfig(text_config=text, vision_config=_tower(image_size=32, patch_size=8), projection_dim=24)
    torch.manual_seed(seed)
    CLIPModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    kw = {"image_mean": image_mean} if image_mean else {}
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, **kw)
    processor.save_pretrained(path)
    return str(path)


def _save_hf_siglip(path) -> str:
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    tok = _tiny_tokenizer()
    text = _tower(vocab_size=len(tok), max_position_embeddings=12, **SPECIAL_IDS)
    cfg = SiglipConfig(text_config=text, vision_config=_tower(image_size=32, patch_size=8))
    torch.manual_seed(0)
    SiglipModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> str:
    return _save_hf_clip(tmp_path_factory.mktemp("hf_clip"))


@pytest.fixture(scope="module")
def hf_clip(clip_dir) -> HFTeacher:
    return HFTeacher(clip_dir)


def test_hf_clip_embeddings_and_load_teacher(hf_clip, clip_dir):
    assert hf_clip.width == 24
    _check_embeddings(hf_clip)
    assert all(not p.requires_grad for p in hf_clip.model.parameters()) and not hf_clip.model.training
    tokens = hf_clip.tokenize(CAPTIONS)
    assert set(tokens) == {"input_ids", "attention_mask"}
    loaded = load_teacher(f"hf:{clip_dir}")
    assert isinstance(loaded, HFTeacher) and loaded.fingerprint() == hf_clip.fingerprint()
    torch.testing.assert_close(loaded.encode_texts(tokens), hf_clip.encode_texts(tokens), rtol=0, atol=0)


def test_hf_transform_is_processor_and_picklable(hf_clip):
    _check_pickled_transform(hf_clip)
    im = _images()[0]
    p = hf_clip.processor
    expected = _normalised(im, p.image_mean, p.image_std)
    torch.testing.assert_close(hf_clip.image_transform()(im), expected, atol=1e-5, rtol=0)


def test_hf_fingerprint_tracks_weights_and_preprocessing(hf_clip, clip_dir, tmp_path):
    base = hf_clip.fingerprint_parts()
    # The parent folder does not matter (the directory's own name is the teacher's display name).
    moved = shutil.copytree(clip_dir, tmp_path / "parent" / os.path.basename(clip_dir))
    assert HFTeacher(str(moved)).fingerprint() == hf_clip.fingerprint()

    other_seed = HFTeacher(_save_hf_clip(tmp_path / "seed1", seed=1))
    assert other_seed.fingerprint_parts()["weights"] != base["weights"]
    assert other_seed.fingerprint() != hf_clip.fingerprint()

    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(clip_dir)
    with torch.no_grad():
        model.text_projection.weight[0, 0] += 1e-3
    model.save_pretrained(moved)
    perturbed = HFTeacher(str(moved))
    assert perturbed.fingerprint_parts()["weights"] != base["weights"]
    assert perturbed.fingerprint() != hf_clip.fingerprint()

    new_mean = HFTeacher(_save_hf_clip(tmp_path / "mean", seed=0, image_mean=[0.5, 0.5, 0.5]))
    parts = new_mean.fingerprint_parts()
    assert parts["weights"] == base["weights"] and parts["processor"] != base["processor"]
    assert new_mean.fingerprint() != hf_clip.fingerprint()


def test_hf_siglip(tmp_path):
    teacher = load_teacher(f"hf:{_save_hf_siglip(tmp_path)}")
    assert isinstance(teacher, HFTeacher) and teacher.width == 32
    tokens = teacher.tokenize(CAPTIONS)
    # max_length padding (SigLIP pools the last position), no attention mask, long caption truncated.
    assert set(tokens) == {"input_ids"} and tokens["input_ids"].shape == (3, 12)
    _check_embeddings(teacher)
    _check_pickled_transform(teacher)


def test_hf_bad_inputs(tmp_path):
    with pytest.raises(PipelineError, match="cannot load"):
        HFTeacher(str(tmp_path / "missing"))
    from transformers import BertConfig

    BertConfig().save_pretrained(tmp_path)
    with pytest.raises(PipelineError, match="supported: clip, siglip"):
        HFTeacher(str(tmp_path))
    with pytest.raises(PipelineError, match="hf teacher needs"):
        load_teacher("hf:")


def test_image_tokens_are_refused_in_one_line_by_a_backend_without_them():
    """Image tokens are an optional capability: a backend without them (an ensemble) says so in one line, and
    the token cache refuses it before reading an image."""
    from pipeline.teachers.ensemble import EnsembleTeacher
    from tests.fake_teacher import FakeTeacher

    teacher = EnsembleTeacher([FakeTeacher(width=4), FakeTeacher(width=4, seed=1)])
    for call in (lambda: teacher.image_tokens(torch.zeros(1, 3, 8, 8)), teacher.token_arch):
        with pytest.raises(PipelineError) as e:
            call()
        assert "has no image tokens" in str(e.value) and "\n" not in str(e.value)
