"""compare --plot: each stage's error over the steps of two runs, as a PNG (matplotlib, the optional [plot] extra)."""
from __future__ import annotations

from pathlib import Path

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
