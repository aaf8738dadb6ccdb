"""Regenerate the result tables of README.md and docs/*.md from the JSON that the lab's commands printed.

Run a command with --json and keep its last line in results/NAME.json, e.g.
    labkit eval clip --json | tail -n 1 > results/eval_clip.json
then `python scripts/update_readme.py` rewrites every block between
<!-- results:NAME --> and <!-- /results:NAME --> from results/NAME.json (the README's `summary` block
from several of them), and redraws the figures in docs/img from the same files. A test checks that
every block on disk is what this script would write.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def key_value_table(data: dict) -> str:
    rows = [(k, v) for k, v in data.items() if not isinstance(v, (dict, list)) and k != "out"]
    return "\n".join(["| metric | value |", "|---|---|", *(f"| {k} | {fmt(v)} |" for k, v in rows)])


def tip_table(data: dict) -> str:
    shots = ["1", "2", "4", "8", "16"]
    lines = ["| task | method | zero-shot | " + " | ".join(f"{s}-shot" for s in shots) + " |",
             "|---|---|---|" + "---|" * len(shots)]
    for task, res in data["results"].items():
        for method in ("tip_adapter", "tip_adapter_f", "linear_probe"):
            cells = [fmt(res[method].get(s, "")) for s in shots]
            lines.append(f"| {task} | {method} | {fmt(res['zero_shot'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def masking_bench_table(data: dict) -> str:
    lines = ["| model | batch | strategy | ratio | images/s | speedup | ideal 1/(1-r) | Amdahl ideal | of Amdahl "
             "| kept tokens | Amdahl ideal (kept tokens) | of it |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for model in data["models"]:
        for row in model["rows"]:
            lines.append(f"| {model['model']} | {model['batch']} | {row['strategy']} | {row['ratio']} | "
                         f"{fmt(row['images_per_s'])} | {fmt(row['speedup'])} | {fmt(row['ideal'])} | "
                         f"{fmt(row['amdahl_ideal'])} | {fmt(row['of_amdahl'])} | "
                         f"{fmt(row['kept_token_fraction'])} | {fmt(row['amdahl_ideal_kept_tokens'])} | "
                         f"{fmt(row['of_amdahl_kept_tokens'])} |")
    if data.get("targets"):
        lines.append("")
        lines.append("Targets: " + ", ".join(f"{k} = {fmt(v['value'])} ({'met' if v['met'] else 'not met'})"
                                             for k, v in data["targets"].items()))
    return "\n".join(lines)


def masking_eval_table(data: dict) -> str:
    cols = ["run", "images_seen", "unmasked steps run / planned", "zero_shot_shape_acc", "zero_shot_color_acc",
            "retrieval_i2t_r1", "retrieval_t2i_r1", "shape_acc_small", "shape_acc_large", "val_shape_plus_i2t"]

    def cell(run: dict, c: str) -> str:
        if c == "unmasked steps run / planned":
            return f"{run['tuning_steps_done']} / {run['tuning_steps']}" if run["tuning_steps"] else "-"
        return fmt(run[c])

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(run, c) for c in cols) + " |" for run in data["runs"]]
    return "\n".join(lines)


def _threads(n: int | None) -> str:
    return "" if not n else f", {n} thread" + ("s" if n > 1 else "")


def efficient_table(data: dict) -> str:
    cols = ("| model | params | speedup | ITM acc | retrieval R@1 (ITC) | R@1 re-ranked by ITM | ITM retention | "
            "retrieval retention (ITC / re-ranked) | sparsity v / t / f |")
    lines = [cols, "|---|---|---|---|---|---|---|---|---|"]
    m = data["metrics"]

    def row(name, params, speedup, metrics, sparsity=None):
        teacher = m["teacher"]
        split = " / ".join(fmt(sparsity[k]) for k in ("vision", "text", "fusion")) if sparsity else ""
        return (f"| {name} | {params:,} | {fmt(speedup)} | {fmt(metrics['itm_accuracy'])} | {fmt(metrics['retrieval_r1'])} | "
                f"{fmt(metrics['retrieval_rerank_r1'])} | {fmt(metrics['itm_accuracy'] / teacher['itm_accuracy'])} | "
                f"{fmt(metrics['retrieval_r1'] / teacher['retrieval_r1'])} / "
                f"{fmt(metrics['retrieval_rerank_r1'] / teacher['retrieval_rerank_r1'])} | {split} |")

    lines.append(row("teacher", data["teacher_params"], 1.0, m["teacher"]))
    lines.append(row("student (distilled)", data["student_params"], data["student_speedup"], m["student"]))
    shipped = f"pruned, target {data['pruned_target']} + {data['pruned_recover_steps']} recovery steps (shipped)"
    lines.append(row(shipped, data["pruned_params"], data["speedup"],
                     m["pruned"], data["sparsity_by_modality"]))
    for r in data["sweep"]:
        steps = f"{data['sweep_steps']} + {data['sweep_recover_steps']} recovery steps"
        lines.append(row(f"sweep: sparsity {fmt(r['realised_sparsity'])} (target {r['target']}, {steps})", r["params"],
                         r["speedup"],
                         m[f"target_{r['target']}"], r["sparsity_by_modality"]))
    lines.append("")
    lines.append(f"Speed: median of `match_scores` on {data['bench_batch']} image-caption pairs, teacher "
                 f"{data['teacher_ms']:.0f} ms, pruned {data['pruned_ms']:.0f} ms ({data['device']}"
                 f"{_threads(data.get('threads'))}); "
                 f"accuracy on {data['n_scenes']} held-out test scenes; re-ranking: the ITM head re-scores the "
                 f"top {data['rerank_k']} ITC candidates of each query, as the paper's retrieval evaluation does.")
    return "\n".join(lines)


def app_bench_table(data: dict) -> str:
    """One row per ``labkit bench app --json`` run: latency under load and what batching buys."""
    cols = [("students", "n_clients"), ("requests at once", "n_requests"), ("errors", "errors"),
            ("p50 s", "p50_latency_s"), ("p95 s", "p95_latency_s"), ("throughput req/s", "throughput_rps"),
            ("one at a time req/s", "sequential_rps"), ("32 at once req/s", "burst32_rps"),
            ("batching gain", "batching_gain"), ("server CPU ms/req", "server_cpu_ms_per_request"),
            ("load generator CPU ms/req", "load_generator_cpu_ms_per_request")]
    return "\n".join(["| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols),
                      "| " + " | ".join(str(data.get(k)) for _, k in cols) + " |"])  # rounded by the bench


def _flatten(value, prefix: str = "") -> list[tuple[str, object]]:
    if isinstance(value, dict):
        return [row for k, v in value.items() for row in _flatten(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        return [row for i, v in enumerate(value) for row in _flatten(v, f"{prefix}[{i}]")]
    return [(prefix, ", ".join(map(fmt, value)) if isinstance(value, list) else value)]


def device_check_table(data: dict) -> str:
    """results/device_check.json, the JSON of scripts/device_check.py: the masking bench as its usual table
    (one per batch setting), every other check as measurement / value rows."""
    lines = [f"Device: {data.get('device')}, torch {data.get('torch')}"
             + (" (fast mode: smoke-test sizes, not figures)" if data.get("fast_mode") else ""), ""]
    masking = data.get("masking", {})
    for setting, report in masking.items():
        if isinstance(report, dict) and "models" in report:
            lines += [f"Masking, {setting} ({report.get('dtype')}):", "", masking_bench_table(report), ""]
    rows = [(k, v) for k, v in _flatten({k: v for k, v in data.items()
                                         if k not in ("device", "torch", "fast_mode")})
            if not (k.startswith("masking.") and "models" in masking.get(k.split(".")[1], {}))]
    lines += ["| measurement | value |", "|---|---|", *(f"| {k} | {fmt(v)} |" for k, v in rows)]
    return "\n".join(lines)


def _load(name: str) -> dict:
    return json.loads((ROOT / "results" / f"{name}.json").read_text())


def summary_table() -> str:
    """README's headline row per part of the lab, each from its own results file."""
    clip, masking, study = _load("eval_clip"), _load("bench_masking"), _load("eval_masking")
    qformer, efficient, tip = _load("eval_qformer"), _load("eval_efficient"), _load("eval_tip")
    vit = next(m for m in masking["models"] if m["model"] == "ViT-B-32")
    speed = {(r["strategy"], r["ratio"]): r["speedup"] for r in vit["rows"]}
    runs = {r["run"]: r for r in study["runs"]}
    novel = tip["results"]["novel"]
    rows = [
        ("toy CLIP", "[docs/clip.md](docs/clip.md)",
         f"zero-shot shape {fmt(clip['zero_shot_shape_acc'])}, colour {fmt(clip['zero_shot_color_acc'])}; "
         f"image-to-text R@1 {fmt(clip['retrieval_i2t_r1'])}"),
        ("FLIP / Cluster Masking", "[docs/masking.md](docs/masking.md)",
         f"ViT-B-32 vision-tower step at r = 0.75: {fmt(speed[('random', 0.75)])}x (random), "
         f"{fmt(speed[('cluster', 0.75)])}x (cluster); same budget, shape accuracy "
         f"{fmt(runs['cluster:0.75']['zero_shot_shape_acc'])} (cluster 0.75) vs "
         f"{fmt(runs['none']['zero_shot_shape_acc'])} (no masking)"),
        ("BLIP-2 Q-Former", "[docs/blip2.md](docs/blip2.md)",
         f"VQA {fmt(qformer['vqa_accuracy'])}, caption attributes {fmt(qformer['caption_attribute_accuracy'])}, "
         f"trainable fraction {fmt(qformer['trainable_fraction'])}"),
        ("EfficientVLM", "[docs/efficientvlm.md](docs/efficientvlm.md)",
         f"pruned model {fmt(efficient['speedup'])}x faster than the teacher, retention ITM {fmt(efficient['retention_itm'])}, "
         f"retrieval {fmt(efficient['retention_retrieval'])}"),
        ("Tip-Adapter", "[docs/tipadapter.md](docs/tipadapter.md)",
         f"novel shapes: zero-shot {fmt(novel['zero_shot'])} -> {fmt(novel['tip_adapter']['16'])} at 16 shots, no training "
         f"(Tip-Adapter-F {fmt(novel['tip_adapter_f']['16'])})"),
    ]
    return "\n".join(["| part | headline (measured on a 2-core CPU) | details |", "|---|---|---|",
                       *(f"| {name} | {text} | {link} |" for name, link, text in rows)])


