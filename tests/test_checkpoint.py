"""The .lopt format: round trips give identical updates; bad files fail clearly."""
import json
import struct

import jax
import jax.numpy as jnp
import pytest

from learned_opt import meta_train
import learned_opt as lo
from learned_opt import checkpoint

ARCHS = [lo.LearnedLR(direction="adam"),
         lo.PerParamMLP(hidden_sizes=(8, 8), features=("grad", "momentum", "adafactor", "loss")),
         lo.PerParamLSTM(hidden_size=4, mup=True),
         lo.HierarchicalLOpt(num_mlps=2, features=("grad", "muon", "train_frac"))]


@jax.jit
def _updates(lopt, theta):
  """Two jitted steps; a loaded optimizer equal to the saved one reuses the compilation."""
  params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(4, 3), "b": jnp.zeros((3,))}
  grads = jax.tree.map(lambda p: jnp.cos(3.0 * p) + 0.1, params)
  state = lopt.init(theta, params, num_steps=10)
  out = []
  for _ in range(2):
    u, state = lopt.update(theta, grads, state, params, loss=jnp.float32(1.5), key=jax.random.key(0))
    out.append(u)
  return out


@pytest.mark.parametrize("lopt", ARCHS, ids=lambda l: l.name)
def test_round_trip_gives_identical_updates(tmp_path, lopt):
  theta = lopt.init_meta_params(jax.random.key(1))
  info = {"config": {"lr": 1e-3}, "code_version": "abc123", "meta_steps": 17}
  path = tmp_path / "opt.lopt"
  lo.save(path, lopt, theta, info)
  lopt2, theta2, info2 = lo.load(path)
  assert lopt2 == lopt and info2 == info
  for a, b in zip(_updates(lopt, theta), _updates(lopt2, theta2)):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      assert bool(jnp.array_equal(x, y))
  header = lo.read_header(path)
  assert header["features"] == list(lopt.feature_names())
  assert header["architecture"] == lopt.name and header["format_version"] == checkpoint.FORMAT_VERSION
  assert path.read_bytes().find(b"pickle") == -1


def _saved(tmp_path):
  lopt = lo.PerParamMLP(hidden_sizes=(4,), features=("grad",))
  path = tmp_path / "x.lopt"
  lo.save(path, lopt, lopt.init_meta_params(jax.random.key(0)), {"meta_steps": 1})
  return path, path.read_bytes()


def _rewrite_header(blob, edit):
  """The file with its header edited and signed again (as a writer that put these values
  there would), so what is tested is the value, not the digest."""
  n = struct.unpack("<I", blob[8:12])[0]
  header = json.loads(blob[12:12 + n])
  edit(header)
  if "content_sha256" in header:
    header["content_sha256"] = checkpoint._content_digest(header, blob[12 + n:])
  h = json.dumps(header).encode()
  return blob[:8] + struct.pack("<I", len(h)) + h + blob[12 + n:]


@pytest.mark.parametrize("corrupt,match", [
    (lambda b: b"NOTLOPT!" + b[8:], "not a lopt checkpoint"),
    (lambda b: b[:10], "truncated"),
    (lambda b: b[:-5] + bytes(5), "SHA-256"),
    (lambda b: b[:12] + b"X" + b[13:], "corrupt JSON header"),
    (lambda b: _rewrite_header(b, lambda h: h.update(format_version=99)), "format version 99"),
    (lambda b: _rewrite_header(b, lambda h: h.update(architecture="exec")), "architecture 'exec'"),
    (lambda b: _rewrite_header(b, lambda h: h["config"].update(hidden_sizes=[5])), "shape"),
    (lambda b: _rewrite_header(b, lambda h: h["config"].update(bogus=1)), "unknown keys"),
    (lambda b: _rewrite_header(b, lambda h: h.update(features=["param"])), "feature list"),
])
def test_bad_files_raise_clear_errors(tmp_path, corrupt, match):
  path, blob = _saved(tmp_path)
  path.write_bytes(corrupt(blob))
  with pytest.raises(checkpoint.CheckpointError, match=match):
    lo.load(path)


