"""The bounded GGUF header pre-scan: a valid file passes with gguf-py's counts; crafted counts
(huge arrays, strings, tensor or key counts), unknown types and every truncation fail in
milliseconds with a ModelLoadError naming the file and the field."""

from __future__ import annotations

import struct
import time

import gguf
import numpy as np
import pytest

from autobits.errors import ModelLoadError
from autobits.gguf_scan import LIMITS, GGUFSource, scan_gguf_header
from autobits.model import read_gguf_header


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A small valid GGUF: scalars, a string, a string array, an int array, two tensors."""
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_string("test.note", "hello")
    w.add_array("test.tokens", ["a", "bb", "ccc"])
    w.add_array("test.scores", [1.0, 2.0, 3.0, 4.0])
    w.add_tensor("token_embd.weight", np.ones((4, 32), np.float32))
    w.add_tensor("output_norm.weight", np.ones(32, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _gguf_py_view(path):
    """What gguf-py reads of a header, in read_gguf_header's terms."""
    reader = gguf.GGUFReader(path)
    meta = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        t = f.types[0]
        if t == gguf.GGUFValueType.STRING:
            meta[key] = bytes(f.parts[f.data[0]]).decode("utf-8", "replace")
        elif t == gguf.GGUFValueType.ARRAY:
            meta[key] = f"<array of {len(f.data)}>"
        else:
            meta[key] = f.parts[f.data[0]].tolist()[0]
    tensors = {t.name: (tuple(int(x) for x in reversed(t.shape.tolist())), t.tensor_type.name)
               for t in reader.tensors}
    return meta, tensors, reader


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_header_reads_what_gguf_py_reads(tiny_gguf, smol_path, which):
    path = tiny_gguf if which == "tiny" else smol_path
    meta, tensors, reader = _gguf_py_view(path)
    if which == "tiny":
        info_meta, info_tensors = scan_gguf_header(path).metadata, None
    else:
        info = read_gguf_header(path)
        info_meta, info_tensors = info.metadata, info.tensors
        assert info_tensors == tensors and info.architecture == "llama"
    assert info_meta == meta
    assert {k: type(v) for k, v in info_meta.items()} == {k: type(v) for k, v in meta.items()}
    # arrays named are kept whole: strings as str, numbers as NumPy arrays
    keys = [k for k, f in reader.fields.items() if f.types and f.types[0] == gguf.GGUFValueType.ARRAY]
    kept = scan_gguf_header(path, arrays=keys).metadata
    for k in keys:
        want = reader.fields[k].contents()
        got = kept[k]
        assert (got if isinstance(got, list) else got.tolist()) == want, k


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_source_copies_what_gguf_py_reads(tiny_gguf, smol_path, tmp_path, which):
    """GGUFSource (the copying side of stand-ins and exports): the same key/values, types
    and tensor views as gguf-py's reader, and a copy of the key/values reads back equal."""
    path = tiny_gguf if which == "tiny" else smol_path
    reader = gguf.GGUFReader(path)
    src = GGUFSource(path)
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert [k for k, *_ in src.kv] == list(fields)
    for key, value, vtype, sub in src.kv:
        f = fields[key]
        assert vtype == f.types[0] and sub == (f.types[1] if len(f.types) > 1 else None)
        want = f.contents()
        if vtype == gguf.GGUFValueType.STRING:
            assert value.decode("utf-8") == want
        elif vtype == gguf.GGUFValueType.ARRAY:
            got = [v.decode("utf-8") for v in value] if isinstance(value, list) else value.tolist()
            assert got == want, key
        else:
            assert value == want and type(value) is type(want), key
    assert [t.name for t in src.tensors] == [t.name for t in reader.tensors]
    for ours, theirs in zip(src.tensors, reader.tensors):
        assert ours.tensor_type == theirs.tensor_type and ours.n_bytes == theirs.n_bytes
        assert ours.shape.tolist() == theirs.shape.tolist()
        assert ours.data.dtype == theirs.data.dtype and ours.data.shape == theirs.data.shape
        np.testing.assert_array_equal(ours.data, theirs.data)
    out = tmp_path / "copy.gguf"
    w = gguf.GGUFWriter(str(out), src.architecture)
    assert src.copy_kv(w, skip={"general.architecture"}) == len(src.kv) - 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    again = {k: f.contents() for k, f in gguf.GGUFReader(out).fields.items() if not k.startswith("GGUF.")}
    assert again == {k: f.contents() for k, f in fields.items()}


