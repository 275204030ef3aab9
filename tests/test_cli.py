"""The command line, as a user meets it: help, bad flags, one folder per run, predict, no tracebacks."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import mnist_jax
from conftest import ROOT


def run_cli(*args, cwd=None, env=None):
    """Run the CLI in a subprocess; `env` adds variables, or removes those it maps to None."""
    full_env = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    return subprocess.run([sys.executable, str(ROOT / "mnist_jax.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=full_env, timeout=300)


def test_help_lists_every_flag_with_its_default():
    result = run_cli("--help", env={"MNIST_DATA_DIR": None})
    assert result.returncode == 0
    flags = ("--data-dir", "--name", "--out", "--epochs", "--batch-size", "--lr", "--momentum", "--hidden",
             "--activation", "--seed", "--model", "--batchnorm", "--dropout", "--weight-decay", "--grad",
             "--optimizer", "--schedule", "--augment", "--no-plots", "--dry-run")
    for flag in flags:
        assert flag in result.stdout
    help_text = " ".join(result.stdout.split())
    assert help_text.count("(default:") >= 17 and "(default: 512,512)" in help_text
    assert "(default: data)" in help_text and mnist_jax._per_model("epochs") in help_text  # per-model epochs
    # ... and the README's table of flags says the same
    readme = (ROOT / "README.md").read_text()
    for name in ("epochs", "lr"):
        assert mnist_jax._per_model(name).removeprefix("default: ") in readme, name


def test_env_changes_the_data_dir_default():
    result = run_cli("--help", env={"MNIST_DATA_DIR": "/somewhere/mnist"})
    assert "/somewhere/mnist" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--epochs", "-1"], "--epochs: must be a positive whole number"),
    (["--hidden", "abc"], "--hidden: must be positive whole numbers"),
    (["--hidden", "128,0"], "--hidden"),
    (["--lr", "0"], "--lr: must be a positive number"),
    (["--lr", "abc"], "--lr: must be a positive number, got 'abc'"),  # not "invalid _positive_float value"
    (["--epochs", "two"], "--epochs: must be a positive whole number, got 'two'"),
    (["--momentum", "1.5"], "--momentum"),
    (["--activation", "sigmoid"], "invalid choice"),
    (["--model", "transformer"], "invalid choice"),
    (["--optimizer", "rmsprop"], "invalid choice"),
    (["--name", "../elsewhere"], "--name: must be a plain folder name"),
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


def dry_run(mnist_dir, *args):
    return mnist_jax.main(["--data-dir", str(mnist_dir), "--dry-run", "--hidden", "32", *map(str, args)])


def test_each_run_gets_a_folder_of_its_own(mnist_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert dry_run(mnist_dir) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.strip().splitlines() if not line.startswith("note:")]  # our own IDX files
    assert lines[0] == "run folder: runs/mlp-1"
    assert lines[-1].startswith("test accuracy: 0.") and len(lines[-1]) == len("test accuracy: 0.1234")
    assert any(line.startswith("epoch   1 ") for line in lines) and not any("epoch   2" in l for l in lines)
    assert any(line.startswith("macro") for line in lines)
    timing = next(line for line in lines if line.startswith("time: "))
    for part in ("start", "load", "setup", "compile", "train", "evaluate", "report", "plots", "total"):
        assert f"{part} " in timing
    run1 = tmp_path / "runs" / "mlp-1"
    metrics = json.loads((run1 / "metrics.json").read_text())
    assert metrics["config"]["hidden"] == [32] and len(metrics["epochs"]) == 1
    assert metrics["config"]["epochs"] == 1 and metrics["config"]["batch_size"] == 128  # as resolved
    assert len(metrics["precision"]) == len(metrics["recall"]) == len(metrics["f1"]) == 10
    assert np.array(metrics["confusion_matrix"]).shape == (10, 10) and 0 <= metrics["macro_f1"] <= 1
    assert {"load", "setup", "compile", "train", "evaluate", "plots", "total"} <= set(metrics["seconds"])
    assert sorted(p.name for p in run1.iterdir()) == sorted(
        ["config.json", "metrics.json", "params.npz", *mnist_jax.PLOT_FILES])
    # A second run never touches the first one's files, and runs/latest follows the newest.
    before = {p.name: p.read_bytes() for p in run1.iterdir()}
    assert dry_run(mnist_dir, "--seed", 1, "--no-plots") == 0
    assert {p.name: p.read_bytes() for p in run1.iterdir()} == before
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["latest", "mlp-1", "mlp-2"]
    assert (tmp_path / "runs" / "latest" / "params.npz").read_bytes() == \
        (tmp_path / "runs" / "mlp-2" / "params.npz").read_bytes()
    assert dry_run(mnist_dir, "--name", "mine", "--no-plots") == 0
    assert (tmp_path / "runs" / "mine" / "params.npz").is_file()
    assert dry_run(mnist_dir, "--name", "mine", "--no-plots") == 1  # a named folder that holds files
    assert "--name runs/mine already holds config.json" in capsys.readouterr().err


def test_latest_as_a_text_file_where_links_are_not_allowed(mnist_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def no_links(*args, **kwargs):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "symlink", no_links)
    assert dry_run(mnist_dir, "--no-plots") == 0
    latest = tmp_path / "runs" / "latest"
    assert latest.is_file() and not latest.is_symlink() and latest.read_text() == "mlp-1\n"
    assert mnist_jax.latest_checkpoint() == mnist_jax.RUNS / "mlp-1" / "params.npz"


def test_out_writes_exactly_there_and_refuses_a_folder_with_files(mnist_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert dry_run(mnist_dir, "--out", out, "--no-plots") == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "metrics.json", "params.npz"]
    kept = {p.name: p.read_bytes() for p in out.iterdir()}
    assert dry_run(mnist_dir, "--out", out) == 1
    err = capsys.readouterr().err
    assert f"--out {out} already holds config.json, metrics.json, params.npz" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == kept
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's")
    assert dry_run(mnist_dir, "--out", mine) == 1 and "already holds notes.txt" in capsys.readouterr().err
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_what_can_be_refused_before_training_makes_no_run_folder(mnist_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "o"
    assert dry_run(mnist_dir, "--out", out, "--batch-size", 5000) == 1  # the test data: 600 images
    assert "--batch-size 5000 is larger than the training set (600 images)" in capsys.readouterr().err
    assert dry_run(mnist_dir, "--out", out, "--name", "mine") == 1
    assert "not both" in capsys.readouterr().err
    real_find_spec = mnist_jax.importlib.util.find_spec
    monkeypatch.setattr(mnist_jax.importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a))
    assert dry_run(mnist_dir, "--out", out) == 1
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "runs").exists()
    assert dry_run(mnist_dir, "--out", out, "--no-plots") == 0  # without plots, no matplotlib is needed


def test_a_compile_cache_that_cannot_be_written_is_left_off_with_a_note(tmp_path, monkeypatch, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    monkeypatch.setenv("MNIST_JAX_CACHE", str(tmp_path / "a_file" / "cache"))
    before = mnist_jax.jax.config.jax_compilation_cache_dir
    mnist_jax.use_compile_cache()
    assert "compiled programs are not kept" in capsys.readouterr().err
    assert mnist_jax.jax.config.jax_compilation_cache_dir == before


def test_out_must_be_a_folder(mnist_dir, tmp_path, capsys):
    (tmp_path / "taken").write_text("a file of the user's")
    assert dry_run(mnist_dir, "--out", tmp_path / "taken") == 1
    assert "is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "taken").read_text() == "a file of the user's"


def test_two_runs_claiming_one_folder_at_once(tmp_path):
    """The second of two runs that find the same --out empty at the same moment is refused."""
    folder = tmp_path / "out"
    mnist_jax.claim_run_folder({"model": "mlp", "seed": 0}, out=folder)
    folder_files = sorted(p.name for p in folder.iterdir())
    with pytest.raises(mnist_jax.UserError, match="already holds config.json"):
        mnist_jax.claim_run_folder({"model": "mlp", "seed": 1}, out=folder)
    assert folder_files == ["config.json"] and json.loads((folder / "config.json").read_text())["seed"] == 0


def test_cnn_dry_run_plots_its_kernels(mnist_dir, tmp_path):
    out = tmp_path / "out"
    assert mnist_jax.main(["--data-dir", str(mnist_dir), "--out", str(out), "--dry-run", "--model", "cnn-small"]) == 0
    with Image.open(out / "first_layer.png") as picture:
        assert picture.width > 100


@pytest.mark.parametrize("tag", ["# fastest to 99%", "# the photo model"])
def test_the_readmes_named_commands_run_as_written(mnist_dir, tmp_path, tag):
    """Scripts find these commands by their comment: they must stay valid as the flags change."""
    import shlex
    lines = [line for line in (ROOT / "README.md").read_text().splitlines() if tag in line]
    command = shlex.split(lines[0].split("`")[1 if "|" in lines[0] else 0].split("#")[0])
    assert command[:2] == ["python", "mnist_jax.py"], lines[0]
    out = tmp_path / "out"
    assert mnist_jax.main(command[2:] + ["--data-dir", str(mnist_dir), "--out", str(out), "--dry-run"]) == 0
    assert (out / "params.npz").is_file()


def test_user_errors_exit_nonzero_without_traceback(tmp_path):
    broken = tmp_path / "data"
    broken.mkdir()
    (broken / "train-images-idx3-ubyte.gz").write_bytes(b"<html>not found</html>")
    result = run_cli("--data-dir", broken, "--out", tmp_path / "o")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "train-images-idx3-ubyte.gz is an HTML page" in result.stderr
    result = run_cli("predict", tmp_path / "missing.png", "--params", tmp_path / "none.npz")
    assert result.returncode == 1 and "Traceback" not in result.stderr and "no checkpoint at" in result.stderr
    result = run_cli("predict", "x.png", cwd=tmp_path)  # no run yet: runs/latest does not exist
    assert result.returncode == 1 and "no trained model yet" in result.stderr and "Traceback" not in result.stderr


def test_divergence_exits_nonzero(mnist_dir, tmp_path, capsys):
    assert dry_run(mnist_dir, "--out", tmp_path / "o", "--lr", "1e30", "--momentum", "0") == 1
    err = capsys.readouterr().err
    assert "diverged in epoch 1" in err and "smaller learning rate" in err and "Nothing was saved" in err


def interrupt_epoch(monkeypatch, at_epoch):
    """Ctrl-C in the middle of epoch `at_epoch` of a real training run: the compiled epoch raises it."""
    real_compile = mnist_jax.compile_function

    def compile_function(fn, *args):
        compiled = real_compile(fn, *args)
        if getattr(fn, "func", None) is not mnist_jax.train_epoch:
            return compiled  # the evaluation
        calls = []

        def epoch(*epoch_args):
            calls.append(1)
            if len(calls) == at_epoch:
                raise KeyboardInterrupt
            return compiled(*epoch_args)
        return epoch

    monkeypatch.setattr(mnist_jax, "compile_function", compile_function)


def test_ctrl_c_in_the_first_epoch_says_nothing_was_saved(mnist_dir, tmp_path, monkeypatch, capsys):
    interrupt_epoch(monkeypatch, 1)
    out = tmp_path / "o"
    code = mnist_jax.main(["--data-dir", str(mnist_dir), "--out", str(out), "--epochs", "2", "--hidden", "16"])
    err = capsys.readouterr().err
    assert code == 130 and "no epoch had finished, so no checkpoint was saved" in err
    assert not (out / "params.npz").exists()


def test_ctrl_c_in_a_later_epoch_keeps_the_last_checkpoint(mnist_dir, tmp_path, monkeypatch, capsys):
    interrupt_epoch(monkeypatch, 2)
    out = tmp_path / "o"
    code = mnist_jax.main(["--data-dir", str(mnist_dir), "--out", str(out), "--epochs", "3", "--hidden", "16"])
    err = capsys.readouterr().err
    assert code == 130 and f"the checkpoint of epoch 1 is in {out / 'params.npz'}" in err
    mnist_jax.load_params(out / "params.npz")  # it loads
    assert [e["epoch"] for e in json.loads((out / "metrics.json").read_text())["epochs"]] == [1]


@pytest.fixture
def trained(mnist_dir, tmp_path):
    out = tmp_path / "out"
    assert dry_run(mnist_dir, "--out", out, "--no-plots") == 0
    return out / "params.npz"


def one_png(path):
    digit = np.zeros((40, 40), np.uint8)
    digit[10:30, 18:23] = 255
    Image.fromarray(255 - digit).save(path)
    return path


def test_predict_command_prints_digits_and_saves_steps(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    one_png(tmp_path / "one.png")
    capsys.readouterr()
    assert mnist_jax.main(["predict", "one.png", "--params", str(trained), "--show"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("one.png: ") and lines[0].count(": 0.") == 3  # top three probabilities
    assert (tmp_path / "runs" / "predict-1" / "one_steps.png").stat().st_size > 0
    assert mnist_jax.main(["predict", "one.png", "--params", str(trained), "--show"]) == 0
    assert (tmp_path / "runs" / "predict-2" / "one_steps.png").is_file()  # a new folder, nothing replaced


def test_predict_show_dir_must_be_new_or_empty(trained, tmp_path, capsys):
    for folder in ("a", "b"):  # two photos with the same name in different folders
        (tmp_path / folder).mkdir()
        one_png(tmp_path / folder / "one.png")
    shown = tmp_path / "shown"
    assert mnist_jax.main(["predict", str(tmp_path / "a" / "one.png"), str(tmp_path / "b" / "one.png"),
                           "--params", str(trained), "--show-dir", str(shown), "--show"]) == 0
    assert sorted(p.name for p in shown.iterdir()) == ["one-2_steps.png", "one_steps.png"]
    assert mnist_jax.main(["predict", str(tmp_path / "a" / "one.png"), str(tmp_path / "b" / "one.png"),
                           "--params", str(trained), "--show-dir", str(shown), "--show"]) == 1
    err = capsys.readouterr().err
    assert err.count("is not empty") == 1 and "could not be read" not in err  # the folder's fault, said once
    assert sorted(p.name for p in shown.iterdir()) == ["one-2_steps.png", "one_steps.png"]


def test_predict_goes_on_after_a_bad_file_and_fails_at_the_end(trained, tmp_path, capsys):
    one_png(tmp_path / "a.png")
    Image.fromarray(np.full((30, 30), 255, np.uint8)).save(tmp_path / "blank.png")
    one_png(tmp_path / "c.png")
    capsys.readouterr()
    code = mnist_jax.main(["predict", str(tmp_path / "a.png"), str(tmp_path / "blank.png"), str(tmp_path / "c.png"),
                           "--params", str(trained)])
    out, err = capsys.readouterr()
    assert code == 1
    assert f"{tmp_path / 'a.png'}: " in out and f"{tmp_path / 'c.png'}: " in out  # C is read after B failed
    assert "no digit found in" in err and "blank.png" in err and "1 of 3 files could not be read" in err


def test_a_network_too_large_for_memory_is_refused_before_allocating(mnist_dir, tmp_path):
    result = run_cli("--data-dir", mnist_dir, "--out", tmp_path / "o", "--hidden", "100000000")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "this network has 79,500,000,010 parameters" in result.stderr and "GiB of memory" in result.stderr
    assert not (tmp_path / "o").exists()  # refused before the run folder (or anything else) was made


def test_an_out_folder_that_cannot_be_written_is_refused_before_training(mnist_dir, tmp_path, monkeypatch, capsys):
    import errno
    import tempfile
    trained = []
    monkeypatch.setattr(mnist_jax, "train", lambda *a, **k: trained.append(1))

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    assert dry_run(mnist_dir, "--out", tmp_path / "o") == 1
    err = capsys.readouterr().err
    assert f"could not write {tmp_path / 'o' / 'config.json'}: Read-only file system" in err and "Traceback" not in err
    assert trained == []


def test_a_full_disk_while_saving_names_the_file_and_keeps_nothing_half_written(mnist_dir, tmp_path, monkeypatch,
                                                                                   capsys):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full)
    out = tmp_path / "o"
    assert dry_run(mnist_dir, "--out", out) == 1
    err = capsys.readouterr().err
    assert f"could not write {out / 'params.npz'}: No space left on device" in err
    assert f"the disk holding {out} is full: free some space there" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]  # no temporary or truncated file
