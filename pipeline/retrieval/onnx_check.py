"""A student's ONNX graphs checked against torch: cosine parity, onnxruntime latency next to torch's, and for
int8 graphs the recall cost on a whole split (`clipdistill export-onnx`).

It sits in retrieval, not next to the graphs in students/, because its timing and recall are stage 3's
(measure_speed, retrieval), which students/ may not import.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pipeline.common import io
from pipeline.common.errors import PipelineError

MIN_COSINE = 0.999  # the float32 graphs' smallest cosine to torch on every checked item


@dataclass
class OnnxCheck:
    record: dict  # what <export dir>/onnx/parity.json holds
    graphs: tuple[Path, Path]  # image, text
    int8_graphs: Optional[tuple[Path, Path]] = None

    @property
    def worst_cosine(self) -> float:
        return min(self.record["parity"]["image_min_cosine"], self.record["parity"]["text_min_cosine"])


def _inputs(manifest: Optional[Path], items: int):
    """(images, captions, image locations, source) to check and time with: the manifest's first items, or
    generated images and captions (no locations: nothing to time)."""
    import numpy as np
    from PIL import Image

    from pipeline.data.images import ImageDecodeError, load_rgb
    from pipeline.data.manifest import Manifest

    if manifest is None:
        rng = np.random.default_rng(0)
        images = [Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)) for _ in range(items)]
        captions = [f"generated caption number {i} with a few words" for i in range(items)]
        return images, captions, [], f"{items} generated images and captions"
    m = Manifest.read(manifest)
    _, image_paths = m.unique_images()
    locations = [m.resolve(p) for p in image_paths[:items]]
    captions = m.table.column("caption").to_pylist()[:items]
    images = []
    for loc in locations:
        try:
            images.append(load_rgb(loc))
        except ImageDecodeError:
            continue
    return images, captions, locations, f"{len(images)} images and {len(captions)} captions of {manifest}"


def check_onnx(export: Path, manifest: Optional[Path] = None, items: int = 64, repeats: int = 20,
               int8: bool = False) -> OnnxCheck:
    """Write <export dir>/onnx/{image,text}.onnx (dynamic batch), their cosine to torch and (with a manifest
    and ``repeats``) both runtimes' latency; ``int8`` adds quantised graphs (_int8). Writes parity.json."""
    from pipeline.retrieval.evaluate import SpeedSettings, measure_speed
    from pipeline.students.export import StudentEncoder, load_student_model
    from pipeline.students.onnx import OnnxStudent, check_parity, export_onnx, onnx_dir

    if items < 1:
        raise PipelineError("--items must be at least 1")
    model, _ = load_student_model(export)
    out = onnx_dir(export)
    graphs = export_onnx(model, out)
    images, captions, locations, source = _inputs(manifest, items)
    if not images or not captions:
        raise PipelineError(f"no decodable image or caption in {manifest} to check the graphs with")
    onnx = OnnxStudent(model, out)
    record = {"parity": check_parity(model, onnx, images, captions), "source": source}
    if repeats > 0 and locations:
        settings = SpeedSettings(repeats=repeats, batch=min(items, 64))
        record.update(torch=measure_speed(StudentEncoder(model), locations, captions, settings),
                      onnxruntime=measure_speed(onnx, locations, captions, settings))
    check = OnnxCheck(record, graphs)
    if int8:
        record["int8"], check.int8_graphs = _int8(model, onnx, out, images, captions, locations, manifest, repeats,
                                                  items)
    io.write_json(out / "parity.json", record)
    return check


def _int8(model, onnx, out: Path, images, captions, locations, manifest: Optional[Path], repeats: int,
          items: int):
    """Quantise both graphs to int8: their size, cosine to torch, latency, and the RSUM of float32 vs int8
    graphs on the whole manifest split (the recall cost of quantising); ``onnx`` is the float32 graphs, already
    loaded and checked. Returns (record, graph paths)."""
    from pipeline.data.manifest import Manifest
    from pipeline.features.encode import embed_manifest
    from pipeline.retrieval.evaluate import SpeedSettings, measure_speed, retrieval
    from pipeline.students.onnx import INT8, OnnxStudent, check_parity, quantize_int8

    image_path, text_path = quantize_int8(out)
    sizes = {p.name: p.stat().st_size for p in (out / "image.onnx", out / "text.onnx", image_path, text_path)}
    quantised = OnnxStudent(model, out, variant=INT8)
    record = {"parity": check_parity(model, quantised, images, captions), "bytes": sizes}
    if repeats > 0 and locations:
        settings = SpeedSettings(repeats=repeats, batch=min(items, 64))
        record["onnxruntime"] = measure_speed(quantised, locations, captions, settings)
    if manifest is not None:
        split = Manifest.read(manifest)
        rsum = {}
        for label, encoder in (("float32", onnx), ("int8", quantised)):
            metrics, _ = retrieval(embed_manifest(encoder, split, workers=0))
            rsum[label] = {k: round(float(metrics[k]), 3) for k in ("rsum", "i2t_r1", "t2i_r1")}
        record["recall"] = rsum
    return record, (image_path, text_path)
