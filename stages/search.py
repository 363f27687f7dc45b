"""Query a saved evaluation: top-K images for a caption, or top-K captions for an image."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipeline.common.errors import PipelineError
from stages.common import TRUST_UNCHECKED, resolve_device


def _print(result, model: str) -> None:
    what = "images" if result.kind == "text" else "captions"
    query = f'"{result.query}"' if result.kind == "text" else result.query
    typer.echo(f"{result.kind} query {query} -> top {len(result.hits)} {what} ({model}, query embedding: "
               f"{result.embedded_by}); * = ground truth")
    for h in result.hits:
        mark = " *" if h.relevant else ""
        if h.caption is None:
            typer.echo(f"  {h.rank:>3}. {h.score:7.4f}  image {h.image_id}  {h.location}{mark}")
        else:
            typer.echo(f"  {h.rank:>3}. {h.score:7.4f}  \"{h.caption}\"  (image {h.image_id}){mark}")


def search(
    index_dir: Path = typer.Argument(..., help="Evaluation folder of one model, e.g. artifacts/eval/<run>."),
    query: Optional[str] = typer.Argument(None, help="A caption, or the path of an image."),
    k: int = typer.Option(5, "--k", "-k", help="Results per query."),
    html: Optional[Path] = typer.Option(None, help="Also write an HTML page with thumbnails of the results."),
    queries_file: Optional[Path] = typer.Option(
        None, help="Text file with one query (caption or image path) per line."),
    device: str = typer.Option("cpu", help="Device for embedding new queries: cpu, cuda, cuda:N or auto."),
    trust_unchecked: bool = TRUST_UNCHECKED,
) -> None:
    """Search the image and caption galleries saved by `eval` with a caption or an image."""
    from pipeline.retrieval.evaluate import EvalIndex
    from pipeline.retrieval.report import search_page

    queries = [query] if query else []
    if queries_file is not None:
        if not queries_file.is_file():
            raise PipelineError(f"queries file not found: {queries_file}")
        queries += [line.strip() for line in queries_file.read_text().splitlines() if line.strip()]
    if not queries:
        raise PipelineError("give a query (caption or image path) or --queries-file")
    if k < 1:
        raise PipelineError(f"k must be >= 1, got {k}")
    index = EvalIndex(index_dir, resolve_device(device))
    results = [index.search(q, k) for q in queries]
    for result in results:
        _print(result, index.name)
    if html is not None:
        typer.echo(f"html: {search_page(results, html, f'{index.name}: top {k} results')}")
