"""Tabulate a results folder: every configuration of the grid is a row, whatever became of it.

    python -m evalbridge.collect results/reuse_study_<model> [--out DIR]

Writes ``results.md`` and ``results.csv`` (task x configuration: status, accuracy, the rate of the task's own
request type, tokens per forward, skipped-layer fraction) and, per task, ``<task>.png``: accuracy against
that rate, one labelled point per configuration, coloured by the skipped-layer fraction. Configurations come
from the grid that sbatch/run.sh recorded (grid.json) and from the folders found; each is complete, running,
queued, failed (with the log's last error line) or missing. A file that cannot be read is named with the
reason and shown as a row; the table is always written.
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import sys

from .grid import queue, job_name, state

PREFERRED = ("exact_match,strict-match", "exact_match,flexible-extract", "acc,none", "acc_norm,none",
             "exact_match,none", "word_perplexity,none")
COLUMNS = ["experiment", "task", "limit", "config", "status", "k", "subset", "mode", "scoring", "metric", "value",
           "request_type", "tokens_per_s_wall", "tokens_per_s_device", "tokens_per_forward",
           "skipped_layer_fraction", "device", "detail", "folder"]
# lm-eval output types -> the request type the model serves (multiple choice is scored by loglikelihood)
REQUEST_OF = {"generate_until": "generate_until", "multiple_choice": "loglikelihood",
              "loglikelihood": "loglikelihood", "loglikelihood_rolling": "loglikelihood_rolling"}
NOT_CONFIG = (".partial", "lm_eval", "lm_eval.previous")


def main_metric(metrics: dict):
    for name in PREFERRED:
        if name in metrics:
            return name, metrics[name]
    for name, value in metrics.items():
        if isinstance(value, (int, float)) and "stderr" not in name and not name.startswith("sample_len"):
            return name, value
    return None, None


def request_type(summary: dict, folder: str, task: str, metric: str | None) -> str | None:
    """The request type a task's rows are timed by: recorded in the summary, else lm-eval's task config in the
    results beside it, else read from the metric (exact_match: generation; acc: scoring; perplexity: rolling)."""
    kinds = [k for k in summary.get("throughput", {}) if not k.startswith("_")]
    recorded = (summary.get("request_types") or {}).get(task)
    if recorded:
        return REQUEST_OF.get(recorded, recorded)
    for path in sorted(glob.glob(os.path.join(folder, "lm_eval", "**", "results*.json"), recursive=True)):
        try:
            with open(path) as f:
                out_type = json.load(f)["configs"][task]["output_type"]
            return REQUEST_OF.get(out_type, out_type)
        except (OSError, ValueError, KeyError, TypeError):
            continue
    name = (metric or "").split(",")[0]
    guess = ("loglikelihood_rolling" if "perplexity" in name or name in ("bits_per_byte", "byte_perplexity")
             else "loglikelihood" if name.startswith("acc") else "generate_until" if name else None)
    return guess if guess in kinds or len(kinds) != 1 else kinds[0]


def base_row(folder: str) -> dict:
    cfg_dir = os.path.dirname(folder)
    task_dir = os.path.basename(cfg_dir)
    task, _, limit = task_dir.partition("_limit_")
    return dict({c: None for c in COLUMNS}, experiment=os.path.basename(os.path.dirname(cfg_dir)), task=task,
                limit=limit or None, config=os.path.basename(folder), folder=folder)


def rows_from(summary_path: str) -> list[dict]:
    """Rows of one complete summary.json; raises ValueError naming what is wrong with it."""
    folder = os.path.dirname(summary_path)
    try:
        with open(summary_path) as f:
            s = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e})") from None
    except OSError as e:
        raise ValueError(e.strerror or str(e)) from None
    if not isinstance(s, dict):
        raise ValueError(f"holds a JSON {type(s).__name__}, not a summary object")
    if s.get("complete") is not True:
        raise ValueError("is not marked complete")
    if not isinstance(s.get("metrics"), dict) or not s["metrics"] or not isinstance(s.get("throughput"), dict):
        raise ValueError("has no metrics or throughput")
    reuse = (s.get("reuse") or {}).get("policy") or {}
    ma = s.get("model_args") or {}
    out = []
    for task, metrics in s["metrics"].items():
        name, value = main_metric(metrics if isinstance(metrics, dict) else {})
        kind = request_type(s, folder, task, name)
        t = s["throughput"].get(kind) or {}
        row = base_row(folder)
        row.update(task=task, limit=(s.get("evaluation") or {}).get("limit") or row["limit"],
                   config=s.get("config_tag") or row["config"], status="complete",
                   k=reuse.get("k", ma.get("reuse_k", 1)), subset=reuse.get("layers", ma.get("layer_subset")),
                   mode=reuse.get("mode", ma.get("reuse_mode")), scoring=s.get("scoring"), metric=name,
                   value=value, request_type=kind, device=ma.get("device"),
                   **{k: t.get(k) for k in ("tokens_per_s_wall", "tokens_per_s_device", "tokens_per_forward",
                                            "skipped_layer_fraction")})
        out.append(row)
    return out


def config_folders(root: str) -> list[str]:
    """Folders of the recorded grid(s) plus every folder holding a summary or a log."""
    found = set()
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x not in NOT_CONFIG]
        if "grid.json" in files:
            try:
                with open(os.path.join(d, "grid.json")) as f:
                    grid = json.load(f)
                found |= {os.path.normpath(os.path.join(d, rel)) for cfgs in grid.values() for rel in cfgs.values()}
            except (OSError, ValueError, AttributeError) as e:
                print(f"collect: {os.path.join(d, 'grid.json')}: cannot read ({e}); the grid is taken from the "
                      f"folders found", file=sys.stderr)
        if "summary.json" in files or "log.txt" in files:
            found.add(os.path.normpath(d))
    return sorted(found)


def collect(root: str) -> list[dict]:
    folders = config_folders(root)
    try:
        q = queue([job_name(f) for f in folders])
    except (RuntimeError, OSError) as e:
        print(f"collect: {e}; queued jobs are shown as missing", file=sys.stderr)
        q = {}
    rows = []
    for folder in folders:
        path = os.path.join(folder, "summary.json")
        if os.path.exists(path):
            try:
                rows.extend(rows_from(path))
                continue
            except ValueError as e:
                print(f"collect: {path}: {e}", file=sys.stderr)
                why = str(e)
        else:
            why = ""
        st, detail = state(folder, q)
        if why:
            detail = f"summary.json {why}" + (f"; {st}: {detail}" if st != "missing" else "")
            st = "unreadable" if st in ("failed", "missing") else st
        rows.append(dict(base_row(folder), status=st, detail=detail))
    return sorted(rows, key=lambda r: (r["experiment"], r["task"], str(r["config"])))


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v).replace("|", "/")


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evalbridge.collect", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results")
    ap.add_argument("--out", help="where the tables and plots go (default: the results folder)")
    args = ap.parse_args(argv)
    if not os.path.isdir(args.results):
        print(f"collect: {args.results} is not a folder", file=sys.stderr)
        return 2
    rows = collect(args.results)
    out = args.out or args.results
    md, csv_path = write_tables(rows, out)
    try:
        from .plot import plot

        pngs = plot(rows, out)
    except ImportError:
        pngs = []
        print("matplotlib is not installed, so no plots were drawn (pip install -e .[eval] installs it)")
    with open(md) as f:
        print(f.read())
    counts = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    print(f"wrote {md}, {csv_path} and {len(pngs)} plot(s); "
          + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) if rows else f"no configuration under {args.results}")
    return 0 if rows else 1


if __name__ == "__main__":
    raise SystemExit(main())
