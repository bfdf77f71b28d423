"""`edgejudge run --ray` on a local CPU Ray cluster with the tiny Qwen3-VL artifact: judge
workers return rows, the driver writes them, and a resumed Ray run ends with exactly the results
of a plain run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import ray

from edgejudge.cli import main

JOBS = 12
OPTIONS = ["--sample", "uniform:4", "--fps", "2"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from edgejudge.export.fixtures import tiny_model_dir
    from edgejudge.export.onnx import export_onnx

    tmp = tmp_path_factory.mktemp("ray")
    artifact = export_onnx(tiny_model_dir("qwen3_vl"), None, "fp32", tmp / "artifact",
                           judge_spec="robocasa-completion")
    rng = np.random.default_rng(0)
    jobs = []
    for i in range(JOBS):
        for view in ("right", "left"):
            np.save(tmp / f"{view}{i}.npy", rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8))
        jobs.append({"id": f"ep{i}", "video": [f"right{i}.npy", f"left{i}.npy"], "instruction": f"Stack cup {i}."})
    jobs[4]["video"][0] = "missing.npy"  # a failed row, from a worker
    (tmp / "jobs.jsonl").write_text("".join(json.dumps(j) + "\n" for j in jobs))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield tmp, artifact
    ray.shutdown()


def _run(artifact, jobs, out, *extra) -> int:
    return main(["run", str(artifact), "--input", str(jobs), "--out", str(out), *OPTIONS, *extra])


def test_resumed_ray_run_equals_a_plain_run(setup, tmp_path):
    tmp, artifact = setup
    plain = tmp_path / "plain.jsonl"
    assert _run(artifact, tmp / "jobs.jsonl", plain) == 0
    expected = {r["id"]: r for r in map(json.loads, plain.read_text().splitlines())}
    assert len(expected) == JOBS and [r["ok"] for r in expected.values()].count(False) == 1

    out = tmp_path / "ray.jsonl"
    lines = plain.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:5]) + lines[5][:30])  # a run killed after 5 results, mid-line
    assert _run(artifact, tmp / "jobs.jsonl", out, "--resume", "--ray", "--num-gpus-per-worker", "0",
                "--workers", "2", "--batch", "2") == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == JOBS and rows[:5] == [json.loads(line) for line in lines[:5]]
    assert {r["id"]: r for r in rows} == expected


def test_worker_setup_errors_are_one_line(setup, tmp_path, capsys):
    tmp, artifact = setup
    assert _run(artifact, tmp / "jobs.jsonl", tmp_path / "a.jsonl", "--ray") == 2
    assert "the Ray cluster has 0 GPUs, too few for 1 per worker" in capsys.readouterr().err
    assert _run(artifact, tmp / "jobs.jsonl", tmp_path / "b.jsonl", "--ray", "--num-gpus-per-worker", "0",
                "--device", "tpu") == 2
    last = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert last == "edgejudge: error: a Ray worker could not load the judge: device 'tpu': expected cpu, cuda or cuda:N"
