"""`clipdistill` command line: one subcommand per stage. Errors the user can fix print as one line."""

from __future__ import annotations

import sys

from pipeline.common.runtime import tune_cpu_runtime

tune_cpu_runtime()  # before torch is imported by the stage modules below

import typer  # noqa: E402

from pipeline.common.errors import PipelineError  # noqa: E402
from stages.adapt import adapt  # noqa: E402
from stages.build_corpus import build_corpus  # noqa: E402
from stages.build_icons import build_icons  # noqa: E402
from stages.build_lit import build_lit  # noqa: E402
from stages.build_manifest import build_manifest  # noqa: E402
from stages.build_openmoji import build_openmoji  # noqa: E402
from stages.classify import (  # noqa: E402
    class_folder, classify, classify_eval, rephead, self_distill, teacher_tokens,
)
from stages.distill import distill  # noqa: E402
from stages.emoji_labels import emoji_labels  # noqa: E402
from stages.evaluate import evaluate  # noqa: E402
from stages.experiments import experiments  # noqa: E402
from stages.export_onnx import export_onnx  # noqa: E402
from stages.search import search  # noqa: E402
from stages.students import students  # noqa: E402
from stages.verify import verify  # noqa: E402
from stages.teacher_features import teacher_features  # noqa: E402

app = typer.Typer(
    help="Distil large image-text teachers into small dual-encoder students from an offline feature cache.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("build-manifest")(build_manifest)
app.command("build-openmoji")(build_openmoji)
app.command("build-corpus")(build_corpus)
app.command("build-icons")(build_icons)
app.command("build-lit")(build_lit)
app.command("teacher-features")(teacher_features)
app.command("distill")(distill)
app.command("adapt")(adapt)
app.command("eval")(evaluate)
app.command("search")(search)
app.command("emoji-labels")(emoji_labels)
app.command("teacher-tokens")(teacher_tokens)
app.command("rephead")(rephead)
app.command("self-distill")(self_distill)
app.command("classify")(classify)
app.command("classify-eval")(classify_eval)
app.command("class-folder")(class_folder)
app.command("experiments")(experiments)
app.command("students")(students)
app.command("verify")(verify)
app.command("export-onnx")(export_onnx)


def main() -> None:
    try:
        app()
    except PipelineError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.secho("interrupted; rerun the same command to resume", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
