"""Selection: a search's best allocations re-measured on a larger slice before one is chosen."""

import pytest

from autobits.agents import Evaluation, SearchResult
from autobits.agents.selection import select
from autobits.allocation import Allocation
from autobits.evaluate import Metrics


def _m(a: Allocation, kld: float) -> Metrics:
    return Metrics(kld=kld, ppl=10.0, top1=0.9, bytes=a.bytes, bpw=a.bpw, seconds=0.1,
                   tokens=256, windows=1, ref_ppl=9.0)


@pytest.fixture()
def allocs(tiny_lm):
    return {f: Allocation.uniform(tiny_lm.name, tiny_lm.specs, f) for f in ("Q8_0", "Q5_0", "Q4_0")}


def _result(allocs, reward: dict[str, float]) -> SearchResult:
    ranked = sorted(reward, key=reward.get)
    cands = [(allocs[f], _m(allocs[f], reward[f])) for f in ranked]
    hist = [Evaluation(index=i, kld=reward[f], bytes=allocs[f].bytes, bpw=allocs[f].bpw,
                       feasible=True, seconds=0.1) for i, f in enumerate(ranked)]
    return SearchResult(agent="optuna", best=cands[0][0], best_metrics=cands[0][1], history=hist,
                        meta={"evals": 3}, candidates=cands)


def test_selection_overrules_an_overfitted_reward(allocs):
    # the reward slice ranks Q4_0 first; the selection slice disagrees (Q5_0 best)
    result = _result(allocs, {"Q4_0": 0.01, "Q5_0": 0.02, "Q8_0": 0.03})
    truth = {allocs["Q4_0"].bytes: 0.5, allocs["Q5_0"].bytes: 0.1, allocs["Q8_0"].bytes: 0.2}
    calls = []

    def measure(a):
        calls.append(a.bytes)
        return _m(a, truth[a.bytes])

    out = select(result, measure=measure, warm_start=allocs["Q8_0"], top_k=2)
    assert out.best is allocs["Q5_0"] and out.best_metrics.kld == 0.02  # the reward number
    sel = out.meta["selection"]
    assert sel["chosen"] == "optuna #2" and sel["selection_kld"] == 0.1
    assert [r["label"] for r in sel["rows"]] == ["optuna #1", "optuna #2", "warm start"]
    assert sel["rows"][2]["reward_kld"] == 0.03  # the warm start's reward is looked up
    assert len(calls) == 3 and out.history == result.history and result.best is allocs["Q4_0"]


def test_warm_start_wins_when_nothing_holds_up(allocs):
    result = _result(allocs, {"Q4_0": 0.01, "Q5_0": 0.02, "Q8_0": 0.03})
    out = select(result, measure=lambda a: _m(a, 1.0 / a.bytes), warm_start=allocs["Q8_0"],
                 top_k=1)
    assert out.best is allocs["Q8_0"] and out.meta["selection"]["chosen"] == "warm start"


def test_top_k_zero_and_bad_top_k(allocs):
    result = _result(allocs, {"Q4_0": 0.01, "Q5_0": 0.02})
    assert select(result, measure=lambda a: 1 / 0, top_k=0) is result
    with pytest.raises(ValueError, match="top_k"):
        select(result, measure=lambda a: None, top_k=-1)
