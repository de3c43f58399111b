"""The report of one search: ``report.md`` and its PNG plots in the run directory.

* ``best_kld.png`` (agents) -- calibration KLD of every evaluation and the best so far,
  versus the number of evaluations (the warm start is evaluation 1);
* ``bits_by_depth.png`` -- bits per weight of every tensor's format over block depth, one
  line per role (the tensors outside the blocks at the ends);
* ``pareto.png`` -- bytes versus held-out KLD of the agent and of the solvers/agents given
  as baselines, with their Pareto front; beside it, for an agent, every allocation the
  search evaluated (bytes versus calibration KLD).

Plots are drawn with matplotlib's Agg renderer on :class:`matplotlib.figure.Figure`
objects (no pyplot state, safe in any process); every file is written to a temporary name
in the run directory and renamed into place.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from pathlib import Path
from typing import Mapping, Sequence

from autobits.agents.base import SearchResult
from autobits.allocation import Allocation
from autobits.errors import AutobitsError
from autobits.evaluate import Metrics
from autobits.io import write_atomic
from autobits.paired import PairedDiff
from autobits.specs import DEFAULT_CANDIDATES, QUANTIZABLE_ROLES, TensorSpec

__all__ = ["write_report", "pareto_front", "REPORT_FILES"]

log = logging.getLogger(__name__)

#: Files :func:`write_report` writes, by key of its returned mapping.
REPORT_FILES = {"report": "report.md", "best_kld": "best_kld.png",
                "bits_by_depth": "bits_by_depth.png", "pareto": "pareto.png"}


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points (fewer bytes or lower KLD), by increasing bytes."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    out, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            out.append(i)
            best = points[i][1]
    return out


def _bits(spec: TensorSpec, fmt: str) -> float:
    return spec.nbytes(fmt) * 8 / spec.numel


def _save_fig(fig, path: Path) -> Path:
    return write_atomic(path, lambda fh: fig.savefig(fh, format="png", dpi=110), binary=True)


# ------------------------------------------------------------------ plots
def _plot_best(result: SearchResult, path: Path) -> Path:
    """Calibration KLD of every evaluation of a search, and the best so far."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot()
    h = result.history
    xs = [e.index + 1 for e in h]
    if h:
        ok = [e for e in h if e.feasible]
        bad = [e for e in h if not e.feasible]
        ax.scatter([e.index + 1 for e in ok], [e.kld for e in ok], s=9, alpha=0.35,
                   color="tab:blue", label="evaluation")
        if bad:
            ax.scatter([e.index + 1 for e in bad], [e.kld for e in bad], s=12, marker="x",
                       color="tab:red", label="over budget")
        best = result.best_so_far()
        ax.step(xs, [b if math.isfinite(b) else float("nan") for b in best], where="post",
                color="tab:orange", lw=2, label="best so far")
        ax.axhline(h[0].kld, color="grey", ls="--", lw=1, label="first (warm start)")
        klds = [e.kld for e in h if e.kld > 0]
        if klds and max(klds) / min(klds) > 20:
            ax.set_yscale("log")
    ax.set_xlabel("evaluations")
    ax.set_ylabel("calibration KLD (nats/token)")
    ax.set_title(f"{result.agent}: best KLD versus evaluations")
    ax.grid(alpha=0.3)
    if h:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save_fig(fig, path)


def _plot_bits(alloc: Allocation, specs: Sequence[TensorSpec], path: Path) -> Path:
    from matplotlib.figure import Figure

    by_name = {s.name: s for s in specs}
    blocks = [s.block for s in specs if s.block is not None]
    n_blocks = max(blocks) + 1 if blocks else 1
    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    roles = [r for r in QUANTIZABLE_ROLES if any(by_name[t].role == r for t in alloc.tensors
                                                if t in by_name)]
    for k, role in enumerate(roles):
        pts = sorted(
            ((s.block if s.block is not None else (-1 if role == "token_embd" else n_blocks)),
             _bits(s, fmt))
            for t, fmt in alloc.tensors.items() if (s := by_name.get(t)) and s.role == role
        )
        if not pts:
            continue
        dx = (k - (len(roles) - 1) / 2) * 0.06  # shift roles sideways: equal lines stay visible
        x, y = zip(*pts)
        ax.plot([v + dx for v in x], y, marker="o", ms=3, lw=1, alpha=0.85, label=role)
    ax.set_xlabel("block (token_embd at -1, output after the last block; roles shifted apart)")
    ax.set_ylabel("bits per weight of the format")
    ax.set_title(f"bits per tensor over depth: {alloc.bpw:.3f} bpw file")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    return _save_fig(fig, path)


