from learned_opt.meta_train import cli


def test_lopt_tasks_lists_families(capsys):
  assert cli.main(["tasks"]) == 0
  out = capsys.readouterr().out
  listed = [line.split()[0] for line in out.split("Families on named")[0].splitlines()[1:]]
  assert len(listed) >= 6 and "mlp_synthetic" in listed
  assert "Held-out evaluation suite" in out


def test_lopt_train_prints_a_falling_curve(capsys):
  assert cli.main(["train", "--task", "quadratic", "--steps", "100", "--lr", "0.05", "--points", "4"]) == 0
  lines = [l for l in capsys.readouterr().out.splitlines() if "mean loss" in l]
  means = [float(l.split("mean loss")[1].split()[0]) for l in lines]
  assert len(means) == 4 and means[-1] < 0.5 * means[0]


def test_lopt_bad_input_is_one_clear_line(capsys, tmp_path):
  assert cli.main(["train", "--task", "no_such_task"]) == 2
  err = capsys.readouterr().err
  assert "unknown task family 'no_such_task'" in err and "Traceback" not in err
  assert cli.main(["train", "--task", "mlp_mnist", "--data-dir", str(tmp_path)]) == 2
  assert "is not available" in capsys.readouterr().err
