"""The ``optuna`` agent: ask/tell black-box search over the per-tensor format choice.

Each trial proposes an allocation, which is projected onto the byte budget (so every
evaluated allocation is feasible), measured with ``problem.evaluate`` (KLD on the short
calibration slice) and told back to the study.  Trial 0 is the warm start (the greedy
solver's allocation).  The study lives in an Optuna journal file in ``out_dir`` under a
fixed name, so ``resume=True`` continues an interrupted search with the evaluations left;
an existing journal is never replaced unless ``force=True``.

Search spaces (``space=``), all decoding to one candidate per tensor:

``"groups"`` (default)
    One log-multiplier per group of tensors, a group being a role and a depth bucket
    (``blk.0-7.attn_v``; ``token_embd`` and ``output`` are groups of their own).  The proxy
    error of every candidate of a tensor is multiplied by ``exp(bias)`` of its group and the
    equal-slope (Lagrangian) allocation is solved exactly at the budget, then filled up --
    the greedy solver on a re-weighted proxy.  All biases at zero *is* the greedy solution.
    The price per byte (the Lagrange multiplier) is fixed by the budget, so it is not a
    parameter.  About 30 continuous dimensions for a 30-block model; every trial spends the
    budget and is Pareto-optimal for its own weighting, so the search only learns how the
    proxy is miscalibrated against the KLD by role and depth.
``"offsets"``
    One integer per tensor in ``[-max_offset, max_offset]``: steps up (negative) or down
    (positive) along the tensor's convex-hull candidate list from its warm-start format.
``"categorical"``
    One categorical per tensor over its valid formats (the plain formulation).

``offsets`` and ``categorical`` proposals may exceed the budget; they are projected by the
cheapest downgrades (least proxy error added per byte saved) until they fit, then spare bytes
are spent by the greedy fill-up.  Whether the raw proposal exceeded the budget is recorded.

Why ``groups`` is the default: on a synthetic SmolLM2-shaped table whose "true" KLD
re-weights the proxy per role (log-sd 1), by depth (ffn_down) and per tensor (log-sd 0.5),
greedy scores 0.179; with 100 evaluations TPE reached 0.117/0.117 (two seeds) over
``offsets``, 0.118/0.145 over ``groups`` (0.111/0.109 with 150 evaluations and the local
startup below), 0.160/0.137 over ``categorical``, random search 0.142/0.157 over ``groups``.
``offsets`` matches ``groups`` in quality, but nearly all of its proposals exceed the budget
before projection and TPE over 211 dimensions costs about 1 s of sampler time per trial after
60 trials and grows with the history, against ~0.1 s for ~30 group dimensions: too slow for a
300-evaluation search in 15 minutes.  Re-weighted greedy solutions also stay on the proxy's
Pareto front, which keeps a search on a short, noisy slice from chasing noise.  The limit: a
candidate with zero proxy error (a GGUF source's own format, re-quantized exactly) stays
chosen under any weighting, so when the budget affords every tensor its source format there
is nothing else to find; the search then stops after ``patience`` trials with nothing new.

An allocation evaluated before (many points of a space decode to the same allocation) is
answered from the study's own record and does not count as an evaluation.  Samplers are
rebuilt for every trial with a seed derived from ``seed`` and the number of completed trials,
so a run is reproducible, and a resumed TPE or random search proposes exactly what the
uninterrupted one would have.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import logging
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from autobits.agents.base import TOP_CANDIDATES, Evaluation, SearchProblem, SearchResult
from autobits.agents.base import AgentConfigError, AgentError, register_agent
from autobits.agents.base import metrics_from_json as _metrics
from autobits.agents.base import problem_fingerprint as _fingerprint
from autobits.agents.base import search_state_file
from autobits.allocation import Allocation
from autobits.candidates import CandidateTable
from autobits.errors import AutobitsError
from autobits.evaluate import Metrics
from autobits.solvers import solve
from autobits.solvers.problem import Packed, pack
from autobits.solvers.lagrange import greedy_index, lower_hull
from autobits.solvers.projection import project

__all__ = ["OptunaAgent", "OptunaConfig", "SPACES", "SAMPLERS", "tensor_groups"]

log = logging.getLogger(__name__)

SPACES = ("groups", "offsets", "categorical")
SAMPLERS = ("tpe", "cmaes", "gp", "random")
STUDY_NAME = "autobits-optuna"
JOURNAL = "optuna.journal"
#: Settings a resumed study must share with the one it continues.
_RESUME_KEYS = ("space", "sampler", "seed", "depth_buckets", "bias_range", "max_offset",
                "multivariate", "n_startup", "limit_bytes", "problem")


def tensor_groups(table: CandidateTable, *, depth_buckets: int) -> tuple[list[str], np.ndarray]:
    """Group names and one group index per tensor of ``table`` (role x depth bucket).

    Tensors outside the blocks (``token_embd``, ``output``) form one group per role.
    """
    if depth_buckets < 1:
        raise AgentConfigError(f"depth_buckets must be at least 1, got {depth_buckets=}")
    specs = {s.name: s for s in table.specs}
    blocks = [specs[t].block for t in table.tensors if specs[t].block is not None]
    n_blocks = max(blocks) + 1 if blocks else 1
    buckets = min(depth_buckets, n_blocks)
    names: list[str] = []
    index = np.zeros(len(table.tensors), dtype=np.int64)
    for i, t in enumerate(table.tensors):
        s = specs[t]
        if s.block is None:
            key = s.role
        else:
            b = s.block * buckets // n_blocks
            lo = -(-b * n_blocks // buckets)
            hi = -(-(b + 1) * n_blocks // buckets) - 1
            key = f"blk.{lo}-{hi}.{s.role}"
        if key not in names:
            names.append(key)
        index[i] = names.index(key)
    return names, index


def _ladders(p: Packed, warm: np.ndarray) -> list[list[int]]:
    """Per tensor: candidate indices of its lower convex hull (largest first), warm included."""
    out = []
    for i in range(len(p.names)):
        n = int(p.count[i])
        hull = lower_hull(p.bytes[i, :n], p.error[i, :n])
        w = int(warm[i])
        if w not in hull:
            hull = sorted(hull + [w], key=lambda k: (-int(p.bytes[i, k]), float(p.error[i, k])))
        out.append(hull)
    return out


def _trial_seed(seed: int, k: int) -> int:
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(k)]).generate_state(1)[0])


@contextmanager
def _quiet_optuna():
    import optuna

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(level)


@dataclass(frozen=True)
class OptunaConfig:
    """Hyperparameters of the :class:`OptunaAgent` (see the module docstring for the spaces).

    :param sampler: ``"tpe"`` | ``"cmaes"`` | ``"gp"`` | ``"random"``
    :param space: ``"groups"`` | ``"offsets"`` | ``"categorical"``
    :param n_startup: random trials after the warm start before the model-based sampler takes
        over (drawn around the warm start in the groups and offsets spaces, uniformly in the
        categorical one; CMA-ES starts from the warm start and ignores it)
    :param depth_buckets: depth buckets per role in the groups space
    :param bias_range: bound of the groups' natural-log multipliers
    :param max_offset: steps in the offsets space
    :param multivariate: multivariate TPE
    :param max_trials_factor: cap on trials (cached duplicates included), times ``evals``
    :param batch: allocations measured per round through ``problem.evaluate_many`` when the
        problem has it (None: its pool's ``workers``; TPE then uses the constant liar)
    :param timeout: seconds after which the search stops early with what it has (resumable)
    :param patience: consecutive trials decoding to allocations evaluated before, after which
        the search stops (the space holds nothing new where the sampler looks)
    :param progress: show a tqdm bar (logging always)
    """

    sampler: str = "tpe"
    space: str = "groups"
    n_startup: int = 10
    depth_buckets: int = 4
    bias_range: float = 2.0
    max_offset: int = 2
    multivariate: bool = True
    max_trials_factor: float = 5.0
    batch: int | None = None
    timeout: float | None = None
    patience: int = 200
    progress: bool = False

    def __post_init__(self) -> None:
        sampler, space = str(self.sampler).lower(), str(self.space).lower()
        object.__setattr__(self, "sampler", sampler)
        object.__setattr__(self, "space", space)
        n_startup, depth_buckets, bias_range = self.n_startup, self.depth_buckets, self.bias_range
        max_offset, timeout, patience = self.max_offset, self.timeout, self.patience
        batch, max_trials_factor = self.batch, self.max_trials_factor
        if sampler not in SAMPLERS:
            raise AgentConfigError(f"sampler must be one of {SAMPLERS}, got {sampler=}")
        if space not in SPACES:
            raise AgentConfigError(f"space must be one of {SPACES}, got {space=}")
        if n_startup < 0:
            raise AgentConfigError(f"n_startup must be non-negative, got {n_startup=}")
        if depth_buckets < 1:
            raise AgentConfigError(f"depth_buckets must be at least 1, got {depth_buckets=}")
        if not 0 < bias_range <= 20:
            raise AgentConfigError(f"bias_range must be in (0, 20], got {bias_range=}")
        if max_offset < 1:
            raise AgentConfigError(f"max_offset must be at least 1, got {max_offset=}")
        if timeout is not None and not timeout > 0:
            raise AgentConfigError(f"timeout must be positive seconds, got {timeout=}")
        if patience < 1:
            raise AgentConfigError(f"patience must be at least 1, got {patience=}")
        if batch is not None and batch < 1:
            raise AgentConfigError(f"batch must be at least 1, got {batch=}")
        if max_trials_factor < 1:
            raise AgentConfigError(f"max_trials_factor must be at least 1, got {max_trials_factor=}")
        if sampler == "cmaes":
            try:
                import cmaes  # noqa: F401
            except ImportError:
                raise AgentConfigError(
                    "sampler='cmaes' needs the 'cmaes' package (pip install cmaes)"
                ) from None


@register_agent("optuna", config=OptunaConfig)
class OptunaAgent:
    """Optuna ask/tell search (see the module docstring for the spaces), configured by an
    :class:`OptunaConfig`."""

    name: ClassVar[str] = "optuna"
    batched: ClassVar[bool] = True
    min_evals: ClassVar[int] = 1

    def __init__(self, config: OptunaConfig | None = None) -> None:
        config = OptunaConfig() if config is None else config
        self.config = config
        self.sampler = config.sampler
        self.space = config.space
        self.n_startup = int(config.n_startup)
        self.depth_buckets = int(config.depth_buckets)
        self.bias_range = float(config.bias_range)
        self.max_offset = int(config.max_offset)
        self.multivariate = bool(config.multivariate)
        self.max_trials_factor = float(config.max_trials_factor)
        self.batch = None if config.batch is None else int(config.batch)
        self.timeout = None if config.timeout is None else float(config.timeout)
        self.patience = int(config.patience)
        self.progress = bool(config.progress)

    # ------------------------------------------------------------ the space
    def _setup(self, problem: SearchProblem) -> None:
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        table = problem.table
        self._packed = p = pack(table)
        warm = problem.warm_start or solve("greedy", table, limit_bytes=problem.limit_bytes)
        if warm.bytes > problem.limit_bytes:
            raise AgentError(f"the warm start exceeds the budget, got {warm.bytes=}, "
                             f"limit_bytes={problem.limit_bytes}")
        self._warm = np.array([p.fmts[i].index(warm.tensors[t]) for i, t in enumerate(p.names)],
                              dtype=np.int64)
        self._warm_alloc = warm
        if self.space == "groups":
            self._groups, self._group_of = tensor_groups(table, depth_buckets=self.depth_buckets)
            r = self.bias_range
            self._dists = {f"b:{g}": FloatDistribution(-r, r) for g in self._groups}
            self._warm_params = {k: 0.0 for k in self._dists}
        elif self.space == "offsets":
            self._ladder = _ladders(p, self._warm)
            self._warm_pos = np.array([lad.index(int(w)) for lad, w in zip(self._ladder, self._warm)])
            m = self.max_offset
            self._dists = {f"o:{t}": IntDistribution(-m, m) for t in p.names}
            self._warm_params = {k: 0 for k in self._dists}
        else:
            self._dists = {f"f:{t}": CategoricalDistribution(p.fmts[i]) for i, t in enumerate(p.names)}
            self._warm_params = {f"f:{t}": p.fmts[i][int(self._warm[i])] for i, t in enumerate(p.names)}

    def decode(self, params: dict[str, Any], limit: int) -> tuple[np.ndarray, int]:
        """Candidate indices (feasible) and the raw proposal's bytes for one trial's params."""
        p = self._packed
        if all(params[k] == v for k, v in self._warm_params.items()):
            return self._warm.copy(), p.total_bytes(self._warm)
        if self.space == "groups":
            bias = np.array([params[f"b:{g}"] for g in self._groups], dtype=np.float64)
            scaled = dataclasses.replace(p, error=p.error * np.exp(bias)[self._group_of][:, None])
            index = greedy_index(scaled, limit)
            return index, p.total_bytes(index)
        if self.space == "offsets":
            raw = np.array([
                lad[int(np.clip(w + params[f"o:{t}"], 0, len(lad) - 1))]
                for t, lad, w in zip(p.names, self._ladder, self._warm_pos)
            ], dtype=np.int64)
        else:
            raw = np.array([p.fmts[i].index(params[f"f:{t}"]) for i, t in enumerate(p.names)],
                           dtype=np.int64)
        return project(p, raw, limit), p.total_bytes(raw)

    def _batch_size(self, problem: SearchProblem) -> int:
        """Allocations measured per round: 1 without ``problem.evaluate_many``; else ``batch``
        or the evaluator pool's ``workers``."""
        many = getattr(problem, "evaluate_many", None)
        if many is None:
            return 1
        if self.batch is not None:
            return self.batch
        return max(1, int(getattr(getattr(many, "__self__", None), "workers", 0) or 2))

    @staticmethod
    def _measure(problem: SearchProblem, allocs: list[Allocation], batch: int) -> list[tuple]:
        """(metrics, seconds) per allocation; several at once through ``evaluate_many``."""
        if batch > 1 and len(allocs) > 1:
            t0 = time.perf_counter()
            metrics = list(problem.evaluate_many(allocs))
            share = (time.perf_counter() - t0) / len(allocs)  # wall time per evaluation
            return [(m, share) for m in metrics]
        out = []
        for a in allocs:
            t0 = time.perf_counter()
            m = problem.evaluate(a)
            out.append((m, time.perf_counter() - t0))
        return out

    def _make_sampler(self, seed: int, *, liar: bool = False):
        import optuna

        s = optuna.samplers
        if self.sampler == "random":
            return s.RandomSampler(seed=seed)
        if self.sampler == "tpe":
            return s.TPESampler(seed=seed, n_startup_trials=self.n_startup + 1,
                                multivariate=self.multivariate, constant_liar=liar)
        if self.sampler == "cmaes":
            # the spaces are symmetric around the warm start, which is CMA-ES's default mean
            return s.CmaEsSampler(seed=seed, n_startup_trials=0)
        return s.GPSampler(seed=seed, n_startup_trials=self.n_startup + 1)

    def _startup_params(self, seed: int) -> list[dict[str, Any]]:
        """Local random trials around the warm start (instead of uniform random ones).

        Uniform draws over the whole space are mostly far worse than the warm start and teach
        the model-based sampler little; these start it where the good allocations are.
        """
        if self.space == "categorical" or self.sampler == "cmaes":
            return []
        rng = np.random.default_rng(_trial_seed(seed, 1 << 20))
        out = []
        for _ in range(self.n_startup):
            if self.space == "groups":
                r = self.bias_range
                v = np.clip(rng.normal(0.0, r / 4, len(self._dists)), -r, r)
                out.append({k: float(x) for k, x in zip(self._dists, v)})
            else:
                v = rng.choice([-1, 0, 1], p=[0.15, 0.7, 0.15], size=len(self._dists))
                out.append({k: int(x) for k, x in zip(self._dists, v)})
        return out

    def settings(self, problem: SearchProblem, seed: int) -> dict:
        return {"space": self.space, "sampler": self.sampler, "seed": int(seed),
                "depth_buckets": self.depth_buckets, "bias_range": self.bias_range,
                "max_offset": self.max_offset, "multivariate": self.multivariate,
                "n_startup": self.n_startup, "limit_bytes": int(problem.limit_bytes),
                "problem": _fingerprint(problem.table, problem.limit_bytes)}

    # ------------------------------------------------------------ storage
    def _open_study(self, out_dir: Path | None, settings: dict, resume: bool, force: bool = False):
        import optuna
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        path = search_state_file(out_dir, JOURNAL, resume=resume, force=force)
        if path is None:
            storage: Any = optuna.storages.InMemoryStorage()
        else:
            storage = JournalStorage(JournalFileBackend(str(path)))
        study = optuna.create_study(storage=storage, study_name=STUDY_NAME, direction="minimize",
                                    load_if_exists=True)
        old = study.user_attrs.get("settings")
        if old is None:
            study.set_user_attr("settings", settings)
        else:
            diff = {k: (old.get(k), settings[k]) for k in _RESUME_KEYS if old.get(k) != settings[k]}
            if diff:
                raise AgentError(f"cannot resume: the journal's search differs in {diff} "
                                 f"(journal value, requested value)")
        return study

    def _queue_slots(self, study, done, seed: int) -> None:
        """Queue the warm start (slot 0) and the startup trials not completed yet, in order.

        A resumed study may have lost an enqueued trial to the interruption (it failed) while
        later ones still wait: the queue is then drained and rebuilt, so that the resumed
        search evaluates the same trials in the same order as an uninterrupted one.
        """
        from optuna.trial import TrialState

        slots = [self._warm_params] + self._startup_params(seed)
        complete = {t.user_attrs.get("slot") for t in done}
        need = [i for i in range(len(slots)) if i not in complete]
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if [t.user_attrs.get("slot") for t in waiting] == need:
            return
        for _ in waiting:
            study.tell(study.ask(), state=TrialState.FAIL)
        for i in need:
            study.enqueue_trial(slots[i], user_attrs={"slot": i, "warm": i == 0})

    # ------------------------------------------------------------ search
    def search(self, problem: SearchProblem, *, evals: int, seed: int, out_dir: Path | None = None,
               resume: bool = False, force: bool = False) -> SearchResult:
        """Run (or, with ``resume``, continue) the search until ``evals`` evaluations are done.

        Without ``resume``, a journal already in ``out_dir`` is an error unless ``force``
        (which deletes it and starts afresh).
        """
        from optuna.trial import TrialState

        if evals < 1:
            raise AgentError(f"evals must be at least 1, got {evals=}")
        t_start = time.perf_counter()
        self._setup(problem)
        p, limit = self._packed, int(problem.limit_bytes)
        settings = self.settings(problem, seed)
        with _quiet_optuna():
            study = self._open_study(out_dir, settings, resume, force)
            for tr in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
                if tr.state == TrialState.RUNNING:  # left by a killed process
                    study.tell(tr.number, state=TrialState.FAIL)
            done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
            seen: dict[tuple, FrozenRecord] = {}
            history: list[Evaluation] = []
            raw_over: list[bool] = []
            for tr in done:
                rec = FrozenRecord.from_trial(tr)
                seen.setdefault(rec.key, rec)
                if not rec.cached:
                    history.append(rec.evaluation(len(history)))
                    raw_over.append(rec.raw_over)
            best = min((r for r in seen.values()), key=lambda r: r.kld, default=None)
            self._queue_slots(study, done, seed)
            if resume and history:
                log.info("resuming: %d of %d evaluations done, best KLD %.5f",
                         len(history), evals, best.kld)
            bar = _bar(self.progress, evals, len(history))
            batch = self._batch_size(problem)
            n_trials = len(done)
            max_trials = int(math.ceil(self.max_trials_factor * evals))
            stale = 0  # consecutive trials that found nothing new
            while len(history) < evals:
                if stale >= self.patience:
                    log.warning("stopping after %d trials in a row found no new allocation "
                                "(%d of %d evaluations done)", stale, len(history), evals)
                    break
                if (self.timeout is not None and history
                        and time.perf_counter() - t_start > self.timeout):
                    log.warning("stopping at the timeout of %.0fs after %d of %d evaluations "
                                "(resume to continue)", self.timeout, len(history), evals)
                    break
                if n_trials >= max_trials:
                    log.warning("stopping after %d trials: only %d distinct allocations found",
                                n_trials, len(history))
                    break
                # ask until `want` allocations not evaluated before are in hand
                want = min(batch, evals - len(history))
                fresh: dict[tuple, list] = {}
                while len(fresh) < want and n_trials < max_trials:
                    study.sampler = self._make_sampler(_trial_seed(seed, n_trials), liar=batch > 1)
                    trial = study.ask(self._dists)
                    n_trials += 1
                    try:
                        index, raw_bytes = self.decode(trial.params, limit)
                    except BaseException:
                        study.tell(trial, state=TrialState.FAIL)
                        raise
                    key = tuple(int(k) for k in index)
                    attrs = {"index": list(key), "raw_bytes": int(raw_bytes),
                             "raw_over": bool(raw_bytes > limit)}
                    hit = seen.get(key)
                    if hit is not None:
                        _tell_cached(study, trial, attrs, hit)
                        stale += 1
                        if stale >= self.patience:
                            break
                    else:
                        fresh.setdefault(key, []).append((trial, attrs))
                        stale = 0
                if not fresh:
                    continue
                keys = list(fresh)
                try:
                    measured = self._measure(problem, [problem.table.allocation(p.choice(np.array(k)))
                                                       for k in keys], batch)
                except BaseException:
                    for group in fresh.values():
                        for trial, _ in group:
                            study.tell(trial, state=TrialState.FAIL)
                    raise
                for key, (m, seconds) in zip(keys, measured):
                    (trial, attrs), *dups = fresh[key]
                    attrs.update(metrics=m.to_json(), seconds=seconds, eval_index=len(history))
                    for k, v in attrs.items():
                        trial.set_user_attr(k, v)
                    rec = FrozenRecord(trial.number, key, float(m.kld), m.to_json(), seconds,
                                       attrs["raw_over"], False, bool(trial.user_attrs.get("warm")),
                                       dict(trial.params))
                    study.tell(trial, float(m.kld))
                    for dup, dattrs in dups:
                        _tell_cached(study, dup, dattrs, rec)
                    seen[key] = rec
                    history.append(rec.evaluation(len(history)))
                    raw_over.append(rec.raw_over)
                    if best is None or rec.kld < best.kld:
                        best = rec
                        log.info("eval %d/%d: new best KLD %.5f at %.4f bpw (trial %d)",
                                 len(history), evals, rec.kld, rec.metrics["bpw"], rec.number)
                    elif len(history) % 10 == 0:
                        log.info("eval %d/%d: KLD %.5f, best %.5f at %.4f bpw", len(history),
                                 evals, rec.kld, best.kld, best.metrics["bpw"])
                    bar.update(1)
                    bar.set_postfix(best=f"{best.kld:.5f}", bpw=f"{best.metrics['bpw']:.3f}")
            bar.close()
        if best is None:
            raise AgentError("the search evaluated nothing")
        best_alloc = problem.table.allocation(p.choice(np.array(best.key)), meta={
            "method": "optuna", "space": self.space, "sampler": self.sampler, "seed": int(seed),
            "trial": best.number, "calib_kld": best.kld, "limit_bytes": limit})
        warm = next((r for r in seen.values() if r.warm), None)
        meta = {
            **settings, "evals": len(history), "trials": n_trials, "limit_bytes": limit,
            "limit_bpw": limit * 8 / problem.table.params, "best_trial": best.number,
            "warm_kld": warm.kld if warm else None, "raw_over": raw_over,
            "groups": getattr(self, "_groups", None), "seconds": time.perf_counter() - t_start,
            "journal": str(Path(out_dir) / JOURNAL) if out_dir is not None else None,
            "batch": batch,
        }
        if self.space == "groups":
            meta["best_params"] = {k[2:]: v for k, v in best.params.items()}
        top = sorted(seen.values(), key=lambda r: r.kld)[:TOP_CANDIDATES]
        candidates = [(best_alloc, _metrics(best.metrics))] + [
            (problem.table.allocation(p.choice(np.array(r.key)), meta={
                "method": "optuna", "trial": r.number, "calib_kld": r.kld, "limit_bytes": limit}),
             _metrics(r.metrics)) for r in top + ([warm] if warm and warm not in top else [])
            if r is not best]
        return SearchResult(agent="optuna", best=best_alloc, best_metrics=_metrics(best.metrics),
                            history=history, meta=meta, candidates=candidates)


@dataclasses.dataclass(frozen=True)
class FrozenRecord:
    """What the journal keeps of one completed trial."""

    number: int
    key: tuple
    kld: float
    metrics: dict
    seconds: float
    raw_over: bool
    cached: bool
    warm: bool
    params: dict

    @classmethod
    def from_trial(cls, tr) -> "FrozenRecord":
        u = tr.user_attrs
        return cls(tr.number, tuple(int(k) for k in u["index"]), float(tr.value), dict(u["metrics"]),
                   float(u.get("seconds", 0.0)), bool(u.get("raw_over", False)), "cached" in u,
                   bool(u.get("warm", False)), dict(tr.params))

    def evaluation(self, index: int) -> Evaluation:
        return Evaluation(index=index, kld=self.kld, bytes=int(self.metrics["bytes"]),
                          bpw=float(self.metrics["bpw"]), feasible=True, seconds=self.seconds)


def _tell_cached(study, trial, attrs: dict, rec: FrozenRecord) -> None:
    """Complete ``trial`` with the value of the identical allocation evaluated by ``rec``."""
    trial.set_user_attr("cached", rec.number)
    for k, v in attrs.items():
        trial.set_user_attr(k, v)
    trial.set_user_attr("metrics", rec.metrics)
    study.tell(trial, rec.kld)


class _NoBar:
    def update(self, n: int) -> None: ...
    def set_postfix(self, **kw) -> None: ...
    def close(self) -> None: ...


def _bar(enabled: bool, total: int, initial: int):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="optuna", unit="eval")
