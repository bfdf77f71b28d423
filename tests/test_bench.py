"""`edgejudge bench` on the tiny models, CPU:

- `bench --workload W1 --preset tiny` writes results.json (every configuration a row: measured, or
  why not), results.md and results.png; each stage is timed, ratios to the HF baseline are its own
  rows' p50s, the FLOP and token counts are consistent;
- the text-answer path (W3: decode video, digit distribution, greedy decode, tokens/s);
- another invocation into the same --out merges: a configuration measured again replaces its row;
  a row out of format (a missing key, p50 over p95) is refused before anything is written;
- --artifact times a user's artifact at its own precision;
- without torchvision (HF's video processors need it) the HF baseline feeds the arrays edgejudge
  builds for that transformers release, equal to the processor's, and says so;
- a --gpu-mem-gb cap that cannot fit is refused before anything loads: exit 2, one line with the
  estimate; bad arguments are one line too;
- the FLOP count equals torch's FlopCounterMode on the tiny Qwen3-VL (the vision tower exactly, the
  decoder's matmuls exactly, attention as the causal half of SDPA's count), and the weight bytes
  and LoRA parameters equal the real ones.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from torch.utils.flop_counter import FlopCounterMode

from edgejudge.bench_measure import HFRunner
from edgejudge.bench_report import compare, write_report
from edgejudge.bench_workloads import (SETUPS, WORKLOADS, device_weight_bytes, model_shape, synthetic_frames, text_flops,
                                       vision_flops)
from edgejudge.cli import main
from edgejudge.export.fixtures import tiny_model_dir
from edgejudge.export.merge import load_base

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("bench-cache")


@pytest.fixture(scope="module")
def w1(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("bench-w1")
    code = main(["bench", "--workload", "W1", "--preset", "tiny", "--out", str(out), "--cache", str(cache)])
    rows = {r["setup"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    return code, out, rows


def test_w1_report(w1):
    code, out, rows = w1
    assert code == 0
    assert set(rows) == {"fp32", "hf", "hf-nf4"}  # the CPU's precision, the seed recipe, the card's nf4
    assert rows["hf-nf4"]["status"] == "not available" and "bitsandbytes" in rows["hf-nf4"]["reason"]
    ours, hf = rows["fp32"], rows["hf"]
    for row in (ours, hf):
        assert row["status"] == "ok" and row["runs"] == 20 and row["warmup"] == 3
        stages = {k: v["p50"] for k, v in row["stages_ms"].items()}
        assert min(stages[s] for s in ("preprocess", "vision", "prefill")) > 0
        assert sum(stages.values()) <= row["latency_ms"]["p95"]  # the stages are parts of the request
        assert row["peak_memory_gib"] > 0 and "RSS" in row["memory_source"] and row["estimate"]["total_gib"] > 0
        assert row["answer"]["prediction"] in ("complete", "not complete")
        total = sum(row["gflops"].values()) * 1e9
        # the report keeps 3 significant digits: up to 5e-3 relative
        assert row["tflops_effective"] == pytest.approx(total / (row["latency_ms"]["p50"] / 1e3) / 1e12, rel=5e-3)
    assert ours["stages_ms"]["scoring"]["p50"] > 0
    assert ours["vs"]["hf"] == round(hf["latency_ms"]["p50"] / ours["latency_ms"]["p50"], 2)
    assert ours["gflops"] == hf["gflops"]  # the workload's count, whoever runs it
    tokens = ours["tokens"]  # 64 frames of 64x64: 32 groups of 4 x 4 patches, 2 x 2 patches a token
    counts = (tokens["frames"], tokens["groups"], tokens["patches_per_group"], tokens["video_tokens"])
    assert counts == (64, 32, 16, 128)
    assert tokens["videos"] == 2 and len(tokens["labels"]) == 2 and tokens["prompt"] > tokens["video_tokens"]
    table = (out / "results.md").read_text()
    assert "## W1" in table and all(r["label"] in table for r in rows.values())
    assert f"{ours['vs']['hf']:g}x hf" in table and "not available" in table
    png = (out / "results.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_text_answers(tmp_path, cache):
    """W3 on the tiny Qwen2.5-VL: a clip file decoded every run, the digit distribution, greedy decoding."""
    code = main(["bench", "--workload", "W3", "--preset", "tiny", "--runs", "2", "--warmup", "1",
                 "--out", str(tmp_path), "--cache", str(cache)])
    rows = {r["setup"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    assert code == 0 and set(rows) == {"fp32", "hf"}
    for row in rows.values():
        assert row["status"] == "ok" and row["runs"] == 2
        assert row["stages_ms"]["decode_video"]["p50"] > 0 and row["stages_ms"]["decode"]["p50"] > 0
        assert 1 <= row["decoded_tokens"] <= 8 and row["decode_tokens_per_s"] > 0
    assert rows["fp32"]["stages_ms"]["distribution"]["p50"] > 0
    assert rows["fp32"]["tokens"]["frames"] == 80  # 5 s sampled at 16 fps


def test_own_artifact(w1, cache, tmp_path):
    """--artifact times a user's artifact at its own precision on the full workload; the HF
    baseline without --reference is reported as not available, with what it needs."""
    artifact = cache / "tiny-qwen3_vl" / "lora8" / "onnx-fp32"
    code = main(["bench", "--workload", "W1", "--artifact", str(artifact), "--runs", "1", "--warmup", "0",
                 "--out", str(tmp_path), "--cache", str(cache)])
    rows = {r["setup"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    assert code == 0 and rows["fp32"]["status"] == "ok" and rows["fp32"]["model"] == "onnx-fp32"
    assert rows["fp32"]["tokens"]["video_tokens"] == 32 * 49  # 224x224: 32 groups of 7 x 7 tokens
    assert all(rows[b]["status"] == "not available" and "--reference" in rows[b]["reason"] for b in ("hf", "hf-nf4"))


def test_hf_inputs_without_torchvision(monkeypatch):
    """HF's video processors need torchvision; without it the baseline feeds the arrays edgejudge
    builds for the same transformers release: equal to the processor's, and the row says so."""
    import transformers

    from edgejudge.runtime.video import read_video

    workload = WORKLOADS["W1"]
    task = {"device": "cpu", "gpu_mem_gb": None, "model_dir": str(tiny_model_dir("qwen3_vl")), "adapter_dir": None}
    with_processor = HFRunner(workload, workload.tiny_video, SETUPS["hf"], task)

    def missing(*args, **kwargs):
        raise ImportError("\nQwen3VLVideoProcessor requires the Torchvision library but it was not found.\nSee ...")

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", missing)
    without = HFRunner(workload, workload.tiny_video, SETUPS["hf"], task)
    assert with_processor.note is None
    assert without.note.endswith("requires the Torchvision library but it was not found.")
    clip = read_video(synthetic_frames(workload.tiny_video, 0), fps=workload.tiny_video.fps)
    ours, theirs = without.inputs(clip, workload.questions[0]), with_processor.inputs(clip, workload.questions[0])
    for key in ("input_ids", "attention_mask", "pixel_values_videos", "video_grid_thw", "mm_token_type_ids"):
        assert torch.equal(ours[key], theirs[key]), key
    outcome = without.run({"right": clip.frames, "left": clip.frames})
    assert outcome.answer["prediction"] in workload.spec.labels and outcome.stages["vision"] > 0


