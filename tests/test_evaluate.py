"""`edgejudge eval`: metrics on hand-made fixtures checked by hand, the HTML report, bad inputs."""

import base64
import json
import re

import numpy as np
import pytest

from edgejudge.cli import main
from edgejudge.evaluate import POOLED, evaluate

# Single-axis fixture. Joined pairs (human, judge): a (1,1), b (2,3), c (3,3), d (4,5), e (5,5), f (5,2).
# g failed, h has no result (missing), z has no label (unmatched).
LABELS = "id,score\na,1\nb,2\nc,3\nd,4\ne,5\nf,5\ng,4\nh,2\n"
RESULTS = [
    {"id": "a", "ok": True, "score": 1, "digits": {"1": 0.8, "2": 0.2, "3": 0, "4": 0, "5": 0}},
    {"id": "b", "ok": True, "score": 3},
    {"id": "c", "ok": True, "score": 3},
    # Digits that sum to 0.5 (the rest of the vocabulary took the other half): renormalized.
    {"id": "d", "ok": True, "score": 5, "digits": {"1": 0, "2": 0, "3": 0, "4": 0.25, "5": 0.25}},
    {"id": "e", "ok": True, "score": 5},
    {"id": "f", "ok": True, "score": 2},
    {"id": "g", "ok": False, "reason": "no JSON object in the answer", "raw": "hmm"},
    {"id": "z", "ok": True, "score": 4},
]


def write(tmp_path, results, labels, name="results.jsonl"):
    results_path, labels_path = tmp_path / name, tmp_path / "human.csv"
    results_path.write_text("".join(json.dumps(r) + "\n" for r in results) if isinstance(results, list) else results)
    labels_path.write_text(labels)
    return results_path, labels_path


