"""Fast quality measurement of an allocation against the reference model.

Built to sit inside a search loop:

* the reference model's next-token distributions are computed once per window set and kept
  (as probabilities, with their negative entropy), so an evaluation is one forward pass of
  the quantized model per window;
* dequantized candidate weights are cached per (tensor, format) and swapped into the model
  by pointer (``param.data = cached``), never re-quantized;
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
import time
from dataclasses import asdict, dataclass
from typing import Mapping

import numpy as np

from autobits.allocation import Allocation
from autobits.formats import get_format
from autobits.model import LoadedModel
from autobits.threads import thread_map

__all__ = ["Metrics", "Evaluator", "WeightCache"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Metrics:
    """Quality and size of one allocation.

    ``kld``: mean per-token KL(reference || quantized) in nats; ``ppl``: perplexity of the
    quantized model on the scored tokens; ``top1``: fraction of scored tokens whose argmax
    agrees with the reference; ``bytes``/``bpw``: exact tensor bytes and file-level bits per
    weight; ``seconds``: wall time of the evaluation; ``ref_ppl``: the reference's
    perplexity on the same tokens.
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

    def to_json(self) -> dict:
        return asdict(self)


class WeightCache:
    """Dequantized weights per (tensor, format), quantized once, stored as float32 tensors.

    ``importance`` maps a tensor name to its per-input-channel importance vector (the
    imatrix); formats that use it then round the way llama.cpp does with an imatrix.
    """

    def __init__(self, lm: LoadedModel, importance: Mapping[str, np.ndarray] | None = None):
        self.lm = lm
        self.importance = dict(importance or {})
        self._cache: dict[tuple[str, str], object] = {}

    def get(self, name: str, fmt: str):
        import torch

        key = (name, get_format(fmt).name)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        ref = self.lm.reference_weight(name)
        f = get_format(fmt)
        arr = ref.detach().cpu().numpy()
        data = f.quantize(arr, self.importance.get(name), tensor=name)
        deq = torch.from_numpy(np.ascontiguousarray(f.dequantize(data, arr.shape)))
        self._cache[key] = deq
        return deq

    def __len__(self) -> int:
        return len(self._cache)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._cache.values())


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

    # ------------------------------------------------------------- evaluate
    def apply(self, tensors: Mapping[str, str]) -> None:
        """Swap the cached dequantized weights of ``tensors`` into the model."""
        self.lm.restore()
        for name, fmt in tensors.items():
            self.lm.set_weight(name, self.cache.get(name, fmt))
        if self._act is not None:
            self._act.set(tensors)

    def evaluate(self, allocation: Allocation) -> Metrics:
        """KLD, perplexity and top-1 agreement of ``allocation`` against the reference."""
        import torch

        t0 = time.perf_counter()

        def one(batch):
            k, ids = batch
            with torch.inference_mode():
                lp = self._logprobs(ids)
                kl = self._ref_negent[k] - (self._ref_prob[k] * lp).sum(-1)
                agree = (lp.argmax(-1) == self._ref_top[k]).sum().item()
                target = ids[:, self.score_from + 1 :]
                nll = -lp.gather(-1, target.unsqueeze(-1)).sum().item()
                return kl.sum().item(), agree, nll

        try:
            self.apply(allocation.tensors)
            batches = [(k, ids) for k, (_, ids) in enumerate(self._batches())]
            kl_sum = nll = 0.0
            agree = 0
            for b_kl, b_agree, b_nll in thread_map(one, batches, self._threads()):
                kl_sum += b_kl
                agree += b_agree
                nll += b_nll
        finally:
            self.lm.restore()
            if self._act is not None:
                self._act.clear()
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
        )
