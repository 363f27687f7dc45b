"""ONNX export of a student's two towers as separate graphs, and onnxruntime behind the ``Teacher`` interface.

``export_onnx`` writes ``image.onnx`` (input ``pixels`` (B, 3, S, S), the eval transform's output) and
``text.onnx`` (inputs ``input_ids`` and ``attention_mask`` (B, L), any L up to ``max_text_len``), returning
L2-normalised embeddings (B, D) (outputs ``image_embedding``, ``text_embedding``); batch and caption length are dynamic. Preprocessing and tokenisation stay
outside the graphs, as in every CLIP deployment: ``settings.json`` beside them records the transform and
tokenizer settings the export used.

``OnnxStudent`` runs the two graphs with onnxruntime (CPU) and is a ``Teacher``, so the stage-3 code that
times and evaluates a student does the same for its ONNX graphs (``check_parity`` compares them with torch).
"""

from __future__ import annotations

import contextlib
import warnings
from io import StringIO as io_text
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.common import io
from pipeline.common.errors import PipelineError, first_line
from pipeline.students.export import _ImageEncoder, _TextEncoder, load_student_model, unwrap
from pipeline.students.model import StudentModel
from pipeline.teachers.base import Teacher

IMAGE_GRAPH, TEXT_GRAPH, SETTINGS = "image.onnx", "text.onnx", "settings.json"
OPSET = 18
INT8 = "int8"  # graph variant: image.int8.onnx / text.int8.onnx (dynamic int8 quantisation)


def graph_names(variant: str = "") -> tuple[str, str]:
    """(image graph, text graph) file names of a variant ("" = float32, ``int8``)."""
    if variant not in ("", INT8):
        raise PipelineError(f"unknown ONNX graph variant {variant!r}")
    return tuple(g.replace(".onnx", f".{variant}.onnx") if variant else g for g in (IMAGE_GRAPH, TEXT_GRAPH))


def onnx_dir(export_path: str | Path) -> Path:
    """Where the ONNX graphs of an export go: ``<run>/export/onnx/``."""
    return Path(export_path).parent / "onnx"


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise PipelineError(f"ONNX export needs {module}: pip install 'clipdistill[deploy]' "
                            "(onnx, onnxruntime, onnxscript)") from None


def export_onnx(model: StudentModel, out_dir: str | Path) -> tuple[Path, Path]:
    """Write both towers' graphs (module docstring) to ``out_dir``; returns their paths."""
    _require("onnx"), _require("onnxscript")
    model = unwrap(model).eval().cpu()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = model.config.image_size
    pixels = torch.zeros(2, 3, size, size)
    tokens = model.tokenizer(["a", "an example caption"])  # padded to the longer: the mask path is exercised
    batch, length = torch.export.Dim("batch", min=1), torch.export.Dim("length", min=2,
                                                                       max=model.config.max_text_len)
    jobs = [(_ImageEncoder(model), (pixels,), {"pixels": {0: batch}}, ["pixels"], IMAGE_GRAPH, "image_embedding"),
            (_TextEncoder(model), (tokens["input_ids"], tokens["attention_mask"]),
             {"input_ids": {0: batch, 1: length}, "attention_mask": {0: batch, 1: length}},
             ["input_ids", "attention_mask"], TEXT_GRAPH, "text_embedding")]
    written = []
    for module, args, shapes, names, filename, output in jobs:
        path = out_dir / filename
        try:
            with io.atomic_path(path, checksum=True) as tmp, warnings.catch_warnings(), \
                    contextlib.redirect_stdout(io_text()):
                warnings.simplefilter("ignore")  # the exporter's deprecation and shape-naming chatter
                program = torch.onnx.export(module, args, dynamo=True, dynamic_shapes=shapes, input_names=names,
                                            output_names=[output], opset_version=OPSET, verbose=False)
                program.save(str(tmp))
        except PipelineError:
            raise
        except Exception as exc:  # the exporter raises many types; the tower is named, the cause kept short
            raise PipelineError(f"ONNX export of the {filename.split('.')[0]} tower failed: {first_line(exc)}") \
                from None
        written.append(path)
    io.write_json(out_dir / SETTINGS, {"transform": model.transform_settings.to_dict(),
                                       "tokenizer": model.tokenizer.settings(), "embed_dim": model.embed_dim,
                                       "opset": OPSET})
    return written[0], written[1]


# Only matrix products are quantised: onnxruntime's dynamic ConvInteger was slower than float convolutions and lost
# most of the accuracy on EfficientNet's depthwise convolutions (cosine to torch 0.44-0.68, RSUM 320 -> 194 on the
# openmoji test split), while int8 MatMul keeps the text tower at cosine >= 0.99 and makes it about 2x faster.
INT8_OPS = ("MatMul", "Gemm")


