"""ONNX export through the real command: two graphs with dynamic batch and caption length, parity with torch
on real inputs, and onnxruntime latency next to torch's in stage 3's record and report."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch

from pipeline.data.manifest import Manifest
from pipeline.retrieval.evaluate import SpeedSettings, evaluate_student
from pipeline.retrieval.report import speed_table
from pipeline.students.export import load_student_model
from pipeline.students.onnx import OnnxStudent, onnx_dir
from tests.clirun import clipdistill
from tests.gen_cache import make_dataset


pytest.importorskip("onnxruntime")


def run(*args) -> subprocess.CompletedProcess:
    return clipdistill(*args)  # in this process (tests/clirun.py): no fresh interpreter per command


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    data = make_dataset(root / "data", n_images=15)
    result = run("distill", "--name", "s", "--no-progress", "--set", f"data.manifest_dir={data}",
                 "--set", f"runs_dir={root / 'runs'}", "--set", "student=tiny", "--set", "optim.batch_size=4",
                 "--set", "optim.epochs=1", "--set", "data.workers=0", "--set", "data.cache_dir=",
                 "--set", "losses.cd=false", "--set", "losses.fd=false", "--set", "losses.sd=false",
                 "--set", "losses.hnd=false", "--set", "losses.pair=true")
    assert result.returncode == 0, result.stderr[-2000:]
    export = root / "runs" / "s" / "export" / "student.pt"
    result = run("export-onnx", export, "--manifest", data / "test.parquet", "--items", 8, "--repeats", 2)
    assert result.returncode == 0, result.stderr[-2000:]
    return data, export, result.stdout


def test_graphs_match_torch_on_real_inputs_with_any_batch_and_caption_length(exported):
    data, export, stdout = exported
    parity = json.loads((onnx_dir(export) / "parity.json").read_text())
    assert parity["parity"]["image_min_cosine"] >= 0.999 and parity["parity"]["text_min_cosine"] >= 0.999
    assert "of " + str(data / "test.parquet") in parity["source"] and "onnxruntime  latency" in stdout
    model, _ = load_student_model(export)
    onnx = OnnxStudent(model, onnx_dir(export))
    size = model.config.image_size
    for batch in (1, 5):  # dynamic batch
        pixels = torch.rand(batch, 3, size, size)
        with torch.no_grad():
            ref = torch.nn.functional.normalize(model.image_features(pixels), dim=-1)
        np.testing.assert_allclose(onnx.encode_images(pixels).numpy(), ref.numpy(), atol=1e-4)
    for captions in (["a"], ["a red circle", "a much longer caption with many more words in it than the other"]):
        tokens = model.tokenizer(captions)  # a different padded length each time
        with torch.no_grad():
            ref = torch.nn.functional.normalize(model.text_features(tokens), dim=-1)
        np.testing.assert_allclose(onnx.encode_texts(tokens).numpy(), ref.numpy(), atol=1e-4)


def test_eval_reports_onnxruntime_latency_next_to_torch(exported):
    data, export, _ = exported
    record = evaluate_student(export, Manifest.read(data / "test.parquet"), workers=0,
                              speed=SpeedSettings(repeats=2, warmup=1, batch=4, batch_repeats=1))
    assert record["speed"]["image_latency_s"] > 0 and record["speed_onnx"]["image_latency_s"] > 0
    table = speed_table([record])
    assert f"| {record['name']} (ONNX, onnxruntime) |" in table and f"| {record['name']} |" in table


def test_a_missing_export_is_a_one_line_error(tmp_path):
    result = run("export-onnx", tmp_path / "nope.pt")
    assert result.returncode == 2 and "nope.pt" in result.stderr and "Traceback" not in result.stderr


def test_int8_graphs_quantise_matrix_products_and_report_their_recall_cost(exported, tmp_path):
    import shutil

    import onnx

    data, export, _ = exported
    copy = tmp_path / "export" / "student.pt"  # its own folder: the module's other tests read the float graphs
    copy.parent.mkdir()
    shutil.copy(export, copy)
    shutil.copy(f"{export}.blake2b", f"{copy}.blake2b")  # an export travels with its checksum
    result = run("export-onnx", copy, "--manifest", data / "test.parquet", "--items", 8, "--repeats", 2, "--int8")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "recall cost of int8" in result.stdout and "WARNING" not in result.stderr
    record = json.loads((onnx_dir(copy) / "parity.json").read_text())["int8"]
    assert set(record["recall"]) == {"float32", "int8"} and record["recall"]["int8"]["rsum"] > 0
    assert record["parity"]["text_min_cosine"] > 0.95 and record["parity"]["image_min_cosine"] > 0.95
    for name in ("image.int8.onnx", "text.int8.onnx"):
        ops = {node.op_type for node in onnx.load(str(onnx_dir(copy) / name)).graph.node}
        assert "ConvInteger" not in ops  # convolutions stay float (see INT8_OPS)
    text_ops = {node.op_type for node in onnx.load(str(onnx_dir(copy) / "text.int8.onnx")).graph.node}
    assert text_ops & {"MatMulInteger", "DynamicQuantizeMatMul"}
    int8 = OnnxStudent.load(copy, variant="int8")
    tokens = int8.tokenize(["a red circle"])
    assert int8.encode_texts(tokens).shape == (1, int8.width)


def test_graphs_carry_checksums_and_a_damaged_or_unchecked_graph_is_never_run(exported, tmp_path, monkeypatch):
    import shutil

    from pipeline.common import io
    from pipeline.common.errors import PipelineError

    monkeypatch.delenv(io.TRUST_ENV, raising=False)
    _, export, _ = exported
    model, _ = load_student_model(export)
    graphs = tmp_path / "onnx"  # a copy (graphs with their checksums): the module's fixture stays intact
    shutil.copytree(onnx_dir(export), graphs)
    OnnxStudent(model, graphs)
    image = graphs / "image.onnx"
    good = image.read_bytes()
    data = bytearray(good)
    data[len(data) // 2] ^= 0x01
    image.write_bytes(bytes(data))
    with pytest.raises(PipelineError, match=f"damaged ONNX graph {image}: content differs"):
        OnnxStudent(model, graphs)
    image.write_bytes(good[: len(good) // 2])
    with pytest.raises(PipelineError, match="damaged ONNX graph"):
        OnnxStudent(model, graphs)
    image.write_bytes(good)
    io.checksum_path(image).unlink()
    with pytest.raises(PipelineError, match=f"refusing ONNX graph {image}: no checksum recorded.*--trust-unchecked"):
        OnnxStudent(model, graphs)
    result = run("verify", graphs)
    assert result.returncode == 1 and f"unchecked {image}" in result.stdout and f"ok        {graphs / 'text.onnx'}" \
        in result.stdout
    monkeypatch.setenv(io.TRUST_ENV, "1")
    OnnxStudent(model, graphs)
