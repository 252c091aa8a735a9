"""`learned_opt._atomic.write_atomic`: whole or nothing, shareable, no temp left behind."""
import os

import pytest

from learned_opt._atomic import write_atomic


def test_writes_bytes_and_text_readable_by_others(tmp_path):
  path = tmp_path / "a.json"
  assert write_atomic(path, "{\"x\": 1}") == str(path)
  assert path.read_text() == "{\"x\": 1}"
  write_atomic(path, b"\x00\x01")
  assert path.read_bytes() == b"\x00\x01"
  assert os.stat(path).st_mode & 0o777 == 0o644  # mkstemp's 0600 would hide a report
  assert os.listdir(tmp_path) == ["a.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
  path = tmp_path / "ckpt.bin"
  write_atomic(path, b"old")

  with pytest.raises(TypeError):
    write_atomic(path, 12345)  # not bytes or str: fails while writing the temp file
  assert path.read_bytes() == b"old"
  assert sorted(os.listdir(tmp_path)) == ["ckpt.bin"]


def test_temp_files_carry_the_given_prefix(tmp_path, monkeypatch):
  seen = []
  real_replace = os.replace

  def spy(src, dst):
    seen.append(os.path.basename(src))
    return real_replace(src, dst)

  monkeypatch.setattr(os, "replace", spy)
  write_atomic(tmp_path / "x", b"1", prefix=".tmp_ckpt_")
  write_atomic(tmp_path / "y", b"1")
  assert seen[0].startswith(".tmp_ckpt_") and seen[1].startswith(".y.")
