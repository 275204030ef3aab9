"""The command line, as a user meets it: help, bad flags, a dry run, predict, no tracebacks."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import mnist_jax
from conftest import ROOT
from mnist_jax import Config


def run_cli(*args, cwd=None, env=None):
    """Run the CLI in a subprocess; `env` adds variables, or removes those it maps to None."""
    full_env = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    return subprocess.run([sys.executable, str(ROOT / "mnist_jax.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=full_env, timeout=300)


def test_help_lists_every_flag_with_its_default():
    result = run_cli("--help", env={"MNIST_DATA_DIR": None})
    assert result.returncode == 0
    for flag in ("--data-dir", "--out", "--epochs", "--batch-size", "--lr", "--momentum", "--hidden", "--activation",
                 "--seed", "--model", "--batchnorm", "--dropout", "--weight-decay", "--grad", "--no-plots",
                 "--dry-run"):
        assert flag in result.stdout
    help_text = " ".join(result.stdout.split())
    assert help_text.count("(default:") >= 16 and "(default: 512,512)" in help_text
    assert "(default: data)" in help_text


def test_env_changes_the_data_dir_default():
    result = run_cli("--help", env={"MNIST_DATA_DIR": "/somewhere/mnist"})
    assert "/somewhere/mnist" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--epochs", "-1"], "--epochs: must be a positive whole number"),
    (["--hidden", "abc"], "--hidden: must be positive whole numbers"),
    (["--hidden", "128,0"], "--hidden"),
    (["--lr", "0"], "--lr: must be a positive number"),
    (["--momentum", "1.5"], "--momentum"),
    (["--activation", "sigmoid"], "invalid choice"),
    (["--model", "transformer"], "invalid choice"),
    (["--seed", "-1"], "--seed: must be a whole number from 0 to 4294967295"),  # NumPy's shuffler: no negatives
    (["--seed", str(2**63)], "--seed: must be a whole number from 0 to 4294967295"),  # jax.random.key: no huge ones
])
def test_invalid_values_are_argparse_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        mnist_jax.main(args)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_import_does_nothing(tmp_path):
    code = "import time; t = time.time(); import mnist_jax; print(time.time() - t)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert list(tmp_path.iterdir()) == []  # no data/, no runs/, nothing written
    assert float(result.stdout) < 20


def test_dry_run_trains_saves_and_plots(mnist_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert mnist_jax.main(["--data-dir", str(mnist_dir), "--out", str(out), "--dry-run", "--hidden", "32"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("test accuracy: 0.") and len(lines[-1]) == len("test accuracy: 0.1234")
    assert any(line.startswith("epoch   1 ") for line in lines) and not any("epoch   2" in l for l in lines)
    assert any("compile" in line and "per epoch" in line for line in lines)
    assert any(line.startswith("macro") for line in lines)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["hidden"] == [32] and len(metrics["epochs"]) == 1
    assert len(metrics["precision"]) == len(metrics["recall"]) == len(metrics["f1"]) == 10
    assert np.array(metrics["confusion_matrix"]).shape == (10, 10) and 0 <= metrics["macro_f1"] <= 1
    for name in ("params.npz", "curves.png", "predictions.png", "confusion.png", "first_layer.png"):
        assert (out / name).stat().st_size > 0, name


def test_cnn_dry_run_plots_its_kernels(mnist_dir, tmp_path):
    out = tmp_path / "out"
    assert mnist_jax.main(["--data-dir", str(mnist_dir), "--out", str(out), "--dry-run", "--model", "cnn-small"]) == 0
    with Image.open(out / "first_layer.png") as picture:
        assert picture.width > 100


def test_no_plots(mnist_dir, tmp_path):
    out = tmp_path / "out"
    assert mnist_jax.main(["--data-dir", str(mnist_dir), "--out", str(out), "--dry-run", "--no-plots"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "params.npz"]


def test_user_errors_exit_nonzero_without_traceback(tmp_path):
    broken = tmp_path / "data"
    broken.mkdir()
    (broken / "train-images-idx3-ubyte.gz").write_bytes(b"<html>not found</html>")
    result = run_cli("--data-dir", broken, "--out", tmp_path / "o")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "train-images-idx3-ubyte.gz is an HTML page" in result.stderr
    result = run_cli("predict", tmp_path / "missing.png", "--params", tmp_path / "none.npz")
    assert result.returncode == 1 and "Traceback" not in result.stderr and "no checkpoint at" in result.stderr


def test_out_must_be_a_folder(mnist_dir, tmp_path, capsys):
    (tmp_path / "taken").write_text("a file of the user's")
    code = mnist_jax.main(["--data-dir", str(mnist_dir), "--out", str(tmp_path / "taken"), "--dry-run"])
    assert code == 1 and "is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "taken").read_text() == "a file of the user's"


def test_divergence_exits_nonzero(mnist_dir, tmp_path, capsys):
    code = mnist_jax.main(["--data-dir", str(mnist_dir), "--out", str(tmp_path), "--dry-run", "--lr", "1e30",
                           "--momentum", "0"])
    err = capsys.readouterr().err
    assert code == 1 and "diverged in epoch 1" in err and "smaller learning rate" in err


def test_ctrl_c_keeps_the_last_epoch(mnist_dir, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(mnist_jax, "train", interrupted)
    assert mnist_jax.main(["--data-dir", str(mnist_dir), "--out", str(tmp_path), "--dry-run"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_predict_command_prints_digits_and_saves_steps(mnist_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert mnist_jax.main(["--data-dir", str(mnist_dir), "--out", str(out), "--dry-run", "--no-plots"]) == 0
    digit = np.zeros((40, 40), np.uint8)
    digit[10:30, 18:23] = 255
    Image.fromarray(255 - digit).save(tmp_path / "one.png")
    capsys.readouterr()
    assert mnist_jax.main(["predict", str(tmp_path / "one.png"), "--params", str(out / "params.npz"), "--show",
                           "--show-dir", str(tmp_path / "shown")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{tmp_path / 'one.png'}: ") and lines[0].count(": 0.") == 3  # top three probabilities
    assert (tmp_path / "shown" / "one_steps.png").stat().st_size > 0


def test_predict_command_bad_image_is_a_clear_error(mnist_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert mnist_jax.main(["--data-dir", str(mnist_dir), "--out", str(out), "--dry-run", "--no-plots"]) == 0
    Image.fromarray(np.full((30, 30), 255, np.uint8)).save(tmp_path / "blank.png")
    assert mnist_jax.main(["predict", str(tmp_path / "blank.png"), "--params", str(out / "params.npz")]) == 1
    err = capsys.readouterr().err
    assert "looks blank" in err and "blank.png" in err  # the message names the file, for a command given several


def test_predict_show_keeps_files_it_did_not_write(mnist_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert mnist_jax.main(["--data-dir", str(mnist_dir), "--out", str(out), "--dry-run", "--no-plots"]) == 0
    digit = np.zeros((40, 40), np.uint8)
    digit[10:30, 18:23] = 255
    for folder in ("a", "b"):  # two photos with the same name in different folders
        (tmp_path / folder).mkdir()
        Image.fromarray(255 - digit).save(tmp_path / folder / "one.png")
    shown = tmp_path / "shown"
    shown.mkdir()
    (shown / "one_steps.png").write_bytes(b"the user's own file")

    def predict():
        assert mnist_jax.main(["predict", str(tmp_path / "a" / "one.png"), str(tmp_path / "b" / "one.png"),
                               "--params", str(out / "params.npz"), "--show", "--show-dir", str(shown)]) == 0
        return sorted(p.name for p in shown.iterdir())

    assert predict() == ["one_steps-2.png", "one_steps-3.png", "one_steps.png"]
    assert (shown / "one_steps.png").read_bytes() == b"the user's own file"
    # Run again: its own pictures are replaced, not piled up, and the user's file is still kept.
    assert predict() == ["one_steps-2.png", "one_steps-3.png", "one_steps.png"]
    assert (shown / "one_steps.png").read_bytes() == b"the user's own file"
    assert "one_steps-3.png" in capsys.readouterr().out


def foreign_png(path):
    """A real PNG, as another program (or an older mnist_jax) would save it: no mnist_jax tag."""
    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(path, pnginfo=None)


@pytest.mark.parametrize("name, make", [
    ("params.npz", lambda p: np.savez(p, weights=np.ones(3))),
    ("metrics.json", lambda p: p.write_text('{"config": {"hidden": [5]}, "epochs": 3, "notes": "mine"}')),
    ("curves.png", foreign_png),
    ("params.npz", lambda p: p.mkdir()),
    ("confusion.png", lambda p: p.symlink_to(p.parent.parent / "elsewhere.png")),  # a dangling link
])
def test_training_refuses_to_replace_files_it_did_not_write(mnist_dir, tmp_path, capsys, name, make):
    out = tmp_path / "out"
    out.mkdir()
    make(out / name)
    before = {p.name: (p.is_symlink(), p.is_dir(), p.read_bytes() if p.is_file() else None) for p in out.iterdir()}
    assert mnist_jax.main(["--data-dir", str(mnist_dir), "--out", str(out), "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert f"{out} already holds {name}, which mnist_jax does not recognise" in err and "Traceback" not in err
    assert ("--no-plots" in err) == name.endswith(".png")
    after = {p.name: (p.is_symlink(), p.is_dir(), p.read_bytes() if p.is_file() else None) for p in out.iterdir()}
    assert after == before


def test_no_plots_trains_beside_a_users_png(mnist_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    foreign_png(out / "curves.png")
    mine = (out / "curves.png").read_bytes()
    assert mnist_jax.main(["--data-dir", str(mnist_dir), "--out", str(out), "--dry-run", "--no-plots"]) == 0
    assert (out / "curves.png").read_bytes() == mine


def test_a_second_run_replaces_the_first_runs_files(mnist_dir, tmp_path):
    out = tmp_path / "out"
    for seed in (0, 1):
        assert mnist_jax.main(["--data-dir", str(mnist_dir), "--out", str(out), "--dry-run", "--seed", str(seed)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(mnist_jax.CHECKPOINT_FILES + mnist_jax.PLOT_FILES)
    assert json.loads((out / "metrics.json").read_text())["config"]["seed"] == 1


def test_plots_of_an_older_untagged_run_are_replaced_beside_its_checkpoint(mnist_dir, tmp_path):
    out = tmp_path / "out"
    assert mnist_jax.main(["--data-dir", str(mnist_dir), "--out", str(out), "--dry-run", "--no-plots"]) == 0
    foreign_png(out / "curves.png")  # as versions before the PNG tag saved it
    assert mnist_jax.main(["--data-dir", str(mnist_dir), "--out", str(out), "--dry-run"]) == 0
    with Image.open(out / "curves.png") as im:
        assert im.info.get("Software") == mnist_jax.FIGURE_MARK


def test_train_function_checks_its_out_folder_before_any_work(tmp_path):
    (tmp_path / "metrics.json").write_text('{"my": "notes"}')
    with pytest.raises(mnist_jax.UserError, match="metrics.json, which mnist_jax does not recognise as its own"):
        mnist_jax.train(Config(), data=None, out=tmp_path)  # no data needed: it stops first