def quantize_int8(out_dir: str | Path) -> tuple[Path, Path]:
    """Dynamic int8 quantisation of both graphs' matrix products in ``out_dir`` (weights int8 per channel,
    activations quantised at run time; onnxruntime's ``quantize_dynamic``) -> ``image.int8.onnx``, ``text.int8.onnx``."""
    import logging

    quantization = _require("onnxruntime.quantization")
    out_dir = Path(out_dir)
    written = []
    for src, dst in zip(graph_names(), graph_names(INT8)):
        if not (out_dir / src).is_file():
            raise PipelineError(f"no {src} in {out_dir} to quantise; export the float graphs first")
        io.verify_file(out_dir / src, "ONNX graph")  # quantising a damaged graph would launder it under a new checksum
        with io.atomic_path(out_dir / dst, checksum=True) as tmp, contextlib.redirect_stdout(io_text()), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.disable(logging.WARNING)  # its "run pre-processing first" advice: shapes are already static
            try:
                quantization.quantize_dynamic(str(out_dir / src), str(tmp), per_channel=True,
                                              op_types_to_quantize=list(INT8_OPS),
                                              weight_type=quantization.QuantType.QInt8)
            finally:
                logging.disable(logging.NOTSET)
        written.append(out_dir / dst)
    return written[0], written[1]


class OnnxStudent(Teacher):
    """A student's ONNX graphs run by onnxruntime on the CPU; preprocessing from the torch export it came from."""

    def __init__(self, model: StudentModel, graphs: Path, threads: int | None = None, variant: str = ""):
        ort = _require("onnxruntime")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.files = graph_names(variant)
        missing = [g for g in self.files if not (graphs / g).is_file()]
        if missing:
            flag = " --int8" if variant else ""
            raise PipelineError(f"no ONNX graphs {missing} in {graphs}; run `clipdistill export-onnx{flag}` first")
        for g in self.files:  # the checksum rule: a changed, damaged or unchecked graph is never run
            io.verify_file(graphs / g, "ONNX graph")
        self.image_session, self.text_session = (
            ort.InferenceSession(str(graphs / g), options, providers=["CPUExecutionProvider"]) for g in self.files)
        self.model, self.width, self.graphs = model, model.embed_dim, graphs
        self.name = f"onnx-{model.config.name}" + (f"-{variant}" if variant else "")
        self.device = torch.device("cpu")

    @classmethod
    def load(cls, export_path: str | Path, threads: int | None = None, variant: str = "") -> "OnnxStudent":
        model, _ = load_student_model(export_path)
        return cls(model, onnx_dir(export_path), threads, variant)

    def to(self, device: str | torch.device) -> "OnnxStudent":
        if torch.device(device).type != "cpu":
            raise PipelineError("OnnxStudent runs on the CPU (onnxruntime's CPU provider)")
        return self

    def image_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        return self.model.image_transform(train=False)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.model.tokenizer(texts)

    def _encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.image_session.run(None, {"pixels": pixels.cpu().float().contiguous().numpy()})[0]
        return torch.from_numpy(np.asarray(out))

    def _encode_texts(self, tokens: dict[str, Any]) -> torch.Tensor:
        feed = {k: tokens[k].cpu().numpy().astype(np.int64) for k in ("input_ids", "attention_mask")}
        return torch.from_numpy(np.asarray(self.text_session.run(None, feed)[0]))

    def fingerprint_parts(self) -> dict:
        return {"graphs": {g: io.file_checksum(self.graphs / g) for g in self.files}}


def check_parity(model: StudentModel, onnx: OnnxStudent, images: list[Image.Image], captions: list[str]) -> dict:
    """Cosine between torch and onnxruntime embeddings of the same inputs: min and mean per tower."""
    model = model.eval()
    transform = model.image_transform(train=False)
    pixels = torch.stack([transform(im) for im in images])
    tokens = model.tokenizer(captions)
    with torch.no_grad():
        ref_img = F.normalize(model.image_features(pixels).float(), dim=-1)
        ref_txt = F.normalize(model.text_features(tokens).float(), dim=-1)
    got_img, got_txt = onnx.encode_images(pixels), onnx.encode_texts(tokens)
    cos_img, cos_txt = (ref_img * got_img).sum(-1), (ref_txt * got_txt).sum(-1)
    return {"image_min_cosine": float(cos_img.min()), "image_mean_cosine": float(cos_img.mean()),
            "text_min_cosine": float(cos_txt.min()), "text_mean_cosine": float(cos_txt.mean()),
            "images": len(images), "captions": len(captions)}
