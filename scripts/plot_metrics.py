#!/usr/bin/env python3
"""Plots a meshtrain run: training and validation loss, and tokens/s, against the step.

    scripts/plot_metrics.py RUN_DIR [--out FILE.png]

Reads RUN_DIR/metrics.jsonl (one JSON object per line, as `meshtrain train` writes it) and
writes RUN_DIR/metrics.png unless --out says otherwise. Needs matplotlib (Debian's
python3-matplotlib, installed by scripts/setup.sh).
"""
import argparse
import json
import os
import sys


def fail(msg):
    print(f"plot_metrics: error: {msg}", file=sys.stderr)
    sys.exit(1)


def read_metrics(path):
    steps, loss, tps, skipped, val_steps, val_loss = [], [], [], [], [], []
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        fail(f"cannot read '{path}': {e.strerror} (is it a run directory of meshtrain train?)")
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                fail(f"{path}:{n}: not a JSON object ({e.msg} at column {e.colno})")
            if not isinstance(rec, dict) or "step" not in rec:
                fail(f"{path}:{n}: expected a JSON object with a \"step\" key")
            if "loss" in rec:
                steps.append(rec["step"])
                loss.append(rec["loss"])
                tps.append(rec.get("tokens_per_s"))
                skipped.append(bool(rec.get("skipped", False)))
            elif "val_loss" in rec:
                val_steps.append(rec["step"])
                val_loss.append(rec["val_loss"])
    if not steps:
        fail(f"{path} holds no training steps (lines with \"step\" and \"loss\")")
    return steps, loss, tps, skipped, val_steps, val_loss


def main():
    ap = argparse.ArgumentParser(description="Plot loss and throughput of a meshtrain run.")
    ap.add_argument("run_dir", help="the run directory (holds metrics.jsonl)")
    ap.add_argument("--out", help="the PNG to write (default RUN_DIR/metrics.png)")
    args = ap.parse_args()
    try:
        import matplotlib
    except ImportError:
        fail("matplotlib is not installed: apt-get install python3-matplotlib")
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    steps, loss, tps, skipped, val_steps, val_loss = read_metrics(
        os.path.join(args.run_dir, "metrics.jsonl"))
    out = args.out or os.path.join(args.run_dir, "metrics.png")

    fig, (ax_loss, ax_tps) = plt.subplots(2, 1, figsize=(9, 7), sharex=True,
                                          gridspec_kw={"height_ratios": [2, 1]})
    ok = [i for i, s in enumerate(skipped) if not s]
    ax_loss.plot([steps[i] for i in ok], [loss[i] for i in ok], lw=1.2, label="train loss")
    if val_steps:
        ax_loss.plot(val_steps, val_loss, "o-", lw=1.5, ms=4, label="validation loss")
    bad = [steps[i] for i, s in enumerate(skipped) if s]
    if bad:
        ax_loss.plot(bad, [min(loss[i] for i in ok)] * len(bad) if ok else [0] * len(bad), "rx",
                     label="skipped (non-finite)")
    ax_loss.set_ylabel("loss (nats per token)")
    ax_loss.set_title(f"meshtrain run {os.path.abspath(args.run_dir)}", fontsize=10)
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()

    # The first step includes one-off costs (primitive creation, page faults): not drawn.
    pts = [(s, t) for s, t in zip(steps, tps) if t is not None and s > 1]
    if pts:
        ax_tps.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2, color="tab:green")
    ax_tps.set_ylabel("tokens/s")
    ax_tps.set_xlabel("step")
    ax_tps.set_ylim(bottom=0)
    ax_tps.grid(alpha=0.3)

    fig.tight_layout()
    tmp = out + ".tmp.png"
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, out)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        fail(f"cannot write '{out}': {e.strerror}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
