"""The bench's report: a row per configuration (what was planned, what was measured, what follows
from both), checked for its format before anything is written, merged into results.json across
runs, and shown as results.md and results.png."""

from __future__ import annotations

import json
from pathlib import Path

from edgejudge.bench_workloads import SETUPS, STAGES, WORKLOADS, decode_step_bytes, workload_flops


def finish_row(config: dict, measured: dict | None, peak_gib: float | None, device_probe: dict | None,
               env: dict) -> dict:
    """One configuration's row: what was planned, what was measured, and what follows from both."""
    setup, workload = SETUPS[config["setup"]], WORKLOADS[config["workload"]]
    row = {"workload": workload.name, "setup": setup.name, "label": setup.label, "backend": setup.backend,
           "model": config["model"], "adapter": config["adapter"], "weights": "random", **env,
           "status": config["status"], "reason": config.get("reason")}
    if "plan" in config:
        shape = config["shape"]
        row["tokens"] = config["plan"]
        row["parameters"] = {k: shape[k] for k in ("vision", "merger", "decoder", "embed", "head", "lora")}
    if "estimate" in config:
        row["estimate"] = {k: round(v, 3) for k, v in config["estimate"].items()}
    if measured is None:
        return row
    if "ok" not in measured:
        return {**row, "status": "failed", "reason": measured.get("input_error") or measured["error"]}
    row.update(status="ok", **measured["ok"])
    if "turns" in row:
        config["plan"]["turns"] = row["turns"]
    row["peak_memory_gib"] = round(peak_gib if peak_gib is not None else measured["ok"]["host_peak_gib"], 3)
    row["memory_source"] = ("NVML device memory used, peak minus idle" if peak_gib is not None
                            else "host peak RSS of the process")
    p50 = row["latency_ms"]["p50"]
    flops = workload_flops(config["shape"], config["plan"], row["decoded_tokens"])
    row["gflops"] = {k: float(f"{v / 1e9:.4g}") for k, v in flops.items()}
    total = sum(flops.values())
    row["tflops_effective"] = float(f"{total / (p50 / 1e3) / 1e12:.3g}")
    if device_probe:
        row["flop_floor_ms"] = round(total / (device_probe["matmul_fp16_tflops"] * 1e12) * 1e3, 2)
    decode_ms = row["stages_ms"].get("decode", {}).get("p50")
    if decode_ms:  # each answer's first token comes from its prefill; the decode stage makes the rest
        steps = row["decoded_tokens"] - len(config["plan"].get("turns") or config["plan"]["suffixes"])
        row["decode_tokens_per_s"] = round(steps / (decode_ms / 1e3), 1)
        if device_probe:  # one step at the prompt's length reads the weights and that KV cache
            step = decode_step_bytes(config["shape"], setup, config["plan"]["prompt"])
            row["decode_floor_tokens_per_s"] = round(device_probe["copy_gb_s"] * 1e9 / step, 1)
    return row


def compare(rows: list[dict]) -> None:
    """edgejudge rows get `vs`: each baseline's p50 over theirs (same workload, model and device),
    and `targets`: each of the workload's targets met or missed, by how much."""
    for row in rows:
        if row["backend"] == "hf" or row["status"] != "ok":
            continue
        row["vs"] = {b["setup"]: round(b["latency_ms"]["p50"] / row["latency_ms"]["p50"], 2) for b in rows
                     if b["backend"] == "hf" and b["status"] == "ok"
                     and all(b[k] == row[k] for k in ("workload", "model", "device"))}
        if row["model"].startswith("tiny-") or row["device"].startswith("cpu"):
            continue  # the targets are the full-size models' on a GPU
        if WORKLOADS[row["workload"]].target_setups and row["setup"] not in WORKLOADS[row["workload"]].target_setups:
            continue  # W4's 150 tokens/s is int4's
        checks = {}
        for key, goal in WORKLOADS[row["workload"]].targets.items():
            value = {"p50_ms": row["latency_ms"]["p50"], "vs_hf": row["vs"].get("hf"),
                     "decode_tokens_per_s": row.get("decode_tokens_per_s")}[key]
            if value is None:
                checks[key] = "not measured"
                continue
            unit = {"p50_ms": " ms", "vs_hf": "x", "decode_tokens_per_s": " tokens/s"}[key]
            met, op = (value <= goal, "<=") if key == "p50_ms" else (value >= goal, ">=")
            checks[key] = (f"{'met' if met else 'missed'}: {value:.4g}{unit} vs {op} {goal:g}{unit}"
                           + ("" if met else f" ({max(value, goal) / min(value, goal):.2f}x off)"))
        row["targets"] = checks


