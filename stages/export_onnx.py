"""Deploy: a student's two towers as ONNX graphs, checked against torch and timed under onnxruntime."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from stages.common import TRUST_UNCHECKED


def export_onnx(
    export: Path = typer.Argument(..., help="A student export, e.g. runs/<name>/export/student.pt."),
    manifest: Optional[Path] = typer.Option(
        None, help="Check and time on this manifest's images and captions (e.g. data/openmoji/test.parquet); "
                   "default: generated images and a few captions."),
    items: int = typer.Option(64, help="Images and captions used for the parity check and the timing."),
    repeats: int = typer.Option(20, help="Single-item forward passes per latency median (0: no timing)."),
    int8: bool = typer.Option(False, help="Also write dynamically quantised int8 graphs (*.int8.onnx): their "
                              "cosine to torch, latency and, with --manifest, the recall cost on the whole split."),
    trust_unchecked: bool = TRUST_UNCHECKED,
) -> None:
    """Write <export dir>/onnx/{image,text}.onnx (dynamic batch), check them against torch (cosine >= 0.999 on
    every item, else exit 1) and print the CPU latency of onnxruntime next to torch's. `eval` then reports both."""
    from pipeline.retrieval.onnx_check import MIN_COSINE, check_onnx

    check = check_onnx(export, manifest, items, repeats, int8)
    r, (image_path, text_path) = check.record, check.graphs
    typer.echo(f"wrote {image_path} and {text_path}")
    p = r["parity"]
    typer.echo(f"parity on {r['source']}: cosine to torch min {p['image_min_cosine']:.6f} (image), "
               f"{p['text_min_cosine']:.6f} (text)")
    for label in ("torch", "onnxruntime"):
        if label in r:
            _speed(label, r[label])
    if check.int8_graphs is not None:
        _int8(r["int8"], *check.int8_graphs, manifest)
    if check.worst_cosine < MIN_COSINE:
        typer.secho(f"ONNX graphs differ from torch: min cosine {check.worst_cosine:.6f} < {MIN_COSINE}", err=True)
        raise typer.Exit(1)


def _speed(label: str, s: dict) -> None:
    typer.echo(f"  {label:<12} latency image {1e3 * s['image_latency_s']:.2f} ms, text "
               f"{1e3 * s['text_latency_s']:.2f} ms; throughput {s['image_throughput']:.0f} / "
               f"{s['text_throughput']:.0f} items/s ({s['device']})")


def _int8(r: dict, image_path: Path, text_path: Path, manifest: Optional[Path]) -> None:
    typer.echo(f"wrote {image_path} and {text_path} (" + ", ".join(f"{k} {v / 2**20:.1f} MiB"
                                                                  for k, v in r["bytes"].items()) + ")")
    p = r["parity"]
    typer.echo(f"int8 cosine to torch: min {p['image_min_cosine']:.4f} / mean {p['image_mean_cosine']:.4f}"
               f" (image), min {p['text_min_cosine']:.4f} / mean {p['text_mean_cosine']:.4f} (text)")
    if "onnxruntime" in r:
        _speed("int8", r["onnxruntime"])
    if "recall" in r:
        rsum = r["recall"]
        typer.echo(f"recall cost of int8 on {manifest}: RSUM {rsum['int8']['rsum']:.1f} vs "
                   f"{rsum['float32']['rsum']:.1f} for the float32 graphs "
                   f"({rsum['int8']['rsum'] - rsum['float32']['rsum']:+.1f})")
