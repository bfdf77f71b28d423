"""How well a judge agrees with human labels: metrics, a terminal summary, a self-contained HTML report.

Inputs:
- results (JSONL, as `edgejudge run` writes them): one object per job with `id` and `ok`; a
  successful row has `score` (int 1..5), or `scores` ({axis: int}) for multi-axis judges, and
  optionally `digits`, the probabilities of the digits 1..5 at the score position
  ({"1": p1, ..., "5": p5}; for multi-axis judges {axis: {"1": p1, ...}}); a failed row has
  `ok: false` and a `reason`. `distribution` (the name `edgejudge judge` prints) is read where
  `digits` is absent, and null fields count as absent, so `edgejudge run` output reads as it is.
- labels (CSV): columns `id` and `score`, plus `axis` for multi-axis judges (one row per id and
  axis). An axis column means the results must carry `scores`.

Every label ends in exactly one bucket: scored (joined with a judge score), missing (no result
for its id, or a result without its axis), or failed (the judge's row has ok=false). Results
whose id has no label are counted as unmatched. All four counts are reported, with example ids,
so nothing disappears silently.

The statistics come from scipy and scikit-learn. The expected score of a digit distribution is
sum(k * p_k) / sum(p_k): renormalized over the five digits, because the rest of the vocabulary
also takes some probability at the score position.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import numpy as np
from scipy import stats
from sklearn.calibration import calibration_curve
from sklearn.metrics import accuracy_score, confusion_matrix, mean_absolute_error, precision_recall_fscore_support

from edgejudge.errors import InputError
from edgejudge.jsonl import json_objects

SCORES = (1, 2, 3, 4, 5)
DIGITS = tuple(str(k) for k in SCORES)
SINGLE_AXIS = "score"  # the axis name of single-axis judges in tables
POOLED = "all axes"
EXAMPLE_IDS = 5  # ids listed per missing/failed/unmatched bucket


@dataclass
class ResultRow:
    line: int
    ok: bool
    scores: dict[str, int]  # axis -> judge score; single-axis rows use SINGLE_AXIS
    digits: dict[str, np.ndarray]  # axis -> p(1..5) as written (not renormalized)
    multi_axis: bool  # the row had `scores` rather than `score`
    reason: str


@dataclass
class Pairs:
    """The joined (human, judge) scores of one axis, in label order."""

    ids: list[str] = field(default_factory=list)
    human: list[int] = field(default_factory=list)
    judge: list[int] = field(default_factory=list)
    digits: list[np.ndarray | None] = field(default_factory=list)


@dataclass
class Evaluation:
    results_path: str
    labels_path: str
    counts: dict[str, int]  # labels, scored, missing, failed, unmatched
    examples: dict[str, list[str]]  # a few ids of the missing, failed and unmatched buckets
    failure_reasons: dict[str, int]  # reason -> labels it cost
    unlabelled_axes: list[str]  # axes the judge scored that no label covers
    pairs: dict[str, Pairs]  # per axis, plus POOLED for multi-axis judges
    metrics: dict[str, dict]  # per axis, same keys as pairs

    def to_json(self) -> dict:
        return {"results": self.results_path, "labels": self.labels_path, "counts": self.counts,
                "examples": self.examples, "failure_reasons": self.failure_reasons,
                "unlabelled_axes": self.unlabelled_axes, "axes": self.metrics}


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise InputError(f"{path}: not found" if not path.exists() else f"{path}: not a file")
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: spreadsheet exports often start with a BOM
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _judge_score(where: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value not in SCORES:
        raise InputError(f"{where}: score {json.dumps(value)} is not an integer 1..5")
    return value


def _digit_probs(where: str, value) -> np.ndarray:
    if not isinstance(value, dict) or sorted(value) != list(DIGITS):
        raise InputError(f"{where}: digits must map each of \"1\"..\"5\" to a probability")
    probs = [value[d] for d in DIGITS]
    if not all(isinstance(p, (int, float)) and not isinstance(p, bool) and p >= 0 for p in probs) or sum(probs) <= 0:
        raise InputError(f"{where}: digits must be non-negative numbers with a positive sum")
    return np.array(probs, dtype=np.float64)


def read_results(path: Path) -> dict[str, ResultRow]:
    rows: dict[str, ResultRow] = {}
    for where, number, obj in json_objects(_read_text(path).splitlines(), str(path)):
        if "id" not in obj or not isinstance(obj.get("ok"), bool):
            raise InputError(f"{where}: a result needs an 'id' and a boolean 'ok'")
        rid = str(obj["id"])
        if rid in rows:
            raise InputError(f"{where}: duplicate id {rid!r} (first on line {rows[rid].line})")
        multi_axis = obj.get("scores") is not None
        written_digits = obj["digits"] if obj.get("digits") is not None else obj.get("distribution")
        scores: dict[str, int] = {}
        digits: dict[str, np.ndarray] = {}
        if obj["ok"]:
            if multi_axis:
                if not isinstance(obj["scores"], dict) or not obj["scores"]:
                    raise InputError(f"{where}: 'scores' must be a non-empty object {{axis: score}}")
                scores = {str(axis): _judge_score(f"{where} axis {axis!r}", s) for axis, s in obj["scores"].items()}
                per_axis = written_digits or {}
                if not isinstance(per_axis, dict):
                    raise InputError(f"{where}: 'digits' of a multi-axis row must be {{axis: {{\"1\": p, ...}}}}")
                digits = {str(axis): _digit_probs(f"{where} axis {axis!r}", d) for axis, d in per_axis.items()}
            elif "score" in obj:
                scores = {SINGLE_AXIS: _judge_score(where, obj["score"])}
                if written_digits is not None:
                    digits = {SINGLE_AXIS: _digit_probs(where, written_digits)}
            else:
                raise InputError(f"{where}: a successful result needs 'score' or 'scores'")
        rows[rid] = ResultRow(number, obj["ok"], scores, digits, multi_axis, str(obj.get("reason") or "no reason given"))
    if not rows:
        raise InputError(f"{path}: no results")
    return rows


def read_labels(path: Path) -> tuple[dict[tuple[str, str], int], bool]:
    """{(id, axis): human score} in file order, and whether the file has an axis column."""
    reader = csv.DictReader(io.StringIO(_read_text(path)))
    if not reader.fieldnames:
        raise InputError(f"{path}: empty file, expected a header with id and score")
    reader.fieldnames = [name.strip() for name in reader.fieldnames]
    missing = [c for c in ("id", "score") if c not in reader.fieldnames]
    if missing:
        raise InputError(f"{path}: missing column {', '.join(missing)} (have {', '.join(reader.fieldnames)})")
    multi_axis = "axis" in reader.fieldnames
    labels: dict[tuple[str, str], int] = {}
    first_line: dict[tuple[str, str], int] = {}
    for row in reader:
        where = f"{path} line {reader.line_num}"
        key = ((row["id"] or "").strip(), (row["axis"] or "").strip() if multi_axis else SINGLE_AXIS)
        if not key[0] or not key[1]:
            raise InputError(f"{where}: empty {'id' if not key[0] else 'axis'}")
        value = (row["score"] or "").strip()
        if value not in DIGITS:
            raise InputError(f"{where}: human score {value!r} is not an integer 1..5")
        if key in labels:
            what = f"id {key[0]!r}" + (f" axis {key[1]!r}" if multi_axis else "")
            raise InputError(f"{where}: duplicate {what} (first on line {first_line[key]})")
        labels[key] = int(value)
        first_line[key] = reader.line_num
    if not labels:
        raise InputError(f"{path}: no labels")
    return labels, multi_axis


def _correlation(test, x: np.ndarray, y: np.ndarray) -> dict | None:
    """Pearson or Spearman r with its p-value; None where undefined (under 2 pairs or a constant side)."""
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    result = test(x, y)
    return {"r": float(result.statistic), "p": float(result.pvalue)}


def _binary(human: np.ndarray, judge: np.ndarray) -> dict | None:
    """Precision, recall and F1 of each class, bad (<= 2) and good (>= 4).

    Labels where the human said 3 are left out: they have no true class. A judge 3 on a bad or
    good item stays in as a third prediction, "middle", which is neither class: it costs recall
    (the judge missed a bad or good item) without counting as a false alarm for either class.
    Dropping judge 3s as well would let a judge that hedges with 3 look perfect.
    """
    keep = human != 3
    if not keep.any():
        return None
    truth = np.where(human[keep] <= 2, "bad", "good")
    predicted = np.select([judge[keep] <= 2, judge[keep] >= 4], ["bad", "good"], "middle")
    precision, recall, f1, support = precision_recall_fscore_support(
        truth, predicted, labels=["bad", "good"], zero_division=np.nan)
    return {"n": int(keep.sum()), "human_3_left_out": int((~keep).sum()),
            **{cls: {"precision": _number(precision[i]), "recall": _number(recall[i]), "f1": _number(f1[i]),
                     "support": int(support[i])} for i, cls in enumerate(("bad", "good"))}}


def _expected_scores(digits: list[np.ndarray | None]) -> tuple[np.ndarray, np.ndarray]:
    """Expected score and probability of the most likely digit, per pair (NaN without digits)."""
    expected, confidence = np.full(len(digits), np.nan), np.full(len(digits), np.nan)
    for i, probs in enumerate(digits):
        if probs is not None:
            p = probs / probs.sum()
            expected[i], confidence[i] = float(p @ np.array(SCORES)), float(p.max())
    return expected, confidence


def _number(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def axis_metrics(pairs: Pairs) -> dict:
    human, judge = np.array(pairs.human), np.array(pairs.judge)
    metrics = {
        "n": len(human),
        "exact": float(accuracy_score(human, judge)),
        "within_1": float(np.mean(np.abs(human - judge) <= 1)),
        "mae": float(mean_absolute_error(human, judge)),
        "pearson": _correlation(stats.pearsonr, human, judge),
        "spearman": _correlation(stats.spearmanr, human, judge),
        "confusion": confusion_matrix(human, judge, labels=list(SCORES)).tolist(),  # rows human, columns judge
        "binary": _binary(human, judge),
        "expected": None,
    }
    expected, _ = _expected_scores(pairs.digits)
    has = ~np.isnan(expected)
    if has.any():
        metrics["expected"] = {"n": int(has.sum()), "mae": float(mean_absolute_error(human[has], expected[has])),
                               "pearson": _correlation(stats.pearsonr, human[has], expected[has]),
                               "spearman": _correlation(stats.spearmanr, human[has], expected[has])}
    return metrics


def evaluate(results_path: Path, labels_path: Path) -> Evaluation:
    labels, multi_axis = read_labels(Path(labels_path))
    results = read_results(Path(results_path))
    for row in results.values():
        if row.ok and row.multi_axis != multi_axis:
            raise InputError(
                f"{results_path}:{row.line}: has '{'scores' if row.multi_axis else 'score'}' but {labels_path} "
                + ("has an axis column (multi-axis results need 'scores')" if multi_axis
                   else "has no axis column (multi-axis results need one label row per id and axis)"))
    labelled_ids = {rid for rid, _ in labels}
    if not labelled_ids & results.keys():
        raise InputError(f"no id is in both {results_path} and {labels_path} (ids differ, e.g. "
                         f"{next(iter(results))!r} vs {next(iter(labels))[0]!r})")

    pairs: dict[str, Pairs] = {}
    buckets: dict[str, list[str]] = {"missing": [], "failed": []}
    reasons: Counter[str] = Counter()
    for (rid, axis), human in labels.items():
        row = results.get(rid)
        if row is not None and not row.ok:
            buckets["failed"].append(rid if not multi_axis else f"{rid}/{axis}")
            reasons[row.reason] += 1
        elif row is None or axis not in row.scores:
            buckets["missing"].append(rid if not multi_axis else f"{rid}/{axis}")
        else:
            axis_pairs = pairs.setdefault(axis, Pairs())
            axis_pairs.ids.append(rid)
            axis_pairs.human.append(human)
            axis_pairs.judge.append(row.scores[axis])
            axis_pairs.digits.append(row.digits.get(axis))
    unmatched = [rid for rid in results if rid not in labelled_ids]
    if not pairs:
        raise InputError(f"no labelled id has a judge score ({len(buckets['failed'])} failed, "
                         f"{len(buckets['missing'])} missing)")
    if multi_axis and len(pairs) > 1:
        pooled = Pairs()
        for axis_pairs in pairs.values():
            for name in ("ids", "human", "judge", "digits"):
                getattr(pooled, name).extend(getattr(axis_pairs, name))
        pairs[POOLED] = pooled
    labelled_axes = {axis for _, axis in labels}
    scored_axes = {axis for row in results.values() for axis in row.scores}
    counts = {"labels": len(labels), "scored": sum(len(p.ids) for a, p in pairs.items() if a != POOLED),
              "missing": len(buckets["missing"]), "failed": len(buckets["failed"]), "unmatched": len(unmatched)}
    return Evaluation(
        results_path=str(results_path), labels_path=str(labels_path), counts=counts,
        examples={"missing": buckets["missing"][:EXAMPLE_IDS], "failed": buckets["failed"][:EXAMPLE_IDS],
                  "unmatched": unmatched[:EXAMPLE_IDS]},
        failure_reasons=dict(reasons.most_common()),
        unlabelled_axes=sorted(scored_axes - labelled_axes),
        pairs=pairs, metrics={axis: axis_metrics(p) for axis, p in pairs.items()})


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _metric_rows(ev: Evaluation) -> list[list[str]]:
    """One table row per axis: the numbers the summary and the HTML both show."""
    rows = []
    for axis, m in ev.metrics.items():
        binary, expected = m["binary"] or {}, m["expected"] or {}
        rows.append([axis, str(m["n"]), _fmt(m["exact"]), _fmt(m["within_1"]), _fmt(m["mae"]),
                     _fmt((m["pearson"] or {}).get("r")), _fmt((m["spearman"] or {}).get("r")),
                     _fmt(binary.get("bad", {}).get("f1")), _fmt(binary.get("good", {}).get("f1")),
                     _fmt(expected.get("mae")), _fmt((expected.get("pearson") or {}).get("r"))])
    return rows


METRIC_HEADER = ["axis", "n", "exact", "within ±1", "MAE", "Pearson r", "Spearman r", "bad F1", "good F1",
                 "E[score] MAE", "E[score] Pearson r"]


def _counts_line(ev: Evaluation) -> str:
    c = ev.counts
    return (f"{c['labels']} labels: {c['scored']} scored, {c['missing']} missing, {c['failed']} failed; "
            f"{c['unmatched']} results without a label")


def summary_markdown(ev: Evaluation) -> str:
    lines = [f"# {ev.results_path} vs {ev.labels_path}", "", _counts_line(ev)]
    for bucket, ids in ev.examples.items():
        if ids:
            lines.append(f"- {bucket}: {', '.join(ids)}{' ...' if ev.counts[bucket] > len(ids) else ''}")
    for reason, n in ev.failure_reasons.items():
        lines.append(f"- failed ({n}): {reason}")
    if ev.unlabelled_axes:
        lines.append(f"- axes the judge scored without labels: {', '.join(ev.unlabelled_axes)}")
    lines += ["", "| " + " | ".join(METRIC_HEADER) + " |", "|" + "---|" * len(METRIC_HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in _metric_rows(ev)]
    axis = POOLED if POOLED in ev.metrics else next(iter(ev.metrics))
    lines += ["", f"Confusion ({axis}; rows human 1..5, columns judge 1..5):", ""]
    lines += ["| human \\ judge | 1 | 2 | 3 | 4 | 5 |", "|---|---|---|---|---|---|"]
    lines += [f"| {k} | " + " | ".join(str(v) for v in row) + " |"
              for k, row in zip(SCORES, ev.metrics[axis]["confusion"])]
    lines.append("")
    lines.append("Binary: bad = score <= 2, good = score >= 4; human 3s left out, judge 3s count as misses.")
    return "\n".join(lines)


def _png(fig) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buffer = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def confusion_png(matrix: list[list[int]], title: str) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.6, 3.2), dpi=100, layout="constrained")
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    peak = max(max(row) for row in matrix) or 1
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > peak / 2 else "black")
    ax.set_xticks(range(5), SCORES)
    ax.set_yticks(range(5), SCORES)
    ax.set_xlabel("judge")
    ax.set_ylabel("human")
    ax.set_title(title)
    return _png(fig)


def calibration_png(pairs: Pairs, title: str) -> str | None:
    """Left: expected score of the digit distribution against the human score (ideal: the diagonal).
    Right: reliability of the top digit: its probability against how often humans chose that digit."""
    from matplotlib.figure import Figure

    expected, confidence = _expected_scores(pairs.digits)
    has = ~np.isnan(expected)
    if not has.any():
        return None
    human = np.array(pairs.human)[has]
    expected, confidence = expected[has], confidence[has]
    top = np.array([int(np.argmax(d)) + 1 for d in pairs.digits if d is not None])

    fig = Figure(figsize=(7.2, 3.2), dpi=100, layout="constrained")
    left, right = fig.subplots(1, 2)
    jitter = np.random.default_rng(0).uniform(-0.12, 0.12, len(human))
    left.scatter(human + jitter, expected, s=10, alpha=0.4)
    means = [(k, expected[human == k].mean()) for k in SCORES if (human == k).any()]
    left.plot([k for k, _ in means], [m for _, m in means], "o-", color="C1", label="mean")
    left.plot([1, 5], [1, 5], "--", color="gray", label="ideal")
    left.set(xlabel="human score", ylabel="expected judge score", xlim=(0.5, 5.5), ylim=(0.5, 5.5),
             xticks=SCORES, title=f"{title}: expected score")
    left.legend(loc="upper left", fontsize=8)
    frequency, mean_confidence = calibration_curve(top == human, confidence, n_bins=5, strategy="uniform")
    right.plot(mean_confidence, frequency, "o-", color="C0")
    right.plot([0, 1], [0, 1], "--", color="gray")
    right.set(xlabel="p(top digit)", ylabel="fraction humans agree", xlim=(-0.05, 1.05), ylim=(-0.05, 1.05),
              title=f"{title}: top-digit reliability")
    return _png(fig)


HTML = jinja2.Environment(autoescape=True).from_string("""<!doctype html>
<html><head><meta charset="utf-8"><title>edgejudge eval</title>
<style>
body { font-family: sans-serif; margin: 2em; max-width: 75em; }
table { border-collapse: collapse; margin: 1em 0; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.plots img { margin: 0.5em 1em 0.5em 0; vertical-align: top; }
</style></head><body>
<h1>Judge vs human labels</h1>
<p>Results <code>{{ ev.results_path }}</code>, labels <code>{{ ev.labels_path }}</code>.</p>
<p>{{ counts }}</p>
<ul>
{% for bucket, ids in ev.examples.items() if ids %}<li>{{ bucket }}: {{ ids | join(", ") }}{% if ev.counts[bucket] > ids | length %} ...{% endif %}</li>
{% endfor %}{% for reason, n in ev.failure_reasons.items() %}<li>failed ({{ n }}): {{ reason }}</li>
{% endfor %}{% if ev.unlabelled_axes %}<li>axes the judge scored without labels: {{ ev.unlabelled_axes | join(", ") }}</li>{% endif %}
</ul>
<h2>Agreement</h2>
<table><tr>{% for h in header %}<th>{{ h }}</th>{% endfor %}</tr>
{% for row in rows %}<tr>{% for cell in row %}<td>{{ cell }}</td>{% endfor %}</tr>
{% endfor %}</table>
<p>Exact: judge = human. MAE: mean |judge - human|. E[score]: the expected score of the digit
distribution, sum(k p_k) / sum(p_k), on the rows that report one.</p>
<h2>Bad (&le; 2) vs good (&ge; 4)</h2>
<p>Labels where the human said 3 have no class and are left out; a judge 3 on a bad or good item
counts as a miss (lower recall) but not as a false alarm.</p>
<table><tr><th>axis</th><th>n</th><th>human 3 left out</th>
{% for cls in ("bad", "good") %}<th>{{ cls }} precision</th><th>{{ cls }} recall</th><th>{{ cls }} F1</th><th>{{ cls }} support</th>{% endfor %}</tr>
{% for axis, m in ev.metrics.items() if m.binary %}<tr><td>{{ axis }}</td><td>{{ m.binary.n }}</td><td>{{ m.binary.human_3_left_out }}</td>
{% for cls in ("bad", "good") %}{% for k in ("precision", "recall", "f1") %}<td>{{ fmt(m.binary[cls][k]) }}</td>{% endfor %}<td>{{ m.binary[cls].support }}</td>{% endfor %}</tr>
{% endfor %}</table>
{% for axis, plots in images.items() %}<h2>{{ axis }}</h2>
<div class="plots"><img alt="confusion matrix, {{ axis }}" src="data:image/png;base64,{{ plots.confusion }}">
{% if plots.calibration %}<img alt="calibration, {{ axis }}" src="data:image/png;base64,{{ plots.calibration }}">{% endif %}</div>
{% endfor %}
</body></html>
""")


def write_html(ev: Evaluation, out: Path) -> Path:
    out = Path(out)
    if not out.parent.is_dir():
        raise InputError(f"{out.parent}: output folder does not exist")
    images = {axis: {"confusion": confusion_png(ev.metrics[axis]["confusion"], axis),
                     "calibration": calibration_png(pairs, axis)} for axis, pairs in ev.pairs.items()}
    out.write_text(HTML.render(ev=ev, counts=_counts_line(ev), header=METRIC_HEADER, rows=_metric_rows(ev),
                               images=images, fmt=_fmt), encoding="utf-8")
    return out
