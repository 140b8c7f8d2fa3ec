"""Read every summary.json under a results folder and tabulate the grid.

    python -m evalbridge.collect results/ [--out results/]

Writes ``results.md`` and ``results.csv`` (one row per task x configuration: accuracy, tokens/s, tokens per
forward, skipped-layer fraction) and, per task, ``<task>.png`` plotting accuracy against tokens/s with the
reuse interval k as colour and the layer subset as marker."""
from __future__ import annotations

import argparse
import csv
import json
import os

PREFERRED = ("exact_match,strict-match", "exact_match,flexible-extract", "acc,none", "acc_norm,none",
             "exact_match,none", "word_perplexity,none")
COLUMNS = ["experiment", "task", "limit", "config", "k", "subset", "mode", "scoring", "metric", "value",
           "tokens_per_s_wall", "tokens_per_s_device", "tokens_per_forward", "skipped_layer_fraction",
           "request_type", "summary"]


def main_metric(metrics: dict):
    for name in PREFERRED:
        if name in metrics:
            return name, metrics[name]
    for name, value in metrics.items():
        if isinstance(value, (int, float)) and "stderr" not in name and not name.startswith("sample_len"):
            return name, value
    return None, None


def rows_from(summary_path: str, root: str) -> list[dict]:
    with open(summary_path) as f:
        s = json.load(f)
    if not s.get("complete"):
        return []
    rel = os.path.relpath(os.path.dirname(summary_path), root).split(os.sep)
    experiment = rel[0] if len(rel) >= 3 else ""
    reuse = (s.get("reuse") or {}).get("policy") or {}
    ma = s.get("model_args", {})
    out = []
    for task, metrics in s.get("metrics", {}).items():
        name, value = main_metric(metrics)
        kinds = [k for k in ("generate_until", "loglikelihood", "loglikelihood_rolling") if k in s["throughput"]]
        kind = kinds[0] if kinds else None
        t = s["throughput"].get(kind, {}) if kind else {}
        out.append({
            "experiment": experiment, "task": task, "limit": (s.get("evaluation") or {}).get("limit"),
            "config": s.get("config_tag"), "k": reuse.get("k", ma.get("reuse_k", 1)),
            "subset": reuse.get("layers", ma.get("layer_subset")), "mode": reuse.get("mode", ma.get("reuse_mode")),
            "scoring": s.get("scoring"), "metric": name, "value": value,
            "tokens_per_s_wall": t.get("tokens_per_s_wall"), "tokens_per_s_device": t.get("tokens_per_s_device"),
            "tokens_per_forward": t.get("tokens_per_forward"), "skipped_layer_fraction": t.get("skipped_layer_fraction"),
            "request_type": kind, "summary": os.path.relpath(summary_path, root)})
    return out


def collect(root: str) -> list[dict]:
    rows = []
    for d, _, files in os.walk(root):
        if "summary.json" in files:
            rows.extend(rows_from(os.path.join(d, "summary.json"), root))
    return sorted(rows, key=lambda r: (r["experiment"], r["task"], str(r["config"])))


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def write_tables(rows: list[dict], out: str) -> tuple[str, str]:
    os.makedirs(out, exist_ok=True)
    csv_path, md_path = os.path.join(out, "results.csv"), os.path.join(out, "results.md")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    shown = COLUMNS[:-1]
    with open(md_path, "w") as f:
        f.write("| " + " | ".join(shown) + " |\n|" + "---|" * len(shown) + "\n")
        for r in rows:
            f.write("| " + " | ".join(_fmt(r[c]) for c in shown) + " |\n")
    return md_path, csv_path


def plot(rows: list[dict], out: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"first": "o", "middle": "s", "last": "^"}
    colors = {1: "tab:gray", 2: "tab:blue", 3: "tab:red"}
    paths = []
    for task in sorted({r["task"] for r in rows}):
        pts = [r for r in rows if r["task"] == task and r["value"] is not None]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(6, 4.2), dpi=100)
        for r in pts:
            speed = r["tokens_per_s_device"] or r["tokens_per_s_wall"] or 0.0
            k = int(r["k"] or 1)
            ax.scatter(speed, r["value"], s=70, marker=markers.get(str(r["subset"]), "D"),
                       color=colors.get(k, "tab:green"), edgecolors="black", linewidths=0.5)
            ax.annotate(str(r["config"]), (speed, r["value"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.set_xlabel("tokens/s (device time where measured, else wall)")
        ax.set_ylabel(pts[0]["metric"] or "metric")
        ax.set_title(f"{task}: accuracy against speed (colour: k, marker: subset)")
        for k, c in colors.items():
            ax.scatter([], [], color=c, label=f"k={k}")
        for s, m in markers.items():
            ax.scatter([], [], marker=m, color="white", edgecolors="black", label=s)
        ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = os.path.join(out, f"{task}.png")
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evalbridge.collect", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    rows = collect(args.results)
    if not rows:
        print(f"no complete summary.json under {args.results}")
        return 1
    out = args.out or args.results
    md, csv_path = write_tables(rows, out)
    try:
        pngs = plot(rows, out)
    except ImportError:
        pngs = []
        print("matplotlib is not installed, so no plots were drawn (pip install -e .[eval] installs it)")
    print(open(md).read())
    print(f"wrote {md}, {csv_path} and {len(pngs)} plot(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
