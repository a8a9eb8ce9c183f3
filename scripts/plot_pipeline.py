#!/usr/bin/env python3
"""Draws the pipeline timeline of one traced step (trace.steps) as a PNG, and prints each rank's
bubble: the share of the step's pipeline phase (first forward to last backward over all ranks)
it spent not computing, against the 1F1B/GPipe theory (P - 1) / (M + P - 1).

    scripts/plot_pipeline.py RUN_DIR/traces [--step N] [--out timeline.png] [--json]

The traces are the per-rank Chrome trace-event files the trainer writes (rank-NNNNN.json; they
also open in Perfetto or chrome://tracing)."""
import argparse
import glob
import json
import os
import re
import sys


def load(trace_dir):
    ranks = {}
    for path in sorted(glob.glob(os.path.join(trace_dir, "rank-*.json"))):
        with open(path) as f:
            doc = json.load(f)
        rank = int(re.search(r"rank-(\d+)\.json$", path).group(1))
        name, events = f"rank {rank}", []
        for e in doc["traceEvents"]:
            if e.get("ph") == "M" and e.get("name") == "process_name":
                name = e["args"]["name"]
            elif e.get("ph") == "X":
                events.append(e)
        ranks[rank] = (name, events)
    if not ranks:
        sys.exit(f"plot_pipeline: no rank-*.json traces in '{trace_dir}'")
    return ranks


def bubble(ranks, step):
    """Per rank: (busy ms, span ms, idle share) over the step's pipeline phase, and M, P."""
    compute = {r: [e for e in ev if e["args"].get("step") == step and e["cat"] == "compute"]
               for r, (_, ev) in ranks.items()}
    if not any(compute.values()):
        sys.exit(f"plot_pipeline: step {step} has no compute events")
    start = min(e["ts"] for es in compute.values() for e in es)
    end = max(e["ts"] + e["dur"] for es in compute.values() for e in es)
    out = {}
    for r, es in compute.items():
        busy = sum(e["dur"] for e in es)
        out[r] = (busy / 1e3, (end - start) / 1e3, 1.0 - busy / (end - start))
    # Forwards are "F3", or "F3.c1" for chunk 1 of an interleaved stage.
    fwd = [re.match(r"F(\d+)(?:\.c(\d+))?$", e["name"]) for es in compute.values() for e in es]
    fwd = [f for f in fwd if f]
    micro = len({f.group(1) for f in fwd})
    chunks = len({f.group(2) or "0" for f in fwd}) or 1
    return out, micro, chunks, start, end


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("traces")
    ap.add_argument("--step", type=int, help="the traced step to draw (default: the last)")
    ap.add_argument("--out", default=None, help="PNG path (default: TRACES/timeline.png)")
    ap.add_argument("--json", action="store_true", help="print the bubble figures as one JSON line")
    ap.add_argument("--no-png", action="store_true", help="only the figures (no matplotlib needed)")
    a = ap.parse_args()
    ranks = load(a.traces)
    steps = sorted({e["args"]["step"] for _, ev in ranks.values() for e in ev})
    step = a.step if a.step is not None else steps[-1]
    if step not in steps:
        sys.exit(f"plot_pipeline: step {step} was not traced (traced: {steps})")
    per, micro, chunks, start, end = bubble(ranks, step)
    stages = len({re.search(r"stage (\d+)", n).group(1) for n, _ in ranks.values() if "stage" in n}) or 1
    # Interleaved (V chunks per stage): the fill and drain are V times finer.
    theory = (stages - 1) / (chunks * micro + stages - 1) if micro else 0.0
    if a.json:
        print(json.dumps({"step": step, "stages": stages, "micro_batches": micro, "chunks": chunks,
                          "theory": theory,
                          "bubble": {str(r): v[2] for r, v in per.items()},
                          "mean_bubble": sum(v[2] for v in per.values()) / len(per)}))
    else:
        for r, (busy, span, idle) in sorted(per.items()):
            print(f"{ranks[r][0]}: busy {busy:.1f} ms of {span:.1f} ms, bubble {100 * idle:.1f}%")
        v, vs = ("V ", f", V = {chunks}") if chunks > 1 else ("", "")
        print(f"theory (P - 1) / ({v}M + P - 1) with P = {stages}{vs}, M = {micro}: {100 * theory:.1f}%")
    if a.no_png:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(12, 0.6 * len(ranks) + 1.5))
    colors = {"F": "#4c72b0", "B": "#55a868"}
    for row, r in enumerate(sorted(ranks)):
        name, events = ranks[r]
        for e in events:
            if e["args"].get("step") != step:
                continue
            x, w = (e["ts"] - start) / 1e3, e["dur"] / 1e3
            if e["cat"] == "compute":
                c = colors.get(e["name"][:1], "#8172b2")
                ax.broken_barh([(x, w)], (row - 0.4, 0.55), facecolors=c, edgecolor="white", linewidth=0.3)
                if w > (end - start) / 1e3 / 60:
                    ax.text(x + w / 2, row - 0.12, e["name"], ha="center", va="center", fontsize=7, color="white")
            elif e["cat"] == "pipeline p2p":
                ax.broken_barh([(x, w)], (row + 0.18, 0.12), facecolors="#c44e52", alpha=0.6)
            else:
                ax.broken_barh([(x, w)], (row + 0.18, 0.12), facecolors="#937860", alpha=0.8)
    ax.set_yticks(range(len(ranks)))
    ax.set_yticklabels([f"{ranks[r][0]}\nbubble {100 * per[r][2]:.0f}%" for r in sorted(ranks)], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms")
    ax.set_title(f"step {step}: {stages} stages, {micro} micro-batches (forward blue, backward green, "
                 f"p2p red, DP/optimizer brown); theory bubble {100 * theory:.0f}%")
    fig.tight_layout()
    out = a.out or os.path.join(a.traces, "timeline.png")
    fig.savefig(out, dpi=120)
    if not a.json:
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