def _plot_pareto(name: str, search: SearchResult | None, heldout: Metrics | None,
                 baselines: Mapping[str, tuple[Allocation, Metrics]], path: Path) -> Path:
    """Held-out size versus KLD of the answer and the baselines (and, for a search, every
    evaluation's calibration KLD beside it)."""
    from matplotlib.figure import Figure

    if search is not None:
        fig = Figure(figsize=(11, 4.5))
        ax, ax2 = fig.subplots(1, 2)
    else:
        fig = Figure(figsize=(6, 4.5))
        ax, ax2 = fig.add_subplot(), None
    pts: list[tuple[str, int, float]] = []
    if heldout is not None:
        pts.append((name, heldout.bytes, heldout.kld))
    pts += [(name, m.bytes, m.kld) for name, (_, m) in baselines.items()]
    if pts:
        front = pareto_front([(b, k) for _, b, k in pts])
        for i, (label, b, k) in enumerate(pts):
            mine = i == 0 and heldout is not None
            ax.scatter([b / 1e6], [k], s=60 if mine else 35, marker="*" if mine else "o",
                       color="tab:orange" if mine else ("tab:blue" if i in front else "grey"),
                       zorder=3)
            ax.annotate(label, (b / 1e6, k), textcoords="offset points", xytext=(5, 4), fontsize=8)
        fx = [pts[i][1] / 1e6 for i in front]
        fy = [pts[i][2] for i in front]
        ax.step(fx, fy, where="post", color="tab:blue", alpha=0.5, lw=1, label="Pareto front")
        klds = [k for _, _, k in pts]
        if min(klds) > 0 and max(klds) / min(klds) > 10:
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no held-out metrics", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("file bytes (MB)")
    ax.set_ylabel("held-out KLD (nats/token)")
    ax.set_title("solvers and agents: size versus held-out KLD")
    ax.grid(alpha=0.3)
    if search is not None:
        h = search.history
        if h:
            ax2.scatter([e.bpw for e in h], [e.kld for e in h], s=9, alpha=0.4,
                        c=[e.index for e in h], cmap="viridis")
            ax2.scatter([search.best_metrics.bpw], [search.best_metrics.kld], s=80,
                        marker="*", color="tab:orange", label="best", zorder=3)
            ax2.legend(fontsize=8)
            ax2.ticklabel_format(axis="x", useOffset=False)
        ax2.set_xlabel("bits per weight (file)")
        ax2.set_ylabel("calibration KLD")
        ax2.set_title(f"{search.agent}: every evaluation (colour = order)")
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    return _save_fig(fig, path)


# ------------------------------------------------------------------ markdown
def _row(name: str, m: Metrics, ref: Metrics | None, mark: str = "") -> str:
    delta = ""
    if ref is not None and ref.kld > 0:
        delta = f"{(m.kld / ref.kld - 1) * 100:+.1f}%"
    return (f"| {name}{mark} | {m.kld:.5f} | {m.ppl:.4f} | {m.top1:.4f} | {m.bytes:,} | "
            f"{m.bpw:.4f} | {delta} |")


