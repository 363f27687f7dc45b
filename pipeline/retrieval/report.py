"""Comparison report over evaluation results (pipeline.retrieval.evaluate): Markdown tables and PNG figures.

The main table follows the published papers' layout (method.md 1.6, section 2): one row per model,
params, latency, image->text and text->image R@1/5/10, RSUM and the student's RSUM as a percentage of
its teacher's. Figures use matplotlib's object-oriented API on its Agg canvas (no pyplot), so using
this module never changes the backend of an interactive session.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pipeline.common.errors import PipelineError
from pipeline.retrieval.evaluate import EMBEDDINGS_FILE, QueryResult, safe_name
from pipeline.data.images import ImageDecodeError, load_rgb
from pipeline.common.runlog import read_metrics
from pipeline.common import io as files

METRICS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
METRIC_LABELS = ("i2t R@1", "i2t R@5", "i2t R@10", "t2i R@1", "t2i R@5", "t2i R@10")
HEADER = ("Model", "Params", "Latency img / txt (ms)", *METRIC_LABELS, "RSUM", "% of teacher RSUM")
IMAGE_COLOUR, TEXT_COLOUR = "tab:blue", "tab:orange"


# ---- tables ---------------------------------------------------------------------------------------


def ordered(results: Sequence[dict]) -> list[dict]:
    """Teachers first (as in the papers' tables), otherwise in the given order."""
    return sorted(results, key=lambda r: r["kind"] != "teacher")


def _protocol(r: dict) -> tuple:
    """Results are comparable when they ran the same split of the same manifest with the same captions."""
    s = r.get("settings", {})
    return s.get("split"), s.get("manifest_hash"), r.get("max_captions_per_image")


def reference_teacher(result: dict, results: Sequence[dict]) -> dict | None:
    """The teacher result a model's RSUM is compared with: same protocol and, when the model records
    its teacher, that teacher's fingerprint. None when there is none (or no single obvious one)."""
    teachers = [r for r in results if r["kind"] == "teacher" and _protocol(r) == _protocol(result)]
    if result.get("teacher_fingerprint"):
        teachers = [r for r in teachers if r.get("teacher_fingerprint") == result["teacher_fingerprint"]]
    return teachers[0] if len(teachers) == 1 else None


def _params(r: dict) -> str:
    total = (r.get("params") or {}).get("total")
    if total is None:
        return "-"
    return f"{total / 1e6:.1f}M" if total >= 1e7 else f"{total / 1e6:.2f}M"


def _latency(r: dict) -> str:
    s = r.get("speed")
    return "-" if not s else f"{1e3 * s['image_latency_s']:.2f} / {1e3 * s['text_latency_s']:.2f}"


def percent_of_teacher(result: dict, results: Sequence[dict]) -> float | None:
    teacher = reference_teacher(result, results)
    if teacher is None or teacher["metrics"]["rsum"] <= 0:
        return None
    return 100.0 * result["metrics"]["rsum"] / teacher["metrics"]["rsum"]


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]], text_columns: int = 1) -> str:
    """A Markdown table; the first ``text_columns`` columns left-aligned, numbers right-aligned."""
    align = ["---"] * text_columns + ["---:"] * (len(header) - text_columns)
    lines = [header, align, *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def comparison_table(results: Sequence[dict]) -> str:
    """The main table (HEADER); recalls in percent with one decimal."""
    rows = []
    for r in ordered(results):
        pct = percent_of_teacher(r, results)
        m = r["metrics"]
        rows.append([f"{r['name']} ({r['kind']})", _params(r), _latency(r), *(f"{m[k]:.1f}" for k in METRICS),
                     f"{m['rsum']:.1f}", "-" if pct is None else f"{pct:.1f}%"])
    return _markdown(HEADER, rows)


def speed_table(results: Sequence[dict]) -> str:
    header = ("Model", "Device", "Image latency (ms)", "Text latency (ms)", "Image items/s", "Text items/s",
              "Params image / text", "GFLOPs image / caption")
    rows = []
    for r in ordered(results):
        s, p, f = r.get("speed"), r.get("params") or {}, r.get("flops")
        towers = [f"{p['image'] / 1e6:.2f}M / {p['text'] / 1e6:.2f}M" if "image" in p else "-",
                  f"{f['image'] / 1e9:.3f} / {f['text'] / 1e9:.3f}" if f else "-"]
        if not s:
            rows.append([r["name"], r.get("device") or "-", "-", "-", "-", "-", *towers])
            continue
        for label, s in ((r["name"], s), (f"{r['name']} (ONNX, onnxruntime)", r.get("speed_onnx"))):
            if s:  # the ONNX row only where `clipdistill export-onnx` wrote the graphs
                rows.append([label, s["device"], f"{1e3 * s['image_latency_s']:.2f}",
                             f"{1e3 * s['text_latency_s']:.2f}", f"{s['image_throughput']:.0f}",
                             f"{s['text_throughput']:.0f}", *towers])
    return _markdown(header, rows, text_columns=2)


def notes(results: Sequence[dict]) -> list[str]:
    """What the numbers mean and where rows are not comparable."""
    out = []
    for protocol in dict.fromkeys(_protocol(r) for r in results):
        group = [r for r in results if _protocol(r) == protocol]
        r = group[0]
        dropped = f", {r['n_captions_dropped']} dropped" if r["n_captions_dropped"] else ""
        names = ", ".join(g["name"] for g in group)
        out.append(f"{names}: dataset {r.get('dataset') or '?'}, split {r['split']}, "
                   f"{r['n_images']} images x {r['n_captions']} captions ({r['captions_policy']}{dropped}).")
        for g in group:  # e.g. images the student's loader could not decode but the teacher's could
            if (g["n_images"], g["n_captions"]) != (r["n_images"], r["n_captions"]):
                out.append(f"{g['name']}: {g['n_images']} images x {g['n_captions']} captions.")
    if len(out) > 1:
        out.append("Rows of different protocols above are not comparable; % of teacher is given within one.")
    for r in results:
        idx = r["index"]["t2i"]
        how = "exact search (FAISS IndexFlatIP)" if r["exact"] else (
            f"approximate search: images {idx['factory']}, captions {r['index']['i2t']['factory']}"
            f" (nprobe {idx.get('nprobe')}, efSearch {idx.get('ef_search')})")
        failed = r["embed_failures"]["count"]
        if failed:
            how += f"; {failed} images failed to decode and are left out"
        if r.get("cost_note") and not r.get("params"):
            how += f"; params/latency not measured ({r['cost_note']})"
        if r.get("text_side"):
            how += (f"; its text side is the teacher's ({r['text_side']['from']}), frozen and carried in its export: "
                    "captions are embedded as the teacher embeds them, and its text cost is the teacher's")
        out.append(f"{r['name']}: {how}.")
    speed = next((r["speed"] for r in results if r.get("speed")), None)
    if speed:
        out.append(f"Latency: median of {speed['settings_repeats']} single-item forward passes after "
                   f"{speed['settings_warmup']} warm-up runs, preprocessed inputs already on the device; "
                   f"throughput at batch {speed['settings_batch']}.")
    out.append("Recall in percent; RSUM is the sum of the six recalls (max 600), method.md section 2.")
    return out


# ---- figures -------------------------------------------------------------------------------------


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def plot_recalls(results: Sequence[dict], path: Path) -> Path:
    """Grouped bars: the six recalls, one bar per model."""
    results = ordered(results)
    fig = Figure(figsize=(max(7.0, 0.6 * len(METRICS) * len(results)), 4.2), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(results)
    x = np.arange(len(METRICS))
    for i, r in enumerate(results):
        values = [r["metrics"][k] for k in METRICS]
        bars = ax.bar(x + (i - (len(results) - 1) / 2) * width, values, width,
                      label=f"{r['name']} ({r['kind']}, RSUM {r['metrics']['rsum']:.1f})")
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    ax.set_xticks(x, METRIC_LABELS)
    ax.set_ylim(0, 110)
    ax.set_ylabel("Recall (%)")
    r0 = results[0]
    ax.set_title(f"Retrieval recall, {r0.get('dataset') or '?'} {r0['split']} split")
    # Below the axes: a legend inside would hide bars whenever recalls are high.
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncols=min(3, len(results)))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_training(run_dir: str | Path, path: Path, title: str) -> Path | None:
    """Train losses per loss name, val RSUM per epoch and balancer weights per window of one run."""
    train, val, bal = (read_metrics(Path(run_dir), kind) for kind in ("train", "val", "balancer"))
    if not (train or val or bal):
        return None
    names = [k[2:] for k in train[0] if k.startswith("w/")] if train else []
    fig = Figure(figsize=(15, 4.3), layout="constrained")
    ax_loss, ax_val, ax_w = fig.subplots(1, 3)
    steps = [r["step"] for r in train]
    for name in names:
        values = np.array([r.get(name, np.nan) for r in train], dtype=float)
        # Log scale: the losses differ by orders of magnitude; a loss of 0 (e.g. CD with an empty
        # queue on the first step) has no log and is left out.
        ax_loss.plot(steps, np.where(values > 0, values, np.nan), label=name)
    if names:
        ax_loss.set_yscale("log")
        ax_loss.legend(fontsize=8)
    ax_loss.set(title="Training losses (raw, before balancing)", xlabel="step", ylabel="loss (log scale)")
    if val:
        ax_val.plot([r["epoch"] + 1 for r in val], [r["rsum"] for r in val], marker="o")
        ax_val.set_xticks(sorted({r["epoch"] + 1 for r in val}))
    else:
        ax_val.text(0.5, 0.5, "no validation split", ha="center", va="center", transform=ax_val.transAxes)
    ax_val.set(title="Validation RSUM", xlabel="epoch", ylabel="RSUM (max 600)")
    for key in [k for k in (bal[0] if bal else {}) if k.startswith("w_")]:
        ax_w.plot([r["step"] for r in bal], [r[key] for r in bal], marker="o", label=key[2:])
    if bal:
        ax_w.axhline(1.0, color="grey", linestyle=":", linewidth=1)
        ax_w.legend(fontsize=8)
    ax_w.set(title="Loss-balancer weights (method.md 1.5)", xlabel="step (end of window)", ylabel="weight")
    for ax in (ax_loss, ax_val, ax_w):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"Training run {title}")
    return _save(fig, path)