def test_merge(w1, tmp_path):
    """A configuration measured again replaces its row; the others stay and ratios follow."""
    _, out, rows = w1
    shutil.copy(out / "results.json", tmp_path / "results.json")
    again = {**rows["hf"], "latency_ms": {k: 2 * v for k, v in rows["hf"]["latency_ms"].items()}}
    write_report(tmp_path, [again])
    merged = {r["setup"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    assert set(merged) == set(rows) and merged["hf"]["latency_ms"] == again["latency_ms"]
    ours = merged["fp32"]
    assert ours["vs"]["hf"] == round(again["latency_ms"]["p50"] / ours["latency_ms"]["p50"], 2)
    assert (tmp_path / "results.md").is_file() and (tmp_path / "results.png").is_file()
    merged_dir = tmp_path / "merged"  # --merge: earlier runs' files into one report, nothing run
    files = [str(out / "results.json"), str(tmp_path / "results.json")]
    assert main(["bench", "--merge", *files, "--out", str(merged_dir)]) == 0
    final = {r["setup"]: r for r in json.loads((merged_dir / "results.json").read_text())["rows"]}
    assert final["hf"]["latency_ms"] == again["latency_ms"] and (merged_dir / "results.png").is_file()
    with pytest.raises(RuntimeError, match="lacks gflops"):  # the report checks its own format first
        write_report(tmp_path, [{k: v for k, v in again.items() if k != "gflops"}])
    with pytest.raises(RuntimeError, match="out of order"):
        write_report(tmp_path, [{**again, "latency_ms": {"p50": 2.0, "p95": 1.0}}])


def test_targets_apply_to_their_setups():
    """Full-size GPU rows are held to their workload's targets, and only the setups they name."""
    def row(setup: str, tokens_per_s: float) -> dict:
        return {"workload": "W4", "setup": setup, "backend": "onnx", "status": "ok", "model": "qwen2.5-vl-7b-instruct",
                "device": "NVIDIA H100 80GB HBM3", "latency_ms": {"p50": 5000.0}, "decode_tokens_per_s": tokens_per_s}

    rows = [row("int4", 182.4), row("fp16", 114.7), {**row("int4", 120.0), "device": "NVIDIA L4"}]
    compare(rows)
    assert rows[0]["targets"]["decode_tokens_per_s"].startswith("met: 182.4 tokens/s")
    assert "targets" not in rows[1]
    assert rows[2]["targets"]["decode_tokens_per_s"].startswith("missed: 120 tokens/s vs >= 150 tokens/s (1.25x off)")


def test_memory_refusal(tmp_path, cache, capsys):
    code = main(["bench", "--workload", "W1", "--preset", "tiny", "--gpu-mem-gb", "0.001", "--out", str(tmp_path),
                 "--cache", str(cache)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("edgejudge: error: W1 ")
    assert "an estimated" in err[-1] and "weights" in err[-1] and "over the --gpu-mem-gb 0.001 cap" in err[-1]
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("argv, message", [
    (["--workload", "W9", "--preset", "tiny"], "--workload 'W9'"),
    (["--workload", "W1", "--preset", "tiny", "--precision", "int3"], "--precision 'int3'"),
    (["--workload", "W1"], "--random-weights"),
    (["--workload", "W1", "--preset", "qwen3.5-9b", "--random-weights"], "use qwen3-vl-4b-instruct"),
    (["--workload", "W1", "--preset", "tiny", "--runs", "0"], "--runs must be >= 1"),
])
def test_bad_arguments(tmp_path, capsys, argv, message):
    code = main(["bench", *argv, "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0]


def test_flops_and_bytes_match_the_model(w1, cache):
    model_dir = tiny_model_dir("qwen3_vl")
    config = json.loads((model_dir / "config.json").read_text())
    shape = model_shape(config, None)
    model = load_base(model_dir)
    groups, height, width = 3, 8, 12
    patch = model.config.vision_config.patch_size
    with FlopCounterMode(display=False) as counter:
        model.model.visual(torch.randn(groups * height * width, 3 * 2 * patch**2),
                           grid_thw=torch.tensor([[groups, height, width]]))
    assert vision_flops(shape, groups, height * width) == counter.get_total_flops()
    tokens = 37
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.lm_head(model.model.language_model(input_ids=torch.randint(0, 100, (1, tokens))).last_hidden_state)
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    attention = counts.pop("aten._scaled_dot_product_flash_attention_for_cpu")
    matmuls = counts.pop("aten.mm")
    assert set(counts) == {"aten.bmm"} and counts["aten.bmm"] < 1e-3 * matmuls  # the rotary's position product
    # SDPA counts every query against every key; a causal prefill needs (S + 1) / 2S of that
    assert text_flops(shape, 0, tokens, tokens) == pytest.approx(matmuls + attention * (tokens + 1) / (2 * tokens))
    assert device_weight_bytes(shape, SETUPS["hf"], 4) == 4 * sum(p.numel() for p in model.parameters())
    with safe_open(str(cache / "tiny-qwen3_vl" / "lora8-adapter" / "adapter_model.safetensors"), "pt") as f:
        adapter = sum(f.get_slice(name).get_shape()[0] * f.get_slice(name).get_shape()[1] for name in f.keys())
    assert model_shape(config, 8)["lora"] == adapter
