"""The results table of the classification experiment, laid out like the thesis's.

Rows are teacher encoders (one per run), columns the teacher and each student generation, without and
with text; every cell is test top-1 / top-5 (%), or val where a run has no test split.
"""

from __future__ import annotations

from typing import Optional, Sequence


def _cell(metrics: Optional[dict]) -> str:
    if not metrics:
        return "-"
    return f"{metrics['top1']:.1f} / {metrics['top5']:.1f}"


def _score(part: Optional[dict]) -> Optional[dict]:
    if not part:
        return None
    return part.get("test") or part.get("val")


def _arch_name(arch: dict) -> str:
    return arch.get("name") or arch.get("kind", "?")


def classification_table(results: Sequence[dict]) -> str:
    """Markdown table over runs' ``results.json`` contents (see ``pipeline.classify.experiment``)."""
    gens = max([len(r.get("students", {}).get(k, [])) for r in results for k in ("text", "notext")] + [0])
    header = ["Teacher encoder", "student", "text", "few-shot k"]
    for label in ("w/o text", "with text"):
        header += [f"{label}: teacher"] + [f"{label}: gen {g}" for g in range(1, gens + 1)]
    header += ["majority class"]
    lines = [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(["---"] * 4 + ["---:"] * (len(header) - 4)) + " |",
    ]
    for r in results:
        st = r.get("student", {})
        student = (
            f"{_arch_name(st.get('arch', {}))} {st.get('image_size', '?')} px, {st.get('epochs', '?')} ep, "
            f"{st.get('init', 'random')} init"
        )
        row = [f"{r['teacher_name']} ({r['teacher']})", student, r["text_mode"], str(r["few_shot"] or "all")]
        for kind, part in (("notext", "probe"), ("text", "head")):
            students = r.get("students", {}).get(kind, [])
            row += [_cell(_score(r.get(part)))] + [
                _cell(_score(students[g])) if g < len(students) else "-" for g in range(gens)
            ]
        row.append(f"{r['majority_class'].get('test_top1', float('nan')):.1f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


__all__ = ["classification_table"]
