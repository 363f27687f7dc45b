"""Weight inheritance: a student's text tower from chosen layers of a trained dual encoder's (TinyCLIP)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from pipeline.common import config as cfgio
from pipeline.common.errors import PipelineError
from pipeline.distill.trainer import DistillConfig, train
from pipeline.students.config import get_preset
from pipeline.students.export import export_student, load_student_model
from pipeline.students.inherit import inherit_text_layers, spaced_layers
from pipeline.students.model import build_student
from tests.gen_cache import make_cache, make_dataset


def _tiny(layers: int, hidden: int = 64, seed: int = 0, width: int = 32):
    cfg = get_preset("tiny", width)
    text = dataclasses.replace(cfg.text, config={**cfg.text.config, "num_hidden_layers": layers,
                                                 "hidden_size": hidden})
    torch.manual_seed(seed)
    return build_student(dataclasses.replace(cfg, text=text))


def _equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_spaced_layers_keep_the_first_and_the_last():
    assert spaced_layers(2, 6) == [0, 5] and spaced_layers(3, 6) == [0, 2, 5] and spaced_layers(1, 6) == [0]


def test_the_chosen_layers_embeddings_and_projection_are_the_sources():
    source, student = _tiny(4, seed=1), _tiny(2, seed=2)
    mine, theirs = student.text_tower.model, source.text_tower.model
    assert not _equal(mine.encoder.layer[0], theirs.encoder.layer[2])
    untouched_image = {k: v.clone() for k, v in student.image_tower.state_dict().items()}
    taken = inherit_text_layers(student, source, [2, 1])
    assert taken == {"layers": [2, 1], "of": 4, "projection": True}
    assert _equal(mine.encoder.layer[0], theirs.encoder.layer[2]) and _equal(mine.encoder.layer[1], theirs.encoder.layer[1])
    assert _equal(mine.embeddings, theirs.embeddings) and _equal(student.text_proj, source.text_proj)
    assert all(torch.equal(v, student.image_tower.state_dict()[k]) for k, v in untouched_image.items())
    other = _tiny(2, seed=3)
    proj = {k: v.clone() for k, v in other.text_proj.state_dict().items()}
    assert inherit_text_layers(other, source, (), projection=False)["layers"] == [0, 3]
    assert all(torch.equal(v, other.text_proj.state_dict()[k]) for k, v in proj.items())


@pytest.mark.parametrize("layers, student_layers, hidden, message", [
    ([0], 2, 64, "names 1 layers; the student's text tower has 2"),
    ([0, 4], 2, 64, "the source's text tower has layers 0-3"),
    ((), 2, 32, "does not fit the student's"),
])
def test_towers_that_cannot_take_each_others_weights_are_refused_in_one_line(layers, student_layers, hidden, message):
    with pytest.raises(PipelineError, match=message) as info:
        inherit_text_layers(_tiny(student_layers, hidden=hidden), _tiny(4), layers)
    assert "\n" not in str(info.value)


def test_a_distill_run_starts_its_text_tower_from_the_export_and_records_it(tmp_path):
    manifests = make_dataset(tmp_path / "shapes")
    cache = make_cache(manifests, tmp_path / "cache")
    from pipeline.features.cache import FeatureCache

    source = _tiny(4, seed=5, width=FeatureCache(cache / "train").width)  # the student projects to the teacher's
    source_path = export_student(source, source.config, tmp_path / "teacher" / "student.pt")
    cfg = cfgio.load(DistillConfig, None, [
        f"data.manifest_dir={manifests}", f"data.cache_dir={cache}", f"runs_dir={tmp_path / 'runs'}",
        "student=tiny", "optim.batch_size=8", "optim.epochs=1", "queue.size=24", "data.workers=0", "max_steps=1",
        f"inherit.text_from={source_path}", "inherit.text_layers=[3, 0]", "name=inherited"])
    train(cfg, progress=False)
    run = tmp_path / "runs" / "inherited"
    recorded = json.loads((run / "config.json").read_text())["inherit"]
    assert recorded == {"text_from": str(source_path), "text_layers": [3, 0], "text_projection": True}
    model, meta = load_student_model(run / "export" / "student.pt")
    assert list(meta["recipe"]["inherit"]["text_layers"]) == [3, 0]
    # the student the run starts from: its text tower is the source's, layer for layer
    from pipeline.common.distributed import DistEnv
    from pipeline.distill.trainer import DistillObjective

    start = DistillObjective(cfg, tmp_path / "start", torch.device("cpu"), DistEnv()).model
    theirs = load_student_model(source_path)[0]
    assert _equal(start.text_tower.model.encoder.layer[0], theirs.text_tower.model.encoder.layer[3])
    assert _equal(start.text_tower.model.encoder.layer[1], theirs.text_tower.model.encoder.layer[0])
    assert _equal(start.text_proj, theirs.text_proj)
