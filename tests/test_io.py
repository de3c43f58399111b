"""autobits.io: the one atomic write and the output-folder check."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from autobits.io import OutputError, atomic_path, check_output_folder, write_atomic, write_json_atomic


def test_write_atomic_replaces_whole_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")
    write_json_atomic(target, {"x": 1})
    assert target.read_text() == '{\n  "x": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    mode = stat.S_IMODE(target.stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # a normal file's mode, not mkstemp's 0600


def test_failure_inside_keeps_the_old_file(tmp_path):
    target = tmp_path / "m.bin"
    target.write_bytes(b"old")

    def boom(fh):
        fh.write(b"half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_atomic(target, boom)
    assert target.read_bytes() == b"old" and sorted(tmp_path.iterdir()) == [target]


def test_check_output_folder(tmp_path):
    assert check_output_folder(tmp_path) == tmp_path
    assert list(tmp_path.iterdir()) == []  # the probe file is gone
    with pytest.raises(OutputError, match="does not exist"):
        check_output_folder(tmp_path / "nope")
    (tmp_path / "f").write_text("")
    with pytest.raises(OutputError, match="is a file, expected a folder"):
        check_output_folder(tmp_path / "f")
    # /proc refuses new files even to root, whatever its permission bits say
    with pytest.raises(OutputError, match="output folder '/proc' is not writable"):
        check_output_folder(Path("/proc"))


def test_an_unmakeable_temporary_names_the_target():
    with pytest.raises(OutputError, match="cannot write '/proc/x.gguf'"):
        with atomic_path("/proc/x.gguf"):
            pass
