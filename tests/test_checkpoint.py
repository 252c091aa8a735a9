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
  n = struct.unpack("<I", blob[8:12])[0]
  header = json.loads(blob[12:12 + n])
  edit(header)
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
