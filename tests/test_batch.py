"""`edgejudge run`'s machinery without a model: job files (JSONL, CSV, Parquet) and their errors,
the durable results file (torn lines, resume, another run's file, a second writer), per-job
failures, and the --keep filter. A deterministic decider stands in for the judge; the real judge
(tiny model, SIGKILL and resume) is in tests/test_batch_judge.py."""

from __future__ import annotations

import json

import pytest

from edgejudge.batch import Job, ResultsFile, decide_rows, local_rows, parse_keep, read_jobs, run_jobs, write_kept
from edgejudge.errors import InputError
from edgejudge.specs import get_spec

SPEC = get_spec("robocasa-completion")  # two views: right, left; one field: instruction
RUN = "0123456789abcdef robocasa-completion uniform:64"


def _job_dicts(n: int) -> list[dict]:
    return [{"id": f"ep{i}", "video": [f"ep{i}_right.mp4", f"ep{i}_left.mp4"], "instruction": f"task {i}"}
            for i in range(n)]


def _write_jsonl(path, rows) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def _decide(jobs: list[Job]) -> list:
    """A deterministic judge: the score comes from the id; a video path with "bad" fails its job."""
    out = []
    for job in jobs:
        if any("bad" in v for v in job.videos):
            out.append(InputError(f"{job.videos[0]}: no such file"))
        else:
            score = int(job.id[2:]) % 5 + 1
            out.append({"label": "complete" if score >= 3 else "not complete", "score": score,
                        "scores": {"complete": 1.0 / score, "not complete": 0.5}})
    return out


