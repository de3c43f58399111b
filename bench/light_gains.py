"""Refit the light path's gain table (:data:`autobits.light.ROLE_GAINS`) from a full calibration.

    python -m bench.light_gains --model smollm2-135m-float [--calibration CALIB.npz]

Runs the full path's calibration (8 stdlib windows x 512 tokens, output Fisher on 4; or
loads ``--calibration``), computes for every quantizable tensor its Fisher-weighted output
energy ``G_t = 1/2 sum_j F_j sum_i D_i W_ji^2`` (``D`` = E[x^2] of its input; a tied
embedding: the frequency-weighted lookup part plus the head part) and the crest factor
``kappa_t`` of ``D`` (:func:`autobits.light.crest_factor`), and prints what
:mod:`autobits.light` tabulates: per role the median of ``log G_t - log kappa_t`` and of
``log G_t`` relative to their medians over the linear tensors (as gains), the
embedding's lookup and head parts, ``WEIGHTED_SCALE``, and how much of the variance of
``log G_t`` the role alone and the role with ``log kappa_t`` explain.
"""

from __future__ import annotations

import argparse

import numpy as np


def _energies(lm, calib) -> list[dict]:
    """Per quantizable tensor: role, G (lookup and head parts for token_embd), kappa."""
    import torch

    from autobits.light import crest_factor

    out = []
    for s in lm.quantizable:
        w2 = lm.reference_weight(s.name).double().square()
        d = calib.importance(s.name)
        row = {"name": s.name, "role": s.role, "kappa": None if d is None else crest_factor(d)}
        if s.role == "token_embd":
            g = torch.from_numpy(np.array(calib.gain(s.name))).double() * calib.embed_scale**2
            row["lookup"] = 0.5 * float((w2 * g).sum(1) @ torch.from_numpy(calib.token_frequency()))
            row["head"] = 0.0 if d is None else 0.5 * float(
                torch.from_numpy(np.array(calib.head_gain)).double() @ (w2 @ torch.from_numpy(d).double()))
            row["G"] = row["lookup"] + row["head"]
        else:
            g = torch.from_numpy(np.array(calib.gain(s.name))).double()
            row["G"] = 0.5 * float(g @ (w2 @ torch.from_numpy(d).double()))
        out.append(row)
    return out


def _r2(y: np.ndarray, x: np.ndarray) -> float:
    coef = np.linalg.lstsq(x, y, rcond=None)[0]
    return 1.0 - float(((y - x @ coef) ** 2).sum() / ((y - y.mean()) ** 2).sum())


def main(argv=None) -> int:
    from autobits.calibrate import Calibration, calibrate
    from autobits.model import load_model
    from autobits.text import load_text, make_windows

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-float")
    p.add_argument("--calibration", help="a saved calibration (with Fisher) of the model")
    p.add_argument("--save", help="save the calibration here (.npz)")
    args = p.parse_args(argv)
    lm = load_model(args.model)
    if args.calibration:
        calib = Calibration.load(args.calibration, lm=lm)
    else:
        split = make_windows(load_text("stdlib"), lm.tokenizer, ctx=512).split(calib=8, eval=0)
        calib = calibrate(lm, split.calib, fisher_windows=4, progress=False)
    if args.save:
        calib.save(args.save)
    if not calib.has_fisher:
        raise SystemExit("the calibration has no Fisher pass")
    rows = _energies(lm, calib)
    lin = [r for r in rows if r["role"] not in ("token_embd", "output")]
    lg = np.log([r["G"] for r in lin])
    adj = lg - np.log([r["kappa"] for r in lin])
    med_lg, med_adj = float(np.median(lg)), float(np.median(adj))
    roles = list(dict.fromkeys(r["role"] for r in lin))
    print(f"{'role':12s} {'with vector':>12s} {'without':>10s}  (tensors)")
    for role in roles:
        m = np.array([r["role"] == role for r in lin])
        print(f"{role:12s} {np.exp(np.median(adj[m]) - med_adj):12.3g} "
              f"{np.exp(np.median(lg[m]) - med_lg):10.3g}  ({int(m.sum())})")
    for r in rows:
        if r["role"] == "token_embd":
            print(f"token_embd lookup: without {np.exp(np.log(r['lookup']) - med_lg):.3g}")
            if r["head"] > 0:
                print(f"head part (output): with vector "
                      f"{np.exp(np.log(r['head']) - np.log(r['kappa']) - med_adj):.3g}, "
                      f"without {np.exp(np.log(r['head']) - med_lg):.3g}")
    print(f"WEIGHTED_SCALE {np.exp(med_lg - med_adj):.3g}")
    onehot = np.array([[r["role"] == role for role in roles] for r in lin], dtype=float)
    kappa = np.log([r["kappa"] for r in lin])[:, None]
    print(f"variance of log G explained: role {_r2(lg, onehot):.2f}, role + log kappa "
          f"{_r2(lg, np.hstack([onehot, kappa])):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
