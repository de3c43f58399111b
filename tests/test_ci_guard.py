"""The ``needs`` mechanism of conftest.py: a test whose dependency is missing is skipped, and
fails under ``CI=true`` (run on a generated test file with ``llama_cpp`` made unimportable)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ("pytester",)

_HIDE = 'import sys\nsys.modules["llama_cpp"] = None  # `import llama_cpp` raises ImportError\n'
_TESTS = '''
import pytest

@pytest.mark.needs("llama_cpp")
def test_needs_llama():
    import llama_cpp  # noqa: F401

pytestmark_cls = pytest.mark.needs("llama_cpp")

@pytestmark_cls
class TestJudge:
    def test_in_class(self):
        pass

def test_plain():
    pass
'''


@pytest.mark.parametrize("ci", ["true", "", "false"])
def test_missing_dependency_fails_only_under_ci(pytester, monkeypatch, ci):
    pytester.makeconftest(Path(__file__).with_name("conftest.py").read_text() + _HIDE)
    pytester.makepyfile(test_dep=_TESTS)
    monkeypatch.setenv("CI", ci)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    if ci == "true":
        result.assert_outcomes(passed=1, errors=2)
        result.stdout.fnmatch_lines(["*CI=true: llama-cpp-python*is missing*"])
        assert result.ret != 0
    else:
        result.assert_outcomes(passed=1, skipped=2)
        assert result.ret == 0


def test_unknown_dependency_name_is_an_error(pytester):
    pytester.makeconftest(Path(__file__).with_name("conftest.py").read_text())
    pytester.makepyfile(test_dep='import pytest\n\n@pytest.mark.needs("llama")\ndef test_a():\n    pass\n')
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*unknown dependency*"])


def test_qwen_is_skipped_under_ci_too(pytester, monkeypatch):
    """The qwen extra (1.1 GB) is not installed by CI: its tests skip there, not fail."""
    hide = ('import autobits.registry\n'
            'autobits.registry._QWEN_PARTS = [("autobits-no-such-piece", "x.bin")]\n')
    pytester.makeconftest(Path(__file__).with_name("conftest.py").read_text() + hide)
    pytester.makepyfile(test_dep='import pytest\n\n@pytest.mark.needs("qwen")\ndef test_q():\n    pass\n')
    monkeypatch.setenv("CI", "true")
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*needs the package 'autobits-no-such-piece'*"])
