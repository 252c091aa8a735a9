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


# Parametrized cases measured at >= 3.5 s on an idle 2-core machine: CI runs them in its
# second pass (`pytest -m slow`); the functions' other cases stay in the default run.
# (Whole slow functions carry @pytest.mark.slow where they are defined.)
SLOW_CASES = frozenset([
    "tests/test_checkpoint.py::test_round_trip_gives_identical_updates[hierarchical]",
    "tests/test_compile.py::test_per_param_update_same_with_and_without_ynn[mlp]",
    "tests/test_fused.py::test_hierarchical_matches_xla[config0]",
    "tests/test_fused.py::test_per_param_mlp_matches_xla[config0]",
    "tests/test_lopt_architectures.py::test_finite_on_huge_zero_and_nan_gradients[hierarchical]",
    "tests/test_lopt_architectures.py::test_finite_on_huge_zero_and_nan_gradients[lstm]",
    "tests/test_lopt_architectures.py::test_jitted_update_does_not_recompile[hierarchical]",
    "tests/test_lopt_architectures.py::test_params_and_state_can_be_donated[lstm]",
    "tests/test_lopt_architectures.py::test_params_and_state_can_be_donated[mlp]",
    "tests/test_lopt_architectures.py::test_same_seed_same_meta_params_and_vmappable[lstm]",
    "tests/test_lopt_mup.py::test_mup_keeps_hidden_output_change_constant_across_width[<lambda>-2.0]",
    "tests/test_lopt_mup.py::test_mup_keeps_hidden_output_change_constant_across_width[<lambda>-4.0]",
    "tests/test_meta_robustness.py::test_blown_up_tasks_do_not_poison_the_estimate[PES]",
    "tests/test_meta_robustness.py::test_blown_up_tasks_do_not_poison_the_estimate[TruncatedES]",
    "tests/test_nominal_adam.py::test_zero_output_layer_is_exactly_adam[mlp]",
    "tests/test_ray_pool.py::test_killed_worker_resumes_exactly_and_logs_one_line[False-2]",
    "tests/test_ray_pool.py::test_killed_worker_resumes_exactly_and_logs_one_line[True-100]",
    "tests/test_saferate.py::test_narrow_params_bound_in_float32_and_loss_in_float32_never_increases[bfloat16-adam]",
    "tests/test_shipped_quality.py::test_hierarchical_hd_is_within_2x_of_tuned_adam[mlp_rgb32_synthetic]",
    "tests/test_tasks.py::test_adam_lowers_loss_by_30_percent_in_200_steps[logreg_synthetic]",
    "tests/test_tasks.py::test_adam_lowers_loss_by_30_percent_in_200_steps[mlp_mnist]",
    "tests/test_tasks.py::test_adam_lowers_loss_by_30_percent_in_200_steps[mlp_synthetic]",
    "tests/test_tasks.py::test_heldout_suite_tasks_build_with_finite_loss[lstm_tiny_shakespeare]",
    "tests/test_tasks.py::test_heldout_suite_tasks_build_with_finite_loss[mlp_wide_synthetic]",
    "tests/test_tasks.py::test_heldout_suite_tasks_build_with_finite_loss[transformer_tiny_shakespeare]",
    "tests/test_tasks.py::test_heldout_suite_tasks_build_with_finite_loss[transformer_wide_synthetic]",
    "tests/test_tasks.py::test_vmapped_step_over_8_sampled_configs_compiles_once[logreg_synthetic]",
    "tests/test_tasks.py::test_vmapped_step_over_8_sampled_configs_compiles_once[mlp_synthetic]",
    "tests/test_tasks.py::test_vmapped_step_over_8_sampled_configs_compiles_once[quadratic]",
])


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
  # Under pytest-xdist (`-n`), tests that start Ray clusters share one worker: two local
  # clusters at once on a 2-core machine only slow each other down.
  _check_slow_cases(config, items)
  for item in items:
    if item.path.name.startswith("test_ray_"):
      item.add_marker(pytest.mark.xdist_group("ray"))
    if item.nodeid in SLOW_CASES:
      item.add_marker(pytest.mark.slow)


def _check_slow_cases(config, items) -> None:
  """A `SLOW_CASES` id that names no collected test (a renamed case or parameter) would
  silently send that case back to the default run: refuse to run instead. Checked for
  the functions collected, and for whole files when no node id narrows the run."""
  ids = {item.nodeid for item in items}
  functions = {i.split("[")[0] for i in ids}
  whole = not any("::" in str(a) for a in config.args)
  files = {i.split("::")[0] for i in ids} if whole else set()
  stale = sorted(c for c in SLOW_CASES
                 if c not in ids and (c.split("[")[0] in functions or c.split("::")[0] in files))
  if stale:
    raise pytest.UsageError("tests/conftest.py SLOW_CASES names tests that were not collected "
                            f"(renamed?): {', '.join(stale)}; update the list")
