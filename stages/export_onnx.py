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
    io.write_json(out / "parity.json", record)
    worst = min(parity["image_min_cosine"], parity["text_min_cosine"])
    if worst < MIN_COSINE:
        typer.secho(f"ONNX graphs differ from torch: min cosine {worst:.6f} < {MIN_COSINE}", err=True)
        raise typer.Exit(1)