def _name(row: dict) -> str:
    return row["setup"] + (f" (cap {row['gpu_mem_gb']:g} GiB)" if row.get("gpu_mem_gb") else "")


def _cell(row: dict, stage: str) -> str:
    value = row.get("stages_ms", {}).get(stage)
    return f"{value['p50']:.1f}" if value else "-"


def markdown(rows: list[dict]) -> str:
    """The report as Markdown: one table per workload, ms p50 per stage."""
    lines = ["# edgejudge bench", ""]
    versions: dict[tuple[str, str], dict] = {}
    for r in rows:
        if r["status"] == "ok":
            found = versions.setdefault((r["device"], r["date"]), {})
            found.update(r["versions"])
            if r["device_probe"]:
                found["measured fp16 matmul"] = f"{r['device_probe']['matmul_fp16_tflops']} TFLOP/s"
                found["measured copy"] = f"{r['device_probe']['copy_gb_s']} GB/s"
    for (device, date), found in sorted(versions.items()):
        lines.append(f"- {device}, {date}: {', '.join(f'{k} {v}' for k, v in sorted(found.items()))}")
    for name, model in sorted({(r["workload"], r["model"]) for r in rows}):
        group = [r for r in rows if (r["workload"], r["model"]) == (name, model)]
        lines += ["", f"## {name}: {WORKLOADS[name].title}", ""]
        tokens = next((r["tokens"] for r in group if "tokens" in r), None)
        if tokens:
            lines += [f"{model} ({group[0]['weights']} weights, {group[0]['adapter']}): "
                      f"{tokens['frames']} frames at {tokens['frame_size'][0]}x{tokens['frame_size'][1]}, "
                      f"{tokens['video_tokens']} video tokens x {tokens['videos']} video(s), "
                      f"prompt {tokens['prompt']} tokens.", ""]
        lines += ["| configuration | device | cap GiB | p50 ms | p95 ms | vs HF | decode video | preprocess | vision | "
                  "prefill | scoring / decode | tokens/s (floor) | eff. TFLOP/s | FLOP floor ms | peak GiB (est.) | targets |",
                  "|" + "---|" * 16]
        for r in group:
            if r["status"] != "ok":
                lines.append(f"| {r['label']} | {r['device']} | {r.get('gpu_mem_gb') or '-'} | {r['status']}: {r['reason']} |"
                             + " |" * 12)
                continue
            scoring = sum(r["stages_ms"].get(s, {}).get("p50", 0.0) for s in ("scoring", "distribution", "decode"))
            rate = (f"{r['decode_tokens_per_s']:g} ({r.get('decode_floor_tokens_per_s', '-')})"
                    if "decode_tokens_per_s" in r else "-")
            vs = ", ".join(f"{v:g}x {k}" for k, v in r.get("vs", {}).items()) or "-"
            lines.append(
                f"| {r['label']} | {r['device']} | {r.get('gpu_mem_gb') or '-'} | {r['latency_ms']['p50']:.1f} | "
                f"{r['latency_ms']['p95']:.1f} | {vs} | {_cell(r, 'decode_video')} | {_cell(r, 'preprocess')} | "
                f"{_cell(r, 'vision')} | {_cell(r, 'prefill')} | {scoring:.1f} | {rate} | {r['tflops_effective']:g} | "
                f"{r.get('flop_floor_ms', '-')} | {r['peak_memory_gib']:.2f} ({r['estimate']['total_gib']:.2f}) | "
                f"{'; '.join(f'{k} {v}' for k, v in r.get('targets', {}).items()) or '-'} |")
    lines += [f"\n{r['workload']} {r['label']}: {r['note']}" for r in rows if r.get("note")]
    sources = sorted({r["memory_source"] for r in rows if r["status"] == "ok"})
    lines += ["", f"Runs: p50 / p95 over the timed runs after warm-up. Peak memory: {'; '.join(sources)}. "
              "Estimate: weights + KV cache + activations (+ the runtime overhead measured on an H100), the figure a cap is checked against."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> Path:
    """Latency p50 by stage for each configuration (one panel per workload), and peak memory
    against the 16 and 24 GB lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["status"] == "ok"]
    names = sorted({r["workload"] for r in done})
    fig, axes = plt.subplots(len(names) + 1, 1, figsize=(10, 2.2 * (len(names) + 1) + 1), squeeze=False)
    colors = dict(zip(STAGES, plt.get_cmap("tab10").colors))
    for ax, name in zip(axes[:, 0], names):
        group = [r for r in done if r["workload"] == name]
        for y, r in enumerate(group):
            left = 0.0
            for stage in STAGES:
                if stage in r["stages_ms"]:
                    width = r["stages_ms"][stage]["p50"]
                    ax.barh(y, width, left=left, color=colors[stage], label=stage)
                    left += width
        ax.set_yticks(range(len(group)), [_name(r) for r in group], fontsize=8)
        ax.set_title(f"{name}: latency p50 by stage, ms ({', '.join(sorted({r['device'] for r in group}))})", fontsize=9)
        handles = dict(zip(*reversed(ax.get_legend_handles_labels())))  # one entry per stage
        ax.legend(handles.values(), handles.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax = axes[-1, 0]
    ax.barh(range(len(done)), [r["peak_memory_gib"] for r in done], color="gray")
    ax.set_yticks(range(len(done)), [f"{r['workload']} {_name(r)}" for r in done], fontsize=8)
    for cap in (16, 24):  # the --gpu-mem-gb of a 16 and a 24 GB card (GiB, as the cap counts)
        ax.axvline(cap, color="red", linestyle="--")
        ax.text(cap, -0.5, f" {cap}", color="red", fontsize=7)
    ax.set_title(f"peak memory (GiB; {done[0]['memory_source'] if done else ''})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


REPORT_KEYS = {"workload", "setup", "label", "backend", "model", "device", "date", "status", "reason"}
MEASURED_KEYS = {"latency_ms", "stages_ms", "tokens", "gflops", "tflops_effective", "peak_memory_gib", "memory_source",
                 "estimate", "runs", "warmup", "versions"}


def check_rows(rows: list[dict]) -> None:
    """The report's own format check, before anything is written: every row has its keys, every
    measured one its timings (p50 <= p95), and every reason a row was not measured is given."""
    for row in rows:
        need = REPORT_KEYS | (MEASURED_KEYS if row.get("status") == "ok" else set())
        if missing := need - set(row):
            raise RuntimeError(f"bench row {row.get('workload')} {row.get('setup')} lacks {', '.join(sorted(missing))}")
        if row["status"] != "ok" and not row["reason"]:
            raise RuntimeError(f"bench row {row['workload']} {row['setup']} is {row['status']} without a reason")
        for timing in [row["latency_ms"], *row["stages_ms"].values()] if row["status"] == "ok" else []:
            if not 0 <= timing["p50"] <= timing["p95"]:
                raise RuntimeError(f"bench row {row['workload']} {row['setup']}: p50 / p95 {timing} out of order")


def write_report(out: Path, rows: list[dict]) -> str:
    """Merge `rows` into out/results.json (a configuration measured again replaces its old row),
    then write results.md and results.png from all of them."""
    check_rows(rows)
    path = out / "results.json"
    key = lambda r: (r["workload"], r["setup"], r["model"], r["device"], r.get("gpu_mem_gb"))  # noqa: E731
    old = json.loads(path.read_text())["rows"] if path.is_file() else []
    fresh = {key(r) for r in rows}
    merged = [r for r in old if key(r) not in fresh] + rows
    compare(merged)
    path.write_text(json.dumps({"rows": merged}, indent=1) + "\n")
    text = markdown(merged)
    (out / "results.md").write_text(text)
    plot(merged, out / "results.png")
    return text