def test_jobs_from_jsonl_csv_and_parquet_are_the_same(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _job_dicts(3)
    _write_jsonl(tmp_path / "jobs.jsonl", rows)
    (tmp_path / "jobs.csv").write_text("id,video,instruction\n" + "".join(
        f"{r['id']},\"{json.dumps(r['video']).replace(chr(34), chr(34) * 2)}\",{r['instruction']}\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "jobs.parquet")
    jobs = {suffix: read_jobs(tmp_path / f"jobs.{suffix}", SPEC) for suffix in ("jsonl", "csv", "parquet")}
    strip = [(j.id, j.videos, j.fields) for j in jobs["jsonl"]]
    assert strip == [(j.id, j.videos, j.fields) for j in jobs["csv"]] == [(j.id, j.videos, j.fields) for j in jobs["parquet"]]
    assert jobs["jsonl"][1].videos == (str(tmp_path / "ep1_right.mp4"), str(tmp_path / "ep1_left.mp4"))
    assert jobs["jsonl"][2].fields == {"instruction": "task 2"} and jobs["jsonl"][2].where.endswith("jobs.jsonl line 3")
    assert jobs["csv"][2].where.endswith("jobs.csv line 4")


@pytest.mark.parametrize("rows, message", [
    (['{"id": "a", "video": ["r", "l"], "instruction": "x"}', '{"id": "b", "video": '], "line 2: not valid JSON"),
    (['["a", "b"]'], "line 1: expected a JSON object, got list"),
    ([{"video": ["r", "l"], "instruction": "x"}], "line 1: no id"),
    ([{"id": 7, "video": ["r", "l"], "instruction": "x"}], "line 1: id must be a non-empty string, got 7"),
    ([{"id": "a", "instruction": "x"}], "line 1: video must be a path or a list of paths, got None"),
    ([{"id": "a", "video": "one.mp4", "instruction": "x"}], "line 1: 1 videos, spec robocasa-completion takes 2 (views right, left)"),
    ([{"id": "a", "video": ["r", "l"]}], "line 1: no instruction (spec robocasa-completion needs id, video, instruction)"),
    ([{"id": "a", "video": ["r", "l"], "instruction": "  "}], "line 1: no instruction"),
    ([*_job_dicts(2), "", _job_dicts(1)[0]], "line 4: duplicate id 'ep0' (first at"),
    ([], "no jobs"),
])
def test_bad_jsonl_is_one_clear_error(tmp_path, rows, message):
    _write_jsonl(tmp_path / "jobs.jsonl", rows)
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_jobs(tmp_path / "jobs.jsonl", SPEC)


def test_bad_csv_and_files(tmp_path):
    (tmp_path / "a.csv").write_text("id,video\nep0,x.mp4\n")
    with pytest.raises(InputError, match=r"a.csv: no column instruction \(spec robocasa-completion needs id, video, instruction\)"):
        read_jobs(tmp_path / "a.csv", SPEC)
    (tmp_path / "b.csv").write_text('id,video,instruction\nep0,"[""r.mp4"", ",x\n')
    with pytest.raises(InputError, match="b.csv line 2: video is not a valid JSON list"):
        read_jobs(tmp_path / "b.csv", SPEC)
    (tmp_path / "c.csv").write_text('id,video,instruction\nep0,"[""r"",""l""]",\n')
    with pytest.raises(InputError, match="c.csv line 2: no instruction"):
        read_jobs(tmp_path / "c.csv", SPEC)
    (tmp_path / "d.parquet").write_text("not parquet")
    with pytest.raises(InputError, match="d.parquet: not a readable Parquet file"):
        read_jobs(tmp_path / "d.parquet", SPEC)
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(InputError, match="jobs must be .jsonl, .csv or .parquet"):
        read_jobs(tmp_path / "e.txt", SPEC)
    with pytest.raises(InputError, match="no such jobs file"):
        read_jobs(tmp_path / "missing.jsonl", SPEC)


def _jobs(tmp_path, n: int, bad: tuple[int, ...] = ()) -> list[Job]:
    rows = _job_dicts(n)
    for i in bad:
        rows[i]["video"] = ["bad.mp4", "bad.mp4"]
    _write_jsonl(tmp_path / "jobs.jsonl", rows)
    return read_jobs(tmp_path / "jobs.jsonl", SPEC)


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_resume_after_torn_line_equals_one_run(tmp_path):
    jobs = _jobs(tmp_path, 10, bad=(3,))
    whole = tmp_path / "whole.jsonl"
    results = ResultsFile(whole, RUN, resume=False)
    assert run_jobs(jobs, results, lambda batches: local_rows(lambda: _decide, batches), batch_size=4) == 10
    results.close()
    expected = {row["id"]: row for row in _lines(whole)}
    assert len(expected) == 10 and expected["ep3"] == {"id": "ep3", "ok": False, "reason": f"{tmp_path}/bad.mp4: no such file",
                                              "run": RUN}
    assert expected["ep4"]["ok"] is True and expected["ep4"]["score"] == 5 and expected["ep4"]["run"] == RUN

    # A run killed mid-write: 6 whole lines and half of the 7th.
    out = tmp_path / "out.jsonl"
    text = whole.read_text()
    cut = [i for i, c in enumerate(text) if c == "\n"][5] + 1
    out.write_text(text[: cut + 20])
    with pytest.raises(InputError, match="out.jsonl exists: pass --resume"):
        ResultsFile(out, RUN, resume=False)
    results = ResultsFile(out, RUN, resume=True)
    assert len(results.done) == 6 and out.read_text() == text[:cut]  # the torn line is gone
    with pytest.raises(InputError, match="another edgejudge run is writing it"):
        ResultsFile(out, RUN, resume=True)
    assert run_jobs(jobs, results, lambda batches: local_rows(lambda: _decide, batches), batch_size=3) == 4
    results.close()
    rows = _lines(out)
    assert len(rows) == 10 and {row["id"]: row for row in rows} == expected


def test_interrupted_run_keeps_every_finished_batch(tmp_path):
    """Ctrl-C (or any exception) between batches: what was written stays, and resume finishes."""
    jobs = _jobs(tmp_path, 9)
    calls = []

    def decide(batch):
        calls.append(len(batch))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return _decide(batch)

    out = tmp_path / "out.jsonl"
    results = ResultsFile(out, RUN, resume=False)
    with pytest.raises(KeyboardInterrupt):
        run_jobs(jobs, results, lambda batches: local_rows(lambda: decide, batches), batch_size=2)
    results.close()
    assert [row["id"] for row in _lines(out)] == ["ep0", "ep1", "ep2", "ep3"]
    results = ResultsFile(out, RUN, resume=True)
    assert run_jobs(jobs, results, lambda batches: local_rows(lambda: _decide, batches), batch_size=2) == 5
    results.close()
    assert sorted(row["id"] for row in _lines(out)) == sorted(j.id for j in jobs)


def test_results_of_another_run_or_tool_are_refused(tmp_path):
    out = tmp_path / "out.jsonl"
    _write_jsonl(out, [{"id": "ep0", "ok": True, "score": 3, "run": "ffffffffffffffff robocasa-completion uniform:64"}])
    with pytest.raises(InputError, match="holds results of another run .*refusing to mix them"):
        ResultsFile(out, RUN, resume=True)
    assert out.read_text().count("\n") == 1  # untouched
    _write_jsonl(out, [{"id": "ep0", "score": 3}])
    with pytest.raises(InputError, match="out.jsonl line 1: not a row written by `edgejudge run`"):
        ResultsFile(out, RUN, resume=True)
    with pytest.raises(InputError, match="output folder does not exist"):
        ResultsFile(tmp_path / "nowhere" / "out.jsonl", RUN, resume=False)
    fresh = ResultsFile(tmp_path / "new.jsonl", RUN, resume=True)  # --resume on a first run starts it
    assert fresh.done == set()
    fresh.close()


def test_a_failing_batch_is_retried_job_by_job(tmp_path):
    jobs = _jobs(tmp_path, 4)

    def decide(batch):
        if len(batch) > 1:
            raise RuntimeError("batch too large for the GPU")
        if batch[0].id == "ep2":
            raise ValueError("unexpected shape\nsecond line")
        return _decide(batch)

    rows = decide_rows(decide, jobs)
    assert [r["id"] for r in rows] == ["ep0", "ep1", "ep2", "ep3"]
    assert [r["ok"] for r in rows] == [True, True, False, True]
    assert rows[2]["reason"] == "ValueError: unexpected shape"
    assert [r["reason"] for r in decide_rows(lambda batch: [], jobs[:2])] == \
        ["RuntimeError: the judge returned 0 results for 1 jobs"] * 2


@pytest.mark.parametrize("expr, expected", [
    ("score>=4", ["a", "d"]),
    ("score >= 4 and label==complete", ["a"]),
    ("label == 'not complete'", ["b", "d"]),
    ("label==not complete", ["b", "d"]),
    ("label!=complete", ["b", "d"]),  # c has no label: every comparison on it is false
    ("score<2 or scores.complete>0.5", ["a", "b"]),
    ("score>4.5", ["a"]),
    ('axis=="a or b"', ["c"]),
])
def test_keep_filter(expr, expected):
    rows = [
        {"id": "a", "ok": True, "score": 5, "label": "complete", "scores": {"complete": 0.9}},
        {"id": "b", "ok": True, "score": 1, "label": "not complete", "scores": {"complete": 0.1}},
        {"id": "c", "ok": True, "score": 3, "axis": "a or b"},
        {"id": "d", "ok": True, "score": 4, "label": "not complete"},
        {"id": "e", "ok": False, "score": 5, "reason": "failed rows are never kept"},
    ]
    keep = parse_keep(expr)
    assert [r["id"] for r in rows if keep(r)] == expected


@pytest.mark.parametrize("expr", ["score", "score>=", ">=4", "score>=4 and", "score=4", "score>=4 label==x",
                                  "__import__('os')", "score>=>4", "1score>2"])
def test_keep_filter_syntax_errors(expr):
    with pytest.raises(InputError, match="--keep"):
        parse_keep(expr)


def test_write_kept(tmp_path):
    rows = [{"id": "a", "ok": True, "score": 5}, {"id": "b", "ok": True, "score": 2}, {"id": "c", "ok": False}]
    path, count = write_kept(tmp_path / "results.jsonl", rows, parse_keep("score>=4"))
    assert path == tmp_path / "results.kept.jsonl" and count == 1 and _lines(path) == [rows[0]]
    with pytest.raises(InputError, match="no result has a field scroe .*rerun with --resume"):
        write_kept(tmp_path / "results.jsonl", rows, parse_keep("scroe>=4"))