def test_single_axis_metrics_by_hand(tmp_path):
    ev = evaluate(*write(tmp_path, RESULTS, LABELS))
    assert ev.counts == {"labels": 8, "scored": 6, "missing": 1, "failed": 1, "unmatched": 1}
    assert ev.examples == {"missing": ["h"], "failed": ["g"], "unmatched": ["z"]}
    assert ev.failure_reasons == {"no JSON object in the answer": 1}
    m = ev.metrics["score"]
    assert m["n"] == 6
    assert m["exact"] == pytest.approx(3 / 6)  # a, c, e
    assert m["within_1"] == pytest.approx(5 / 6)  # |diff| = 0, 1, 0, 1, 0, 3: only f is off by more than 1
    assert m["mae"] == pytest.approx(5 / 6)  # (0 + 1 + 0 + 1 + 0 + 3) / 6
    human, judge = [1, 2, 3, 4, 5, 5], [1, 3, 3, 5, 5, 2]
    assert m["pearson"]["r"] == pytest.approx(np.corrcoef(human, judge)[0, 1])  # 0.586 by hand
    assert m["pearson"]["r"] == pytest.approx(0.5861, abs=1e-4)
    # Spearman = Pearson of the ranks (ties get their mean rank).
    assert m["spearman"]["r"] == pytest.approx(np.corrcoef([1, 2, 3, 4, 5.5, 5.5], [1, 3.5, 3.5, 5.5, 5.5, 2])[0, 1])
    assert m["confusion"] == [  # rows human 1..5, columns judge 1..5
        [1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 0, 0, 1],
        [0, 1, 0, 0, 1],
    ]
    # Binary, c (human 3) left out. Truth: a bad, b bad, d good, e good, f good.
    # Predicted: a bad, b middle (judge 3), d good, e good, f bad.
    # bad: TP a, FP f, FN b -> precision 1/2, recall 1/2. good: TP d, e; FN f -> precision 1, recall 2/3.
    b = m["binary"]
    assert (b["n"], b["human_3_left_out"]) == (5, 1)
    assert b["bad"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert b["good"]["precision"] == 1.0 and b["good"]["recall"] == pytest.approx(2 / 3)
    assert b["good"]["f1"] == pytest.approx(0.8)  # 2 * 1 * 2/3 / (1 + 2/3)
    # Expected scores: a 1*0.8 + 2*0.2 = 1.2 vs human 1; d (4*0.25 + 5*0.25) / 0.5 = 4.5 vs human 4.
    assert m["expected"]["n"] == 2
    assert m["expected"]["mae"] == pytest.approx((0.2 + 0.5) / 2)


def test_multi_axis_per_axis_and_pooled(tmp_path):
    labels = ("id,axis,score\nv1,gravity,5\nv1,collision,2\nv2,gravity,1\nv2,collision,4\n"
              "v3,gravity,3\nv3,collision,3\nv4,gravity,4\n")
    results = [
        {"id": "v1", "ok": True, "scores": {"gravity": 5, "collision": 1, "fluid": 3},
         "digits": {"gravity": {"1": 0, "2": 0, "3": 0, "4": 0.5, "5": 0.5}}},
        {"id": "v2", "ok": True, "scores": {"gravity": 2, "collision": 4, "fluid": 3}},
        {"id": "v3", "ok": True, "scores": {"gravity": 3, "collision": 5, "fluid": 3}},
        {"id": "v4", "ok": True, "scores": {"collision": 2}},  # no gravity score: v4/gravity is missing
    ]
    ev = evaluate(*write(tmp_path, results, labels))
    assert ev.counts == {"labels": 7, "scored": 6, "missing": 1, "failed": 0, "unmatched": 0}
    assert ev.examples["missing"] == ["v4/gravity"]
    assert ev.unlabelled_axes == ["fluid"]
    assert list(ev.metrics) == ["gravity", "collision", POOLED]
    gravity, collision, pooled = (ev.metrics[a] for a in ("gravity", "collision", POOLED))
    # gravity (5,5) (1,2) (3,3): exact 2/3, MAE 1/3, all within 1.
    assert (gravity["n"], gravity["exact"], gravity["mae"], gravity["within_1"]) == (3, pytest.approx(2 / 3),
                                                                                   pytest.approx(1 / 3), 1.0)
    # collision (2,1) (4,4) (3,5): exact 1/3, MAE (1 + 0 + 2) / 3 = 1, within 1: 2/3.
    assert (collision["exact"], collision["mae"], collision["within_1"]) == (pytest.approx(1 / 3), 1.0,
                                                                           pytest.approx(2 / 3))
    assert (pooled["n"], pooled["exact"], pooled["mae"]) == (6, 0.5, pytest.approx(4 / 6))
    assert gravity["expected"] == {"n": 1, "mae": 0.5, "pearson": None, "spearman": None}  # E = 4.5 vs 5
    assert collision["expected"] is None


def test_hedging_judge_and_undefined_correlation(tmp_path):
    """A judge that answers 3 everywhere has no correlation and zero recall, not a perfect binary score."""
    labels = "id,score\na,1\nb,2\nc,4\nd,5\n"
    ev = evaluate(*write(tmp_path, [{"id": i, "ok": True, "score": 3} for i in "abcd"], labels))
    m = ev.metrics["score"]
    assert m["pearson"] is None and m["spearman"] is None
    assert m["binary"]["bad"] == {"precision": None, "recall": 0.0, "f1": 0.0, "support": 2}
    assert m["binary"]["good"]["recall"] == 0.0
    assert m["within_1"] == 0.5 and m["exact"] == 0.0  # |diff| = 2, 1, 1, 2


def test_integer_json_ids_and_spreadsheet_csv(tmp_path):
    """JSON ids may be numbers; a spreadsheet's CSV may start with a BOM and pad its header."""
    results_path, labels_path = write(tmp_path, [{"id": 1, "ok": True, "score": 4}, {"id": 2, "ok": True, "score": 2}], "")
    labels_path.write_bytes("\ufeffid , score\n1,4\n2, 1\n".encode("utf-8"))
    ev = evaluate(results_path, labels_path)
    assert ev.counts["scored"] == 2 and ev.metrics["score"]["mae"] == 0.5


def test_reads_judge_output_rows(tmp_path):
    """Rows as `edgejudge judge`/`run` write them: `scores` null, digits under `distribution`,
    an unparseable answer as ok=false with its reason."""
    results = [
        {"id": "r1", "ok": True, "key": "gravity", "score": 4, "scores": None, "reason": None, "raw": '{"gravity": 4}',
         "distribution": {"1": 0.0, "2": 0.0, "3": 0.1, "4": 0.6, "5": 0.3}, "expected": 4.2},
        {"id": "r2", "ok": False, "key": None, "score": None, "scores": None, "reason": "no JSON object in the answer",
         "raw": "plausible", "distribution": None, "expected": None},
        {"id": "r3", "ok": True, "key": "gravity", "score": 2, "scores": None, "distribution": None},
    ]
    ev = evaluate(*write(tmp_path, results, "id,score\nr1,5\nr2,3\nr3,2\n"))
    assert ev.counts == {"labels": 3, "scored": 2, "missing": 0, "failed": 1, "unmatched": 0}
    assert ev.metrics["score"]["expected"]["n"] == 1
    assert ev.metrics["score"]["expected"]["mae"] == pytest.approx(5 - 4.2)  # 3*0.1 + 4*0.6 + 5*0.3 = 4.2


def test_cli_html_report_and_summary(tmp_path, capsys):
    results_path, labels_path = write(tmp_path, RESULTS, LABELS)
    out = tmp_path / "report.html"
    assert main(["eval", str(results_path), "--labels", str(labels_path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "8 labels: 6 scored, 1 missing, 1 failed; 1 results without a label" in printed
    assert "| score | 6 | 0.500 | 0.833 | 0.833 |" in printed
    assert f"report: {out}" in printed
    html = out.read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(images) == 2  # confusion heatmap + calibration
    assert all(base64.b64decode(i).startswith(b"\x89PNG\r\n\x1a\n") for i in images)
    assert not re.search(r'(src|href)="(?!data:)', html)  # self-contained: no external assets
    assert "no JSON object in the answer" in html and "0.833" in html

    assert main(["eval", str(results_path), "--labels", str(labels_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["counts"]["unmatched"] == 1 and report["axes"]["score"]["exact"] == 0.5
    assert report["report"] is None


BAD_INPUTS = [
    # (results file text, labels CSV text, part of the error)
    (None, LABELS, "results.jsonl: not found"),
    ('{"id": "a", "ok": true, "score": 1}\n', None, "human.csv: not found"),
    ('{"id": "a", "ok": true, "score": 1}\n{"id": "b", "ok": true, "score": 2}\n{"id": "c", "ok": tru\n', LABELS,
     "results.jsonl line 3: not valid JSON"),
    ('[1, 2]\n', LABELS, "results.jsonl line 1: expected a JSON object"),
    ('{"id": "a", "score": 1}\n', LABELS, "needs an 'id' and a boolean 'ok'"),
    ('{"id": "a", "ok": true}\n', LABELS, "needs 'score' or 'scores'"),
    ('{"id": "a", "ok": true, "score": 7}\n', LABELS, "score 7 is not an integer 1..5"),
    ('{"id": "a", "ok": true, "score": "4"}\n', LABELS, 'score "4" is not an integer 1..5'),
    ('{"id": "a", "ok": true, "score": 1, "digits": {"1": 1}}\n', LABELS, "digits must map"),
    ('{"id": "a", "ok": true, "score": 1}\n\n{"id": "a", "ok": true, "score": 2}\n', LABELS,
     "results.jsonl line 3: duplicate id 'a' (first on line 1)"),
    ("", LABELS, "no results"),
    ('{"id": "a", "ok": true, "score": 1}\n', "id,rating\na,1\n", "missing column score"),
    ('{"id": "a", "ok": true, "score": 1}\n', "", "empty file"),
    ('{"id": "a", "ok": true, "score": 1}\n', "id,score\na,1\nb,2\na,3\n", "human.csv line 4: duplicate id 'a' (first on line 2)"),
    ('{"id": "a", "ok": true, "score": 1}\n', "id,score\na,x\n", "human score 'x' is not an integer 1..5"),
    ('{"id": "a", "ok": true, "score": 1}\n', "id,score\nb,1\n", "no id is in both"),
    ('{"id": "a", "ok": false, "reason": "video unreadable"}\n', "id,score\na,1\n", "no labelled id has a judge score"),
    ('{"id": "a", "ok": true, "scores": {"gravity": 1}}\n', "id,score\na,1\n", "has no axis column"),
    ('{"id": "a", "ok": true, "score": 1}\n', "id,axis,score\na,gravity,1\n", "multi-axis results need 'scores'"),
]


@pytest.mark.parametrize("results, labels, message", BAD_INPUTS)
def test_bad_inputs_exit_2(tmp_path, capsys, results, labels, message):
    results_path, labels_path = tmp_path / "results.jsonl", tmp_path / "human.csv"
    if results is not None:
        results_path.write_text(results)
    if labels is not None:
        labels_path.write_text(labels)
    assert main(["eval", str(results_path), "--labels", str(labels_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgejudge: error: ") and err.count("\n") == 1
    assert message in err


def test_missing_output_folder_exit_2(tmp_path, capsys):
    results_path, labels_path = write(tmp_path, RESULTS, LABELS)
    assert main(["eval", str(results_path), "--labels", str(labels_path), "--out", str(tmp_path / "no" / "r.html")]) == 2
    assert "output folder does not exist" in capsys.readouterr().err
