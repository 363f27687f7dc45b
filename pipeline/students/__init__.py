"""Student dual encoders for stage 2: configs and presets, towers, preprocessing, cost, export.

    from pipeline.students import get_preset, build_student
    model = build_student(get_preset("small", embed_dim=teacher_width))
    s_img, s_txt = model(pixels, model.tokenizer(captions))
"""

from pipeline.students.config import (
    DEFAULT_PRESET, MINILM, PRESETS, ImageTowerSpec, StudentConfig, TextTowerSpec, get_preset,
)
from pipeline.students.export import (
    StudentEncoder, export_student, export_torchscript, load_student, load_student_model, unwrap,
)
from pipeline.students.measure import TEXT_LEN, count_params, describe, flops_per_item, lit_teacher_cost
from pipeline.students.model import StudentModel, build_student
from pipeline.students.preprocess import ImageTransform, TextTokenizer, TransformSettings

__all__ = [
    "DEFAULT_PRESET", "MINILM", "PRESETS", "ImageTowerSpec", "TextTowerSpec", "StudentConfig", "get_preset",
    "StudentModel", "build_student", "ImageTransform", "TextTokenizer", "TransformSettings",
    "count_params", "flops_per_item", "describe", "lit_teacher_cost", "TEXT_LEN",
    "StudentEncoder", "export_student", "load_student", "load_student_model", "export_torchscript", "unwrap",
]
