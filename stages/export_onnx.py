"""Deploy: a student's two towers as ONNX graphs, checked against torch and timed under onnxruntime."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipeline.common.errors import PipelineError

MIN_COSINE = 0.999


def export_onnx(
    export: Path = typer.Argument(..., help="A student export, e.g. runs/<name>/export/student.pt."),
    manifest: Optional[Path] = typer.Option(
        None, help="Check and time on this manifest's images and captions (e.g. data/openmoji/test.parquet); "
                   "default: generated images and a few captions."),
    items: int = typer.Option(64, help="Images and captions used for the parity check and the timing."),
    repeats: int = typer.Option(20, help="Single-item forward passes per latency median (0: no timing)."),
    int8: bool = typer.Option(False, help="Also write dynamically quantised int8 graphs (*.int8.onnx): their "
                              "cosine to torch, latency and, with --manifest, the recall cost on the whole split."),
) -> None:
    """Write <export dir>/onnx/{image,text}.onnx (dynamic batch), check them against torch (cosine >= 0.999 on
    every item, else exit 1) and print the CPU latency of onnxruntime next to torch's. `eval` then reports both."""
    import numpy as np
    from PIL import Image

    from pipeline.common import io
    from pipeline.data.images import ImageDecodeError, load_rgb
    from pipeline.data.manifest import Manifest
    from pipeline.retrieval.evaluate import SpeedSettings, measure_speed
    from pipeline.students.export import StudentEncoder, load_student_model
    from pipeline.students.onnx import OnnxStudent, check_parity, export_onnx as write_graphs, onnx_dir

    if items < 1:
        raise PipelineError("--items must be at least 1")
    model, _ = load_student_model(export)
    out = onnx_dir(export)
    image_path, text_path = write_graphs(model, out)
    typer.echo(f"wrote {image_path} and {text_path}")

    locations: list[str] = []
    if manifest is not None:
        m = Manifest.read(manifest)
        _, paths = m.unique_images()
        locations = [m.resolve(p) for p in paths[:items]]
        captions = m.table.column("caption").to_pylist()[:items]
        images = []
        for loc in locations:
            try:
                images.append(load_rgb(loc))
            except ImageDecodeError:
                continue
        source = f"{len(images)} images and {len(captions)} captions of {manifest}"
    else:
        rng = np.random.default_rng(0)
        images = [Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)) for _ in range(items)]
        captions = [f"generated caption number {i} with a few words" for i in range(items)]
        source = f"{items} generated images and captions"
    if not images or not captions:
        raise PipelineError(f"no decodable image or caption in {manifest} to check the graphs with")
    onnx = OnnxStudent(model, out)
    parity = check_parity(model, onnx, images, captions)
    typer.echo(f"parity on {source}: cosine to torch min {parity['image_min_cosine']:.6f} (image), "
               f"{parity['text_min_cosine']:.6f} (text)")
    record = {"parity": parity, "source": source}
    if repeats > 0 and locations:
        settings = SpeedSettings(repeats=repeats, batch=min(items, 64))
        torch_speed = measure_speed(StudentEncoder(model), locations, captions, settings)
        ort_speed = measure_speed(onnx, locations, captions, settings)
        record.update(torch=torch_speed, onnxruntime=ort_speed)
        for label, s in (("torch", torch_speed), ("onnxruntime", ort_speed)):
            typer.echo(f"  {label:<12} latency image {1e3 * s['image_latency_s']:.2f} ms, text "
                       f"{1e3 * s['text_latency_s']:.2f} ms; throughput {s['image_throughput']:.0f} / "
                       f"{s['text_throughput']:.0f} items/s ({s['device']})")
    if int8:
        record["int8"] = _int8(model, out, images, captions, locations, manifest, repeats, items)
    io.write_json(out / "parity.json", record)
    worst = min(parity["image_min_cosine"], parity["text_min_cosine"])
    if worst < MIN_COSINE:
        typer.secho(f"ONNX graphs differ from torch: min cosine {worst:.6f} < {MIN_COSINE}", err=True)
        raise typer.Exit(1)


def _int8(model, out: Path, images, captions, locations, manifest: Optional[Path], repeats: int, items: int) -> dict:
    """Quantise both graphs to int8; cosine to torch, latency, and the RSUM of float32 vs int8 graphs on the
    whole --manifest split (the recall cost of quantising)."""
    from pipeline.data.manifest import Manifest
    from pipeline.features.encode import embed_manifest
    from pipeline.retrieval.evaluate import SpeedSettings, measure_speed, retrieval
    from pipeline.students.onnx import INT8, OnnxStudent, check_parity, quantize_int8

    image_path, text_path = quantize_int8(out)
    sizes = {p.name: p.stat().st_size for p in (out / "image.onnx", out / "text.onnx", image_path, text_path)}
    typer.echo(f"wrote {image_path} and {text_path} (" + ", ".join(f"{k} {v / 2**20:.1f} MiB"
                                                                  for k, v in sizes.items()) + ")")
    quantised = OnnxStudent(model, out, variant=INT8)
    parity = check_parity(model, quantised, images, captions)
    typer.echo(f"int8 cosine to torch: min {parity['image_min_cosine']:.4f} / mean {parity['image_mean_cosine']:.4f}"
               f" (image), min {parity['text_min_cosine']:.4f} / mean {parity['text_mean_cosine']:.4f} (text)")
    record = {"parity": parity, "bytes": sizes}
    if repeats > 0 and locations:
        speed = measure_speed(quantised, locations, captions, SpeedSettings(repeats=repeats, batch=min(items, 64)))
        record["onnxruntime"] = speed
        typer.echo(f"  {'int8':<12} latency image {1e3 * speed['image_latency_s']:.2f} ms, text "
                   f"{1e3 * speed['text_latency_s']:.2f} ms; throughput {speed['image_throughput']:.0f} / "
                   f"{speed['text_throughput']:.0f} items/s ({speed['device']})")
    if manifest is not None:
        split = Manifest.read(manifest)
        rsum = {}
        for label, encoder in (("float32", OnnxStudent(model, out)), ("int8", quantised)):
            metrics, _ = retrieval(embed_manifest(encoder, split, workers=0))
            rsum[label] = {k: round(float(metrics[k]), 3) for k in ("rsum", "i2t_r1", "t2i_r1")}
        record["recall"] = rsum
        typer.echo(f"recall cost of int8 on {manifest}: RSUM {rsum['int8']['rsum']:.1f} vs "
                   f"{rsum['float32']['rsum']:.1f} for the float32 graphs "
                   f"({rsum['int8']['rsum'] - rsum['float32']['rsum']:+.1f})")
    return record