def _pca_pairs(d: Any, n_pairs: int, seed: int) -> tuple[np.ndarray, ...] | None:
    """(teacher image, teacher text, student image, student text) rows for up to ``n_pairs`` test pairs:
    one caption per image, only ids the teacher arrays hold, a seeded random sample of images."""
    t_img = {int(i): r for r, i in enumerate(d["teacher_image_ids"])}
    t_txt = {int(s): r for r, s in enumerate(d["teacher_sample_ids"])}
    picked: dict[int, tuple[int, int]] = {}  # student image row -> (student text row, ...)
    for j, (sid, img) in enumerate(zip(d["sample_ids"].tolist(), d["text_image_idx"].tolist())):
        if img not in picked and sid in t_txt and int(d["image_ids"][img]) in t_img:
            picked[img] = (j, sid)
    if not picked:
        return None
    rows = sorted(picked)
    rows = np.random.default_rng(seed).choice(rows, size=min(n_pairs, len(rows)), replace=False)
    rows = sorted(rows.tolist())
    s_txt = [picked[i][0] for i in rows]
    return (d["teacher_image_emb"][[t_img[int(d["image_ids"][i])] for i in rows]].astype(np.float32),
            d["teacher_text_emb"][[t_txt[picked[i][1]] for i in rows]].astype(np.float32),
            d["image_emb"][rows], d["text_emb"][s_txt])


