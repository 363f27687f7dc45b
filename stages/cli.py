"""`clipdistill` command line: one subcommand per stage. Errors the user can fix print as one line."""

from __future__ import annotations

import sys

import typer

from pipeline.errors import PipelineError

app = typer.Typer(
    help="Distil large image-text teachers into small dual-encoder students from an offline feature cache.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    # Imported here so `clipdistill --help` stays fast and a missing optional piece names itself.
    from stages.teacher_features import teacher_features

    app.command("teacher-features")(teacher_features)
    for module, name, func in (
        ("stages.build_manifest", "build-manifest", "build_manifest"),
        ("stages.build_openmoji", "build-openmoji", "build_openmoji"),
        ("stages.build_lit", "build-lit", "build_lit"),
        ("stages.distill", "distill", "distill"),
    ):
        try:
            mod = __import__(module, fromlist=[func])
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        app.command(name)(getattr(mod, func))


_register()


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
