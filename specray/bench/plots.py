"""The comparison's PNG plots (matplotlib, Agg backend), drawn from result rows:

- tokens_per_s.png: output tokens/s of every system and setting at concurrency 1, one bar per prompt set;
- tpot_vs_concurrency.png: gRPC TPOT p50 against client concurrency, one line per mode and prompt set;
- acceptance_by_position.png: the fraction of rounds that accepted draft position i, per mode and set
  (the in-process engine's rows; acceptance does not depend on where the engine runs).
A plot without rows to draw is not written."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

STYLES = ("-", "--", ":", "-.")


def _sets(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["prompts"] for r in rows))


def tokens_per_s(rows: list[dict], path: Path) -> bool:
    rows = [r for r in rows if r["concurrency"] == 1]
    if not rows:
        return False
    labels = list(dict.fromkeys(f"{r['system']} {r['setting']}" for r in rows))
    sets = _sets(rows)
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(labels) * len(sets) + 1.5))
    height = 0.8 / len(sets)
    for j, name in enumerate(sets):
        value = {f"{r['system']} {r['setting']}": r["output_tokens_per_s"] for r in rows if r["prompts"] == name}
        ax.barh([i + j * height for i in range(len(labels))], [value.get(label, 0) for label in labels],
                height, label=name)
    ax.set_yticks([i + height * (len(sets) - 1) / 2 for i in range(len(labels))], labels)
    ax.invert_yaxis()
    ax.set_xlabel("output tokens/s (concurrency 1)")
    ax.legend(title="prompts")
    return _save(fig, path)


def tpot_vs_concurrency(rows: list[dict], path: Path) -> bool:
    rows = [r for r in rows if r["system"] == "grpc"]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for j, name in enumerate(_sets(rows)):
        for mode in dict.fromkeys(r["setting"] for r in rows):
            line = sorted((r["concurrency"], r["tpot_ms"]["p50"]) for r in rows
                          if r["prompts"] == name and r["setting"] == mode)
            ax.plot(*zip(*line), STYLES[j % len(STYLES)], marker="o", label=f"{mode}, {name}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("client concurrency (gRPC)")
    ax.set_ylabel("TPOT p50 (ms)")
    ax.legend(fontsize="small")
    return _save(fig, path)


def acceptance_by_position(rows: list[dict], path: Path) -> bool:
    system = next((s for s in ("local", "ray", "grpc") if any(r["system"] == s for r in rows)), None)
    rows = [r for r in rows if r["system"] == system and r["concurrency"] == 1 and r["acceptance_by_position"]]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sets = _sets(rows)
    for r in rows:
        rates = r["acceptance_by_position"]
        ax.plot(range(1, len(rates) + 1), rates, STYLES[sets.index(r["prompts"]) % len(STYLES)], marker="o",
                label=f"{r['setting']}, {r['prompts']}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("draft position")
    ax.set_ylabel("accepted per round")
    ax.set_ylim(0, 1)
    ax.set_title(f"acceptance by position ({system})")
    ax.legend(fontsize="small")
    return _save(fig, path)


def _save(fig, path: Path) -> bool:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def draw_all(rows: list[dict], out: Path) -> list[Path]:
    """Every plot that has rows, under out; the paths written."""
    plots = (tokens_per_s, tpot_vs_concurrency, acceptance_by_position)
    paths = [out / f"{plot.__name__}.png" for plot in plots]
    return [p for plot, p in zip(plots, paths) if plot(rows, p)]
