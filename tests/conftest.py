"""Shared fixtures. Real offline data is used when present, never downloaded."""
import os
import pathlib

import pytest

_REPO = pathlib.Path(__file__).resolve().parents[1]


def shared_data_dir() -> pathlib.Path | None:
  """$LOPT_TEST_DATA_DIR, else ../shared/data next to the checkout, else None."""
  for candidate in (os.environ.get("LOPT_TEST_DATA_DIR"), _REPO.parent / "shared" / "data"):
    if candidate and (pathlib.Path(candidate) / "mnist").is_dir():
      return pathlib.Path(candidate)
  return None


@pytest.fixture
def data_dir() -> pathlib.Path:
  path = shared_data_dir()
  if path is None:
    pytest.skip("real offline data not found (set LOPT_TEST_DATA_DIR to a folder with mnist/ and tinyshakespeare/)")
  return path