def plot_embedding_pca(eval_dir: str | Path, path: Path, title: str, n_pairs: int = 150,
                       seed: int = 0) -> Path | None:
    """3-D PCA of teacher vs student embeddings of the same test pairs, in one joint basis.

    Fitting the basis on all four point sets together puts both spaces on the same axes (the student
    projects into the teacher's space, method.md preamble), so the panels can be compared directly.
    None when the evaluation saved no teacher embeddings (evaluated without the teacher cache).
    """
    with np.load(Path(eval_dir) / EMBEDDINGS_FILE) as d:
        if "teacher_image_ids" not in d.files:
            return None
        sets = _pca_pairs(d, n_pairs, seed)
    if sets is None:
        return None
    n = len(sets[0])
    x = np.concatenate(sets).astype(np.float64)
    centred = x - x.mean(axis=0)
    _, sv, vt = np.linalg.svd(centred, full_matrices=False)
    k = min(3, vt.shape[0])
    proj = np.zeros((len(x), 3))
    proj[:, :k] = centred @ vt[:k].T
    explained = np.zeros(3)
    explained[:k] = (sv ** 2 / max((sv ** 2).sum(), 1e-12))[:k]
    t_img, t_txt, s_img, s_txt = (proj[i * n : (i + 1) * n] for i in range(4))
    lo, hi = proj.min(axis=0), proj.max(axis=0)

    def cos(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.mean(np.sum(a * b, axis=1)))

    ti, tt, si, st = sets
    fig = Figure(figsize=(13, 6), layout="constrained")
    for pos, (label, img, txt, c) in enumerate((("Teacher (cached)", t_img, t_txt, cos(ti, tt)),
                                                (f"Student {title}", s_img, s_txt, cos(si, st)))):
        ax = fig.add_subplot(1, 2, pos + 1, projection="3d")
        for i, (a, b) in enumerate(zip(img, txt)):  # each image joined to its caption: shows the modality gap
            ax.plot(*zip(a, b), color="grey", alpha=0.3, linewidth=0.6,
                    label="image-caption pair" if i == 0 else None)
        ax.scatter(*img.T, color=IMAGE_COLOUR, marker="o", s=14, label="images")
        ax.scatter(*txt.T, color=TEXT_COLOUR, marker="^", s=14, label="captions")
        ax.set(xlim=(lo[0], hi[0]), ylim=(lo[1], hi[1]), zlim=(lo[2], hi[2]))
        ax.set_xlabel(f"PC1 ({explained[0]:.0%})")
        ax.set_ylabel(f"PC2 ({explained[1]:.0%})")
        ax.set_zlabel(f"PC3 ({explained[2]:.0%})")
        ax.set_title(f"{label}\nmean cos(image, its caption) = {c:.2f}", fontsize=10)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"PCA of {n} test image-caption pairs, joint basis; student vs teacher cosine: "
                 f"images {cos(si, ti):.2f}, captions {cos(st, tt):.2f}")
    return _save(fig, path)


