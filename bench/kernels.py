#!/usr/bin/env python3
"""Speed of the packed-weight Triton kernels on a GPU, next to torch's float16 matmul.

For each bit-width (2, 3, 4, 5, 6, 8 at one group size) and each weight shape
``out x in`` (4096x4096, 4096x11008, 11008x4096, and SmolLM2-135M's 576x576, 1536x576,
576x1536):

* GEMV (one token): time, achieved GB/s (packed codes + scales + zeros + activations +
  output, each read or written once) and that as a fraction of the device's peak memory
  bandwidth; torch's fp16 ``x @ W.T`` on the same shape for comparison;
* GEMM (``--tokens`` rows, default 512): TFLOP/s (``2*M*N*K``) next to torch fp16;
* where ``bitsandbytes`` is installed, its 4-bit (NF4) GEMV on the 4-bit rows.

Peak bandwidth is computed from the device's memory clock and bus width (double data
rate), or given with ``--peak-gbs``.  Times are medians from ``triton.testing.do_bench``
after autotuning.  The goal: GEMV at 4 bits reaches at least 80% of peak bandwidth on an
H100-class GPU.

Without a CUDA GPU (or with ``TRITON_INTERPRET=1``) the script refuses to run: exit 2.

    .venv/bin/python -m bench.kernels                          # table on stdout
    .venv/bin/python -m bench.kernels --group 64 --bits 4,8 --json out.json
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

log = logging.getLogger("bench.kernels")

#: (out_features, in_features) of the benchmarked weights.
SHAPES: tuple[tuple[int, int], ...] = (
    (4096, 4096), (4096, 11008), (11008, 4096), (576, 576), (1536, 576), (576, 1536),
)
BITS = (2, 3, 4, 5, 6, 8)


def _refuse(msg: str) -> int:
    print(f"bench.kernels: {msg}", file=sys.stderr)
    return 2


def peak_bandwidth_gbs(device: int = 0) -> float | None:
    """Peak DRAM bandwidth in GB/s from the memory clock (kHz) and bus width, if torch reports them."""
    import torch

    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if not clock_khz or not bus_bits:
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9


def _bnb_gemv(x, w):
    """Time bitsandbytes' NF4 GEMV on ``w`` (fp16) in ms, or None if it is not installed/fails."""
    try:
        import bitsandbytes.functional as bnbf
        from bitsandbytes import matmul_4bit
    except ImportError:
        return None
    from triton.testing import do_bench

    try:
        qw, state = bnbf.quantize_4bit(w, quant_type="nf4")
        return do_bench(lambda: matmul_4bit(x, qw.t(), quant_state=state))
    except Exception as e:  # noqa: BLE001 - an optional comparison must not stop the bench
        log.warning("bitsandbytes NF4 comparison failed: %s", e)
        return None


def bench_one(bits: int, group: int, shape: tuple[int, int], tokens: int, peak: float | None):
    """One row of the table: GEMV and GEMM timings of one (bits, shape)."""
    import torch
    from triton.testing import do_bench

    from autobits.packed_layout import pack_weight
    from autobits.kernels.triton_kernels import quant_matmul

    n, k = shape
    w = torch.randn(n, k) * 0.02
    pw = pack_weight(w, f"INT{bits}_G{group}")
    codes, scales, zeros = (t.cuda() for t in (pw.codes, pw.scales, pw.zeros))
    w16 = w.to("cuda", torch.float16)
    x1 = torch.randn(1, k, device="cuda", dtype=torch.float16)
    xm = torch.randn(tokens, k, device="cuda", dtype=torch.float16)

    def run(x):
        return quant_matmul(x, codes, scales, zeros, bits=bits, group=group)

    run(x1)
    run(xm)  # autotune outside the timed region
    t_gemv = do_bench(lambda: run(x1))  # ms
    t_gemm = do_bench(lambda: run(xm))
    t_f16_gemv = do_bench(lambda: x1 @ w16.T)
    t_f16_gemm = do_bench(lambda: xm @ w16.T)
    moved = pw.nbytes + x1.numel() * 2 + n * 2
    gbs = moved / (t_gemv * 1e-3) / 1e9
    f16_gbs = (w16.numel() * 2 + x1.numel() * 2 + n * 2) / (t_f16_gemv * 1e-3) / 1e9
    flops = 2 * tokens * n * k
    bnb = _bnb_gemv(x1, w16) if bits == 4 else None
    return {
        "bits": bits, "group": group, "shape": f"{n}x{k}",
        "gemv_us": t_gemv * 1e3, "gemv_gbs": gbs, "gemv_peak": gbs / peak if peak else None,
        "f16_gemv_us": t_f16_gemv * 1e3, "f16_gemv_gbs": f16_gbs,
        "gemm_tflops": flops / (t_gemm * 1e-3) / 1e12,
        "f16_gemm_tflops": flops / (t_f16_gemm * 1e-3) / 1e12,
        "bnb_nf4_gemv_us": None if bnb is None else bnb * 1e3,
    }


