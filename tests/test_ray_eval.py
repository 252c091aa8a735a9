"""`lopt eval --ray ADDRESS`: the suite's tasks as tasks of a Ray cluster."""
import pytest

ray = pytest.importorskip("ray")

from learned_opt.meta_train.eval import evaluation


@pytest.mark.slow
def test_eval_on_ray_matches_in_process_and_keeps_the_suite_order(tmp_path):
  tasks = ["mlp_rgb32_synthetic", "mlp_wide_synthetic"]
  kwargs = dict(seeds=1, tasks=tasks, progress=False)
  if ray.is_initialized():  # a Ray left by another module: start this test's own
    ray.shutdown()
  ray.init(num_cpus=2, include_dashboard=False)
  try:
    on_ray = evaluation.evaluate_suite("heldout_offline", ["prodigy"], out_dir=str(tmp_path / "ray"),
                                       workers=2, ray_address="auto", **kwargs)
  finally:
    ray.shutdown()
  local = evaluation.evaluate_suite("heldout_offline", ["prodigy"], out_dir=str(tmp_path / "local"),
                                    **kwargs)
  assert list(on_ray["tasks"]) == list(local["tasks"]) == ["mlp_wide_synthetic", "mlp_rgb32_synthetic"]
  for name in tasks:
    ours, theirs = (r["tasks"][name]["optimizers"]["prodigy"] for r in (on_ray, local))
    assert ours["final_train_loss"] == pytest.approx(theirs["final_train_loss"], rel=1e-5)
    assert ours["final_train_loss"] < ours["initial_loss"]