def test_save_rejects_mismatched_weights_and_bad_info(tmp_path):
  lopt = lo.PerParamMLP(hidden_sizes=(4,), features=("grad",))
  theta = lopt.init_meta_params(jax.random.key(0))
  wrong = dict(theta, w_param=jnp.zeros((3, 4)))
  with pytest.raises(checkpoint.CheckpointError, match="w_param"):
    lo.save(tmp_path / "a.lopt", lopt, wrong)
  with pytest.raises(ValueError, match="JSON"):
    lo.save(tmp_path / "b.lopt", lopt, theta, {"x": object()})
  assert not list(tmp_path.iterdir())  # nothing half-written


def test_pretrained_listing_and_loading(tmp_path, monkeypatch):
  lopt = lo.LearnedLR(init_lr=0.25)
  lo.save(tmp_path / "tiny_sgd.lopt", lopt, lopt.init_meta_params(None), {"meta_steps": 0})
  monkeypatch.setattr(checkpoint, "_pretrained_dir", lambda: tmp_path)
  assert lo.list_pretrained() == ["tiny_sgd"]
  tx = lo.load_pretrained("tiny_sgd")
  params = {"w": jnp.ones((2,))}
  u, _ = tx.update({"w": jnp.array([1.0, 2.0])}, tx.init(params), params)
  assert jnp.allclose(u["w"], jnp.array([-0.25, -0.5]))
  with pytest.raises(ValueError, match="available: \\['tiny_sgd'\\]"):
    lo.load_pretrained("nope")


def test_shipped_checkpoints_load():
  for name in lo.list_pretrained():
    lopt, theta, info = lo.load(lo.pretrained_path(name))
    assert isinstance(lopt, lo.LearnedOptimizer)


@pytest.mark.slow  # ~10 s: two shipped optimizers x 150 steps
def test_shipped_optimizers_train_a_task():
  """Every shipped optimizer, loaded as optax, cuts a held-in task's loss by half."""
  import jax

  from learned_opt import tasks
  task = tasks.get_family("logreg_synthetic").task()
  for name in lo.list_pretrained():
    result = meta_train.train(task, lo.load_pretrained(name, num_steps=150), num_steps=150,
                         key=jax.random.key(0))
    first, last = float(result.losses[0]), float(result.final_loss)
    assert jnp.isfinite(last) and last < 0.5 * first, (name, first, last)


# ---- integrity of the whole file (format version 2) ------------------------------------
def _step_mult_file(tmp_path):
  lopt = lo.PerParamMLP(hidden_sizes=(4,), features=("grad",), step_mult=0.001)
  path = tmp_path / "s.lopt"
  lo.save(path, lopt, lopt.init_meta_params(jax.random.key(0)), {"meta_steps": 3})
  return path, path.read_bytes()


def test_a_flipped_header_byte_fails_to_load(tmp_path):
  """Header values are covered: 0.001 -> 0.011 in step_mult is caught, not loaded."""
  path, blob = _step_mult_file(tmp_path)
  assert blob.count(b'"step_mult": 0.001') == 1
  path.write_bytes(blob.replace(b'"step_mult": 0.001', b'"step_mult": 0.011'))
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"s\.lopt is corrupt: its header does not match content_sha256.*weights are intact"):
    lo.load(path)
  with pytest.raises(checkpoint.CheckpointError, match="content_sha256"):
    lo.read_header(path)
  # Also in info, which nothing else checks, and a byte of the weights.
  path.write_bytes(blob.replace(b'"meta_steps": 3', b'"meta_steps": 8'))
  with pytest.raises(checkpoint.CheckpointError, match="header does not match content_sha256"):
    lo.load(path)
  path.write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))
  with pytest.raises(checkpoint.CheckpointError, match="the weights' SHA-256 .* does not match"):
    lo.load(path)
  path.write_bytes(_rewrite_header(blob, lambda h: h.pop("content_sha256")))
  with pytest.raises(checkpoint.CheckpointError, match="lacks 'content_sha256' \\(format version 2"):
    lo.load(path)
  path.write_bytes(blob)
  assert lo.load(path)[0].step_mult == 0.001