def _patched(src, dst, key: bytes, offset: int, fmt: str, value: int):
    """``src`` with ``value`` packed at ``offset`` bytes after the end of metadata ``key``."""
    data = bytearray(src.read_bytes())
    at = data.index(key) + len(key) + offset
    struct.pack_into(fmt, data, at, value)
    dst.write_bytes(bytes(data))
    return dst


def test_valid_file_scans_with_gguf_counts(tiny_gguf):
    head = scan_gguf_header(tiny_gguf)
    reader = gguf.GGUFReader(tiny_gguf)
    assert head.version == 3 and head.tensor_count == len(reader.tensors) == 2
    assert head.kv_count == len(reader.fields) - 3  # gguf-py lists the 3 header fields too
    assert head.alignment == 32 and head.header_bytes <= tiny_gguf.stat().st_size


@pytest.mark.parametrize("case", [
    # (metadata key, bytes after the key, struct format, value, what the message names)
    ("test.tokens", 8, "<Q", 1 << 60, "'test.tokens' (string array): count"),   # array count
    ("test.scores", 8, "<Q", (1 << 28) - 1, "'test.scores' (float32 array): count"),
    ("test.note", 4, "<Q", 1 << 40, "'test.note': count"),                      # string length
    ("test.tokens", 4, "<I", 77, "unknown array item type 77"),
    ("test.note", 0, "<I", 99, "unknown value type 99"),
])
def test_crafted_metadata_counts_fail_fast(tiny_gguf, tmp_path, case):
    key, offset, fmt, value, field = case
    bad = _patched(tiny_gguf, tmp_path / "bad.gguf", key.encode(), offset, fmt, value)
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError) as e:
        scan_gguf_header(bad)
    assert time.perf_counter() - t0 < 0.5
    msg = str(e.value)
    assert str(bad) in msg and field in msg and "\n" not in msg
    # the model loader runs the scan before gguf-py sees the file
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError, match="corrupt GGUF file") as e2:
        read_gguf_header(bad)
    assert time.perf_counter() - t0 < 0.5 and field in str(e2.value)


@pytest.mark.parametrize("where,value,field", [
    (8, 1 << 62, "tensor count"), (16, 1 << 62, "metadata count"),
    (8, LIMITS["tensors"] + 1, "exceeds the limit"),
])
def test_crafted_header_counts_fail_fast(tiny_gguf, tmp_path, where, value, field):
    data = bytearray(tiny_gguf.read_bytes())
    struct.pack_into("<Q", data, where, value)
    (tmp_path / "bad.gguf").write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=field):
        scan_gguf_header(tmp_path / "bad.gguf")


def test_every_truncation_and_byte_flip_is_a_model_load_error(tiny_gguf, tmp_path):
    """Cut the header anywhere, or flip any header byte: ModelLoadError or a clean pass."""
    data = tiny_gguf.read_bytes()
    end = scan_gguf_header(tiny_gguf).header_bytes
    bad = tmp_path / "cut.gguf"
    t0 = time.perf_counter()
    for n in range(1, end):
        bad.write_bytes(data[:n])
        with pytest.raises(ModelLoadError):
            scan_gguf_header(bad)
    rng = np.random.default_rng(0)
    for i in range(end):
        flipped = bytearray(data)
        flipped[i] ^= int(rng.integers(1, 256))
        bad.write_bytes(bytes(flipped))
        try:
            scan_gguf_header(bad)
        except ModelLoadError:
            pass
    assert time.perf_counter() - t0 < 30


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="is empty"):
        scan_gguf_header(tmp_path / "empty.gguf")
    with pytest.raises(ModelLoadError, match="cannot read"):
        scan_gguf_header(tmp_path / "missing.gguf")