def _role_table(alloc: Allocation, specs: Sequence[TensorSpec]) -> list[str]:
    by_name = {s.name: s for s in specs}
    counts: dict[str, Counter] = {}
    bits: dict[str, list[float]] = {}
    for t, fmt in alloc.tensors.items():
        s = by_name[t]
        counts.setdefault(s.role, Counter())[fmt] += 1
        bits.setdefault(s.role, [0.0, 0.0])
        bits[s.role][0] += s.nbytes(fmt) * 8
        bits[s.role][1] += s.numel
    used = {f for c in counts.values() for f in c}
    fmts = [f for f in DEFAULT_CANDIDATES if f in used] + sorted(used - set(DEFAULT_CANDIDATES))
    roles = [r for r in QUANTIZABLE_ROLES if r in counts]
    lines = ["| role | " + " | ".join(fmts) + " | bpw |",
             "|---|" + "---:|" * (len(fmts) + 1)]
    for r in roles:
        cells = [str(counts[r].get(f, "")) for f in fmts]
        lines.append(f"| {r} | " + " | ".join(cells) + f" | {bits[r][0] / bits[r][1]:.3f} |")
    return lines


def _budget_line(limit_bytes: int, params: int) -> str:
    return f"- budget: {int(limit_bytes):,} bytes ({int(limit_bytes) * 8 / params:.4f} bpw, file-level)"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:+.2f}%"


