"""The test suite's own guard: a stale SLOW_CASES id stops the run instead of silently
sending a slow case back to the default run."""
import types

import pytest

import conftest


def _items(*nodeids):
  return [types.SimpleNamespace(nodeid=n) for n in nodeids]


def _config(*args):
  return types.SimpleNamespace(args=list(args))


def test_a_renamed_slow_case_stops_the_run_and_is_named(monkeypatch):
  monkeypatch.setattr(conftest, "SLOW_CASES", frozenset(["tests/test_x.py::test_f[old]"]))
  with pytest.raises(pytest.UsageError, match=r"tests/test_x.py::test_f\[old\]"):
    conftest._check_slow_cases(_config("tests"), _items("tests/test_x.py::test_f[new]"))
  # A whole file collected: a case of a function no longer in it is stale too.
  with pytest.raises(pytest.UsageError, match="test_gone"):
    monkeypatch.setattr(conftest, "SLOW_CASES", frozenset(["tests/test_x.py::test_gone[a]"]))
    conftest._check_slow_cases(_config("tests/test_x.py"), _items("tests/test_x.py::test_f[a]"))


def test_cases_outside_the_selection_and_present_cases_pass(monkeypatch):
  monkeypatch.setattr(conftest, "SLOW_CASES", frozenset(["tests/test_x.py::test_f[a]",
                                                         "tests/test_y.py::test_g[b]"]))
  conftest._check_slow_cases(_config("tests"), _items("tests/test_x.py::test_f[a]"))
  # A run narrowed to one node id does not judge the file's other functions.
  conftest._check_slow_cases(_config("tests/test_y.py::test_h"), _items("tests/test_y.py::test_h"))


def test_every_listed_slow_case_exists_in_the_full_collection():
  # The real list against the real suite is checked by every full run (the hook raises);
  # here, at least, every listed file exists and ids are well formed.
  import pathlib
  root = pathlib.Path(conftest.__file__).parent.parent
  for case in conftest.SLOW_CASES:
    file, _, rest = case.partition("::")
    assert (root / file).is_file() and rest.startswith("test_") and rest.endswith("]"), case
