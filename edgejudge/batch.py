"""`edgejudge run`: judge a file of jobs durably, resumably, and keep the ones that pass a filter.

Scoring thousands of rollouts takes hours, and a run can die at any moment (SIGKILL, a preempted
node). The results file is therefore the run's only state: one JSON line per finished job, each
stamped with the run's fingerprint (the artifact's manifest hash, the spec, the frame policy) so
that results of another run are never mixed in. Each batch's lines go out in one write() and are
fsynced before the next batch starts. A kill leaves at most one torn last line (no newline), which
`--resume` cuts away before it skips the ids already in the file. So no result is lost or written
twice, whatever the moment of the kill. Every line is a result, so any JSONL reader (and
`edgejudge eval`) reads the file as it is.

A job is one JSON object (or CSV / Parquet row) with `id`, `video` (a path, or a list of paths, one
per view of the spec) and the spec's text fields. The whole input is checked before any work starts.
A job that fails later (unreadable video, unparseable answer) becomes a row
`{"id", "ok": false, "reason"}` and the run goes on.

The judge is a `Decide` callable: a batch of jobs in, one result (a dict) or one exception per job
out. `judge_decider` builds it from an artifact. Ray workers (`--ray`) each hold one and return rows.
The driver alone writes the file, so a Ray run resumes the same way.
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import hashlib
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from edgejudge.errors import InputError
from edgejudge.jsonl import json_objects
from edgejudge.specs import JudgeSpec, compose_prompt, get_spec, read_prompts


@dataclass(frozen=True)
class Job:
    id: str
    videos: tuple[str, ...]  # one path per view, resolved against the jobs file's folder
    fields: dict[str, str]  # the spec's text fields
    where: str  # "jobs.jsonl line 3": where errors point


# A batch of jobs -> one result dict or one exception per job, in order.
Decide = Callable[[list[Job]], list]


# -- jobs ----------------------------------------------------------------------------------------

def read_jobs(path: str | Path, spec: JudgeSpec) -> list[Job]:
    """Every job of a .jsonl, .csv or .parquet file, checked against `spec`; the first problem
    found (a malformed line, a missing field, a duplicate id) is an InputError naming its line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such jobs file")
    readers = {".jsonl": _jsonl_rows, ".csv": _csv_rows, ".parquet": _parquet_rows}
    if path.suffix.lower() not in readers:
        raise InputError(f"{path}: jobs must be .jsonl, .csv or .parquet")
    jobs: list[Job] = []
    seen: dict[str, str] = {}
    try:
        for where, row in readers[path.suffix.lower()](path, spec):
            job = _job(where, row, spec, path.resolve().parent)  # absolute: Ray workers run elsewhere
            if job.id in seen:
                raise InputError(f"{where}: duplicate id {job.id!r} (first at {seen[job.id]})")
            seen[job.id] = where
            jobs.append(job)
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None
    if not jobs:
        raise InputError(f"{path}: no jobs")
    return jobs


def _required(spec: JudgeSpec) -> tuple[str, ...]:
    return ("id", "video", *spec.fields)


def _jsonl_rows(path: Path, spec: JudgeSpec) -> Iterator[tuple[str, dict]]:
    with open(path, encoding="utf-8") as f:
        yield from ((where, row) for where, _, row in json_objects(f, str(path)))


def _check_columns(path: Path, columns: Iterable[str], spec: JudgeSpec) -> None:
    missing = [c for c in _required(spec) if c not in set(columns)]
    if missing:
        needs = ", ".join(_required(spec))
        raise InputError(f"{path}: no column {', '.join(missing)} (spec {spec.name} needs {needs})")