RENDERERS = {"eval_efficient": efficient_table, "eval_tip": tip_table, "bench_masking": masking_bench_table,
             "eval_masking": masking_eval_table, "device_check": device_check_table,
             "bench_app": app_bench_table, "bench_app_40": app_bench_table}


def render(name: str) -> str:
    """The body of block ``name``: the summary, or a table of results/NAME.json."""
    return summary_table() if name == "summary" else render_data(name, _load(name))


def render_data(name: str, data: dict) -> str:
    custom = RENDERERS.get(name)
    if custom is not None:
        return custom(data)
    if isinstance(data.get("table"), list):  # commands may provide their own rows
        rows = data["table"]
        cols = list(rows[0])
        return "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols),
                          *("| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows)])
    return key_value_table(data)


def figures() -> dict:
    """docs/img file name -> (results file, function drawing a matplotlib Figure from its JSON)."""
    from labkit.masking import viz as viz_masking
    from labkit.tipadapter import viz as viz_tip

    def tip_shots(data):
        return viz_tip.accuracy_vs_shots_figure(data["results"],
                                                f"test accuracy versus shots (mean of {data['repeats']} support draws)")

    return {"masking_accuracy_vs_time.png": ("eval_masking", viz_masking.accuracy_vs_time_figure),
            "masking_accuracy_by_size.png": ("eval_masking", viz_masking.size_accuracy_figure),
            "tip_accuracy_vs_shots.png": ("eval_tip", tip_shots)}


def draw_figures() -> None:
    import matplotlib

    matplotlib.use("Agg")
    for name, (source, draw) in figures().items():
        path = ROOT / "results" / f"{source}.json"
        if path.is_file():
            draw(json.loads(path.read_text())).savefig(ROOT / "docs" / "img" / name, dpi=90, bbox_inches="tight")


PATTERN = re.compile(r"(<!-- results:([\w-]+) -->\n)(.*?)(<!-- /results:\2 -->)", re.S)


def available(name: str) -> bool:
    return name == "summary" or (ROOT / "results" / f"{name}.json").is_file()


def regenerate(text: str, missing: list | None = None) -> str:
    """``text`` with every results block rewritten from results/ (blocks without a results file kept)."""
    def replace(match):
        name = match.group(2)
        if not available(name):
            if missing is not None:
                missing.append(name)
            return match.group(0)
        return match.group(1) + render(name) + "\n" + match.group(4)

    return PATTERN.sub(replace, text)


def documents() -> list[Path]:
    """README.md and every page under docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def main() -> int:
    missing: list[str] = []
    for path in documents():
        path.write_text(regenerate(path.read_text(), missing))
    draw_figures()
    if missing:
        print("no results yet for:", ", ".join(sorted(set(missing))), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