def test_version_1_files_still_load(tmp_path):
  """A v1 file (weights hash only, like the shipped ones) loads; its header is not covered."""
  path, blob = _step_mult_file(tmp_path)

  def to_v1(h):
    h.pop("content_sha256")
    h["format_version"] = 1
  v1 = _rewrite_header(blob, to_v1)
  path.write_bytes(v1)
  lopt, _, info = lo.load(path)
  assert lopt.step_mult == 0.001 and info == {"meta_steps": 3}
  assert lo.read_header(path)["format_version"] == 1
  path.write_bytes(v1[:-1] + bytes([v1[-1] ^ 1]))
  with pytest.raises(checkpoint.CheckpointError, match="weights' SHA-256"):
    lo.load(path)


def test_shipped_v1_checkpoints_resave_as_v2_identically(tmp_path):
  """Re-saving a shipped (v1) file from its loaded contents gives a v2 file with the same
  weights bytes (so the same weights_sha256, eval's cache key), features and info, an
  equivalent config, and bit-identical meta-parameters."""
  for name in lo.list_pretrained():
    src = lo.pretrained_path(name)
    old = lo.read_header(src)
    lopt, theta, info = lo.load(src)
    lo.save(tmp_path / f"{name}.lopt", lopt, theta, info)
    new = lo.read_header(tmp_path / f"{name}.lopt")
    assert new["format_version"] == 2 and "content_sha256" in new
    for key in ("weights_sha256", "features", "info", "architecture"):
      assert new[key] == old[key], (name, key)
    # The config is written in today's form (some shipped headers hold an older one,
    # e.g. nominal: "adam" for {"kind": "adam"}); both build the same optimizer.
    cls = checkpoint.ARCHITECTURES[old["architecture"]]
    assert cls.from_config(new["config"]) == cls.from_config(old["config"]) == lopt
    lopt2, theta2, _ = lo.load(tmp_path / f"{name}.lopt")
    assert lopt2 == lopt
    for a, b in zip(jax.tree.leaves(theta), jax.tree.leaves(theta2)):
      assert a.dtype == b.dtype and bool(jnp.array_equal(a, b))


# ---- paths that are not files ---------------------------------------------------------
def test_missing_path_and_directory_are_named(tmp_path):
  missing = tmp_path / "nope.lopt"
  with pytest.raises(checkpoint.CheckpointNotFoundError, match=r"no such file: .*nope\.lopt; expected a \.lopt file"):
    lo.load(missing)
  with pytest.raises(FileNotFoundError):  # what load raised before: callers catching it still do
    lo.read_header(missing)
  with pytest.raises(checkpoint.CheckpointError, match=r"is a directory; expected a \.lopt file"):
    lo.load(tmp_path)
  with pytest.raises(ValueError, match="is a directory"):
    lo.read_header(tmp_path)


def test_save_leaves_no_temp_file_and_names_it_after_the_target(tmp_path, monkeypatch):
  """A failed write removes its temp file; the temp name starts with '.<target>.'."""
  import os
  seen = []
  real_replace = os.replace

  def failing_replace(src, dst):
    seen.append(os.path.basename(src))
    raise OSError("disk full")
  monkeypatch.setattr(os, "replace", failing_replace)
  lopt = lo.LearnedLR()
  with pytest.raises(OSError, match="disk full"):
    lo.save(tmp_path / "x.lopt", lopt, lopt.init_meta_params(None))
  monkeypatch.setattr(os, "replace", real_replace)
  assert seen and seen[0].startswith(".x.lopt.") and seen[0].endswith(".tmp")
  assert not list(tmp_path.iterdir())
