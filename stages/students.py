"""List the student presets: towers, where their weights come from, parameters and GFLOPs per item."""

from __future__ import annotations

import typer


def students(
    embed_dim: int = typer.Option(512, help="Projection width D (= the teacher's width) the counts assume."),
) -> None:
    """Print every student preset as a Markdown table (architecture only: nothing is downloaded)."""
    from pipeline.students.catalogue import preset_table

    typer.echo(preset_table(embed_dim))