# ---- the report ----------------------------------------------------------------------------------


@dataclass
class Report:
    markdown: Path
    figures: list[Path]
    table: str


def write_report(results: Sequence[dict], out_dir: str | Path) -> Report:
    """``out_dir/report.md`` and ``out_dir/figures/*.png`` for results read with ``read_result``."""
    if not results:
        raise PipelineError("no evaluation results to report")
    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    figures = [plot_recalls(results, fig_dir / "recall.png")]
    for r in ordered(results):
        if r["kind"] != "student":
            continue
        name = safe_name(r["name"])
        if r.get("run_dir"):
            p = plot_training(r["run_dir"], fig_dir / f"training-{name}.png", r["name"])
            figures += [p] if p else []
        if r.get("eval_dir"):
            p = plot_embedding_pca(r["eval_dir"], fig_dir / f"pca-{name}.png", r["name"])
            figures += [p] if p else []
    table = comparison_table(results)
    sections = [
        "# Retrieval evaluation", "", table, "", *(f"- {n}" for n in notes(results)), "",
        "## Speed and size", "", speed_table(results), "", "## Figures", "",
        *(f"![{p.stem}](figures/{p.name})" for p in figures), "",
    ]
    md = files.write_text(out_dir / "report.md", "\n".join(sections))
    return Report(md, figures, table)


# ---- search results page -------------------------------------------------------------------------


def _thumbnail(location: str, size: int, cache: dict[str, str]) -> str:
    """An <img> tag with the image as an inline base64 PNG, so the page works when moved."""
    if location not in cache:
        try:
            img = load_rgb(location)
            img.thumbnail((size, size))
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            data = base64.b64encode(buf.getvalue()).decode()
            alt = html.escape(Path(location).name)
            cache[location] = f'<img src="data:image/png;base64,{data}" alt="{alt}">'
        except ImageDecodeError as exc:
            cache[location] = f'<span class="bad">{html.escape(str(exc))}</span>'
    return cache[location]


def search_page(results: Sequence[QueryResult], path: str | Path, title: str, thumb: int = 128) -> Path:
    """An HTML page with each query and its hits as thumbnails (images) or captions with their images."""
    thumbs: dict[str, str] = {}
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em} .hits{display:flex;flex-wrap:wrap;gap:12px}"
             " figure{margin:0;width:%dpx;font-size:12px} .gt{outline:3px solid #2a2}"
             " .bad{color:#a22}</style>" % (thumb + 8), f"<h1>{html.escape(title)}</h1>"]
    for q in results:
        if q.kind == "image":
            parts.append(f"<h2>Image query: {_thumbnail(q.query, thumb, thumbs)}</h2><div class='hits'>")
        else:
            parts.append(f"<h2>Caption query: &ldquo;{html.escape(q.query)}&rdquo;</h2><div class='hits'>")
        for h in q.hits:
            text = f"<br>{html.escape(h.caption)}" if h.caption is not None else ""
            cls = " class='gt'" if h.relevant else ""
            parts.append(f"<figure{cls}>{_thumbnail(h.location, thumb, thumbs)}<figcaption>#{h.rank} "
                         f"score {h.score:.3f}{text}</figcaption></figure>")
        parts.append("</div>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))
    return path