def _selection_lines(sel: Mapping) -> list[str]:
    """The selection section: every re-measured allocation, with its paired interval of
    selection KLD against the warm start (see :mod:`autobits.agents.selection`)."""
    level, method = sel.get("level"), sel.get("method")
    head = (f"{level * 100:g}% interval ({method})" if level is not None else "interval")
    lines = ["## Selection", "", "The best allocations of the search were re-measured on the "
             "selection slice (calibration windows disjoint from the reward slice) and "
             "compared, window by window, with the warm start (the greedy solver's "
             "allocation, where the search starts); a candidate replaces it only when the "
             "whole interval of its KLD difference is below zero.", "",
             f"Chosen: **{sel['chosen']}**" + (f": {sel['reason']}." if sel.get("reason") else "."),
             "", f"| allocation | reward KLD | selection KLD | KLD vs warm start | {head} "
             f"| windows | bytes | bpw |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sel["rows"]:
        rk = "-" if r["reward_kld"] is None else f"{r['reward_kld']:.5f}"
        d = r.get("vs_warm_start")
        if d is not None:
            d = PairedDiff(**d)
            vs = _pct(d.rel) if d.rel is not None else f"{d.diff:+.3g}"
            span = (f"{_pct(d.rel_lo)} .. {_pct(d.rel_hi)}" if d.mean_a else
                    f"{d.lo:+.3g} .. {d.hi:+.3g}")
        else:
            vs = span = "(warm start)" if r.get("warm_start") else "-"
        label = f"**{r['label']}** (chosen)" if r["label"] == sel["chosen"] else r["label"]
        lines.append(f"| {label} | {rk} | {r['selection_kld']:.5f} | {vs} | {span} "
                     f"| {r.get('windows', '-')} | {r['bytes']:,} | {r['bpw']:.4f} |")
    return lines + [""]


def _markdown(name: str, best: Allocation, reward: Metrics | None, search: SearchResult | None,
              heldout: Metrics | None, baselines: Mapping[str, tuple[Allocation, Metrics]],
              specs: Sequence[TensorSpec], plots: Mapping[str, Path], limit_bytes: int,
              source_note: str | None = None, numerics: str | None = None) -> str:
    kind = "search" if search is not None else "solver"
    lines = [f"# {name} {kind}: {best.model}", "", _budget_line(limit_bytes, best.params)]
    if source_note:
        lines.append(f"- source: {source_note}")
    if numerics:
        lines.append(f"- held-out numerics: {numerics}")
    if search is not None:
        h, bm = search.history, search.best_metrics
        at = next((e.index + 1 for e in h if e.kld == bm.kld and e.bytes == bm.bytes), None)
        secs = sum(e.seconds for e in h)
        lines.append(f"- evaluations: {len(h)} ({secs / 60:.1f} min evaluating)"
                     + (f"; best found at evaluation {at}" if at else ""))
    lines += ["", "## Answer", "", "| | value |", "|---|---:|",
              f"| bytes | {best.bytes:,} |", f"| bpw | {best.bpw:.4f} |"]
    if reward is not None:
        lines.append(f"| calibration KLD | {reward.kld:.5f} |")
    if heldout is not None:
        lines += [f"| held-out KLD | {heldout.kld:.5f} |", f"| held-out PPL | {heldout.ppl:.4f} "
                  f"(reference {heldout.ref_ppl:.4f}) |", f"| held-out top-1 | {heldout.top1:.4f} |"]
    lines += ["", "### Formats per role", ""] + _role_table(best, specs) + [""]
    if heldout is not None or baselines:
        ref = heldout
        lines += ["## Comparison (held-out)", "",
                  "| allocation | KLD | PPL | top-1 | bytes | bpw | KLD vs " + name + " |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        if heldout is not None:
            lines.append(_row(name, heldout, None, f" (this {kind})"))
        for other, (_, m) in sorted(baselines.items(), key=lambda kv: kv[1][1].kld):
            lines.append(_row(other, m, ref))
        if heldout is not None and baselines:
            beaten = [n for n, (_, m) in baselines.items()
                      if heldout.kld <= m.kld and heldout.bytes <= m.bytes]
            lines += ["", f"{name} has a held-out KLD at most that of "
                      f"{', '.join(sorted(beaten))} at equal or smaller size." if beaten else
                      f"{name} does not reach the held-out KLD of any baseline at equal "
                      f"or smaller size."]
        lines.append("")
    meta = search.meta if search is not None else {}
    sel = meta.get("selection")
    if sel:
        lines += _selection_lines(sel)
    lines += ["## Plots", ""]
    captions = {"best_kld": "Best KLD versus evaluations", "bits_by_depth": "Bits per tensor over depth",
                "pareto": "Pareto points of solvers and agents"}
    for key, p in plots.items():
        lines += [f"![{captions[key]}]({p.name})", ""]
    scalars = {k: v for k, v in meta.items() if isinstance(v, (str, int, float))}
    if scalars:
        lines += ["## Search settings", "", "| key | value |", "|---|---|"]
        for k, v in scalars.items():
            lines.append(f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |")
        lines.append("")
    return "\n".join(lines)


def write_report(*, name: str, allocation: Allocation, out_dir: str | os.PathLike,
                 specs: Sequence[TensorSpec], limit_bytes: int, reward: Metrics | None = None,
                 search: SearchResult | None = None, heldout: Metrics | None = None,
                 baselines: Mapping[str, tuple[Allocation, Metrics]] | None = None,
                 source_note: str | None = None, numerics: str | None = None) -> dict[str, Path]:
    """Write ``report.md`` and its plots into ``out_dir``; return their paths by
    :data:`REPORT_FILES` key (``best_kld`` only for a search).

    ``name`` is the solver or agent that answered ``allocation`` within ``limit_bytes``;
    ``reward`` its reward-slice metrics; ``search`` the agent's record (history, selection),
    None for a solver; ``heldout`` the answer's held-out metrics; ``baselines`` maps a solver
    name to its allocation and held-out metrics at the same budget; ``specs`` the model's
    tensors (for bits per weight and roles); ``source_note`` a line on the source model
    printed under the budget (e.g. that it was already quantized); ``numerics`` how the
    held-out metrics were computed (:data:`autobits.pipeline.NUMERICS`).
    """
    if not specs:
        raise AutobitsError(f"specs must list the model's tensors, got {len(specs)=}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    baselines = dict(baselines or {})
    plots = {}
    if search is not None:
        plots["best_kld"] = _plot_best(search, out / REPORT_FILES["best_kld"])
    plots["bits_by_depth"] = _plot_bits(allocation, specs, out / REPORT_FILES["bits_by_depth"])
    plots["pareto"] = _plot_pareto(name, search, heldout, baselines, out / REPORT_FILES["pareto"])
    text = _markdown(name, allocation, reward, search, heldout, baselines, specs, plots,
                     limit_bytes, source_note, numerics)
    report = write_atomic(out / REPORT_FILES["report"], text)
    log.info("report written to %s", report)
    return {"report": report, **plots}
