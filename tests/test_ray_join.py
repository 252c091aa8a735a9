"""Joining a running Ray cluster as docs/ray.md says: `ray start --head`, then
`lopt meta-train ... --ray-address HOST:PORT --workers N`.

The head node is this test's own: its own HOME (so its own ~/.ray/auth_token), temp
dir and port, started with `ray start --block` in a new session and stopped by
signalling that session only (`ray stop` would stop every Ray on the machine, other
runs' included).
"""
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

pytest.importorskip("ray")

from flax import serialization

from learned_opt.meta_train.run import checkpoint as run_checkpoint

BIN = os.path.dirname(sys.executable)
QUICK = ["lopt.name=learned_lr", "lopt.options={}", "task.families=[quadratic]", "truncation.horizon=20",
         "estimator.unroll_length=5", "estimator.num_tasks=4", "outer.learning_rate=0.05",
         "outer.num_steps=3", "run.export=null", "run.tensorboard=false"]
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture
def head_node():
  """(port, environment of a user on the head's machine: HOME with the head's token,
  no RAY_AUTH_* set)."""
  # Short paths: Ray's unix sockets live under the temp dir (108-byte limit).
  root = tempfile.mkdtemp(prefix="lopt_join_")
  home = os.path.join(root, "home")
  os.makedirs(os.path.join(home, ".ray"))
  with open(os.path.join(home, ".ray", "auth_token"), "w") as f:
    f.write(uuid.uuid4().hex)   # `ray start --head` then requires this token
  env = {k: v for k, v in os.environ.items() if k not in AUTH_VARS}
  env["HOME"] = home
  port = _free_port()
  with open(os.path.join(root, "head.log"), "w") as out:
    head = subprocess.Popen(
        [os.path.join(BIN, "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={port}", f"--temp-dir={os.path.join(root, 'ray')}", "--num-cpus=2",
         "--include-dashboard=false", "--disable-usage-stats"],
        env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
  try:
    deadline = time.monotonic() + 120
    while True:
      assert head.poll() is None, open(os.path.join(root, "head.log")).read()
      try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        break
      except OSError:
        assert time.monotonic() < deadline, "the head node did not come up in 120 s"
        time.sleep(0.5)
    yield port, env, root
  finally:
    # SIGINT lets `ray start --block` shut its node down; the rest of its session
    # (raylet, GCS, workers, all in its process group) is killed after.
    head.send_signal(signal.SIGINT)
    try:
      head.wait(timeout=60)
    except subprocess.TimeoutExpired:
      pass
    try:
      os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass


def _meta_train(env, out, port):
  argv = [os.path.join(BIN, "lopt"), "meta-train", "--out", out, "--no-progress",
          "--ray-address", f"127.0.0.1:{port}", "--workers", "2"]
  return subprocess.run(argv + sum((["--set", s] for s in QUICK), []), env=env,
                        capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # ~1 min: a head node, two worker processes, their compiles
def test_documented_join_of_a_running_cluster_works(head_node):
  port, env, root = head_node
  out = os.path.join(root, "run")
  done = _meta_train(env, out, port)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "InvalidAuthToken" not in done.stderr and "Traceback" not in done.stderr
  step, path = run_checkpoint.latest_checkpoint(os.path.join(out, "checkpoints"))
  with open(path, "rb") as f:
    saved = serialization.msgpack_restore(f.read())
  assert step == 3 and int(saved["learner"]["step"]) == 3

  # Without the head's token the join fails in one line that says what to set.
  env = dict(env, RAY_AUTH_TOKEN_PATH=os.path.join(root, "missing"),
             HOME=os.path.join(root, "elsewhere"))
  failed = _meta_train(env, os.path.join(root, "run2"), port)
  assert failed.returncode == 2, failed.stderr[-3000:]
  assert "Traceback" not in failed.stderr
  error = [line for line in failed.stderr.splitlines() if line.startswith("lopt meta-train: error:")]
  assert len(error) == 1 and "could not join the Ray cluster" in error[0]
  assert "RAY_AUTH_TOKEN" in error[0]
