"""compare --plot: each stage's error over the steps of two runs; replay --plot: the step x stage heat map of the
errors each stage introduced, received and produced. PNGs (matplotlib, the optional [plot] extra)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.core.atomic import atomic_write_path
from pipeline.core.errors import StagepipeError
from pipeline.core.layout import step_number, tensor_sort_key

ZERO_FLOOR = 1e-12  # where an exact match is drawn on the log-scale plot


def require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise StagepipeError("--plot needs matplotlib, which is not installed: pip install matplotlib") from None
    matplotlib.use("Agg")


def write_plot(r: dict, out: Path):
    """Max abs error per step for each stage's output tensor (log y); failures marked x, NaN as a red band."""
    require_matplotlib()
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    series: dict[str, dict] = {}
    for s in r["steps"]:
        x = step_number(s["step"]) or 0
        for e in s["tensors"]:
            if e["stage"] is None:
                continue
            line = series.setdefault(e["stage"], {"file": e["file"], "x": [], "y": [], "fail": [], "nan": []})
            err = e["max_abs_err"]
            if err is None or err != err:  # shape mismatch or NaN: no value to draw
                line["nan"].append(x)
                continue
            line["x"].append(x)
            line["y"].append(max(err, ZERO_FLOOR))
            if e["exceeds"]:
                line["fail"].append((x, max(err, ZERO_FLOOR)))
    fig, ax = plt.subplots(figsize=(9, 5))
    for stage in sorted(series, key=lambda st: tensor_sort_key(series[st]["file"])):
        line = series[stage]
        (drawn,) = ax.plot(line["x"], line["y"], marker="o", markersize=3,
                           label=f"{stage} ({line['file'].removesuffix('.npy')})")
        if line["fail"]:
            ax.scatter(*zip(*line["fail"]), marker="x", s=60, color=drawn.get_color(), zorder=3)
        for x in line["nan"]:
            ax.axvspan(x - 0.3, x + 0.3, color="red", alpha=0.15)
    ax.axhline(r["tolerance"]["atol"], color="red", linestyle="--", linewidth=1, label=f"atol {r['tolerance']['atol']:g}")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel(f"max abs error over real rows (exact: {ZERO_FLOOR:g})")
    title = f"{r['run_a']} vs {r['run_b']}"
    if r["first_failure"]:
        title += f"\nfirst failure: {r['first_failure']['path']} (x: exceeds; red band: NaN or shape mismatch)"
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_write_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_heatmap(out: Path, panels: list[tuple[str, np.ndarray]], steps: list[str], stages: list[str],
                  max_rel_err: float, title: str):
    """One panel per (title, values[step, stage]) of relative errors, log colour scale; NaN cells (not
    measured) blank, cells over max_rel_err marked x."""
    require_matplotlib()
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    finite = [v for _, m in panels for v in m[np.isfinite(m)].ravel()]
    vmax = max([max_rel_err * 10] + finite)
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 + 1.1 * len(stages) * len(panels),
                                                       1.8 + 0.22 * len(steps)), squeeze=False)
    for ax, (name, values) in zip(axes[0], panels):
        shown = np.where(np.isnan(values), np.nan, np.maximum(values, ZERO_FLOOR))
        image = ax.imshow(np.ma.masked_invalid(shown), aspect="auto", cmap="viridis",
                          norm=LogNorm(vmin=ZERO_FLOOR, vmax=max(vmax, ZERO_FLOOR * 10)), interpolation="nearest")
        over = np.argwhere(values > max_rel_err)
        if len(over):
            ax.scatter(over[:, 1], over[:, 0], marker="x", s=18, color="red", linewidths=1)
        ax.set_xticks(range(len(stages)), stages, rotation=45, ha="right", fontsize=8)
        every = max(1, len(steps) // 40)
        ax.set_yticks(range(0, len(steps), every), steps[::every], fontsize=7)
        ax.set_title(name, fontsize=9)
        fig.colorbar(image, ax=ax, label=f"relative error (exact: {ZERO_FLOOR:g}; x: > {max_rel_err:g})")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_write_path(Path(out)) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
