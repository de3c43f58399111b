"""A cost model on paper: memory per node and time per stage for 8B and 70B models.

    python -m bench.cost_model                                   # print the tables
    python -m bench.cost_model --measure smollm2-135m-float gemma3-270m-float qwen2.5-coder-1.5b
    python -m bench.cost_model --whole smollm2-135m-float        # whole prepare() as a check

``--measure`` times small pieces of the pipeline on this machine, one child process per
model (medians of ``--repeats``; torch threads 1, as calibration workers, candidate threads
and Ray evaluator actors run) and merges them into ``bench/cost_measurements.json`` with
the machine (cores, ``os.getloadavg()`` before and after each model), the date and the
commit:

* load: seconds and resident memory after :func:`autobits.model.load_model`;
* forward: one 512-token window through the transformer body (no head), 1 and 2 threads;
* Fisher window: forward, head, log-softmax, the sampling ops and the backward pass, as
  :func:`autobits.calibrate.calibrate` runs its first windows (weights frozen); for the
  small models also ``calibrate`` itself on one window with and without Fisher (hooks and
  the ``H`` accumulation included) as a check of the sum of the parts;
* ``H`` accumulation: ``_SiteAcc.add`` of 512 rows for every input width of the model;
* candidates: quantize + dequantize seconds per million weights for every default
  candidate format, with an importance vector (the main job runs ``--imatrix``), on a row
  sample of one middle block's tensors; the Cholesky factor of ``H`` and the proxy product
  (:func:`autobits.proxy.proxy_error` with the factor) on that block's full tensors;
* evaluation: one reward evaluation (2 x 256 tokens, float numerics), one held-out window
  (512 tokens, llama.cpp numerics) and its reference pass, with
  :class:`autobits.evaluate.Evaluator` on a uniform Q8_0 allocation with no dequantized
  cache, and the dequantization of every tensor on its own;
* the child's peak resident memory (the evaluation holds the reference weights and one
  dequantized float32 copy at once: Qwen2.5-1.5B's child peaked at 18 GB).

``--whole MODEL`` runs :func:`autobits.pipeline.prepare` (the main job's settings:
imatrix, 8 windows of 512 tokens, 4 Fisher windows, the default formats, all cores) and
records its stage times and peak memory: the check of the model on a measured model.

Without ``--measure`` it reads the JSON and prints, for Llama-3.1-8B and -70B shapes and
for the measured models, memory per node and time per stage on N nodes of
:data:`CORES_PER_NODE` cores.  The scaling rules:

* a calibration window costs its parts times the measured ``calibrate()`` overhead;
* forward cost is proportional to FLOPs: ``2 x linear params x tokens`` plus the attention
  term ``4 x layers x heads x head_dim x tokens^2 x`` :data:`ATTENTION_CAUSAL_FRACTION`;
  the head's ``2 x vocab x hidden`` per scored token; a Fisher window is the forward with
  the head over every token times the measured backward factor;
* ``H`` accumulation is proportional to ``tokens x`` the multiply-adds of the upper
  triangle of ``d_in^2`` (:func:`autobits.calibrate.accumulator_bytes` counts them);
* quantization is proportional to the elements of each format (measured rates per format);
  the proxy to ``rows x d_in^2 x (k+1)/2k`` (the triangular product of
  :mod:`autobits.proxy`, ``k`` = :data:`autobits.proxy.FACTOR_BLOCKS`) per candidate, and
  the Cholesky factor to ``d_in^3 / 3`` once per input site;
* an evaluation is the dequantization of every tensor (elements) plus a forward pass
  (FLOPs, with its own measured rate: it includes KLD and the llama.cpp rounding);
* memory of calibration is proportional to ``sum d_in^2`` (float64 upper triangles while
  accumulating, float32 full matrices kept); the rest is
  :func:`autobits.memory.estimate_peak_bytes`'s model, called on the shapes;
* parallel stages divide over ``N x 8`` cores, one item per core (a window in calibration
  and held-out evaluation, the tensors reading one input site in candidates, as
  :mod:`autobits.stages` runs them, an evaluation in the search: makespan
  of the longest-first schedule, so a stage never goes faster than its largest item); as
  many Fisher windows per node at once as :func:`autobits.memory.fisher_concurrency`
  allows (:func:`fisher_per_node`: one for every model modelled here); the
  300-evaluation search runs in rounds of one evaluation per core (evaluator workers).

Per-core rates are fitted from the measurements, not typed in: the forward and evaluation
rates (seconds per FLOP) from the largest measured model, the kernels (``H``, proxy,
Cholesky) by least squares through the origin over every measured point, the quantizers
per format over every measured element.  The tables name each rate's source and print
the smaller models' predicted-vs-measured unit times under those rates, and the whole-stage
check.  What the model leaves out is in the printed caveats.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import heapq
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

log = logging.getLogger("bench.cost_model")

#: Where ``--measure`` writes and the default mode reads.
MEASUREMENTS = Path(__file__).with_name("cost_measurements.json")
#: Version of the measurements file layout.
MEASUREMENTS_VERSION = 1
#: Cores of one node of the extrapolation.
CORES_PER_NODE = 8
#: Node counts of the tables.
NODE_COUNTS = (1, 4, 16)
#: Memory of a node for the "fits" verdict (decimal bytes, the machine the measures ran on).
NODE_MEMORY_BYTES = 24 * 10**9
#: Tokens of a calibration / held-out window (``PrepareConfig.ctx``).
CTX = 512
#: Calibration windows and the first of them that also run backward for the Fisher.
CALIB_WINDOWS = 8
FISHER_WINDOWS = 4
#: The reward slice: windows x tokens (float numerics); tokens scored from ``ctx // 2`` on.
REWARD_WINDOWS = 2
REWARD_CTX = 256
#: Held-out windows per allocation (llama.cpp numerics), allocations reported.
HELDOUT_WINDOWS = 8
REPORT_ALLOCATIONS = 5
#: Evaluations of a learned search (``--evals``).
SEARCH_EVALS = 300
#: Share of the ``tokens^2`` attention products a causal mask leaves.
ATTENTION_CAUSAL_FRACTION = 0.5
#: Format of the uniform allocation the evaluation timings use.
EVAL_FORMAT = "Q8_0"
#: Elements (rows x d_in) of the row sample each tensor contributes to the quantizer timings.
SAMPLE_ELEMENTS = 1 << 20
#: Rank of the low-rank part of the synthetic positive definite ``H`` the proxy is timed on
#: (the Cholesky and product costs do not depend on its values).
SYNTHETIC_H_RANK = 64
#: Accumulator bytes up to which ``calibrate()`` itself is timed on one window (the
#: per-site float64 sums of every site at once; Qwen2.5-1.5B's would take about 19 GB).
CALIBRATE_CHECK_BYTES = 4 * 10**9
#: Repeats of each timed piece (median) unless ``--repeats``.
REPEATS = 3
#: Seed of the random token ids and weights of the timings.
SEED = 0
#: Quoted figures of SmolLM2's main job (README, 2-core VM under load 3 to 4): calibration
#: about 1 min, candidates about 5 min, peak 3.6 GB resident.
README_SMOLLM2 = {"model": "smollm2-135m-float", "cores": 2, "calibrate_s": 60.0,
                  "candidates_s": 300.0, "peak_rss_bytes": 3.6e9}
#: Roles with one tensor per block, in GGUF order, and the input site each reads.
BLOCK_ROLES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
GB = 1e9


# ============================================================================ shapes
@dataclass(frozen=True)
class ModelShape:
    """The shapes a llama-style decoder is made of (GGUF names follow from them).

    ``layers`` blocks of attention (``heads`` query heads, ``kv_heads`` key/value heads of
    ``head_dim``) and a gated MLP of width ``ffn`` over ``hidden``; ``vocab`` tokens; an
    untied model has its own ``output.weight``.
    """

    name: str
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    def __post_init__(self) -> None:
        for k in ("layers", "hidden", "ffn", "heads", "kv_heads", "head_dim", "vocab"):
            if int(getattr(self, k)) <= 0:
                raise ValueError(f"{self.name}: {k} must be > 0, got {getattr(self, k)}")

    def block_shapes(self) -> dict[str, tuple[int, int]]:
        """Role -> (rows, d_in) of one block's linear tensors."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"attn_q": (q, self.hidden), "attn_k": (kv, self.hidden),
                "attn_v": (kv, self.hidden), "attn_output": (self.hidden, q),
                "ffn_gate": (self.ffn, self.hidden), "ffn_up": (self.ffn, self.hidden),
                "ffn_down": (self.hidden, self.ffn)}

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """GGUF name -> shape (numpy order) of every tensor, norms included."""
        out: dict[str, tuple[int, ...]] = {"token_embd.weight": (self.vocab, self.hidden)}
        for b in range(self.layers):
            out[f"blk.{b}.attn_norm.weight"] = (self.hidden,)
            for role, shape in self.block_shapes().items():
                out[f"blk.{b}.{role}.weight"] = shape
            out[f"blk.{b}.ffn_norm.weight"] = (self.hidden,)
        out["output_norm.weight"] = (self.hidden,)
        if not self.tied:
            out["output.weight"] = (self.vocab, self.hidden)
        return out

    @property
    def block_params(self) -> int:
        return sum(r * d for r, d in self.block_shapes().values())

    @property
    def params(self) -> int:
        return sum(math.prod(s) for s in self.tensor_shapes().values())

    def site_widths(self) -> list[int]:
        """d_in of every calibration input site: per block attn_in, attn_output_in, ffn_in,
        ffn_down_in, and the head's input."""
        bs = self.block_shapes()
        per_block = [bs["attn_q"][1], bs["attn_output"][1], bs["ffn_gate"][1], bs["ffn_down"][1]]
        return per_block * self.layers + [self.hidden]

    def body_flops(self, tokens: int) -> float:
        """FLOPs of the transformer body (no head) over one window of ``tokens``.

        :param tokens: tokens of the window
        """
        attention = (4 * self.layers * self.heads * self.head_dim * tokens**2
                     * ATTENTION_CAUSAL_FRACTION)
        return 2.0 * self.layers * self.block_params * tokens + attention

    def head_flops(self, tokens: int) -> float:
        """FLOPs of the output head over ``tokens`` positions.

        :param tokens: positions whose logits are computed
        """
        return 2.0 * self.vocab * self.hidden * tokens


