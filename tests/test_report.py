"""The search report: markdown and PNG plots from a synthetic SearchResult."""

from __future__ import annotations

import numpy as np
import pytest

from autobits.agents.base import Evaluation, SearchResult
from autobits.app.report import REPORT_FILES, pareto_front, write_report
from autobits.allocation import Allocation
from autobits.evaluate import Metrics
from autobits.specs import TensorSpec

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def specs(n_layers=3, d=64, ffn=256):
    q = lambda name, shape, role, blk: TensorSpec(name, shape, role, blk, quantizable=True)  # noqa: E731
    out = [q("token_embd.weight", (512, d), "token_embd", None),
           TensorSpec("output_norm.weight", (d,), "norm", None)]
    for i in range(n_layers):
        p = f"blk.{i}."
        out += [q(p + "attn_q.weight", (d, d), "attn_q", i),
                q(p + "attn_v.weight", (d // 2, d), "attn_v", i),
                q(p + "ffn_down.weight", (d, ffn), "ffn_down", i)]
    return out


def metrics(alloc, kld):
    return Metrics(kld=kld, ppl=10 * (1 + kld), top1=1 - kld, bytes=alloc.bytes, bpw=alloc.bpw,
                   seconds=0.5, tokens=512, windows=2, ref_ppl=10.0)


def allocation(sp, fmt_by_role):
    tensors = {s.name: fmt_by_role.get(s.role, "Q8_0") for s in sp if s.quantizable}
    return Allocation.build("synthetic", sp, tensors)


@pytest.fixture
def result():
    sp = specs()
    best = allocation(sp, {"ffn_down": "Q4_K", "attn_q": "Q5_0", "token_embd": "Q4_0"})
    rng = np.random.default_rng(0)
    hist = [Evaluation(i, float(0.1 + rng.uniform(0, 0.05) - 0.0003 * i), best.bytes - i,
                       best.bpw, True, 0.5) for i in range(40)]
    hist.append(Evaluation(40, 0.02, best.bytes, best.bpw, True, 0.5))
    res = SearchResult(agent="optuna", best=best, best_metrics=metrics(best, 0.02), history=hist,
                       meta={"limit_bytes": best.bytes + 10, "sampler": "tpe", "seed": 0,
                             "raw_over": [False] * 41, "seconds": 12.5})
    return sp, res


def test_pareto_front():
    pts = [(10, 0.5), (8, 0.7), (12, 0.4), (11, 0.6), (8, 0.9)]
    assert pareto_front(pts) == [1, 0, 2]
    assert pareto_front([]) == []


def test_write_report(tmp_path, result):
    sp, res = result
    held = metrics(res.best, 0.025)
    greedy = allocation(sp, {"ffn_down": "Q5_K", "attn_q": "Q4_0", "token_embd": "Q4_0"})
    uni = allocation(sp, {"ffn_down": "Q4_0", "attn_q": "Q4_0", "token_embd": "Q4_0",
                          "attn_v": "Q4_0"})
    baselines = {"greedy": (greedy, metrics(greedy, 0.03)), "uniform": (uni, metrics(uni, 0.2))}
    paths = write_report(name="optuna", allocation=res.best, reward=res.best_metrics, search=res,
                         out_dir=tmp_path, heldout=held, baselines=baselines, specs=sp,
                         limit_bytes=res.best.bytes + 10)
    assert set(paths) == set(REPORT_FILES)
    for key, name in REPORT_FILES.items():
        assert paths[key] == tmp_path / name and paths[key].is_file()
    for key in ("best_kld", "bits_by_depth", "pareto"):
        data = paths[key].read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
        import matplotlib.image

        img = matplotlib.image.imread(paths[key])
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
    md = paths["report"].read_text()
    assert md.startswith("# optuna search: synthetic")
    assert f"{res.best.bytes + 10:,} bytes" in md
    assert "| ffn_down |" in md and "Q4_K" in md
    assert "| held-out KLD | 0.02500 |" in md and "| calibration KLD | 0.02000 |" in md
    assert "| greedy | 0.03000 |" in md and "+20.0%" in md  # greedy's KLD vs optuna's
    # uniform is smaller than the best allocation: not beaten at equal or smaller size
    assert "optuna has a held-out KLD at most that of greedy at equal or smaller size." in md
    for name in ("best_kld.png", "bits_by_depth.png", "pareto.png"):
        assert f"]({name})" in md
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left
    assert paths["report"].stat().st_mode & 0o044  # readable by others, as written files are


def test_write_report_minimal(tmp_path, result):
    sp, res = result
    res.history = []
    paths = write_report(name="optuna", allocation=res.best, search=res, out_dir=tmp_path / "new",
                         specs=sp, limit_bytes=res.best.bytes)
    assert all(p.is_file() for p in paths.values())
    assert "Comparison" not in paths["report"].read_text()
    with pytest.raises(ValueError, match="specs"):
        write_report(name="optuna", allocation=res.best, out_dir=tmp_path, specs=[],
                     limit_bytes=res.best.bytes)


def test_write_report_for_a_solver(tmp_path, result):
    """A solver's report has no search record: no evaluations plot, no selection, its own
    title, and its reward-slice KLD when it was measured."""
    sp, res = result
    held = metrics(res.best, 0.025)
    paths = write_report(name="greedy", allocation=res.best, reward=metrics(res.best, 0.021),
                         out_dir=tmp_path, specs=sp, limit_bytes=res.best.bytes + 10, heldout=held)
    assert set(paths) == {"report", "bits_by_depth", "pareto"}
    assert not (tmp_path / REPORT_FILES["best_kld"]).exists()
    md = paths["report"].read_text()
    assert md.startswith("# greedy solver: synthetic")
    assert "evaluations:" not in md and "## Selection" not in md
    assert "| calibration KLD | 0.02100 |" in md and "| greedy (this solver) | 0.02500 |" in md


def test_report_selection_intervals(tmp_path, result):
    """The selection section shows every re-measured allocation's paired interval of KLD
    against the warm start, the chosen one marked, and why it was chosen."""
    from autobits.agents.selection import select

    sp, res = result
    warm = allocation(sp, {"ffn_down": "Q5_K", "attn_q": "Q4_0", "token_embd": "Q4_0"})
    noisy = allocation(sp, {"ffn_down": "Q4_K", "attn_q": "Q4_0", "token_embd": "Q4_0"})
    res.candidates = [(res.best, res.best_metrics), (noisy, metrics(noisy, 0.021))]
    base = (0.01, 0.03, 0.02, 0.015)
    windows = {warm.key: base, res.best.key: tuple(w * 0.97 for w in base),
               noisy.key: tuple(w * (1 + e) for w, e in zip(base, (0.05, -0.05, 0.04, -0.05)))}

    def measure(a):
        w = windows[a.key]
        return Metrics(kld=sum(w) / len(w), ppl=10.0, top1=0.9, bytes=a.bytes, bpw=a.bpw,
                       seconds=0.1, tokens=1024, windows=len(w), ref_ppl=9.0, window_kld=w)

    out = select(res, measure=measure, warm_start=warm, top_k=2)
    assert out.best is res.best
    md = write_report(name="optuna", allocation=out.best, search=out, out_dir=tmp_path,
                      specs=sp, limit_bytes=res.best.bytes + 10)["report"].read_text()
    section = md[md.index("## Selection"):md.index("## Plots")]
    assert "Chosen: **optuna #1**: optuna #1 has a lower selection KLD" in section
    assert "| KLD vs warm start | 95% interval (t) | windows |" in section
    rows = {line.split(" | ")[0]: line for line in section.splitlines() if line.startswith("| ")}

    def interval(row):
        cells = row.split(" | ")
        lo, hi = cells[4].split(" .. ")
        return cells[3], float(lo.rstrip("%")), float(hi.rstrip("%")), cells[5]

    rel, lo, hi, n = interval(rows["| **optuna #1** (chosen)"])
    assert rel == "-3.00%" and lo < -3 < hi < 0 and n == "4"
    rel, lo, hi, n = interval(rows["| optuna #2"])
    assert lo < 0 < hi  # noisy: straddles zero
    assert "(warm start) | (warm start) | 4 |" in rows["| warm start"]
