"""The README's (and a few RESULTS findings') headline numbers against docs/results/summary.json.

summary.json is written by the experiment runner from the runs' result files (pipeline/experiments/tables.py and
classify_tables.py); prose is written by hand. Each check below names a phrase of the document, with ``{}`` where
a number stands, and for each ``{}`` the summary.json key path and format it must equal. A check fails when the
phrase is gone (reworded: update the check with the prose) or when a number in it differs from summary.json.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUMMARY = ROOT / "docs" / "results" / "summary.json"
NUMBER = r"[-+]?\d[\d,]*(?:\.\d+)?(?: ± \d+(?:\.\d+)?)?"


def get(summary: dict, path: tuple) -> object:
    node = summary["sweeps"]
    for key in path:
        if isinstance(node, list) and isinstance(key, str):  # paired differences: a list of {"name": ...}
            node = next((x for x in node if x.get("name") == key), None)
        elif isinstance(node, list):
            node = node[key]
        else:
            node = node.get(key) if isinstance(node, dict) else None
        if node is None:
            raise KeyError(f"summary.json has no {' / '.join(map(str, path))} (stopped at {key!r})")
    return node


# formats: each takes the summary and returns the text the document must show
def _stats(entry: dict) -> tuple[float, float]:
    """Mean and sample std from the per-seed values, as the tables compute them."""
    values = entry["values"]
    m = statistics.fmean(values)
    return m, (statistics.stdev(values) if len(values) > 1 else 0.0)


def _roundings(x: float, digits: int, sign: bool = False) -> set[str]:
    """How a number stored to 3 decimals may print: summary.json rounds each seed's value to 3 decimals, so a
    mean at a rounding boundary (176.65) may have printed either way (the table's 176.6) from the exact values."""
    return {f"{x + e:{'+' if sign else ''}.{digits}f}" for e in (-5e-4, 0.0, 5e-4)}


def pm(*path, digits=1):
    """``mean ± std`` of a stats entry."""
    def spec(s):
        m, sd = _stats(get(s, path))
        return {f"{a} ± {b}" for a in _roundings(m, digits) for b in _roundings(sd, digits)}
    return spec


def mean(*path, digits=1, sign=False):
    return lambda s: _roundings(_stats(get(s, path))[0], digits, sign)


def val(*path, digits=1):
    return lambda s: f"{get(s, path):.{digits}f}"


def gflops(*path):
    """FLOPs stored as counts, printed as GFLOPs to 3 decimals."""
    return lambda s: f"{get(s, path) / 1e9:.3f}"


def ratio(a, b, digits=2):
    return lambda s: f"{a(s) / b(s):.{digits}f}"


DEMO_PAIRS, DEMO_DISTILLED = "pairs alone (no teacher)", "distilled + transfer images"
DEMO_DIFF = f"{DEMO_DISTILLED} - {DEMO_PAIRS}"


def row(sweep, table, label, *rest):
    return (sweep, "tables", table, label, *rest)


def cls(table, label, column, metric="top1"):
    return row("emoji-subgroups", table, label, "columns", column, metric)


def teacher(sweep, metric="rsum"):
    return (sweep, "teacher", "metrics", metric)


def _num(path):
    return lambda s: get(s, path)


W, WV, WL, W2, R = "emoji-world", "world-views", "world-long", "emoji-benchmark", "reinforced"
PAIRS, DEFAULT = "pairs only (no teacher)", "default: pair + DSMD"
TRANSFER = "pairs + transfer images and captions (1:1)"
TRANSFER_IMAGES = "pairs + transfer images (1:1)"

T1B = "teacher's text side, + transfer images, 128 px, 12 epochs"

T1 = "text-side"
T1_INHERITED, T1_TWO_TOWER = "inherited text layers, + transfer images", "two-tower, + transfer images"
T1_TEACHER_TEXT = "teacher's text side, + transfer images"

README_CHECKS = [
    ("the inherited 2-layer tower scores {} RSUM against {} for the same student with MiniLM's first 2 layers, at "
     "the same cost; the teacher's whole text side (below) {}",
     [pm(*row(T1, T1, T1_INHERITED, "rsum")), pm(*row(T1, T1, T1_TWO_TOWER, "rsum")),
      pm(*row(T1, T1, T1_TEACHER_TEXT, "rsum"))]),
    ("student reaches {} RSUM on openmoji test, {} % of the teacher, at {} image GFLOPs against the teacher's {}",
     [pm(*row("text-side", "text-side-chosen", T1B, "rsum")),
      pm(*row("text-side", "text-side-chosen", T1B, "pct_of_teacher_rsum")),
      gflops(*row("text-side", "text-side-chosen", T1B, "flops", "image")),
      gflops("text-side", "teacher", "flops", "image")]),
    ("scores RSUM **{}** (R@1 {} / {})",
     [val(*teacher(W)), val(*teacher(W, "i2t_r1")), val(*teacher(W, "t2i_r1"))]),
    ("(`configs/emoji-lite.yaml`) reaches {}, so the teacher is {}x it",
     [pm(*row(W, "world", PAIRS, "rsum")),
      ratio(_num(teacher(W)), _num(row(W, "world", PAIRS, "rsum", "mean")))]),
    ("(the four DSMD losses + the CLIP loss on the pairs) it reaches {}, inside the pairs-only spread",
     [pm(*row(W, "world", DEFAULT, "rsum"))]),
    ("(Table W1v) gives {}, still inside that spread",
     [pm(*row(W, WV, "pair + DSMD, 3 replayed views", "rsum"))]),
    ("the pairs-only student reaches {} (the teacher is then only {}x it) and the distilled one with replayed views {}",
     [pm(*row(W, WL, "pairs only (no teacher), 6 epochs", "rsum")),
      ratio(_num(teacher(W)), _num(row(W, WL, "pairs only (no teacher), 6 epochs", "rsum", "mean"))),
      pm(*row(W, WL, "pair + DSMD, 3 replayed views, 6 epochs", "rsum"))]),
    ("keeps the first, 3-epoch recipe ({})", [val(*teacher("reinforced-3ep"))]),
    ("DSMD {} vs {} for the pairs alone",
     [pm(*row(W2, "benchmark-strong", "full method (DSMD)", "rsum")),
      pm(*row(W2, "benchmark-strong", PAIRS, "rsum"))]),
    ("Over 3 seeds (docs/RESULTS.md Table D) the pairs alone give {} and the distilled student {} (seed 0, the "
     "demo's own runs: {} and {}); per seed the distilled student is ahead by {} RSUM:",
     [pm(*row("demo", "demo", DEMO_PAIRS, "rsum")), pm(*row("demo", "demo", DEMO_DISTILLED, "rsum")),
      val(*row("demo", "demo", DEMO_PAIRS, "rsum", "values", 0)),
      val(*row("demo", "demo", DEMO_DISTILLED, "rsum", "values", 0)),
      lambda s: {"+" + x for x in pm("demo", "paired_differences", "demo", DEMO_DIFF)(s)}]),
    ("that run has since been retrained for Table W1, where seed 2 scores {}",
     [val(*row(W, "world", DEFAULT, "rsum", "values", 2))]),
    ("(openmoji test, strong teacher {}, 3 seeds): the student of the 2,956 pairs scores {}; with the corpus's "
     "13,491 caption-less images {}; with those images and the corpus's captions, unpaired, **{}** ({} % of the "
     "teacher) at 6 epochs and **{}** ({} %) at 18 epochs (the pairs alone at 18 epochs: {})",
     [val(*teacher(R)), pm(*row(R, "transfer", "pairs alone", "rsum")),
      pm(*row(R, "transfer", "pairs + transfer images (1:1)", "rsum")),
      pm(*row(R, "transfer", TRANSFER, "rsum")), mean(*row(R, "transfer", TRANSFER, "pct_of_teacher_rsum"), digits=0),
      pm(*row(R, "transfer-long", TRANSFER + ", 18 epochs", "rsum")),
      mean(*row(R, "transfer-long", TRANSFER + ", 18 epochs", "pct_of_teacher_rsum")),
      pm(*row(R, "transfer-long", "pairs alone, 18 epochs", "rsum"))]),
    ("956 pairs reached {}% of the teacher with the floor ({}% without;",
     [mean(*row("recipe-icons-lucide-small", "recipe-small", "earlier default (6 epochs, 250-step floor)",
                "pct_of_teacher_rsum")),
      mean(*row("recipe-icons-lucide-small", "recipe-small", "6 epochs, no floor (min_steps 0)",
                "pct_of_teacher_rsum"), digits=0)]),
    ("5,006 pairs {}% at 6 epochs and {}% at 13, 12,664 pairs {}% at 6 epochs",
     [mean(*row("recipe-icons-tabler", "recipe-tabler", "earlier default (6 epochs, 250-step floor)",
                "pct_of_teacher_rsum")),
      mean(*row("recipe-icons-tabler", "recipe-tabler", "floor of 1,000 steps (min_steps 1000)",
                "pct_of_teacher_rsum")),
      mean(*row("recipe-line-icons", "recipe-full", "earlier default (6 epochs, 250-step floor)",
                "pct_of_teacher_rsum"))]),
    ("956 pairs **{} %** of the teacher ({} of {}), 12,664 pairs **{} %** ({} of {}; {} % at 6 epochs), "
     "5,006 pairs **{} %** ({} of {}; {} % at 6 epochs)",
     [pm(*row("recipe-icons-lucide-small", "recipe-small-12", "default config", "pct_of_teacher_rsum")),
      pm(*row("recipe-icons-lucide-small", "recipe-small-12", "default config", "rsum")),
      val(*teacher("recipe-icons-lucide-small")),
      pm(*row("recipe-line-icons", "recipe-full-12", "default config", "pct_of_teacher_rsum")),
      pm(*row("recipe-line-icons", "recipe-full-12", "default config", "rsum")),
      val(*teacher("recipe-line-icons")),
      mean(*row("recipe-line-icons", "recipe-full", "earlier default (6 epochs, 250-step floor)",
                "pct_of_teacher_rsum")),
      pm(*row("recipe-icons-tabler", "recipe-tabler-12", "default config", "pct_of_teacher_rsum")),
      pm(*row("recipe-icons-tabler", "recipe-tabler-12", "default config", "rsum")),
      val(*teacher("recipe-icons-tabler")),
      mean(*row("recipe-icons-tabler", "recipe-tabler", "earlier default (6 epochs, 250-step floor)",
                "pct_of_teacher_rsum"))]),
    ("(a domain it has never seen: {} RSUM zero-shot) with 120 steps: supervised fine-tuning reaches {} / {} with "
     "1 % / 10 % of the captions; the mean teacher stays below it ({} / {} in its best variant",
     [mean(*row("icons-adapt", "icons-adapt", "start (zero-shot)", "rsum")),
      pm(*row("icons-adapt", "icons-adapt", "1 %: supervised", "rsum")),
      pm(*row("icons-adapt", "icons-adapt", "10 %: supervised", "rsum")),
      pm(*row("icons-adapt", "icons-adapt-b", "1 %: mean teacher (ramp-up, student export)", "rsum")),
      pm(*row("icons-adapt", "icons-adapt-b", "10 %: mean teacher (ramp-up, student export)", "rsum"))]),
    ("the text-free probe {} % top-1 and the text head {} %; first-generation students {} / {} %",
     [pm(*cls("subgroups-thesis", "class prompts, all labels", "w/o text: teacher")),
      pm(*cls("subgroups-thesis", "class prompts, all labels", "with text: teacher")),
      pm(*cls("subgroups-thesis", "class prompts, all labels", "w/o text: gen 1")),
      pm(*cls("subgroups-thesis", "class prompts, all labels", "with text: gen 1"))]),
    ("(Table C3) give a {} % head but students of {} %",
     [pm(*cls("subgroups-text", "captions", "with text: teacher")),
      pm(*cls("subgroups-text", "captions", "with text: gen 1"))]),
    ("(Table C4): the same top-1 ({} points, inside the spread), balanced top-1 {} / {} % instead of {} / {} %",
     [mean("emoji-subgroups", "paired_differences", "subgroups-targets",
           "in-sample targets - out-of-fold targets (5 folds): w/o text: gen 1", sign=True),
      pm(*cls("subgroups-targets", "in-sample targets", "w/o text: gen 1", "balanced_top1")),
      pm(*cls("subgroups-targets", "in-sample targets", "with text: gen 1", "balanced_top1")),
      pm(*cls("subgroups-targets", "out-of-fold targets (5 folds)", "w/o text: gen 1", "balanced_top1")),
      pm(*cls("subgroups-targets", "out-of-fold targets (5 folds)", "with text: gen 1", "balanced_top1"))]),
]

def signed_diff(sweep, table, name, negate=False, key="paired_differences"):
    """A paired difference as ``+m ± s`` (``negate``: the document states ``b - a`` of the stored ``a - b``;
    ``key``: paired_differences_val for the val split's)."""
    def spec(s):
        values = [-v if negate else v for v in get(s, (sweep, key, table, name))["values"]]
        m, sd = _stats({"values": values})
        return {f"{a} ± {b}" for a in _roundings(m, 1, sign=True) for b in _roundings(sd, 1)}
    return spec


P, P2, P4, P5A, P5C, P5D = "w2-ablations", "w2-methods", "w2-balancer", "w2-normalisation", "w2-tau", "w2-margin"
P5B, P3 = "w2-queue", "w2-losses"
P3_FULL = "cd+fd+sd+hnd (default)"


def claim_diff(sweep, table, than, claim=0):
    """One comparison of a table's claim (``better - than``, paired by seed) as ``+m ± s``."""
    def spec(s):
        comp = next(c for c in get(s, (sweep, "claims", table))[claim]["comparisons"] if c["than"] == than)
        m, sd = _stats(comp)
        return {f"{a} ± {b}" for a in _roundings(m, 1, sign=True) for b in _roundings(sd, 1)}
    return spec
P2_FULL = "full multiscale (DSMD)"

README_CHECKS += [
    ("distillation beats the pairs alone by {} RSUM per seed (holds); the dynamic balancer beats equal fixed weights "
     "by {} (holds); normalised teacher targets beat un-normalised ones by {} (holds); the four losses beat the L1 "
     "feature distance alone by {} but not the MSE one ({} against {}: inside the spread); the lowest temperature, "
     "0.05, beats 0.5 and 1.0 by {} and {} but not 0.1 or 0.2 (holds against 2 of 4); and margin 0 is not the "
     "best here: 0.5 scores {} above it (contradicted)",
     [signed_diff(P, P2, f"no distillation (pairs only) - {P2_FULL}", negate=True),
      signed_diff(P, P4, "fixed equal weights - dynamic (default)", negate=True),
      signed_diff(P, P5A, "not normalised - normalised (default)", negate=True),
      signed_diff(P, P2, f"feature only (L1) - {P2_FULL}", negate=True),
      pm(*row(P, P2, "feature only (MSE)", "rsum")), pm(*row(P, P2, P2_FULL, "rsum")),
      *(signed_diff(P, P5C, f"{t} - 0.05 (default)", negate=True) for t in ("0.5", "1.0")),
      signed_diff(P, P5D, "0.5 - 0 (default)")]),
    ("the queue size that scores highest is 8192, {}, ahead of 4096 by {} but inside the spread of the other sizes",
     [pm(*row(P, P5B, "8192", "rsum")), claim_diff(P, P5B, "4096")]),
    ("the four losses together beat each loss alone except the cosine term SD, which alone scores {}",
     [pm(*row(P, P3, "sd", "rsum"))]),
    ("without CD the other three lose {} per seed, but HND at margin 0 costs rather than contributes: without it "
     "the other three losses score {}, {} per seed above all four. On val (the split epochs are chosen by) the full "
     "method stays the highest row and dropping HND scores {} (inside the spread)",
     [lambda s: {x.lstrip("-") for x in signed_diff(P, P3, f"fd+sd+hnd - {P3_FULL}")(s)},
      pm(*row(P, P3, "cd+fd+sd", "rsum")), signed_diff(P, P3, f"cd+fd+sd - {P3_FULL}"),
      signed_diff(P, P3, f"cd+fd+sd - {P3_FULL}", key="paired_differences_val")]),
]

# RESULTS findings that issue 34 found out of step with their tables, and the findings of Tables P2-P5d
RESULTS_CHECKS = [
    ("the default config **{}** (277.6, 277.0, 278.3), **{} % of the teacher**",
     [pm(*row("recipe-icons-tabler", "recipe-tabler", "earlier default (6 epochs, 250-step floor)", "rsum")),
      pm(*row("recipe-icons-tabler", "recipe-tabler", "earlier default (6 epochs, 250-step floor)",
              "pct_of_teacher_rsum"))]),
    ("per seed the probe is ahead by 6.9 and 5.4 points and behind by 0.2 ({}: inside the spread)",
     [lambda s: {x.lstrip("-") for x in pm("emoji-subgroups", "paired_differences", "subgroups-thesis",
                                           "with text - w/o text, teacher")(s)}]),  # the probe's lead: negated
    ("({} per seed, positive in all three seeds but inside the spread by the 2-std rule)",
     [lambda s: {"+" + x for x in pm("emoji-subgroups", "paired_differences", "subgroups-text",
                                     "captions - class prompts: with text: teacher")(s)}]),
    ("(Table W2, {}). The default", [mean(*row(W2, "benchmark-strong", PAIRS, "rsum"))]),
    ("inherited 2-layer text tower scores {} and the teacher's text side {}, against {} for the two-tower student "
     "({} and {} per seed)",
     [pm(*row(T1, T1, T1_INHERITED, "rsum")), pm(*row(T1, T1, T1_TEACHER_TEXT, "rsum")),
      pm(*row(T1, T1, T1_TWO_TOWER, "rsum")),
      lambda s: {"+" + x for x in pm(T1, "paired_differences", T1, f"{T1_INHERITED} - {T1_TWO_TOWER}")(s)},
      lambda s: {"+" + x for x in pm(T1, "paired_differences", T1, f"{T1_TEACHER_TEXT} - {T1_TWO_TOWER}")(s)}]),
    ("also beats Table R1's {} (the same student with the first strong teacher file) by {} points",
     [pm(*row(R, "transfer", TRANSFER_IMAGES, "rsum")),
      lambda s: _roundings(_stats(get(s, row(T1, T1, T1_INHERITED, "rsum")))[0]
                           - _stats(get(s, row(R, "transfer", TRANSFER_IMAGES, "rsum")))[0], 1)]),
    ("The transfer images add {} to the teacher's text side and {} to the inherited one (both clear the spread), "
     "but only {} to the two-tower student",
     [pm(T1, "paired_differences", T1, f"{T1_TEACHER_TEXT} - teacher's text side, pairs only"),
      pm(T1, "paired_differences", T1, f"{T1_INHERITED} - inherited text layers, pairs only"),
      lambda s: {x.lstrip("-") for x in pm(T1, "paired_differences", T1, f"two-tower, pairs only - {T1_TWO_TOWER}")(s)}]),
    ("The teacher's text side leads the inherited tower by {}",
     [pm(T1, "paired_differences", T1, f"{T1_TEACHER_TEXT} - {T1_INHERITED}")]),
    ("on T1's schedule it reaches {} % of the teacher", [pm(*row(T1, T1, T1_TEACHER_TEXT, "pct_of_teacher_rsum"))]),
    ("The full method scores {} against {}, {} per seed",
     [pm(*row(P, P2, P2_FULL, "rsum")), pm(*row(P, P2, "no distillation (pairs only)", "rsum")),
      signed_diff(P, P2, f"no distillation (pairs only) - {P2_FULL}", negate=True)]),
    ("(the paper's FD term alone, {}) by {}",
     [pm(*row(P, P2, "feature only (L1)", "rsum")), signed_diff(P, P2, f"feature only (L1) - {P2_FULL}", negate=True)]),
    ("(CLIP-KD's FD) scores {}, {} per seed over the full method",
     [pm(*row(P, P2, "feature only (MSE)", "rsum")), signed_diff(P, P2, f"feature only (MSE) - {P2_FULL}")]),
    ("A plain sum of the four losses with equal weights scores {}, the balancer {} per seed above it",
     [pm(*row(P, P4, "fixed equal weights", "rsum")),
      signed_diff(P, P4, "fixed equal weights - dynamic (default)", negate=True)]),
    ("method.md 1.5) scores {}, {} per seed against the balancer and below the pairs alone (Table P2's {})",
     [pm(*row(P, P4, "reference code", "rsum")), signed_diff(P, P4, "reference code - dynamic (default)"),
      pm(*row(P, P2, "no distillation (pairs only)", "rsum"))]),
    ("With the teacher's norms restored the student scores {}, {} per seed against the cache's unit embeddings",
     [pm(*row(P, P5A, "not normalised", "rsum")), signed_diff(P, P5A, "not normalised - normalised (default)")]),
    ("0.5 reaches {} ({} per seed) and 1.0 {} ({}), both clearing the spread; 0.2 ({}) stays inside it",
     [pm(*row(P, P5D, "0.5", "rsum")), signed_diff(P, P5D, "0.5 - 0 (default)"), pm(*row(P, P5D, "1.0", "rsum")),
      signed_diff(P, P5D, "1.0 - 0 (default)"), signed_diff(P, P5D, "0.2 - 0 (default)")]),
    ("RSUM falls as tau rises ({} at 0.05, {}, {}, {}, {} at 1.0), and 0.05 beats 0.5 and 1.0 by more than the spread "
     "({} and {} per seed), but not 0.1 ({}) or 0.2 ({})",
     [mean(*row(P, P5C, t, "rsum")) for t in ("0.05 (default)", "0.1", "0.2", "0.5", "1.0")]
     + [signed_diff(P, P5C, f"{t} - 0.05 (default)", negate=True) for t in ("0.5", "1.0", "0.1", "0.2")]),
    ("8192 scores highest ({}), but per seed it beats only 4096 by more than the spread ({}); against the default "
     "2048 ({}), 1024 ({}) and 16384 ({}) the difference is inside it. Every size is within a few points of the "
     "default ({})",
     [pm(*row(P, P5B, "8192", "rsum")), claim_diff(P, P5B, "4096"), claim_diff(P, P5B, "2048 (default)"),
      claim_diff(P, P5B, "1024"), claim_diff(P, P5B, "16384"), pm(*row(P, P5B, "2048 (default)", "rsum"))]),
    ("The full method ({}) beats CD alone by {}, FD alone by {} and HND alone by {} per seed, but not SD alone: the "
     "cosine term by itself scores {}, above the full method in every seed ({} for the full method: just inside the "
     "spread). HND alone leaves the student near zero ({}",
     [pm(*row(P, P3, P3_FULL, "rsum")), *(claim_diff(P, P3, loss, claim=1) for loss in ("cd", "fd", "hnd")),
      pm(*row(P, P3, "sd", "rsum")), claim_diff(P, P3, "sd", claim=1), pm(*row(P, P3, "hnd", "rsum"))]),
    ("Dropping CD costs: FD+SD+HND scores {}, the full method {} per seed above it (clears the spread). Dropping SD "
     "(CD+FD+HND, {}, {}) or FD (CD+SD+HND, {}, {}) stays inside the spread.",
     [pm(*row(P, P3, "fd+sd+hnd", "rsum")), claim_diff(P, P3, "fd+sd+hnd"),
      pm(*row(P, P3, "cd+fd+hnd", "rsum")), claim_diff(P, P3, "cd+fd+hnd"),
      pm(*row(P, P3, "cd+sd+hnd", "rsum")), claim_diff(P, P3, "cd+sd+hnd")]),
    ("without HND the other three score {}, {} per seed above the full method (clears the spread). So in this setting "
     "HND at margin 0 does not contribute, it costs: every set with HND scores below the same set without it (means: "
     "CD {} -> {} with HND, FD {} -> {}, SD {} -> {}, CD+FD {} -> {}, CD+SD {} -> {}, FD+SD {} -> {}), and the best "
     "rows are the sets of SD without HND (SD, FD+SD {}, CD+FD+SD)",
     [pm(*row(P, P3, "cd+fd+sd", "rsum")), signed_diff(P, P3, f"cd+fd+sd - {P3_FULL}"),
      *(mean(*row(P, P3, r, "rsum")) for r in ("cd", "cd+hnd", "fd", "fd+hnd", "sd", "sd+hnd", "cd+fd", "cd+fd+hnd",
                                                "cd+sd", "cd+sd+hnd", "fd+sd", "fd+sd+hnd")),
      pm(*row(P, P3, "fd+sd", "rsum"))]),
    ("the full method is the highest of the fifteen rows ({}), and without HND the other three score {} per seed "
     "against it (inside the spread, the other way from test); SD alone is {} (inside)",
     [pm(*row(P, P3, P3_FULL, "best_val_rsum")),
      *(signed_diff(P, P3, f"{r} - {P3_FULL}", key="paired_differences_val") for r in ("cd+fd+sd", "sd"))]),
    ("This agrees with Table P5d, where a margin of 0.5 adds {} to the full method",
     [signed_diff(P, P5D, "0.5 - 0 (default)")]),
]


def flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def mismatches(document: str, checks: list, summary: dict) -> list[str]:
    """Every disagreement between ``document`` and summary.json, one line each; empty when they agree."""
    text = flat(document)
    problems = []
    for phrase, specs in checks:
        phrase = flat(phrase)
        assert phrase.count("{}") == len(specs), phrase
        literal = [re.escape(part) for part in phrase.split("{}")]
        pattern = literal[0] + "".join(f"({NUMBER})" + part for part in literal[1:])
        found = re.search(pattern, text)
        if found is None:
            problems.append(f"phrase not found (reworded? update the check): {phrase!r}")
            continue
        for n, spec in enumerate(specs, 1):
            want = spec(summary)
            want = {want} if isinstance(want, str) else want
            if found.group(n) not in want:
                shown = " or ".join(repr(w) for w in sorted(want))
                problems.append(f"{found.group(n)!r} where summary.json gives {shown}, number {n} of: {phrase!r}")
    return problems


@pytest.fixture(scope="module")
def summary():
    return json.loads(SUMMARY.read_text(encoding="utf-8"))


@pytest.mark.parametrize("doc, checks", [("README.md", README_CHECKS), ("docs/RESULTS.md", RESULTS_CHECKS)])
def test_document_numbers_match_summary_json(doc, checks, summary):
    problems = mismatches((ROOT / doc).read_text(encoding="utf-8"), checks, summary)
    assert not problems, f"{doc} disagrees with docs/results/summary.json:\n" + "\n".join(problems)


def test_a_wrong_number_is_caught(summary):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "scores RSUM **415.5**" in readme
    problems = mismatches(readme.replace("scores RSUM **415.5**", "scores RSUM **422.8**"), README_CHECKS, summary)
    assert problems == ["'422.8' where summary.json gives '415.5', number 1 of: "
                        "'scores RSUM **{}** (R@1 {} / {})'"]
    assert mismatches("nothing here", README_CHECKS[:1], summary)[0].startswith("phrase not found")


def test_the_readme_states_the_demo_comparisons_verdict(summary):
    """The verdict on the spread is words, not a number: the README must say the one summary.json gives."""
    verdict = get(summary, ("demo", "paired_differences", "demo", DEMO_DIFF, "verdict"))
    assert "per seed the distilled student is ahead by " in flat((ROOT / "README.md").read_text(encoding="utf-8"))
    assert re.search(r"ahead by \+[\d.]+ ± [\d.]+ RSUM: " + re.escape(verdict) + r"\.",
                     flat((ROOT / "README.md").read_text(encoding="utf-8")))


def test_results_states_each_decided_claim_with_its_verdict(summary):
    """A claim's verdict is words: RESULTS must state each decided one (not pending) as ``claim: verdict``."""
    text = flat((ROOT / "docs" / "RESULTS.md").read_text(encoding="utf-8")).replace("**", "")
    decided = [(c["claim"], c["verdict"]) for entry in summary["sweeps"].values()
               for checks in (entry.get("claims") or {}).values() for c in checks if c["verdict"] != "pending"]
    assert decided, "no decided claim in summary.json"
    for claim, verdict in decided:
        assert f"{claim}: {verdict}." in text, f"RESULTS does not state {claim!r} as {verdict!r}"


def test_the_p3_findings_words_are_what_summary_json_says(summary):
    """RESULTS/README: every loss set scores lower with HND than without it; on val the full method is Table P3's
    highest row and dropping HND (or SD alone) stays inside the spread. A rerun that changes any of these makes the
    words false, so they are checked, not only the numbers."""
    rows = get(summary, (P, "tables", P3))
    for label in ("cd", "fd", "sd", "cd+fd", "cd+sd", "fd+sd", "cd+fd+sd"):
        with_hnd = P3_FULL if label == "cd+fd+sd" else f"{label}+hnd"
        assert rows[with_hnd]["rsum"]["mean"] < rows[label]["rsum"]["mean"], label
    assert len(rows) == 15 and all(r["best_val_rsum"]["n"] == 3 for r in rows.values())
    assert max(rows, key=lambda label: rows[label]["best_val_rsum"]["mean"]) == P3_FULL
    for other in ("cd+fd+sd", "sd"):
        diff = get(summary, (P, "paired_differences_val", P3, f"{other} - {P3_FULL}"))
        assert diff["verdict"] == "inside the spread" and diff["mean"] < 0