def _csv_rows(path: Path, spec: JudgeSpec) -> Iterator[tuple[str, dict]]:
    """A CSV cell cannot hold a list: several views go in the `video` cell as a JSON array."""
    with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: spreadsheets write a BOM
        reader = csv.DictReader(f)
        _check_columns(path, reader.fieldnames or (), spec)
        for row in reader:
            where = f"{path} line {reader.line_num}"
            video = row.get("video")
            if isinstance(video, str) and video.lstrip().startswith("["):
                try:
                    row["video"] = json.loads(video)
                except json.JSONDecodeError as e:
                    raise InputError(f"{where}: video is not a valid JSON list of paths ({e.msg})") from None
            yield where, {k: v for k, v in row.items() if k is not None and v != ""}


def _parquet_rows(path: Path, spec: JudgeSpec) -> Iterator[tuple[str, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(f"{path}: reading Parquet needs pyarrow (pip install 'edgejudge[batch]')") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises its own error types for a corrupt or non-Parquet file
        raise InputError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
    _check_columns(path, table.column_names, spec)
    for number, row in enumerate(table.to_pylist(), 1):
        yield f"{path} row {number}", {k: v for k, v in row.items() if v is not None}


def _job(where: str, row: dict, spec: JudgeSpec, folder: Path) -> Job:
    if "id" not in row:
        raise InputError(f"{where}: no id")
    if not isinstance(row["id"], str) or not row["id"]:
        raise InputError(f"{where}: id must be a non-empty string, got {row['id']!r}")
    video = row.get("video")
    videos = [video] if isinstance(video, str) else video
    if not videos or not isinstance(videos, list) or not all(isinstance(v, str) and v for v in videos):
        raise InputError(f"{where}: video must be a path or a list of paths, got {video!r}")
    expected = len(spec.views) or 1
    if len(videos) != expected:
        views = f" (views {', '.join(spec.views)})" if spec.views else ""
        raise InputError(f"{where}: {len(videos)} videos, spec {spec.name} takes {expected}{views}")
    fields = {}
    for name in spec.fields:
        value = row.get(name)
        if not isinstance(value, str) or not value.strip():
            raise InputError(f"{where}: no {name} (spec {spec.name} needs {', '.join(_required(spec))})")
        fields[name] = value
    return Job(row["id"], tuple(str(folder / v) for v in videos), fields, where)


# -- results file --------------------------------------------------------------------------------

def run_fingerprint(artifact: str | Path, spec: JudgeSpec, sample: str, fps: float | None, hf: str | None,
                    prompts: dict | None = None) -> str:
    """What makes two runs' results comparable, as one short string every row carries: the
    artifact's manifest hash (the manifest holds every file's sha256, so its own hash names the
    weights exactly), the spec, the prompt texts read from the user's files, and the frames the
    judge sees."""
    from edgejudge.manifest import MANIFEST_NAME, read_manifest, sha256_file

    read_manifest(Path(artifact))  # a clear error for a folder that is not an artifact
    parts = [sha256_file(Path(artifact) / MANIFEST_NAME)[:16], spec.name, sample]
    if prompts is not None:
        texts = json.dumps(prompts, sort_keys=True, ensure_ascii=False).encode()
        parts.append("prompts=" + hashlib.sha256(texts).hexdigest()[:16])
    return " ".join(parts + ([f"fps={fps:g}"] if fps else []) + ([f"hf={hf}"] if hf else []))


def _parse_rows(path: Path, data: bytes) -> list[dict]:
    rows = []
    for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("id"), str) or not isinstance(row.get("run"), str):
            raise InputError(f"{path} line {number}: not a row written by `edgejudge run`")
        rows.append(row)
    return rows


class ResultsFile:
    """The append-only results file of one run, locked against a second writer.

    Opening it with `resume` truncates a torn last line, checks that every row was written by
    this run (same fingerprint), and loads the finished ids. Without `resume` an existing
    non-empty file is refused rather than overwritten.
    """

    def __init__(self, path: str | Path, run: str, resume: bool):
        self.path, self.run = Path(path), run
        if not self.path.parent.is_dir():
            raise InputError(f"{self.path.parent}: output folder does not exist")
        if not resume and self.path.exists() and self.path.stat().st_size > 0:
            raise InputError(f"{self.path} exists: pass --resume to continue that run, or choose another --out")
        created = not self.path.exists()
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise InputError(f"{self.path}: another edgejudge run is writing it") from None
            self._load()
        except BaseException:
            os.close(self.fd)
            raise
        if created:  # make the new file's name durable too
            folder = os.open(self.path.parent, os.O_RDONLY)
            os.fsync(folder)
            os.close(folder)

    def _load(self) -> None:
        data = self.path.read_bytes()
        whole = data[: data.rfind(b"\n") + 1]
        if len(whole) < len(data):  # a torn line from a killed run: cut it away
            os.ftruncate(self.fd, len(whole))
            os.fsync(self.fd)
        self.rows = _parse_rows(self.path, whole)
        other = next((row["run"] for row in self.rows if row["run"] != self.run), None)
        if other is not None:
            raise InputError(f"{self.path} holds results of another run ({other!r}; this run is {self.run!r}: "
                             "artifact hash, spec, frame policy): refusing to mix them; choose another --out")
        self.done = {row["id"] for row in self.rows}

    def _write(self, rows: list[dict]) -> None:
        data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()
        while data:
            data = data[os.write(self.fd, data):]
        os.fsync(self.fd)

    def append(self, rows: list[dict]) -> None:
        """Durably add finished rows (stamped with the run): once this returns, a kill cannot lose them."""
        rows = [{**row, "run": self.run} for row in rows]
        self._write(rows)
        self.rows += rows
        self.done.update(row["id"] for row in rows)

    def close(self) -> None:
        os.close(self.fd)


# -- deciding ------------------------------------------------------------------------------------

def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    text = text[0] if text else ""
    return text if isinstance(error, InputError) else f"{type(error).__name__}: {text}".rstrip(": ")


def decide_rows(decide: Decide, jobs: list[Job]) -> list[dict]:
    """Result rows for `jobs`, from one call of `decide` for the whole batch. If that call fails
    as a whole, each job is retried alone, so a bad job fails its own row and no other."""
    try:
        outcomes = decide(jobs)
        if len(outcomes) != len(jobs):
            raise RuntimeError(f"the judge returned {len(outcomes)} results for {len(jobs)} jobs")
    except Exception as error:
        if len(jobs) > 1:
            return [row for job in jobs for row in decide_rows(decide, [job])]
        outcomes = [error]
    rows = []
    for job, outcome in zip(jobs, outcomes):
        if isinstance(outcome, BaseException):
            rows.append({"id": job.id, "ok": False, "reason": _reason(outcome)})
        else:
            rows.append({"id": job.id, "ok": True, **outcome})  # a judge may say ok: false (unparseable)
    return rows


def judge_decider(artifact: str | Path, spec_name: str, sample: str, fps: float | None, hf: str | None,
                  device: str, prompt_dir: str | None = None) -> Decide:
    """The artifact's judge as a Decide. Module-level and built from plain values, so that a Ray
    worker can construct it from a pickled `partial`."""
    from edgejudge.judge import Judge

    judge = Judge.load(artifact, spec=spec_name, device=device, hf=hf, prompt_dir=prompt_dir)
    return partial(_judge_jobs, judge, sample, fps)


def _judge_jobs(judge, sample: str, fps: float | None, jobs: list[Job]) -> list:
    """One result (or exception) per job. Candidate-label judges score every view of every job
    in one engine call, where prompts of one length share a batch; each decision is the mean over
    its views, as in `Judge.check`. Judges that answer in text decode one job at a time.
    Videos are read per job, so an unreadable one fails only its job."""
    from edgejudge.runtime.model import frame_picker
    from edgejudge.runtime.video import read_video

    spec, engine = judge.spec, judge.engine
    outcomes: list = [None] * len(jobs)
    prompts: dict[int, list] = {}  # job index -> one prompt per view
    for i, job in enumerate(jobs):
        try:
            pick = frame_picker(engine.model, sample)
            clips = [read_video(v, fps=fps if v.endswith(".npy") else None, pick=pick) for v in job.videos]
            if spec.answer == "labels":
                system, text = judge.compose(job.fields)
                prompts[i] = [engine.prompt([clip], text, system) for clip in clips]
            else:
                outcomes[i] = _row(judge.ask(clips[0], sample="none", **job.fields).to_dict())
        except Exception as error:
            outcomes[i] = error
    if prompts:
        decisions = judge.decide(list(prompts.values()), list(spec.views or ("video",)))
        for i, decision in zip(prompts, decisions):
            outcomes[i] = _row(decision.to_dict())
    return outcomes


def _row(result: dict) -> dict:
    """A judge's result as a row: per-call timings mean nothing inside a batch, and absent values
    are left out rather than written as null."""
    return {k: v for k, v in result.items() if k != "timings_ms" and v is not None}


# -- keep filter ---------------------------------------------------------------------------------

_TOKEN = re.compile(r"\"[^\"]*\"|'[^']*'|>=|<=|==|!=|>|<|[^\s<>=!\"']+")
_FIELD = re.compile(r"[A-Za-z_][\w.-]*$")
_MISSING = object()


@dataclass(frozen=True)
class Keep:
    """A row filter like `score>=4`, `prediction==complete`, `scores.complete<7 and views.left.complete<7`.

    Comparisons (`== != >= <= > <`) of a field (dotted for nested values) with a number or a
    word (quotes for values with operators), joined by `and` / `or` (`and` binds tighter).
    Parsed here, never evaluated as Python. Failed rows are never kept; a field a row lacks
    makes its comparison false.
    """

    expr: str
    any_of: tuple[tuple[tuple[str, str, str], ...], ...]  # or of ands of (field, op, literal)

    @property
    def fields(self) -> set[str]:
        return {field for clause in self.any_of for field, _, _ in clause}

    def __call__(self, row: dict) -> bool:
        return row.get("ok") is True and any(all(_compare(_lookup(row, f), op, v) for f, op, v in c)
                                             for c in self.any_of)


def parse_keep(expr: str) -> Keep:
    tokens, at = [], 0
    while at < len(expr):
        if expr[at].isspace():
            at += 1
            continue
        token = _TOKEN.match(expr, at)
        if token is None:
            raise InputError(f"--keep {expr!r}: cannot read it at {expr[at:]!r} (expected e.g. score>=4)")
        tokens.append(token.group())
        at = token.end()
    any_of, clause, words = [], [], []
    for token in [*tokens, "or"]:  # the last "or" closes the last comparison
        if token not in ("and", "or"):
            words.append(token)
            continue
        clause.append(_comparison(expr, words))
        words = []
        if token == "or":
            any_of.append(tuple(clause))
            clause = []
    return Keep(expr, tuple(any_of))


def _comparison(expr: str, words: list[str]) -> tuple[str, str, str]:
    """FIELD OP VALUE, where an unquoted VALUE may be several words (`label==not complete`)."""
    ops = ("==", "!=", ">=", "<=", ">", "<")
    if len(words) < 3 or not _FIELD.match(words[0]) or words[1] not in ops or any(w in ops for w in words[2:]):
        raise InputError(f"--keep {expr!r}: expected FIELD OP VALUE, got {' '.join(words) or 'nothing'!r}")
    quoted = len(words) == 3 and words[2][:1] in "\"'"
    return words[0], words[1], words[2][1:-1] if quoted else " ".join(words[2:])


def _lookup(row: dict, field: str):
    value = row
    for part in field.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _number(value) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _compare(actual, op: str, literal: str) -> bool:
    """Numbers compare as numbers; anything else only by == / != on its text."""
    if actual is _MISSING or actual is None:
        return False
    a, b = _number(actual) if not isinstance(actual, str) else None, _number(literal)
    if a is not None and b is not None:
        return {"==": a == b, "!=": a != b, ">=": a >= b, "<=": a <= b, ">": a > b, "<": a < b}[op]
    text = str(actual).lower() if isinstance(actual, bool) else str(actual)
    if op == "==":
        return text == literal
    if op == "!=":
        return text != literal
    return False


def write_kept(out: str | Path, rows: list[dict], keep: Keep) -> tuple[Path, int]:
    """Write the rows passing `keep` to <out>.kept.jsonl, whole (temp file + rename), from every
    result of the run including those of earlier, resumed attempts."""
    ok = [row for row in rows if row.get("ok") is True]
    absent = sorted(f for f in keep.fields if ok and all(_lookup(r, f) is _MISSING for r in ok))
    if absent:
        have = sorted({k for r in ok for k in r})
        raise InputError(f"--keep: no result has a field {', '.join(absent)} (results have {', '.join(have)}); "
                         "the results are saved: rerun with --resume and a corrected --keep")
    kept = [row for row in rows if keep(row)]
    path = Path(out).with_name(Path(out).name.removesuffix(".jsonl") + ".kept.jsonl")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in kept))
    os.replace(tmp, path)
    return path, len(kept)