HEADER = ["bits", "shape", "GEMV us", "GEMV GB/s", "% peak", "fp16 GEMV us", "fp16 GB/s",
          "GEMM TFLOP/s", "fp16 TFLOP/s", "bnb NF4 us"]


def _cells(r: dict) -> list[str]:
    """One row of the printed table (:data:`HEADER`)."""
    return [
        str(r["bits"]), r["shape"], f"{r['gemv_us']:.1f}", f"{r['gemv_gbs']:.0f}",
        "-" if r["gemv_peak"] is None else f"{100 * r['gemv_peak']:.0f}%",
        f"{r['f16_gemv_us']:.1f}", f"{r['f16_gemv_gbs']:.0f}", f"{r['gemm_tflops']:.1f}",
        f"{r['f16_gemm_tflops']:.1f}",
        "-" if r["bnb_nf4_gemv_us"] is None else f"{r['bnb_nf4_gemv_us']:.1f}",
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", default=",".join(map(str, BITS)), help="comma-separated bit widths")
    p.add_argument("--group", type=int, default=128, choices=(32, 64, 128))
    p.add_argument("--tokens", type=int, default=512, help="rows of the GEMM (prefill) case")
    p.add_argument("--peak-gbs", type=float, help="peak memory bandwidth (default: from the device)")
    p.add_argument("--json", help="write the rows as JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if os.environ.get("TRITON_INTERPRET") == "1":
        return _refuse("needs a CUDA GPU; TRITON_INTERPRET=1 is set and interpreter timings "
                       "mean nothing (unset it on a GPU machine)")
    try:
        import torch
    except ImportError:
        return _refuse("needs torch")
    if not torch.cuda.is_available():
        return _refuse("needs a CUDA GPU and none is visible (torch.cuda.is_available() is "
                       "False); the kernels' correctness is tested on CPU by tests/test_kernels.py")
    try:
        import triton  # noqa: F401
    except ImportError:
        return _refuse("needs triton: pip install -e '.[triton]'")
    try:
        bits = [int(b) for b in args.bits.split(",")]
    except ValueError:
        return _refuse(f"--bits must be comma-separated integers, got {args.bits!r}")
    if any(b not in BITS for b in bits):
        return _refuse(f"--bits must be among {BITS}, got {bits}")
    peak = args.peak_gbs or peak_bandwidth_gbs()
    name = torch.cuda.get_device_name(0)
    log.info("%s, peak bandwidth %s GB/s", name, f"{peak:.0f}" if peak else "unknown")
    torch.manual_seed(0)
    rows = []
    for b in bits:
        for shape in SHAPES:
            rows.append(bench_one(b, args.group, shape, args.tokens, peak))
            log.info("INT%d_G%d %s done", b, args.group, rows[-1]["shape"])
    print(f"{name}; group {args.group}; GEMM with {args.tokens} tokens; peak "
          f"{f'{peak:.0f} GB/s' if peak else 'unknown (pass --peak-gbs)'}")
    from autobits.app.options import format_table
    from autobits.io import write_json_atomic

    print(format_table([_cells(r) for r in rows], HEADER, right=True))
    if args.json:
        write_json_atomic(args.json, {"device": name, "peak_gbs": peak, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
