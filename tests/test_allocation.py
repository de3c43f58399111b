import json

import pytest

from autobits.allocation import Allocation, Budget, feasible_range, size_of
from autobits.errors import AllocationError, BudgetError
from autobits.specs import TensorSpec, role_of, block_of


def _specs():
    return [
        TensorSpec("token_embd.weight", (100, 64), "token_embd", None, quantizable=True),
        TensorSpec("blk.0.attn_q.weight", (64, 64), "attn_q", 0, quantizable=True),
        TensorSpec("blk.0.ffn_down.weight", (64, 256), "ffn_down", 0, quantizable=True),
        TensorSpec("blk.0.attn_norm.weight", (64,), "norm", 0),
    ]


def test_roles_and_blocks():
    assert role_of("blk.3.ffn_down.weight") == "ffn_down"
    assert role_of("blk.3.attn_norm.weight") == "norm"
    assert role_of("blk.3.attn_q.bias") == "bias"
    assert role_of("token_embd.weight") == "token_embd"
    assert block_of("blk.12.attn_v.weight") == 12
    assert block_of("output.weight") is None


def test_exact_bytes_count_every_tensor():
    specs = _specs()
    a = Allocation.build("m", specs, {
        "token_embd.weight": "Q8_0", "blk.0.attn_q.weight": "Q4_0", "blk.0.ffn_down.weight": "Q4_K",
    })
    # Q8_0: 34 bytes / 32 values; Q4_0: 18 / 32; Q4_K: 144 / 256; norm kept F32
    want = 100 * 64 // 32 * 34 + 64 * 64 // 32 * 18 + 64 * 144 + 64 * 4
    assert a.bytes == want == size_of(specs, a.tensors)
    assert a.params == 100 * 64 + 64 * 64 + 64 * 256 + 64
    assert a.bpw == pytest.approx(want * 8 / a.params)


def test_misfit_format_names_tensor_row_and_block():
    with pytest.raises(AllocationError, match=r"blk.0.attn_q.weight.*row length 64.*Q4_K block size 256"):
        Allocation.build("m", _specs(), {
            "token_embd.weight": "Q8_0", "blk.0.attn_q.weight": "Q4_K", "blk.0.ffn_down.weight": "Q4_K",
        })


def test_unknown_tensor_and_format_and_missing():
    base = {"token_embd.weight": "Q8_0", "blk.0.attn_q.weight": "Q4_0", "blk.0.ffn_down.weight": "Q4_K"}
    with pytest.raises(AllocationError, match="does not have: blk.9.attn_q.weight"):
        Allocation.build("m", _specs(), {**base, "blk.9.attn_q.weight": "Q4_0"})
    with pytest.raises(AllocationError, match="unknown format 'Q9_9'"):
        Allocation.build("m", _specs(), {**base, "blk.0.attn_q.weight": "Q9_9"})
    missing = dict(base)
    del missing["blk.0.attn_q.weight"]
    with pytest.raises(AllocationError, match="no format for tensor 'blk.0.attn_q.weight'"):
        Allocation.build("m", _specs(), missing)


def test_uniform_fallback_follows_llamacpp():
    a = Allocation.uniform("m", _specs(), "Q4_K", fallback=True)
    assert a.tensors == {
        "token_embd.weight": "Q5_0", "blk.0.attn_q.weight": "Q5_0", "blk.0.ffn_down.weight": "Q4_K",
    }
    with pytest.raises(AllocationError):
        Allocation.uniform("m", _specs(), "Q4_K")


def test_json_round_trip(tmp_path):
    specs = _specs()
    a = Allocation.uniform("m", specs, "Q8_0")
    path = a.save(tmp_path / "alloc.json")
    payload = json.loads(path.read_text())
    assert {"version", "model", "tensors", "bytes", "bpw"} <= set(payload)
    b = Allocation.load(path, specs, "m")
    assert b.tensors == a.tensors and b.bytes == a.bytes
    payload["version"] = 99
    path.write_text(json.dumps(payload))
    with pytest.raises(AllocationError, match="version 99"):
        Allocation.load(path, specs, "m")
    with pytest.raises(AllocationError, match="does not exist"):
        Allocation.load(tmp_path / "nope.json", specs, "m")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(AllocationError, match="not valid JSON"):
        Allocation.load(tmp_path / "bad.json", specs, "m")


def test_budget_validation_and_feasible_range():
    specs = _specs()
    lo, hi = feasible_range(specs)
    assert lo < hi
    assert Budget(max_bytes=lo).check_feasible(specs) == lo
    with pytest.raises(BudgetError, match=rf"feasible range is {lo}\.\.{hi} bytes"):
        Budget(max_bytes=lo - 1).check_feasible(specs)
    with pytest.raises(BudgetError, match="above the largest"):
        Budget(max_bytes=hi + 1).check_feasible(specs)
    with pytest.raises(BudgetError, match="exactly one"):
        Budget()
    with pytest.raises(BudgetError, match="exactly one"):
        Budget(target_bpw=4.0, max_bytes=100)
    with pytest.raises(BudgetError, match="target_bpw=-1"):
        Budget(target_bpw=-1)
    n = sum(s.numel for s in specs)
    assert Budget(target_bpw=5.0).limit_bytes(specs) == int(5.0 * n // 8)
