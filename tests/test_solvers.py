"""Solvers on synthetic candidate tables (no model): budgets, optimality, llama.cpp rules."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from autobits.candidates import Candidate, CandidateTable
from autobits.errors import AllocationError, BudgetError
from autobits.formats import get_format
from autobits.solvers import (
    SOLVERS,
    best_llamacpp,
    best_uniform,
    greedy,
    ilp,
    llama_fallback,
    llamacpp,
    lower_hull,
    solve,
    uniform,
    use_more_bits,
)
from autobits.specs import DEFAULT_CANDIDATES, TensorSpec

# ----------------------------------------------------------------------------- fixtures


def llama_specs(*, n_layers=30, d=576, ffn=1536, n_head=9, n_kv=3, vocab=49152, tied=True):
    """TensorSpecs of a llama-architecture model (SmolLM2-135M by default)."""
    hd = d // n_head
    q = lambda name, shape, role, blk: TensorSpec(name, shape, role, blk, quantizable=True)  # noqa: E731
    out = [q("token_embd.weight", (vocab, d), "token_embd", None)]
    if not tied:
        out.append(q("output.weight", (vocab, d), "output", None))
    out.append(TensorSpec("output_norm.weight", (d,), "norm", None))
    for i in range(n_layers):
        p = f"blk.{i}."
        out += [
            TensorSpec(p + "attn_norm.weight", (d,), "norm", i),
            q(p + "attn_q.weight", (n_head * hd, d), "attn_q", i),
            q(p + "attn_k.weight", (n_kv * hd, d), "attn_k", i),
            q(p + "attn_v.weight", (n_kv * hd, d), "attn_v", i),
            q(p + "attn_output.weight", (d, n_head * hd), "attn_output", i),
            TensorSpec(p + "ffn_norm.weight", (d,), "norm", i),
            q(p + "ffn_gate.weight", (ffn, d), "ffn_gate", i),
            q(p + "ffn_up.weight", (ffn, d), "ffn_up", i),
            q(p + "ffn_down.weight", (d, ffn), "ffn_down", i),
        ]
    return out


def synthetic_table(specs, *, seed=0, candidates=DEFAULT_CANDIDATES, jitter=0.3):
    """Errors ~ sensitivity * numel * 2^(-2 bpw) * noise: convex-ish, with random kinks."""
    rng = np.random.default_rng(seed)
    opts = {}
    for s in specs:
        if not s.quantizable:
            continue
        w = rng.lognormal(0.0, 1.5) * s.numel
        cands = []
        for f in s.valid_formats(tuple(candidates)):
            bpw = get_format(f).bits_per_weight
            e = 0.0 if f in ("F16", "BF16") else w * 2.0 ** (-2 * bpw) * rng.uniform(1 - jitter, 1 + jitter)
            cands.append(Candidate(f, s.nbytes(f), float(e)))
        opts[s.name] = tuple(sorted(cands, key=lambda c: -c.bytes))
    return CandidateTable("synthetic", tuple(specs), opts)


@pytest.fixture(scope="module")
def smol_table():
    return synthetic_table(llama_specs(), seed=1)


@pytest.fixture(scope="module")
def wide_table():
    # every row a multiple of 256: all 12 default formats fit every tensor
    return synthetic_table(llama_specs(n_layers=12, d=768, ffn=2048, n_head=12, n_kv=4, vocab=32768), seed=2)


def budgets(table, n=3):
    lo, hi = table.min_bytes(), table.max_bytes()
    return [lo, hi] + [int(lo + f * (hi - lo)) for f in np.linspace(0.03, 0.6, n)]


# ----------------------------------------------------------------------------- budgets


@pytest.mark.parametrize("method", ["uniform", "llamacpp", "greedy", "ilp"])
def test_every_solver_fits_the_budget(method, smol_table, wide_table):
    for table in (smol_table, wide_table):
        for limit in budgets(table):
            try:
                a = solve(method, table, limit_bytes=limit)
            except BudgetError as e:  # presets/uniform formats are coarse: none may fit
                assert method in ("uniform", "llamacpp") and "smallest" in str(e)
                continue
            assert a.bytes <= limit
            assert a.bytes == table.choice_bytes(a.tensors)
            assert a.meta["method"] == method and a.meta["limit_bytes"] == limit
            assert a.meta["predicted_error"] == pytest.approx(table.choice_error(a.tensors))
            assert set(a.tensors) == set(table.tensors)


def test_ordering_ilp_greedy_uniform_at_equal_budget(smol_table, wide_table):
    for table in (smol_table, wide_table):
        for fmt in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"):
            u = uniform(table, fmt)
            limit = table.choice_bytes(u)
            e_u = table.choice_error(u)
            e_g = table.choice_error(greedy(table, limit))
            e_i = table.choice_error(ilp(table, limit))
            assert e_i <= e_g * (1 + 1e-9) + 1e-9, fmt
            assert e_g <= e_u * (1 + 1e-9), fmt


def test_greedy_within_small_gap_of_ilp(smol_table, wide_table):
    for table in (smol_table, wide_table):
        for limit in budgets(table)[2:]:
            e_g = table.choice_error(greedy(table, limit))
            e_i = table.choice_error(ilp(table, limit))
            assert e_i <= e_g * (1 + 1e-9) + 1e-9
            assert e_g <= e_i * 1.01 + 1e-9, (limit, e_g, e_i)


def _tiny_table(seed):
    rng = np.random.default_rng(seed)
    specs, opts = [], {}
    rows = [(32, 256), (64, 256), (16, 512), (48, 256), (8, 768)]
    for i, shape in enumerate(rows):
        s = TensorSpec(f"blk.0.t{i}.weight", shape, "other", 0, quantizable=True)
        specs.append(s)
        fmts = rng.choice(list(DEFAULT_CANDIDATES), size=rng.integers(2, 6), replace=False)
        cands = {get_format(f).name: Candidate(get_format(f).name, s.nbytes(f), float(rng.uniform(0, 10)))
                 for f in fmts}
        opts[s.name] = tuple(sorted(cands.values(), key=lambda c: -c.bytes))
    specs.append(TensorSpec("blk.0.norm.weight", (256,), "norm", 0))
    return CandidateTable("tiny", tuple(specs), opts)


@pytest.mark.parametrize("seed", range(6))
def test_ilp_equals_brute_force_on_tiny_instance(seed):
    table = _tiny_table(seed)
    names = table.tensors
    combos = []
    for pick in itertools.product(*(table.options[n] for n in names)):
        combos.append((table.fixed_bytes + sum(c.bytes for c in pick), sum(c.error for c in pick)))
    lo, hi = table.min_bytes(), table.max_bytes()
    for limit in np.linspace(lo, hi, 9).astype(int):
        best = min(e for b, e in combos if b <= limit)
        choice = ilp(table, int(limit))
        assert table.choice_bytes(choice) <= limit
        assert table.choice_error(choice) == pytest.approx(best, rel=1e-9, abs=1e-9)
        assert table.choice_error(greedy(table, int(limit))) >= best - 1e-9


def test_budget_errors_state_the_feasible_range(smol_table):
    lo, hi = smol_table.min_bytes(), smol_table.max_bytes()
    for method in SOLVERS:
        for limit in (lo - 1, hi + 1):
            with pytest.raises(BudgetError, match=rf"feasible range is {lo}\.\.{hi} bytes \(\d+\.\d+\.\.\d+\.\d+ bpw\)"):
                solve(method, smol_table, limit_bytes=limit)
    with pytest.raises(BudgetError, match="feasible range"):
        greedy(smol_table, lo - 1)
    with pytest.raises(BudgetError, match="feasible range"):
        ilp(smol_table, hi + 1)
    with pytest.raises(BudgetError, match="no uniform format fits .* the smallest, Q2_K, needs"):
        best_uniform(smol_table, lo - 1, formats=("Q2_K", "Q4_K"))
    with pytest.raises(BudgetError, match="no llama.cpp preset fits"):
        best_llamacpp(smol_table, lo)
    with pytest.raises(BudgetError, match="uniform Q8_0 needs .* over the budget"):
        solve("uniform", smol_table, limit_bytes=lo, fmt="Q8_0")
    with pytest.raises(ValueError, match="unknown solver 'annealing'"):
        solve("annealing", smol_table, limit_bytes=lo)
    with pytest.raises(ValueError, match=r"solver 'greedy' has no option\(s\) \['time_limit'\]"):
        solve("greedy", smol_table, limit_bytes=lo, time_limit=3)


def test_solve_meta_and_options(smol_table):
    limit = smol_table.choice_bytes(uniform(smol_table, "Q6_K")) + 12345
    a = solve("ilp", smol_table, limit_bytes=limit, time_limit=20)
    assert a.meta["solver"]["status"] == "optimal" and a.meta["solver"]["source"] in ("milp", "greedy")
    assert a.meta["limit_bpw"] == pytest.approx(limit * 8 / smol_table.params, abs=1e-6)
    u = solve("uniform", smol_table, limit_bytes=limit)
    assert u.meta["format"] in DEFAULT_CANDIDATES
    assert solve("uniform", smol_table, limit_bytes=limit, fmt="Q4_K").meta["format"] == "Q4_K"
    p = solve("llamacpp", smol_table, limit_bytes=smol_table.max_bytes())
    assert p.meta["preset"] == "F16"
    q = solve("llamacpp", smol_table, limit_bytes=smol_table.max_bytes(), preset="q4_k_m")
    assert q.meta["preset"] == "Q4_K_M" and q.tensors == llamacpp(smol_table.specs, "Q4_K_M")
    assert a.meta["solver"]["variables"] <= sum(len(o) for o in smol_table.options.values())


def test_ilp_time_limit_still_returns_a_feasible_choice(wide_table):
    from autobits.solvers import ilp_solve

    limit = wide_table.choice_bytes(uniform(wide_table, "Q4_K")) + 1000
    choice, info = ilp_solve(wide_table, limit, time_limit=1e-3)
    assert wide_table.choice_bytes(choice) <= limit
    assert info["status"] in ("limit reached", "optimal") and info["source"] in ("milp", "greedy")
    with pytest.raises(ValueError, match="time_limit must be positive"):
        ilp(wide_table, limit, time_limit=0)


def test_lower_hull_skips_dominated_and_concave_points():
    b = np.array([100, 80, 60, 50, 40, 20])
    e = np.array([0.0, 5.0, 3.0, 6.0, 8.0, 20.0])  # 80 dominated by 60; 50 above hull 60-40
    hull = lower_hull(b, e)
    assert hull == [0, 2, 4, 5]
    slopes = [(e[j] - e[i]) / (b[i] - b[j]) for i, j in zip(hull, hull[1:])]
    assert slopes == sorted(slopes)


def test_greedy_extremes_and_scale():
    table = synthetic_table(llama_specs(n_layers=300, d=256, ffn=512, n_head=4, n_kv=2, vocab=4096), seed=3)
    assert len(table.tensors) > 2000
    mx = greedy(table, table.max_bytes())
    assert table.choice_error(mx) == pytest.approx(sum(min(c.error for c in o) for o in table.options.values()))
    assert table.choice_bytes(greedy(table, table.min_bytes())) == table.min_bytes()
    t0 = time.perf_counter()
    choice = greedy(table, (table.min_bytes() + table.max_bytes()) // 3)
    assert time.perf_counter() - t0 < 3.0
    assert table.choice_bytes(choice) <= (table.min_bytes() + table.max_bytes()) // 3


# ----------------------------------------------------------------------------- uniform


def test_uniform_follows_llamacpp_fallbacks(smol_table):
    u = uniform(smol_table, "Q4_K")
    assert u["blk.0.ffn_down.weight"] == "Q4_K"  # row 1536 = 6 * 256
    assert u["blk.0.attn_q.weight"] == "Q5_0" and u["token_embd.weight"] == "Q5_0"
    assert uniform(smol_table, "Q3_K")["blk.0.attn_v.weight"] == "Q4_0"
    assert uniform(smol_table, "Q6_K")["blk.3.ffn_up.weight"] == "Q8_0"
    assert llama_fallback("Q5_K", 576) == "Q5_1" and llama_fallback("Q2_K", 576) == "Q4_0"
    assert llama_fallback("Q4_K", 48) == "F16" and llama_fallback("Q4_0", 48) == "F16"
    limit = smol_table.choice_bytes(uniform(smol_table, "Q5_0"))
    assert best_uniform(smol_table, limit) == uniform(smol_table, "Q5_0")
    restricted = synthetic_table(llama_specs(n_layers=2), candidates=("F16", "Q8_0", "Q4_K", "Q4_0"))
    with pytest.raises(AllocationError, match="needs Q5_0, which is not among its candidates"):
        uniform(restricted, "Q4_K")


# ----------------------------------------------------------------------------- llama.cpp rules


def _expected(preset, *, n_layers=30, n_gqa=3, tied=True):
    """Expected role -> type per layer for a 576/1536 llama, from llama.cpp's rules by hand.

    Rows: attn_* / ffn_gate / ffn_up / token_embd / output 576 (no K-quant: Q2_K, Q3_K ->
    Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0), ffn_down 1536 (K-quants fit).
    """
    k_fallback = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
    base = {"Q2_K": "Q2_K", "Q3_K_M": "Q3_K", "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K",
            "Q6_K": "Q6_K", "Q8_0": "Q8_0", "Q4_0": "Q4_0"}[preset]
    row576 = lambda t: k_fallback.get(t, t)  # noqa: E731
    more = lambda i, n: i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2  # noqa: E731
    exp = {}
    for i in range(n_layers):
        v = down = out = base
        if preset in ("Q4_K_M", "Q5_K_M") and more(i, n_layers):
            v = down = "Q6_K"
        if preset == "Q4_K_S":
            v = "Q5_K" if i < 4 else base
            down = "Q5_K" if i < n_layers // 8 else base
        if preset == "Q3_K_M":
            v = "Q5_K" if i < 2 else "Q4_K"
            down = "Q5_K" if i < n_layers // 16 else "Q4_K"
            out = "Q4_K"
        if preset == "Q2_K":
            v = "Q4_K" if n_gqa >= 4 else "Q3_K"
            down = out = "Q3_K"
        p = f"blk.{i}."
        for r in ("attn_q", "attn_k", "ffn_gate", "ffn_up"):
            exp[p + r + ".weight"] = row576(base)
        exp[p + "attn_v.weight"] = row576(v)
        exp[p + "attn_output.weight"] = row576(out)
        exp[p + "ffn_down.weight"] = down
    # output rules: 576 % block(default) != 0 -> Q8_0, else Q6_K (-> Q8_0 on a 576 row)
    head = "Q8_0"
    if tied:
        exp["token_embd.weight"] = head
    else:
        exp["output.weight"] = head
        exp["token_embd.weight"] = row576(base)
    return exp


def test_llamacpp_q4_k_m_on_smollm2_shapes():
    specs = llama_specs()
    got = llamacpp(specs, "Q4_K_M", n_layers=30)
    more = [i for i in range(30) if i < 3 or i >= 26 or (i - 3) % 3 == 2]
    assert more == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    for i in range(30):
        assert got[f"blk.{i}.ffn_down.weight"] == ("Q6_K" if i in more else "Q4_K")
        assert got[f"blk.{i}.attn_v.weight"] == ("Q8_0" if i in more else "Q5_0")  # 576 rows
        assert got[f"blk.{i}.attn_q.weight"] == "Q5_0"
    assert got["token_embd.weight"] == "Q8_0"  # tied: output rules
    assert got == _expected("Q4_K_M")


@pytest.mark.parametrize("preset", ["Q2_K", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "Q4_0"])
@pytest.mark.parametrize("tied", [True, False])
def test_llamacpp_rules_match_hand_expectations(preset, tied):
    specs = llama_specs(tied=tied)
    assert llamacpp(specs, preset) == _expected(preset, tied=tied)


def test_llamacpp_gqa_and_output_rules():
    specs = llama_specs(n_head=12, n_kv=3, d=768, ffn=2048, tied=False, n_layers=8)  # n_gqa 4, rows fit K
    got = llamacpp(specs, "Q2_K")
    assert {got[f"blk.{i}.attn_v.weight"] for i in range(8)} == {"Q4_K"}
    assert got["output.weight"] == "Q6_K" and got["token_embd.weight"] == "Q2_K"
    assert llamacpp(specs, "Q2_K", n_gqa=1)["blk.0.attn_v.weight"] == "Q3_K"
    assert llamacpp(specs, "Q8_0")["output.weight"] == "Q8_0"
    assert llamacpp(specs, "Q4_0")["output.weight"] == "Q6_K"  # 768 % 32 == 0 -> Q6_K, fits 768
    assert set(llamacpp(specs, "F16").values()) == {"F16"}
    assert llamacpp(specs, "Q3_K_L")["blk.7.attn_output.weight"] == "Q5_K"
    assert use_more_bits(0, 8) and not use_more_bits(1, 8) and use_more_bits(7, 8)
    with pytest.raises(ValueError, match="unknown llama.cpp preset 'Q7_K'"):
        llamacpp(specs, "Q7_K")


def test_best_llamacpp_picks_largest_fitting(smol_table):
    sizes = {p: smol_table.choice_bytes(llamacpp(smol_table.specs, p)) for p in ("Q4_K_M", "Q5_K_S", "Q4_K_S")}
    choice = best_llamacpp(smol_table, sizes["Q4_K_M"])
    assert smol_table.choice_bytes(choice) <= sizes["Q4_K_M"]
    assert smol_table.choice_bytes(choice) >= max(v for v in sizes.values() if v <= sizes["Q4_K_M"])


# ----------------------------------------------------------------------------- judge


@pytest.mark.judge
@pytest.mark.needs("llama_cpp")
def test_llamacpp_port_matches_llama_quantize(tmp_path):
    """Our rules against the installed llama.cpp's llama_model_quantize on tiny random GGUFs."""
    import gguf
    import llama_cpp.llama_cpp as lc
    presets = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M",
               "Q6_K", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
    configs = [dict(n_layers=30, d=96, n_head=3, n_kv=1, ffn=256, tied=True),
               dict(n_layers=17, d=128, n_head=4, n_kv=1, ffn=512, tied=False)]
    rng = np.random.default_rng(0)
    for ci, c in enumerate(configs):
        specs = llama_specs(vocab=64, **c)
        src = tmp_path / f"m{ci}.gguf"
        w = gguf.GGUFWriter(str(src), "llama")
        w.add_block_count(c["n_layers"])
        w.add_context_length(64)
        w.add_embedding_length(c["d"])
        w.add_feed_forward_length(c["ffn"])
        w.add_head_count(c["n_head"])
        w.add_head_count_kv(c["n_kv"])
        w.add_layer_norm_rms_eps(1e-5)
        w.add_rope_dimension_count(c["d"] // c["n_head"])
        w.add_file_type(0)
        for s in specs:
            w.add_tensor(s.name, rng.standard_normal(s.shape).astype(np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        for p in presets:
            params = lc.llama_model_quantize_default_params()
            params.ftype = getattr(lc, f"LLAMA_FTYPE_MOSTLY_{p}")
            params.nthread = 1
            dst = tmp_path / f"q{ci}_{p}.gguf"
            assert lc.llama_model_quantize(str(src).encode(), str(dst).encode(), params) == 0
            got = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(dst)).tensors}
            mine = llamacpp(specs, p)
            assert mine == {k: got[k] for k in mine}, (ci, p)
