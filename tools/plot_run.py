"""Draw one or several runs' curves from their TensorBoard event files into one PNG.

    python tools/plot_run.py tb --output run.png
    python tools/plot_run.py runs/a/tb runs/b/tb --labels baseline fp8 --output compare.png

Panels: lm loss, lm loss validation, learning-rate, grad-norm, moe/load-imbalance and mtp loss against
the iteration; several runs are overlaid in one colour each. Every event file under each RUN_DIR is read
(a resumed run's files together). Needs matplotlib: pip install -e .[plot].
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

PANELS = (("lm loss", "lm loss"), ("lm loss validation", "lm loss validation"), ("learning-rate", "learning rate"),
          ("grad-norm", "grad norm"), ("moe/load-imbalance", "expert load imbalance (max / mean)"),
          ("mtp loss", "mtp loss"))
SIZE_INCHES, DPI = (15, 8), 100  # a 1500 x 800 picture


def read_run(run_dir: str) -> dict[str, dict[int, float]]:
    """{tag: {iteration: value}} of every event file under `run_dir` (later files win on an iteration)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    dirs = sorted({os.path.dirname(p) for p in map(str, Path(run_dir).rglob("events.out.tfevents.*"))})
    scalars: dict[str, dict[int, float]] = {}
    for d in dirs:
        acc = EventAccumulator(d, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return scalars


def plot(runs: dict[str, dict[str, dict[int, float]]], output: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 3, figsize=SIZE_INCHES, dpi=DPI)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (tag, title) in zip(axes.flat, PANELS):
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        drawn = False
        for i, (label, scalars) in enumerate(runs.items()):
            points = sorted(scalars.get(tag, {}).items())
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, color=colours[i % len(colours)], label=label,
                        marker="o" if len(points) < 20 else None, markersize=3)
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if not handles:  # no run logged lm loss: take the legend from any panel
        handles, labels = next((a.get_legend_handles_labels() for a in axes.flat if a.get_lines()), ([], []))
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 6) or 1, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(output, dpi=DPI)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a run's --tensorboard-dir")
    parser.add_argument("--output", required=True, metavar="FILE.png")
    parser.add_argument("--labels", nargs="+", default=None, help="one legend label per RUN_DIR (default: the paths)")
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        parser.error("matplotlib is not installed: pip install -e .[plot]")
    if args.labels is not None and len(args.labels) != len(args.run_dirs):
        parser.error(f"--labels gives {len(args.labels)} labels for {len(args.run_dirs)} RUN_DIRs")
    runs = {}
    for label, run_dir in zip(args.labels or args.run_dirs, args.run_dirs):
        if not os.path.isdir(run_dir):
            parser.error(f"RUN_DIR {run_dir} is not a directory")
        scalars = read_run(run_dir)
        if not scalars:
            parser.error(f"RUN_DIR {run_dir} holds no TensorBoard scalars (no events.out.tfevents.* files below it)")
        runs[label] = scalars
    plot(runs, args.output)
    print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