# -- running -------------------------------------------------------------------------------------

def batches_of(jobs: list[Job], size: int) -> Iterator[list[Job]]:
    for start in range(0, len(jobs), size):
        yield jobs[start : start + size]


def local_rows(load: Callable[[], Decide], batches: Iterable[list[Job]]) -> Iterator[list[dict]]:
    decide = load()
    for batch in batches:
        yield decide_rows(decide, batch)


class _Worker:
    """A Ray actor holding one judge; it returns rows and never touches the results file. A judge
    that fails to load is reported by `load_error`, so the driver can say why in one line."""

    def __init__(self, load: Callable[[], Decide]):
        try:
            self.decide, self.error = load(), None
        except Exception as error:
            self.decide, self.error = None, _reason(error)

    def load_error(self) -> str | None:
        return self.error

    def rows(self, jobs: list[Job]) -> list[dict]:
        return decide_rows(self.decide, jobs)


def ray_rows(load: Callable[[], Decide], batches: Iterable[list[Job]], address: str | None,
             workers: int | None, gpus_per_worker: float) -> Iterator[list[dict]]:
    """Rows from `workers` Ray actors (default: one per `gpus_per_worker` GPUs of the cluster, or
    one CPU worker), in the order batches finish. Each actor has two batches in flight so it
    never waits for the driver."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address=address or None, include_dashboard=False, log_to_driver=False)
    actors = []
    try:
        if workers is None:
            gpus = ray.cluster_resources().get("GPU", 0)
            workers = int(gpus // gpus_per_worker) if gpus_per_worker > 0 else 1
            if workers == 0:
                raise InputError(f"the Ray cluster has {gpus:g} GPUs, too few for {gpus_per_worker:g} per worker "
                                 "(pass --num-gpus-per-worker 0 for CPU workers)")
        worker_class = ray.remote(num_cpus=1, num_gpus=gpus_per_worker)(_Worker)
        actors = [worker_class.remote(load) for _ in range(workers)]
        error = next((e for e in ray.get([actor.load_error.remote() for actor in actors]) if e), None)
        if error:
            raise InputError(f"a Ray worker could not load the judge: {error}")
        pending: dict = {}
        batches = iter(batches)

        def submit(actor) -> None:
            batch = next(batches, None)
            if batch is not None:
                pending[actor.rows.remote(batch)] = actor

        for actor in actors:
            submit(actor)
            submit(actor)
        while pending:
            [ready], _ = ray.wait(list(pending), num_returns=1)
            actor = pending.pop(ready)
            submit(actor)
            yield ray.get(ready)
    finally:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()


def run_jobs(jobs: list[Job], results: ResultsFile, rows: Callable[[Iterable[list[Job]]], Iterator[list[dict]]],
             batch_size: int) -> int:
    """Judge every job not yet in `results`, appending each finished batch durably; returns
    how many jobs this call finished. Progress is shown in videos per second."""
    from tqdm import tqdm

    todo = [job for job in jobs if job.id not in results.done]
    if not todo:  # a resumed run that had finished: no judge to load
        return 0
    videos = {job.id: len(job.videos) for job in jobs}
    done_videos = sum(n for job_id, n in videos.items() if job_id in results.done)
    failed = sum(1 for row in results.rows if row.get("ok") is not True)
    with tqdm(total=sum(videos.values()), initial=done_videos, unit="video", desc="judging",
              dynamic_ncols=True, file=sys.stderr) as bar:
        for batch_rows in rows(batches_of(todo, batch_size)):
            results.append(batch_rows)
            failed += sum(1 for row in batch_rows if row.get("ok") is not True)
            bar.set_postfix(failed=failed, refresh=False)
            bar.update(sum(videos.get(row["id"], 0) for row in batch_rows))
    return len(todo)


def run_command(args: argparse.Namespace) -> int:
    """`edgejudge run`: everything is checked (jobs, artifact, output file, filter) before the
    judge loads, so a mistake costs seconds, not a model load."""
    from edgejudge.manifest import read_manifest
    from edgejudge.runtime.video import parse_sample

    name = args.spec or read_manifest(Path(args.artifact)).judge_spec
    if not name:
        raise InputError(f"{args.artifact} records no judge spec: pass --spec")
    spec = get_spec(name)
    for option, value in (("--batch", args.batch), ("--workers", args.workers)):
        if value is not None and value < 1:
            raise InputError(f"{option} {value}: must be at least 1")
    keep = parse_keep(args.keep) if args.keep else None
    if args.fps is not None and not args.fps > 0:
        raise InputError(f"--fps {args.fps}: must be positive")
    sample = args.sample or spec.sample
    jobs = read_jobs(args.input, spec)
    # Mistakes that would fail every job fail here instead.
    prompt_dir = str(Path(args.prompt_dir or args.artifact).resolve())
    prompts = read_prompts(spec, prompt_dir) if spec.prompt_sources else None
    compose_prompt(spec, jobs[0].fields, prompts)
    arrays = any(v.endswith(".npy") for job in jobs for v in job.videos)
    if parse_sample(sample).kind == "fps" and args.fps is None and arrays:
        raise InputError(f"--sample {sample} needs the frame rate of the .npy videos: pass --fps")
    results = ResultsFile(args.out, run_fingerprint(args.artifact, spec, sample, args.fps, args.hf, prompts), args.resume)
    try:
        gpu_workers = args.ray is not None and args.num_gpus_per_worker > 0
        load = partial(judge_decider, str(Path(args.artifact).resolve()), spec.name, sample, args.fps, args.hf,
                       args.device or ("cuda" if gpu_workers else "cpu"), prompt_dir)
        if args.ray is None:
            rows = partial(local_rows, load)
        else:
            rows = partial(ray_rows, load, address=args.ray, workers=args.workers,
                           gpus_per_worker=args.num_gpus_per_worker)
        try:
            new = run_jobs(jobs, results, rows, args.batch)
        except KeyboardInterrupt:
            print(f"edgejudge: interrupted; {len(results.rows)} results are saved in {args.out}: "
                  "rerun with --resume to finish", file=sys.stderr)
            return 130
    finally:
        results.close()
    ok = sum(1 for row in results.rows if row.get("ok") is True)
    print(f"{args.out}: {len(results.rows)} results ({ok} ok, {len(results.rows) - ok} failed), {new} new")
    if keep:
        path, count = write_kept(args.out, results.rows, keep)
        print(f"{path}: {count} kept ({keep.expr})")
    return 0
