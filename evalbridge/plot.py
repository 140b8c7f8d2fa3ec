"""One plot per task for choosing a configuration: accuracy against the rate of the task's own request type.

One point per configuration, labelled with its tag (labels placed so they do not overlap), coloured by the
fraction of layer evaluations skipped, marker by reuse interval k. An accuracy that is the same for every
configuration gets a readable axis and a note, and so does a speed spread that is within noise or measured on
a CPU."""
from __future__ import annotations

import os

MARKERS = {1: "o", 2: "s", 3: "^"}
NOISE = 0.10          # relative spread of rates below which differences are not read as real on shared machines


def _place_labels(ax, pts):
    """Greedy placement in display space: each label takes the first offset whose box overlaps none placed."""
    fig = ax.figure
    fig.canvas.draw()
    placed = []
    offsets = [(6, 4), (6, -12), (-6, 4), (-6, -12), (6, 16), (6, -24), (-6, 16), (-6, -24), (6, 28), (6, -36)]
    for x, y, label in sorted(pts, key=lambda p: (p[1], p[0])):
        px, py = ax.transData.transform((x, y))
        w, h = 6.5 * len(label), 11
        for dx, dy in offsets:
            x0 = px + dx if dx > 0 else px + dx - w
            box = (x0, py + dy, x0 + w, py + dy + h)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
                break
        placed.append(box)
        ax.annotate(label, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=8,
                    ha="left" if dx > 0 else "right", va="bottom",
                    arrowprops=dict(arrowstyle="-", color="0.6", lw=0.5) if abs(dy) > 12 else None)


def notes_for(pts: list[dict], rates: list[float]) -> list[str]:
    notes = []
    values = [r["value"] for r in pts]
    if max(values) - min(values) < 1e-9:
        notes.append(f"every configuration scores {values[0]:.4g}: accuracy does not separate them")
    if any(str(r.get("device") or "").startswith("cpu") for r in pts):
        notes.append("measured on a CPU: rates do not carry over to a GPU")
    if len(rates) > 1 and min(rates) > 0 and (max(rates) - min(rates)) / max(rates) < NOISE:
        notes.append(f"rates differ by under {NOISE:.0%}: within the noise of one run")
    return notes


def plot(rows: list[dict], out: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for task in sorted({r["task"] for r in rows}):
        pts = [r for r in rows if r["task"] == task and r["status"] == "complete"
               and isinstance(r["value"], (int, float))]
        if not pts:
            continue
        rates = [float(r["tokens_per_s_device"] or r["tokens_per_s_wall"] or 0.0) for r in pts]
        skipped = [float(r["skipped_layer_fraction"] or 0.0) for r in pts]
        fig, ax = plt.subplots(figsize=(7.5, 5), dpi=100)
        sc = None
        for r, x, s in zip(pts, rates, skipped):
            sc = ax.scatter(x, r["value"], s=90, marker=MARKERS.get(int(r["k"] or 1), "D"), c=[s], cmap="viridis",
                            vmin=0, vmax=max(0.5, max(skipped)), edgecolors="black", linewidths=0.6, zorder=3)
        fig.colorbar(sc, ax=ax, label="fraction of layer evaluations skipped")
        values = [r["value"] for r in pts]
        lo, hi = min(values), max(values)
        if hi - lo < 0.02:                      # a constant: a readable band around it, not 0.96-1.04 noise
            pad = 0.1 if 0 <= lo <= 1 else max(abs(lo) * 0.1, 1)
            ax.set_ylim(lo - pad, hi + pad if hi + pad <= 1 or hi > 1 else 1.02)
        if max(rates) - min(rates) < 1e-9:
            ax.set_xlim(rates[0] * 0.9 - 1, rates[0] * 1.1 + 1)
        kind = pts[0]["request_type"] or "requests"
        timed = "device" if any(r["tokens_per_s_device"] for r in pts) else "wall"
        ax.set_xlabel(f"{kind}: tokens/s ({timed} time)")
        ax.set_ylabel(pts[0]["metric"] or "metric")
        ax.set_title(f"{task}: accuracy against speed", fontsize=11)
        for k, m in MARKERS.items():
            ax.scatter([], [], marker=m, color="white", edgecolors="black", label=f"k={k}" if k > 1 else "k=1 (no reuse)")
        ax.legend(fontsize=8, loc="lower left", framealpha=0.8)
        ax.grid(alpha=0.3)
        _place_labels(ax, [(x, r["value"], str(r["config"])) for r, x in zip(pts, rates)])
        notes = notes_for(pts, rates)
        if notes:
            fig.text(0.01, 0.01, "Note: " + "; ".join(notes), fontsize=7.5, wrap=True, va="bottom")
        fig.tight_layout(rect=(0, 0.06 if notes else 0, 1, 1))
        path = os.path.join(out, f"{task}.png")
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths
