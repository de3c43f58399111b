"""Fast quality measurement of an allocation against the reference model.

Built to sit inside a search loop:

* the reference model's next-token distributions are computed once per window set and kept
  (as probabilities, with their negative entropy), so an evaluation is one forward pass of
  the quantized model per window;
* candidate weights are quantized once per (tensor, format) and kept as their quantized
  bytes; the dequantized float32 tensors live in a least-recently-used cache of bounded
  size (:class:`WeightCache`) and are swapped into the model by pointer
  (``param.data = cached``);
* after :meth:`Evaluator.set_incumbent`, an evaluation starts at the first block whose
  tensors differ from the incumbent's: the blocks before it are not run, their outputs are
  the incumbent's, kept per window (exactly what they would compute: same weights, same
  inputs), so that a search step that changes deep tensors costs a fraction of a pass;
* everything runs under ``torch.inference_mode``; the windows of an evaluation run on
  parallel threads (one per core, torch's own thread count 1 meanwhile:
  :func:`autobits.threads.thread_map`), which on a 2-core machine beats splitting every op
  of one window over both cores.

Scoring follows llama.cpp's ``llama-perplexity``: windows come from
:func:`autobits.text.make_windows` (BOS first exactly when llama.cpp would put it there) and
only the tokens of a window's second half are scored, so every scored token has at least
``ctx/2`` tokens of context.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Mapping

import numpy as np

from autobits.allocation import Allocation
from autobits.formats import get_format
from autobits.memory import log_memory
from autobits.model import LoadedModel
from autobits.threads import thread_map

__all__ = ["DEFAULT_CACHE_BYTES", "Metrics", "Evaluator", "WeightCache"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Metrics:
    """Quality and size of one allocation.

    ``kld``: mean per-token KL(reference || quantized) in nats; ``ppl``: perplexity of the
    quantized model on the scored tokens; ``top1``: fraction of scored tokens whose argmax
    agrees with the reference; ``bytes``/``bpw``: exact tensor bytes and file-level bits per
    weight; ``seconds``: wall time of the evaluation; ``ref_ppl``: the reference's
    perplexity on the same tokens; ``window_kld``: the mean KLD of each window's scored
    tokens, in window order (what :func:`autobits.paired.paired_interval` compares two
    allocations on; every window scores as many tokens, so ``kld`` is their mean up to
    rounding, and unlike ``kld`` they are not clipped at 0); empty when the measurement kept
    none (e.g. a record written before they were kept).
    """

    kld: float
    ppl: float
    top1: float
    bytes: int
    bpw: float
    seconds: float
    tokens: int
    windows: int
    ref_ppl: float
    window_kld: tuple[float, ...] = ()

    def __post_init__(self):
        # a JSON round trip gives a list: keep the record hashable and comparable
        object.__setattr__(self, "window_kld", tuple(float(v) for v in self.window_kld))

    def to_json(self) -> dict:
        d = asdict(self)
        d["window_kld"] = list(self.window_kld)
        return d


#: Default budget of the dequantized weights a :class:`WeightCache` keeps between
#: evaluations (bytes); the quantized bytes of every candidate are kept regardless.
DEFAULT_CACHE_BYTES = 512 << 20


class WeightCache:
    """Candidate weights per (tensor, format): quantized once, dequantized on demand.

    Two layers, so that memory scales with the model and not with model x formats:

    * the quantized bytes of every (tensor, format) quantized so far (``bpw / 32`` of a
      float32 copy: Q4_0 is 0.14 of it), kept for the cache's lifetime, except for the
      float formats (F32, F16, BF16: a cast of the reference, cheaper to redo than to keep);
    * the dequantized float32 tensors most recently asked for, least recently used first
      out once they exceed ``budget_bytes`` (default :data:`DEFAULT_CACHE_BYTES`; 0 keeps
      none between calls).  A miss dequantizes the kept bytes again, which gives the same
      float32 values bit for bit (the formats' dequantizers are deterministic), so metrics
      do not depend on the budget, only the time spent dequantizing.  An evaluation walks
      the tensors in the same order every time, which defeats a plain LRU smaller than the
      model (every entry is evicted just before it is asked for again): after
      :meth:`new_pass` (the evaluator calls it before swapping weights in), entries used in
      the current pass are never evicted; a new entry that does not fit otherwise is not
      kept, so a budget of half the model serves half of each repeated allocation.

    :meth:`get` returns a tensor that nothing writes to; an entry evicted while the model
    still points at it lives until the model lets go (``LoadedModel.restore``), so an
    evaluation holds at most the budget plus one model's worth.
    ``importance`` maps a tensor name to its per-input-channel importance vector (the
    imatrix); formats that use it then round the way llama.cpp does with an imatrix.
    ``packed`` pre-fills the quantized bytes ((tensor, format) -> uint8 array, e.g. the
    read-only views a Ray actor gets from the object store; they are not copied).
    Thread-safe.
    """

    def __init__(self, lm: LoadedModel, importance: Mapping[str, np.ndarray] | None = None, *,
                 budget_bytes: int | None = None,
                 packed: Mapping[tuple[str, str], np.ndarray] | None = None):
        import threading

        self.lm = lm
        self.importance = dict(importance or {})
        budget = DEFAULT_CACHE_BYTES if budget_bytes is None else int(budget_bytes)
        if budget < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes = budget
        self._packed: dict[tuple[str, str], np.ndarray] = {
            (n, get_format(f).name): a for (n, f), a in (packed or {}).items()}
        self._deq: OrderedDict[tuple[str, str], tuple[object, int]] = OrderedDict()
        self._deq_bytes = 0
        self._pass = 0
        self._lock = threading.Lock()
        #: dequantizations of kept bytes (LRU misses) and quantizations from the reference
        self.misses = 0
        self.quantized = 0

    @staticmethod
    def _key(name: str, fmt: str) -> tuple[str, str]:
        return name, get_format(fmt).name

    @staticmethod
    def keeps(fmt: str) -> bool:
        """True when the quantized bytes of ``fmt`` are kept (all but the float formats)."""
        return get_format(fmt).block_size > 1

    def quantize(self, name: str, fmt: str) -> np.ndarray:
        """The quantized bytes of ``name`` in ``fmt`` (quantized from the reference weight,
        and kept when :meth:`keeps`, unless already held)."""
        key = self._key(name, fmt)
        data = self._packed.get(key)
        if data is None:
            arr = self.lm.reference_weight(name).detach().cpu().numpy()
            data = get_format(key[1]).quantize(arr, self.importance.get(name), tensor=name)
            with self._lock:
                if self.keeps(key[1]):
                    data = self._packed.setdefault(key, data)
                self.quantized += 1
        return data

    def put(self, name: str, fmt: str, data: np.ndarray, dequantized=None) -> None:
        """Keep ``data`` (the quantized bytes of ``name`` in ``fmt``; float formats are not
        kept) and, when given, its dequantized tensor (subject to the budget)."""
        key = self._key(name, fmt)
        with self._lock:
            if self.keeps(key[1]):
                self._packed.setdefault(key, data)
            if dequantized is not None:
                self._remember(key, dequantized)

    def has(self, name: str, fmt: str) -> bool:
        """True when the quantized bytes of (``name``, ``fmt``) are held (never for a float
        format)."""
        return self._key(name, fmt) in self._packed

    def get(self, name: str, fmt: str):
        """The dequantized float32 weight (torch) of ``name`` stored as ``fmt``."""
        import torch

        key = self._key(name, fmt)
        with self._lock:
            hit = self._deq.get(key)
            if hit is not None:
                self._deq[key] = (hit[0], self._pass)
                self._deq.move_to_end(key)
                return hit[0]
        data = self.quantize(name, fmt)
        shape = tuple(self.lm.spec(name).shape)
        deq = torch.from_numpy(np.ascontiguousarray(get_format(key[1]).dequantize(data, shape),
                                                    dtype=np.float32))
        with self._lock:
            self.misses += 1
            self._remember(key, deq)
        return deq

    def new_pass(self) -> None:
        """Start a pass over the model (one evaluation): what it uses stays until the next."""
        with self._lock:
            self._pass += 1

    def _remember(self, key, deq) -> None:
        size = lambda t: t.numel() * t.element_size()  # noqa: E731
        old = self._deq.pop(key, None)
        if old is not None:
            self._deq_bytes -= size(old[0])
        need = size(deq)
        while self._deq_bytes + need > self.budget_bytes and self._deq:
            oldest, (t, used) = next(iter(self._deq.items()))
            if self._pass and used == self._pass:  # in use by this pass, as all after it
                return
            del self._deq[oldest]
            self._deq_bytes -= size(t)
        if self._deq_bytes + need <= self.budget_bytes:
            self._deq[key] = (deq, self._pass)
            self._deq_bytes += need

    def packed_items(self) -> dict[tuple[str, str], np.ndarray]:
        """(tensor, format) -> quantized bytes, every entry held (a new dict, same arrays)."""
        with self._lock:
            return dict(self._packed)

    def __len__(self) -> int:
        return len(self._packed)

    @property
    def packed_bytes(self) -> int:
        return sum(a.nbytes for a in list(self._packed.values()))

    @property
    def dequantized_bytes(self) -> int:
        return self._deq_bytes

    @property
    def nbytes(self) -> int:
        """Bytes held: the quantized bytes plus the dequantized tensors in the budget."""
        return self.packed_bytes + self._deq_bytes


class Evaluator:
    """Measures allocations of one model on a fixed set of token windows.

    ``llama_numerics=True`` also rounds every linear layer's input the way llama.cpp's CPU
    matmul does for the weight's format (8-bit activation blocks, see
    :mod:`autobits.numerics`), so that perplexities match llama.cpp's; the reference
    distributions stay those of the float model.

    ``workers`` windows (batches) are measured at once on parallel threads; the default,
    ``None``, takes torch's thread count at call time (so an evaluator inside a 1-thread Ray
    actor stays serial).  Results are summed in window order, whatever the thread count.
    """

    def __init__(
        self,
        lm: LoadedModel,
        windows: np.ndarray,
        *,
        score_from: int | None = None,
        cache: WeightCache | None = None,
        batch_size: int = 1,
        llama_numerics: bool = False,
        workers: int | None = None,
    ):
        import torch

        windows = np.asarray(windows)
        if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
            raise ValueError(f"windows must be a non-empty (n, ctx>=2) array, got shape {windows.shape}")
        self.lm = lm
        self.ctx = int(windows.shape[1])
        self.score_from = self.ctx // 2 if score_from is None else int(score_from)
        if not 0 <= self.score_from < self.ctx - 1:
            raise ValueError(f"score_from must be in [0, ctx-1), got {self.score_from=}, {self.ctx=}")
        self.tokens = torch.tensor(np.array(windows, dtype=np.int64))
        self.cache = cache if cache is not None else WeightCache(lm)
        self.batch_size = max(1, int(batch_size))
        self.llama_numerics = bool(llama_numerics)
        if workers is not None and int(workers) < 1:
            raise ValueError(f"workers must be >= 1 (or None for torch's thread count), got {workers=}")
        self.workers = None if workers is None else int(workers)
        self._act = None
        if self.llama_numerics:
            from autobits.numerics import ActivationQuantizer

            self._act = ActivationQuantizer(lm)
        # prefix reuse (set_incumbent): per thread, the batch being run and how many blocks
        # to take from the incumbent's outputs instead of running them
        self._tls = threading.local()
        self._incumbent: dict[str, str] | None = None
        self._prefix: dict[int, list] = {}
        #: blocks run and blocks taken from the incumbent, over every evaluation so far
        self.blocks_run = 0
        self.blocks_reused = 0
        self._reference()

    # -------------------------------------------------------------- forward
    def _logprobs(self, ids):
        """Log-probabilities of the next token at the scored positions: (b, n_scored, vocab)."""
        import torch

        model = self.lm.model
        out = model.model(input_ids=ids, use_cache=False)
        hidden = out.last_hidden_state[:, self.score_from : self.ctx - 1]
        logits = model.get_output_embeddings()(hidden).float()
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return torch.log_softmax(logits, dim=-1)

    def _batches(self):
        for i in range(0, self.tokens.shape[0], self.batch_size):
            yield i, self.tokens[i : i + self.batch_size]

    def _threads(self) -> int:
        import torch

        return self.workers if self.workers is not None else torch.get_num_threads()

    def _reference(self) -> None:
        import torch

        t0 = time.perf_counter()
        self.lm.restore()

        def one(batch):
            _, ids = batch
            with torch.inference_mode():
                lp = self._logprobs(ids)
                p = lp.exp()
                target = ids[:, self.score_from + 1 :]
                nll = -lp.gather(-1, target.unsqueeze(-1)).sum().item()
                return p, (p * lp).sum(-1), lp.argmax(-1), nll

        self._ref_prob, self._ref_negent, self._ref_top = [], [], []
        nll = 0.0
        for p, negent, top, b_nll in thread_map(one, list(self._batches()), self._threads()):
            self._ref_prob.append(p)
            self._ref_negent.append(negent)
            self._ref_top.append(top)
            nll += b_nll
        self.n_scored = int(self.tokens.shape[0] * (self.ctx - 1 - self.score_from))
        self.ref_ppl = math.exp(nll / self.n_scored)
        log.info(
            "reference: %d windows x %d tokens, ppl %.3f (%.1fs)",
            self.tokens.shape[0], self.ctx, self.ref_ppl, time.perf_counter() - t0,
        )
        log_memory(f"reference distributions of {self.tokens.shape[0]} windows")

    # ------------------------------------------------------- prefix reuse
    def _blocks(self) -> list:
        return list(self.lm.model.model.layers)

    @contextmanager
    def _routed_blocks(self, active: bool):
        """While active, every decoder block runs through :meth:`_run_block`; the model is
        left as it was afterwards (nothing patched stays, so it still pickles)."""
        blocks = self._blocks() if active else []
        for i, block in enumerate(blocks):
            forward = block.forward
            block.forward = lambda *a, _i=i, _f=forward, **kw: self._run_block(_i, _f, *a, **kw)
        try:
            yield
        finally:
            for block in blocks:
                del block.forward  # the class's forward again

    def _run_block(self, i: int, forward, *args, **kwargs):
        st = self._tls
        if i < getattr(st, "skip", 0):
            return self._prefix[st.batch][i]
        out = forward(*args, **kwargs)
        if getattr(st, "record", False):
            self._prefix[st.batch][i] = out
        return out

    def first_changed_block(self, tensors: Mapping[str, str]) -> int:
        """Index of the first block whose tensors differ from the incumbent's (the number of
        blocks when only the output head differs; 0 without an incumbent or when the token
        embedding differs)."""
        if self._incumbent is None:
            return 0
        start = len(self._blocks())
        for name in set(tensors) | set(self._incumbent):
            if tensors.get(name) == self._incumbent.get(name):
                continue
            spec = self.lm.spec(name)
            if spec.block is None:
                if spec.role != "output":
                    return 0
                continue
            start = min(start, int(spec.block))
        return start

    def set_incumbent(self, allocation: Allocation | None) -> Metrics | None:
        """Measure ``allocation`` and keep every block's output on these windows, so that
        later evaluations start at the first block whose tensors differ from it
        (:meth:`first_changed_block`); their metrics are the same as from a full pass.
        Memory: one hidden state per block and window (``blocks x windows x ctx x hidden``
        float32).  ``None`` drops the incumbent.  Returns the incumbent's metrics."""
        self._incumbent, self._prefix = None, {}
        if allocation is None:
            return None
        n = len(self._blocks())
        self._prefix = {k: [None] * n for k in range(len(list(self._batches())))}
        m = self._measure(allocation, skip=0, record=True)
        self._incumbent = dict(allocation.tensors)
        log_memory(f"incumbent's block outputs ({n} blocks x {self.tokens.shape[0]} windows)")
        return m

    # ------------------------------------------------------------- evaluate
    def apply(self, tensors: Mapping[str, str]) -> None:
        """Swap the cached dequantized weights of ``tensors`` into the model."""
        self.lm.restore()
        self.cache.new_pass()
        for name, fmt in tensors.items():
            self.lm.set_weight(name, self.cache.get(name, fmt))
        if self._act is not None:
            self._act.set(tensors)

    def evaluate(self, allocation: Allocation) -> Metrics:
        """KLD (overall and per window), perplexity and top-1 agreement of ``allocation``
        against the reference (from its first changed block on, after
        :meth:`set_incumbent`)."""
        return self._measure(allocation, skip=self.first_changed_block(allocation.tensors),
                             record=False)

    def _measure(self, allocation: Allocation, *, skip: int, record: bool) -> Metrics:
        import torch

        t0 = time.perf_counter()
        n_blocks = len(self._blocks())
        skip = min(skip, n_blocks)

        def one(batch):
            k, ids = batch
            st = self._tls
            st.batch, st.skip, st.record = k, skip, record
            try:
                return scored(k, ids)
            finally:
                st.skip, st.record = 0, False

        def scored(k, ids):
            with torch.inference_mode():
                lp = self._logprobs(ids)
                kl = self._ref_negent[k] - (self._ref_prob[k] * lp).sum(-1)
                agree = (lp.argmax(-1) == self._ref_top[k]).sum().item()
                target = ids[:, self.score_from + 1 :]
                nll = -lp.gather(-1, target.unsqueeze(-1)).sum().item()
                return kl.sum().item(), kl.mean(-1).tolist(), agree, nll

        try:
            self.apply(allocation.tensors)
            batches = [(k, ids) for k, (_, ids) in enumerate(self._batches())]
            kl_sum = nll = 0.0
            agree = 0
            window_kld: list[float] = []
            with self._routed_blocks(skip > 0 or record):
                results = list(thread_map(one, batches, self._threads()))
            for b_kl, b_windows, b_agree, b_nll in results:
                kl_sum += b_kl
                window_kld += b_windows
                agree += b_agree
                nll += b_nll
        finally:
            self.lm.restore()
            if self._act is not None:
                self._act.clear()
        windows = int(self.tokens.shape[0])
        self.blocks_reused += windows * skip
        self.blocks_run += windows * (n_blocks - skip)
        log_memory("evaluation")
        n = self.n_scored
        return Metrics(
            kld=max(kl_sum / n, 0.0),
            ppl=math.exp(nll / n),
            top1=agree / n,
            bytes=allocation.bytes,
            bpw=allocation.bpw,
            seconds=time.perf_counter() - t0,
            tokens=int(self.tokens.numel()),
            windows=int(self.tokens.shape[0]),
            ref_ppl=self.ref_ppl,
            window_kld=tuple(window_kld),
        )