#: Llama-3.1-8B and -70B (untied head, 128k vocabulary).
LLAMA_8B = ModelShape("llama-3.1-8b", layers=32, hidden=4096, ffn=14336, heads=32, kv_heads=8,
                      head_dim=128, vocab=128256, tied=False)
LLAMA_70B = ModelShape("llama-3.1-70b", layers=80, hidden=8192, ffn=28672, heads=64,
                       kv_heads=8, head_dim=128, vocab=128256, tied=False)
TARGETS = (LLAMA_8B, LLAMA_70B)


def scored_tokens(ctx: int) -> int:
    """Positions an :class:`~autobits.evaluate.Evaluator` scores in a window of ``ctx``
    (from ``ctx // 2`` to the second last).

    :param ctx: tokens of the window
    """
    return max(1, ctx - ctx // 2 - 1)


def h_macs_per_token(d: int) -> int:
    """Multiply-adds per token of one site's ``x^T x`` upper-triangle strips (what the
    float64 accumulator holds, less its four per-channel vectors).

    :param d: the site's input width
    """
    from autobits.calibrate import accumulator_bytes

    return accumulator_bytes(d) // 8 - 4 * d


def proxy_macs(rows: int, d: int) -> float:
    """Multiply-adds of one candidate's proxy with the Cholesky factor (triangular product).

    :param rows: output rows of the tensor
    :param d: its input width
    """
    from autobits.proxy import FACTOR_BLOCKS

    return rows * d * d * (FACTOR_BLOCKS + 1) / (2 * FACTOR_BLOCKS)


def cholesky_flops(d: int) -> float:
    """FLOPs of the Cholesky factor of a ``d x d`` matrix.

    :param d: the matrix's order
    """
    return d**3 / 3.0


# ============================================================================ rates
@dataclass(frozen=True)
class Rates:
    """Per-core costs fitted from the measurements (seconds per unit, one thread), each
    with the measurement it comes from (``sources``)."""

    forward_s_per_flop: float
    fisher_factor: float
    eval_s_per_flop: float
    heldout_s_per_flop: float
    h_s_per_mac: float
    proxy_s_per_mac: float
    cholesky_s_per_flop: float
    quantize_s_per_elem: Mapping[str, float]
    dequantize_s_per_elem: float
    sources: Mapping[str, str]
    #: ``calibrate()`` on one plain and one Fisher window over the sum of its parts (forward,
    #: Fisher, ``H``) measured on the same model (hooks, per-site statistics, set-up); 1 where
    #: no model had ``calibrate()`` timed
    calibrate_overhead: float = 1.0


def _shape_of(entry: Mapping) -> ModelShape:
    return ModelShape(**entry["shape"])


def _ls_origin(points: Iterable[tuple[float, float]]) -> float:
    """Slope of ``y = a x`` by least squares (``sum xy / sum x^2``)."""
    pts = list(points)
    den = sum(x * x for x, _ in pts)
    if not pts or den <= 0:
        raise ValueError("no measured points to fit a rate")
    return sum(x * y for x, y in pts) / den


def forward_rate(entry: Mapping) -> float:
    """Seconds per FLOP of one measured model's body forward (1 thread).

    :param entry: the model's measurements
    """
    return entry["forward"]["threads1_s"] / _shape_of(entry).body_flops(entry["forward"]["tokens"])


def eval_parts(entry: Mapping, rate_deq: float | None = None) -> dict[str, float]:
    """A measured evaluation split into dequantization and forward seconds.

    :param entry: the model's measurements
    :param rate_deq: seconds per dequantized element (default: the model's measured pass)
    """
    ev = entry["evaluate"]
    sh = _shape_of(entry)
    deq = ev["dequantize_all_s"] if rate_deq is None else rate_deq * ev["quantizable_elems"]
    reward_flops = REWARD_WINDOWS * (sh.body_flops(REWARD_CTX) + sh.head_flops(scored_tokens(REWARD_CTX)))
    window_flops = sh.body_flops(CTX) + sh.head_flops(scored_tokens(CTX))
    return {"deq": deq, "reward_fwd": max(ev["reward_s"] - deq, 0.0),
            "heldout_fwd": max(ev["heldout_window_s"] - deq, 0.0),
            "reward_flops": reward_flops, "window_flops": window_flops}


def calibrate_overhead(entry: Mapping) -> float:
    """``calibrate()`` on one plain plus one Fisher window over the sum of the same model's
    measured parts (body forward + ``H`` of every site, Fisher window + ``H``).

    :param entry: the model's measurements (with ``calibrate_window``)
    """
    h = sum(entry["h_accumulate"][str(d)] for d in _shape_of(entry).site_widths())
    parts = entry["forward"]["threads1_s"] + entry["fisher"]["seconds"] + 2 * h
    cw = entry["calibrate_window"]
    return (cw["plain_s"] + cw["fisher_s"]) / parts


def fit_rates(models: Mapping[str, Mapping]) -> Rates:
    """Per-core rates from measured models (see the module docstring for which from which).

    :param models: model name -> its measurements (the ``models`` of the JSON)
    """
    if not models:
        raise ValueError("no measured models")
    largest = max(models, key=lambda m: _shape_of(models[m]).params)
    big = models[largest]
    sh = _shape_of(big)
    fwd = forward_rate(big)
    fisher_flops = sh.body_flops(CTX) + sh.head_flops(CTX)
    fisher_factor = big["fisher"]["seconds"] / (fwd * fisher_flops)
    h_pts = [(CTX * h_macs_per_token(int(d)), s) for e in models.values()
             for d, s in e["h_accumulate"].items()]
    p_pts = [(proxy_macs(p["rows"], p["d"]), p["proxy_s"]) for e in models.values() for p in e["proxy"]]
    c_pts = [(cholesky_flops(p["d"]), p["factor_s"]) for e in models.values() for p in e["proxy"]]
    q_s: dict[str, float] = {}
    q_n: dict[str, float] = {}
    d_s = d_n = 0.0
    for e in models.values():
        for fmt, q in e["quantize"].items():
            q_s[fmt] = q_s.get(fmt, 0.0) + q["quantize_s"] + q["dequantize_s"]
            q_n[fmt] = q_n.get(fmt, 0.0) + q["elements"]
            d_s += q["dequantize_s"]
            d_n += q["elements"]
    deq = d_s / d_n
    parts = eval_parts(big)
    overhead = [calibrate_overhead(e) for e in models.values() if "calibrate_window" in e]
    return Rates(
        calibrate_overhead=statistics.median(overhead) if overhead else 1.0,
        forward_s_per_flop=fwd, fisher_factor=fisher_factor,
        eval_s_per_flop=parts["reward_fwd"] / parts["reward_flops"],
        heldout_s_per_flop=parts["heldout_fwd"] / parts["window_flops"],
        h_s_per_mac=_ls_origin(h_pts), proxy_s_per_mac=_ls_origin(p_pts),
        cholesky_s_per_flop=_ls_origin(c_pts),
        quantize_s_per_elem={f: q_s[f] / q_n[f] for f in q_s}, dequantize_s_per_elem=deq,
        sources={
            "forward": f"{largest}: body forward, {CTX} tokens, 1 thread",
            "fisher": f"{largest}: forward + head + backward / forward",
            "evaluation": f"{largest}: reward evaluation less its dequantization",
            "held-out": f"{largest}: held-out window (llama numerics) less its dequantization",
            "H accumulation": f"{len(h_pts)} site widths of {len(models)} models (LS)",
            "proxy, Cholesky": f"{len(p_pts)} tensor shapes of {len(models)} models (LS)",
            "quantize": f"{len(q_s)} formats x row samples of one block of {len(models)} models",
            "calibrate overhead": f"median of {len(overhead)} models' calibrate() windows over "
                                  f"their parts",
        },
    )  # fmt: skip


# ============================================================================ schedule
def makespan(durations: Sequence[float], workers: int, *, gate: int | None = None,
             gated: Sequence[bool] | None = None) -> float:
    """Wall time of ``durations`` on ``workers`` identical cores, longest first, each item
    on the first free core; at most ``gate`` of the ``gated`` items run at once.

    :param durations: seconds of each item on one core
    :param workers: cores
    :param gate: the most gated items running at once (None: no limit)
    :param gated: which items the gate applies to (default none)
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    flags = list(gated) if gated is not None else [False] * len(durations)
    order = sorted(range(len(durations)), key=lambda i: (not flags[i], -durations[i]))
    free = [0.0] * workers
    heapq.heapify(free)
    gate_free = [0.0] * (gate if gate else 0)
    heapq.heapify(gate_free)
    end = 0.0
    for i in order:
        start = heapq.heappop(free)
        if flags[i] and gate:
            start = max(start, heapq.heappop(gate_free))
        stop = start + durations[i]
        heapq.heappush(free, stop)
        if flags[i] and gate:
            heapq.heappush(gate_free, stop)
        end = max(end, stop)
    return end


# ============================================================================ predict
@dataclass(frozen=True)
class StageTimes:
    """Seconds of each stage on ``cores`` cores (see :func:`predict_times`)."""

    cores: int
    calibration: float
    candidates: float
    evaluation: float
    search: float
    heldout: float

    @property
    def total(self) -> float:
        return self.calibration + self.candidates + self.search + self.heldout


def window_costs(shape: ModelShape, rates: Rates) -> dict[str, float]:
    """Core-seconds of one calibration window (plain and Fisher, ``H`` included), one
    reward evaluation, one held-out window and the dequantization of every tensor.

    :param shape: the model
    :param rates: fitted per-core rates
    """
    h = sum(CTX * h_macs_per_token(d) for d in shape.site_widths()) * rates.h_s_per_mac
    plain = shape.body_flops(CTX) * rates.forward_s_per_flop + h
    fisher = (shape.body_flops(CTX) + shape.head_flops(CTX)) * rates.forward_s_per_flop \
        * rates.fisher_factor + h
    quantizable = sum(math.prod(s) for s in shape.tensor_shapes().values() if len(s) == 2)
    deq = quantizable * rates.dequantize_s_per_elem
    reward = REWARD_WINDOWS * (shape.body_flops(REWARD_CTX) + shape.head_flops(scored_tokens(REWARD_CTX)))
    window = shape.body_flops(CTX) + shape.head_flops(scored_tokens(CTX))
    plain *= rates.calibrate_overhead
    fisher *= rates.calibrate_overhead
    return {"plain": plain, "fisher": fisher, "h": h, "deq": deq,
            "evaluation": deq + reward * rates.eval_s_per_flop,
            "heldout_window": window * rates.heldout_s_per_flop,
            "reference_window": window * rates.forward_s_per_flop}


def tensor_costs(shape: ModelShape, rates: Rates, formats: Sequence[str]) -> dict[str, float]:
    """Core-seconds of every quantizable tensor's candidates: quantize + dequantize each
    valid format, and its proxy (the Cholesky factors are :func:`candidate_items`').

    :param shape: the model
    :param rates: fitted per-core rates
    :param formats: candidate formats (those without a measured rate are skipped, logged)
    """
    from autobits.formats import get_format

    missing = [f for f in formats if f not in rates.quantize_s_per_elem]
    if missing:
        log.warning("no measured rate for formats %s: left out of the candidate times", missing)
    fmts = [get_format(f) for f in formats if f in rates.quantize_s_per_elem]
    out = {}
    for name, s in shape.tensor_shapes().items():
        if len(s) != 2:
            continue
        rows, d = s
        valid = [f for f in fmts if f.fits(d)]
        quant = sum(rates.quantize_s_per_elem[f.name] for f in valid) * rows * d
        if name == "token_embd.weight":  # one-hot input: diagonal H (the head term if tied)
            proxy = len(valid) * (rows * d * rates.dequantize_s_per_elem)
            if shape.tied:
                proxy += len(valid) * proxy_macs(rows, d) * rates.proxy_s_per_mac
        else:
            proxy = len(valid) * proxy_macs(rows, d) * rates.proxy_s_per_mac
        out[name] = quant + proxy
    return out


def candidate_items(shape: ModelShape, rates: Rates, formats: Sequence[str]) -> list[float]:
    """Core-seconds of each item of the candidate stage: the tensors that read one input
    site (:func:`autobits.calibrate.site_of`; ``token_embd`` alone), plus that site's
    Cholesky factor (a tied model's head site: the embedding's).

    :param shape: the model
    :param rates: fitted per-core rates
    :param formats: candidate formats
    """
    from autobits.calibrate import site_of
    from autobits.specs import TensorSpec, block_of, role_of

    shapes = shape.tensor_shapes()
    items: dict[str, float] = {}
    for name, cost in tensor_costs(shape, rates, formats).items():
        spec = TensorSpec(name=name, shape=shapes[name], role=role_of(name),
                          block=block_of(name), quantizable=True)
        site = site_of(spec) or name
        if site not in items:
            d = shape.hidden if site == name and shape.tied else shapes[name][1]
            has_h = site != name or shape.tied
            items[site] = cholesky_flops(d) * rates.cholesky_s_per_flop if has_h else 0.0
        items[site] += cost
    return list(items.values())


def predict_times(shape: ModelShape, rates: Rates, *, cores: int, fisher_parallel: int,
                  calib_workers: int | None = None,
                  formats: Sequence[str] | None = None) -> StageTimes:
    """Stage times of ``shape`` on ``cores`` cores.

    :param shape: the model
    :param rates: fitted per-core rates
    :param cores: cores working on the parallel stages
    :param fisher_parallel: Fisher windows that may run at once (one per node)
    :param calib_workers: calibration windows at once (default ``cores``)
    :param formats: candidate formats (default :data:`autobits.specs.DEFAULT_CANDIDATES`)
    """
    from autobits.specs import DEFAULT_CANDIDATES

    w = window_costs(shape, rates)
    n_fisher = min(FISHER_WINDOWS, CALIB_WINDOWS)
    calib_items = [w["fisher"]] * n_fisher + [w["plain"]] * (CALIB_WINDOWS - n_fisher)
    calibration = makespan(calib_items, calib_workers or cores, gate=fisher_parallel,
                           gated=[True] * n_fisher + [False] * (CALIB_WINDOWS - n_fisher))
    candidates = makespan(candidate_items(shape, rates, formats or DEFAULT_CANDIDATES), cores)
    search = math.ceil(SEARCH_EVALS / cores) * w["evaluation"]
    heldout_items = ([w["heldout_window"]] * (HELDOUT_WINDOWS * REPORT_ALLOCATIONS)
                     + [w["reference_window"]] * HELDOUT_WINDOWS)
    heldout = makespan(heldout_items, cores) + w["deq"]
    return StageTimes(cores=cores, calibration=calibration, candidates=candidates,
                      evaluation=w["evaluation"], search=search, heldout=heldout)


@dataclass(frozen=True)
class NodeMemory:
    """Bytes per node: ``weights`` float32 (every node that runs forward passes holds the
    model), ``streamed`` (one block, or the embedding or head, whichever is largest, in
    float32), ``accumulators`` (one calibration worker's float64 sums, input sites sharded
    over the nodes), ``statistics`` (the float32 ``H`` kept for the candidates, sharded),
    ``candidates`` (the quantized bytes of every candidate, sharded while building them),
    ``search`` (what a node of 8 evaluator workers holds: reference weights, every
    candidate, one float32 model swapped in per worker, the reference distributions)."""

    nodes: int
    weights: int
    streamed: int
    accumulators: int
    statistics: int
    candidates: int
    search: int


def _shard(items: Sequence[int], nodes: int) -> int:
    """Bytes per node of ``items`` spread over ``nodes`` (never below the largest item)."""
    return max(math.ceil(sum(items) / nodes), max(items, default=0))


def predict_memory(shape: ModelShape, nodes: int, *, formats: Sequence[str] | None = None,
                   cores: int = CORES_PER_NODE) -> NodeMemory:
    """Memory per node of each stage on ``nodes`` nodes (see :class:`NodeMemory`).

    :param shape: the model
    :param nodes: nodes sharing the work
    :param formats: candidate formats (default :data:`autobits.specs.DEFAULT_CANDIDATES`)
    :param cores: evaluator workers per node in the search
    """
    from autobits.calibrate import accumulator_bytes
    from autobits.formats import get_format
    from autobits.specs import DEFAULT_CANDIDATES

    est = single_process_estimate(shape, cores=cores, formats=tuple(formats) if formats else None)
    fmts = [get_format(f) for f in (formats or DEFAULT_CANDIDATES)]
    shapes = shape.tensor_shapes()
    cand = [sum(f.nbytes(s) for f in fmts if f.block_size > 1 and f.fits(s[-1]))
            for s in shapes.values() if len(s) == 2]
    largest = max(4 * shape.block_params, 4 * shape.vocab * shape.hidden)
    widths = shape.site_widths()
    search = est.model + est.candidates + est.references + cores * est.model
    return NodeMemory(nodes=nodes, weights=est.model, streamed=largest,
                      accumulators=_shard([accumulator_bytes(d) for d in widths], nodes),
                      statistics=_shard([4 * d * d for d in widths], nodes),
                      candidates=_shard(cand, nodes), search=search)


@functools.lru_cache(maxsize=64)
def single_process_estimate(shape: ModelShape, *, cores: int = CORES_PER_NODE,
                            formats: tuple[str, ...] | None = None):
    """:func:`autobits.memory.estimate_peak_bytes` of the current design (everything in one
    process on ``cores`` cores, calibration workers as :func:`~autobits.calibrate.calibrate`
    chooses them, the default dequantized-weight cache).

    :param shape: the model
    :param cores: the process's cores
    :param formats: candidate formats, a tuple (default
        :data:`autobits.specs.DEFAULT_CANDIDATES`)
    """
    from autobits.calibrate import PARALLEL_BYTES, accumulator_bytes
    from autobits.evaluate import DEFAULT_CACHE_BYTES
    from autobits.memory import estimate_peak_bytes
    from autobits.specs import DEFAULT_CANDIDATES

    return estimate_peak_bytes(
        shapes=shape.tensor_shapes(), formats=formats or DEFAULT_CANDIDATES,
        cache_bytes=DEFAULT_CACHE_BYTES, ctx=CTX, eval_windows=HELDOUT_WINDOWS,
        calib_workers=calibration_workers(shape, cores, PARALLEL_BYTES, accumulator_bytes),
        eval_threads=cores)


def fisher_per_node(shape: ModelShape, cores: int) -> int:
    """Fisher windows one node of ``cores`` runs at once, as calibration decides
    (:func:`autobits.memory.fisher_concurrency` of its window's bytes)."""
    from autobits.memory import fisher_concurrency, fisher_window_bytes

    return fisher_concurrency(fisher_window_bytes(vocab=shape.vocab, hidden=shape.hidden,
                                                  n_blocks=shape.layers, ctx=CTX), cores)


def calibration_workers(shape: ModelShape, cores: int, parallel_bytes: int,
                        acc_bytes: Callable[[int], int]) -> int:
    """Calibration threads of :func:`autobits.calibrate.calibrate`: the cores, at most the
    windows, fewer when their accumulators would exceed ``parallel_bytes``.

    :param shape: the model
    :param cores: cores of the process
    :param parallel_bytes: the accumulator memory that bounds the threads
    :param acc_bytes: bytes of one site's accumulators given its width
    """
    one = sum(acc_bytes(d) for d in shape.site_widths())
    return max(1, min(cores, CALIB_WINDOWS, max(1, parallel_bytes // one)))


def dominant_part(estimate) -> str:
    """The largest part of a :class:`~autobits.memory.MemoryEstimate` that its peak counts.

    :param estimate: the estimate
    """
    parts = estimate.parts()
    stage = ("accumulators", "activations") if estimate.calibration_stage >= estimate.search_stage \
        else ("candidates", "references", "cache")
    counted = {k: v for k, v in parts.items() if k in ("runtime", "model", "statistics") + stage}
    return max(counted, key=counted.get)


# ============================================================================ printing
def fmt_seconds(s: float) -> str:
    """``12 s``, ``3.4 min``, ``5.6 h``, ``2.1 d``.

    :param s: seconds
    """
    if s < 100:
        return f"{s:.1f} s" if s < 10 else f"{s:.0f} s"
    if s < 100 * 60:
        return f"{s / 60:.1f} min"
    if s < 48 * 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def fmt_gb(n: float) -> str:
    """Decimal gigabytes, two significant figures below 10.

    :param n: bytes
    """
    g = n / GB
    return f"{g:.2f}" if g < 1 else f"{g:.1f}" if g < 100 else f"{g:.0f}"


def _table(rows, header) -> str:
    from autobits.app.options import format_table

    return format_table(rows, header, right=True)


def time_rows(shapes: Sequence[ModelShape], rates: Rates,
              nodes: Sequence[int] = NODE_COUNTS) -> list[list[str]]:
    """One row per (model, node count): the stage times.

    :param shapes: models
    :param rates: fitted per-core rates
    :param nodes: node counts
    """
    rows = []
    for sh in shapes:
        for n in nodes:
            t = predict_times(sh, rates, cores=n * CORES_PER_NODE,
                              fisher_parallel=n * fisher_per_node(sh, CORES_PER_NODE))
            rows.append([sh.name, n, n * CORES_PER_NODE, fmt_seconds(t.calibration),
                         fmt_seconds(t.candidates), fmt_seconds(t.evaluation),
                         fmt_seconds(t.search), fmt_seconds(t.heldout), fmt_seconds(t.total)])
    return rows


TIME_HEADER = ["model", "N", "cores", "calibration", "candidates", "one eval",
               f"{SEARCH_EVALS}-eval search", f"held-out x{REPORT_ALLOCATIONS}", "total"]
MEMORY_HEADER = ["model", "params", "f32 weights", "streamed", "acc by site N=1/4/16",
                 "H stats N=1/4/16", "cand. cache N=1/4/16", "search node",
                 "one process", f"fits {NODE_MEMORY_BYTES / GB:.0f} GB", "dominated by"]


def memory_rows(shapes: Sequence[ModelShape], nodes: Sequence[int] = NODE_COUNTS) -> list[list[str]]:
    """One row per model: memory per node (GB) of each stage, and the one-process verdict.

    :param shapes: models
    :param nodes: node counts
    """
    rows = []
    for sh in shapes:
        mem = [predict_memory(sh, n) for n in nodes]
        est = single_process_estimate(sh)
        per = lambda k: "/".join(fmt_gb(getattr(m, k)) for m in mem)  # noqa: E731
        rows.append([sh.name, f"{sh.params / 1e9:.2f}B", fmt_gb(mem[0].weights),
                     fmt_gb(mem[0].streamed), per("accumulators"), per("statistics"),
                     per("candidates"), fmt_gb(mem[0].search), fmt_gb(est.total),
                     "yes" if est.total <= NODE_MEMORY_BYTES else "no", dominant_part(est)])
    return rows


def unit_check_rows(models: Mapping[str, Mapping], rates: Rates) -> list[list[str]]:
    """Each measured model's unit times predicted from the fitted rates vs measured.

    :param models: model name -> its measurements
    :param rates: fitted per-core rates
    """
    rows = []
    for name, e in models.items():
        sh = _shape_of(e)
        w = window_costs(sh, rates)
        parts = eval_parts(e)
        fwd_pred = sh.body_flops(CTX) * rates.forward_s_per_flop
        fisher_pred = w["fisher"] / rates.calibrate_overhead - w["h"]
        checks = [("forward 512", fwd_pred, e["forward"]["threads1_s"]),
                  ("Fisher window", fisher_pred, e["fisher"]["seconds"]),
                  ("reward eval", w["evaluation"], e["evaluate"]["reward_s"]),
                  ("held-out window", w["heldout_window"] + parts["deq"],
                   e["evaluate"]["heldout_window_s"])]
        if "calibrate_window" in e:
            checks += [("calibrate() plain window", w["plain"], e["calibrate_window"]["plain_s"]),
                       ("calibrate() Fisher window", w["fisher"], e["calibrate_window"]["fisher_s"])]
        for what, pred, meas in checks:
            rows.append([name, what, f"{pred:.3f}", f"{meas:.3f}", f"{pred / meas:.2f}"])
    return rows


def whole_check_rows(models: Mapping[str, Mapping], rates: Rates) -> list[list[str]]:
    """Whole stages predicted on the cores they ran on vs measured (``--whole`` runs and
    the README's quoted SmolLM2 figures).

    :param models: model name -> its measurements
    :param rates: fitted per-core rates
    """
    rows = []
    runs = [(n, e["whole"], "measured") for n, e in models.items() if "whole" in e]
    if README_SMOLLM2["model"] in models:
        runs.append((README_SMOLLM2["model"], README_SMOLLM2, "README"))
    for name, run, src in runs:
        sh = _shape_of(models[name])
        cores = int(run["cores"])
        from autobits.calibrate import PARALLEL_BYTES, accumulator_bytes

        # the recorded runs were measured with one Fisher window at a time
        t = predict_times(sh, rates, cores=cores, fisher_parallel=1,
                          calib_workers=calibration_workers(sh, cores, PARALLEL_BYTES,
                                                            accumulator_bytes))
        est = single_process_estimate(sh, cores=cores)
        for what, pred, meas, fmt in (
                ("calibration", t.calibration, run["calibrate_s"], fmt_seconds),
                ("candidates", t.candidates, run["candidates_s"], fmt_seconds),
                ("peak memory", est.total, run["peak_rss_bytes"], lambda b: fmt_gb(b) + " GB")):
            rows.append([name, src, cores, what, fmt(pred), fmt(meas), f"{pred / meas:.2f}"])
    return rows


CAVEATS = (
    "Rates are per core of the 2-core VM the measures ran on, shared with other jobs (load in "
    "the JSON); an 8-core node with AVX-512 and its own memory bandwidth may differ 2x either way.",
    "Calibration has 8 windows: more cores than windows do not help; one Fisher window per node "
    "at a time for these models (fisher_concurrency: a window's buffers exceed "
    "FISHER_PARALLEL_BYTES), so N nodes run N of the 4 at once; a window never splits.",
    "Calibration windows and candidate sites spread over N nodes as autobits.stages' runners "
    "spread them; sharding the H sums by input site ('acc by site') is not implemented.",
    "The search: one evaluation per core per round, no prefix reuse (set_incumbent), no agent "
    "or Ray overhead, no selection re-measures; every evaluation dequantizes every tensor.",
    "Memory: 'acc by site' is the float64 H sums sharded by input site over N nodes; today's "
    "calibrate() (and each of its shards) holds the N=1 value per worker. 'search node' assumes "
    "8 evaluators each swapping in a float32 model; 'one process' is estimate_peak_bytes of "
    "today's single-process design on 8 cores.",
)


def report(data: Mapping) -> str:
    """The printed tables from the measurements file's contents.

    :param data: the parsed measurements JSON
    """
    models = data["models"]
    rates = fit_rates(models)
    measured = sorted((_shape_of(e) for e in models.values()), key=lambda s: s.params)
    shapes = list(TARGETS) + measured
    out = [f"Time per stage on N nodes of {CORES_PER_NODE} cores (calibration {CALIB_WINDOWS} x "
           f"{CTX} tokens, {FISHER_WINDOWS} Fisher; candidates: default formats; one eval: "
           f"{REWARD_WINDOWS} x {REWARD_CTX} tokens; held-out: {REPORT_ALLOCATIONS} allocations x "
           f"{HELDOUT_WINDOWS} x {CTX} tokens, llama numerics)", "",
           _table(time_rows(shapes, rates), TIME_HEADER), "",
           f"Memory per node (GB; N = {'/'.join(map(str, NODE_COUNTS))} where it shards)", "",
           _table(memory_rows(shapes), MEMORY_HEADER), "",
           "Per-core rates (1 thread) and where they come from", ""]
    r = rates
    rate_rows = [
        ["forward", f"{1 / r.forward_s_per_flop / 1e9:.2f} GFLOP/s", r.sources["forward"]],
        ["Fisher factor", f"{r.fisher_factor:.2f}x forward+head", r.sources["fisher"]],
        ["calibrate() overhead", f"{r.calibrate_overhead:.2f}x parts",
         r.sources["calibrate overhead"]],
        ["evaluation forward", f"{1 / r.eval_s_per_flop / 1e9:.2f} GFLOP/s", r.sources["evaluation"]],
        ["held-out forward", f"{1 / r.heldout_s_per_flop / 1e9:.2f} GFLOP/s", r.sources["held-out"]],
        ["H accumulation", f"{1 / r.h_s_per_mac / 1e9:.2f} GMAC/s", r.sources["H accumulation"]],
        ["proxy product", f"{1 / r.proxy_s_per_mac / 1e9:.2f} GMAC/s", r.sources["proxy, Cholesky"]],
        ["Cholesky (f64)", f"{1 / r.cholesky_s_per_flop / 1e9:.2f} GFLOP/s", r.sources["proxy, Cholesky"]],
        ["dequantize", f"{1e-6 / r.dequantize_s_per_elem:.0f} M elem/s", r.sources["quantize"]],
    ] + [[f"quantize+deq {f}", f"{1e-6 / s:.1f} M elem/s", r.sources["quantize"]]
         for f, s in r.quantize_s_per_elem.items()]
    out += [_table(rate_rows, ["rate", "value", "from"]), "",
            "Unit times predicted from those rates vs measured (seconds, 1 thread)", "",
            _table(unit_check_rows(models, rates), ["model", "unit", "predicted", "measured",
                                                    "ratio"]), ""]
    whole = whole_check_rows(models, rates)
    if whole:
        out += ["Whole stages predicted vs measured (same cores, one process)", "",
                _table(whole, ["model", "measured by", "cores", "stage", "predicted", "measured",
                               "ratio"]), ""]
    quantized = sorted(n for n, e in models.items() if e.get("source_quantized"))
    caveats = list(CAVEATS)
    if quantized:
        caveats.insert(1, f"{', '.join(quantized)}: quantized sources converted to float32 "
                          f"(same shapes and work: fine for timing, not for quality).")
    out += ["Caveats:"] + [f"- {c}" for c in caveats]
    return "\n".join(out)


# ============================================================================ measuring
def _median_time(fn: Callable[[], object], repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def shape_of_loaded(lm) -> ModelShape:
    """The :class:`ModelShape` of a loaded model (its HF config), checked against its specs.

    :param lm: a :class:`~autobits.model.LoadedModel`
    """
    cfg = lm.model.config
    heads = int(cfg.num_attention_heads)
    sh = ModelShape(
        name=lm.name, layers=int(cfg.num_hidden_layers), hidden=int(cfg.hidden_size),
        ffn=int(cfg.intermediate_size), heads=heads,
        kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads),
        vocab=int(lm.model.get_input_embeddings().weight.shape[0]),
        tied=not any(s.role == "output" for s in lm.quantizable))
    want = {n: s for n, s in sh.tensor_shapes().items() if len(s) == 2}
    have = {s.name: tuple(s.shape) for s in lm.quantizable}
    if want != have:
        diff = sorted(set(want.items()) ^ set(have.items()))[:4]
        raise RuntimeError(f"{lm.name}: shape table differs from the model's tensors: {diff}")
    return sh


def _fisher_window(model, ids) -> None:
    """Forward, head, log-softmax, sampling and backward, as calibrate's Fisher windows."""
    import torch

    emb = model.get_input_embeddings()
    with torch.enable_grad():
        x = emb(ids).detach().requires_grad_(True)
        hidden = model.model(inputs_embeds=x, use_cache=False).last_hidden_state
        logits = model.get_output_embeddings()(hidden).float()
        logp = torch.log_softmax(logits[0], dim=-1)
        del logits
        with torch.no_grad():
            p = logp.exp()
            hg = (p - p.square()).sum(0).double()
            cdf = p.cumsum(-1)
            u = torch.rand(ids.shape[1], 1, generator=torch.Generator().manual_seed(SEED))
            y = torch.searchsorted(cdf, u * cdf[:, -1:]).clamp_max_(p.shape[-1] - 1)
            del p, hg, cdf
        logp.gather(1, y).sum().backward()


def measure_model(name: str, repeats: int = REPEATS) -> dict:
    """Unit costs of one model on this machine (see the module docstring).

    :param name: a model :func:`autobits.model.load_model` accepts
    :param repeats: repeats of each timed piece (median)
    """
    import numpy as np
    import torch

    from autobits.allocation import Allocation
    from autobits.calibrate import _SiteAcc, accumulator_bytes, calibrate
    from autobits.evaluate import Evaluator, WeightCache
    from autobits.formats import get_format
    from autobits.memory import peak_rss_bytes, rss_bytes
    from autobits.model import load_model
    from autobits.proxy import hessian_factor, proxy_error
    from autobits.specs import DEFAULT_CANDIDATES

    out: dict = {"model": name, "repeats": repeats}
    t0 = time.perf_counter()
    lm = load_model(name)
    out["load"] = {"seconds": time.perf_counter() - t0, "rss_bytes": rss_bytes()}
    torch.set_num_threads(1)
    sh = shape_of_loaded(lm)
    out["shape"] = asdict(sh)
    out["params"] = int(lm.n_params)
    out["source_quantized"] = bool(lm.source_quantized)
    log.info("%s loaded in %.1fs, rss %.2f GB", name, out["load"]["seconds"], rss_bytes() / GB)
    gen = torch.Generator().manual_seed(SEED)
    ids = torch.randint(sh.vocab, (1, CTX), generator=gen)
    model = lm.model

    def body():
        with torch.inference_mode():
            model.model(input_ids=ids, use_cache=False)

    body()  # warm-up
    fwd = {"tokens": CTX, "threads1_s": _median_time(body, repeats)}
    torch.set_num_threads(2)
    body()
    fwd["threads2_s"] = _median_time(body, repeats)
    torch.set_num_threads(1)
    out["forward"] = fwd
    out["fisher"] = {"tokens": CTX, "seconds": _median_time(lambda: _fisher_window(model, ids),
                                                            max(1, repeats - 1))}
    log.info("%s forward %.2fs (2 threads %.2fs), Fisher window %.2fs", name, fwd["threads1_s"],
             fwd["threads2_s"], out["fisher"]["seconds"])
    acc_total = sum(accumulator_bytes(d) for d in sh.site_widths())
    if acc_total <= CALIBRATE_CHECK_BYTES:
        w = ids.numpy()
        out["calibrate_window"] = {
            "plain_s": _median_time(lambda: calibrate(lm, w, fisher_windows=0, progress=False,
                                                      workers=1), repeats),
            "fisher_s": _median_time(lambda: calibrate(lm, w, fisher_windows=1, progress=False,
                                                       workers=1), max(1, repeats - 1))}
        log.info("%s calibrate() window: %s", name, out["calibrate_window"])
    else:
        log.info("%s: no calibrate() check, its accumulators would take %.1f GB", name,
                 acc_total / GB)
    out["h_accumulate"] = {}
    for d in sorted(set(sh.site_widths())):
        acc = _SiteAcc(d)
        x = torch.randn(CTX, d, generator=gen)
        acc.add(x)
        out["h_accumulate"][str(d)] = _median_time(lambda: acc.add(x), repeats)
        del acc
    log.info("%s H accumulation (s per %d rows): %s", name, CTX, out["h_accumulate"])

    block = sh.layers // 2
    rng = np.random.default_rng(SEED)
    quant: dict[str, dict[str, float]] = {}
    proxies = []
    seen_shapes = set()
    for role in BLOCK_ROLES:
        tname = f"blk.{block}.{role}.weight"
        w = lm.reference_weight(tname).detach()
        rows_all, d = w.shape
        arr = w[: max(1, min(rows_all, SAMPLE_ELEMENTS // d))].numpy()
        imp = (np.abs(rng.standard_normal(d)) + 0.1).astype(np.float32)
        for fname in DEFAULT_CANDIDATES:
            f = get_format(fname)
            if not f.fits(d):
                continue
            f.quantize(arr, imp, tensor=tname)  # warm-up (first-call setup)
            tq = _median_time(lambda: f.quantize(arr, imp, tensor=tname), repeats)
            data = f.quantize(arr, imp, tensor=tname)
            td = _median_time(lambda: f.dequantize(data, arr.shape), repeats)
            q = quant.setdefault(f.name, {"quantize_s": 0.0, "dequantize_s": 0.0, "elements": 0})
            q["quantize_s"] += tq
            q["dequantize_s"] += td
            q["elements"] += int(arr.size)
        if (rows_all, d) in seen_shapes:
            continue
        seen_shapes.add((rows_all, d))
        u = torch.randn(d, SYNTHETIC_H_RANK, generator=gen, dtype=torch.float64)
        h = (u @ u.T / SYNTHETIC_H_RANK + torch.eye(d, dtype=torch.float64)).float()
        factor_s = _median_time(lambda: hessian_factor(h), max(1, repeats - 1))
        low = hessian_factor(h)
        wq = w + 1e-3 * torch.randn(w.shape, generator=gen)
        gain = torch.rand(rows_all, generator=gen, dtype=torch.float64)
        proxy_s = _median_time(lambda: proxy_error(w, wq, h, gain=gain, factor=low), repeats)
        proxies.append({"tensor": tname, "rows": int(rows_all), "d": int(d), "factor_s": factor_s,
                        "proxy_s": proxy_s})
        del h, low, wq
    out["quantize"] = quant
    out["proxy"] = proxies
    log.info("%s quantize (M elem/s): %s", name,
             {f: round(q["elements"] / (q["quantize_s"] + q["dequantize_s"]) / 1e6, 2)
              for f, q in quant.items()})
    log.info("%s proxy: %s", name, proxies)

    fmt = get_format(EVAL_FORMAT)
    cache = WeightCache(lm, budget_bytes=0)
    for s in lm.quantizable:
        cache.quantize(s.name, fmt.name)
    quantizable_elems = sum(s.numel for s in lm.quantizable)
    deq_s = _median_time(lambda: [fmt.dequantize(cache.quantize(s.name, fmt.name), s.shape)
                                  for s in lm.quantizable], max(1, repeats - 1))
    alloc = Allocation.uniform(lm.name, lm.specs, fmt.name)
    tokens = torch.randint(sh.vocab, (REWARD_WINDOWS + 1, CTX), generator=gen).numpy()
    ev = Evaluator(lm, tokens[:REWARD_WINDOWS, :REWARD_CTX], cache=cache, workers=1)
    ev.evaluate(alloc)
    reward_s = _median_time(lambda: ev.evaluate(alloc), repeats)
    del ev
    t0 = time.perf_counter()
    ev = Evaluator(lm, tokens[REWARD_WINDOWS:], cache=cache, workers=1, llama_numerics=True)
    reference_s = time.perf_counter() - t0
    heldout_s = _median_time(lambda: ev.evaluate(alloc), max(1, repeats - 1))
    del ev
    out["evaluate"] = {"format": fmt.name, "quantizable_elems": int(quantizable_elems),
                       "dequantize_all_s": deq_s, "reward_s": reward_s,
                       "heldout_window_s": heldout_s, "reference_window_s": reference_s}
    log.info("%s evaluation: %s", name, out["evaluate"])
    out["peak_rss_bytes"] = peak_rss_bytes()
    return out


def measure_whole(name: str) -> dict:
    """Stage times and peak memory of :func:`autobits.pipeline.prepare` on ``name`` with
    the main job's settings (imatrix, default windows and formats, all cores).

    :param name: a model :func:`autobits.model.load_model` accepts
    """
    from autobits.memory import peak_rss_bytes
    from autobits.pipeline import PrepareConfig, prepare

    prepared = prepare(PrepareConfig(model=name, imatrix=True), progress=False)
    t = prepared.timings
    return {"cores": os.cpu_count() or 1, "calibrate_s": t["calibrate"],
            "candidates_s": t["candidates"], "timings": dict(t),
            "peak_rss_bytes": peak_rss_bytes()}


def machine_info() -> dict:
    """Cores, CPU model, memory, date and commit of this machine and checkout."""
    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "")
    except OSError:
        pass
    from autobits.memory import available_bytes

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {"cores": os.cpu_count(), "cpu": cpu, "available_bytes": available_bytes(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "commit": commit}


def _run_child(kind: str, model: str, repeats: int) -> dict:
    """One measurement in a fresh process (its own peak memory), with the load around it."""
    with tempfile.TemporaryDirectory(prefix="autobits-cost-") as tmp:
        path = Path(tmp) / "out.json"
        before = os.getloadavg()
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "bench.cost_model", "--child", kind, model,
                        str(path), "--repeats", str(repeats)], check=True)
        result = json.loads(path.read_text())
    result["wall_s"] = time.perf_counter() - t0
    result["date"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    result["loadavg_before"] = list(before)
    result["loadavg_after"] = list(os.getloadavg())
    return result


def merge(path: Path, model: str, key: str | None, result: dict) -> dict:
    """Store ``result`` for ``model`` in the measurements file (``key``: under that key of
    the model's entry; None: as the entry, keeping its ``whole`` run).

    :param path: the measurements file
    :param model: model name
    :param key: sub-key of the entry, or None
    :param result: what was measured
    """
    from autobits.io import write_json_atomic

    data = json.loads(path.read_text()) if path.exists() else {}
    data["version"] = MEASUREMENTS_VERSION
    data["machine"] = machine_info()
    models = data.setdefault("models", {})
    if key is None:
        keep = {k: v for k, v in models.get(model, {}).items() if k == "whole"}
        models[model] = result | keep
    else:
        if model not in models:
            raise SystemExit(f"measure {model} (--measure) before its {key} run")
        models[model][key] = result
    write_json_atomic(path, data)
    return data


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--measure", nargs="+", metavar="MODEL", help="measure these models")
    ap.add_argument("--whole", nargs="+", metavar="MODEL",
                    help="time a whole prepare() of these (measured) models as a check")
    ap.add_argument("--repeats", type=int, default=REPEATS)
    ap.add_argument("--json", type=Path, default=MEASUREMENTS)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("gguf").setLevel(logging.WARNING)
    if args.child:
        kind, model, out = args.child
        res = measure_model(model, args.repeats) if kind == "unit" else measure_whole(model)
        Path(out).write_text(json.dumps(res))
        return 0
    for m in args.measure or []:
        merge(args.json, m, None, _run_child("unit", m, args.repeats))
    for m in args.whole or []:
        merge(args.json, m, "whole", _run_child("whole", m, args.repeats))
    if not args.json.exists():
        raise SystemExit(f"{args.json} does not exist: run with --measure MODEL first")
    print(report(json.loads(args.json.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
