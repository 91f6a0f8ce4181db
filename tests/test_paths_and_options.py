"""Paths and the command line's values (issue 22): outputs naming one file, trailing separators, long file
names, a dangling symbolic link as a first checkpoint, non-finite or out-of-range float options, and a
closed pipe. Expectations are exit codes and messages, files read back, and a second process."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy
import pytest
from click.testing import CliRunner

import gpunn
from gpunn.checkpoint import history_path
from gpunn.cli import main
from gpunn.errors import SaveError
from gpunn.io import write_text_atomic
from helpers import child_env, host, rng


def run(*args):
    return CliRunner().invoke(main, list(args))


# -- float options: finite and in range, exit 2 before any work --------------------------------------------
@pytest.mark.parametrize("args,option", [
    (["train", "--lr", v], "--lr") for v in ("-1", "0", "nan", "inf", "-inf", "1e999", "abc", "")
] + [
    (["train", "--momentum", v], "--momentum") for v in ("1.5", "1", "-0.1", "nan", "inf")
] + [
    (["bench", "--min-time", v], "--min-time") for v in ("nan", "inf", "-inf", "0", "-1", "1e400", "x")
])
def test_float_options_must_be_finite_and_in_range(args, option):
    r = run(*args)
    assert r.exit_code == 2, r.output
    assert f"Invalid value for '{option}'" in r.output
    assert "epoch 1/" not in r.output and "timing" not in r.output       # refused before any work


@pytest.mark.parametrize("args", [
    ["train", "--epochs", "-1"], ["train", "--epochs", str(10**30)], ["train", "--epochs", "2.5"],
    ["train", "--batch-size", "0"], ["train", "--seed", "1e3"], ["train", "--patience", "0"],
    ["train", "--layers", f"64,{10**30},10"], ["bench", "--repeats", "0"], ["bench", "--batch-size", str(10**30)],
    ["check", "--steps", str(2**63)],
])
def test_integer_options_must_be_integers_gpunn_can_hold(args):
    r = run(*args)
    assert r.exit_code == 2, r.output
    assert "Invalid value" in r.output and "epoch 1/" not in r.output and "timing" not in r.output


# -- two outputs naming one file ------------------------------------------------------------------------------
#: A name each output option takes (--save and --plot check the extension first).
EXT = {"--save": ".npz", "--plot": ".png", "--checkpoint": ".ckpt"}


def _spellings(tmp_path, target, ext):
    """Other paths of ``target``: a symbolic link and a hard link named with ``ext``, and, where ``target``'s
    own name does, relative, '..' and linked-folder spellings."""
    (tmp_path / "sub").mkdir()
    os.symlink(tmp_path, tmp_path / "dirlink")
    os.symlink(target, tmp_path / f"link{ext}")
    os.link(target, tmp_path / f"hard{ext}")
    others = [str(tmp_path / f"link{ext}"), str(tmp_path / f"hard{ext}")]
    if ext in (target.suffix, ".ckpt"):
        others += [os.path.relpath(target), str(tmp_path / "sub" / ".." / target.name),
                   str(tmp_path / "dirlink" / target.name)]
    return others


@pytest.mark.parametrize("first,second", [("--save", "--checkpoint"), ("--save", "--plot"),
                                          ("--checkpoint", "--plot"), ("--plot", "--checkpoint")])
def test_two_outputs_naming_one_file_exit_2_and_touch_nothing(tmp_path, first, second):
    if "--plot" in (first, second):
        pytest.importorskip("matplotlib", reason="--plot needs matplotlib (pip install 'gpunn[plot]')")
    target = tmp_path / f"out{EXT[first]}"
    target.write_bytes(b"earlier contents")
    for other in _spellings(tmp_path, target, EXT[second]):
        r = run("train", "--dataset", "xor", "--epochs", "1", first, str(target), second, other)
        assert r.exit_code == 2, (other, r.output)
        assert "name the same file" in r.output and first in r.output and second in r.output
        assert target.read_bytes() == b"earlier contents"


def test_an_output_naming_the_training_data_exits_2(tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("a,b,y\n0,0,0\n0,1,1\n1,0,1\n1,1,0\n" * 4)
    os.symlink(data, tmp_path / "alias.ckpt")
    r = run("train", "--data", str(data), "--epochs", "1", "--checkpoint", str(tmp_path / "alias.ckpt"))
    assert r.exit_code == 2 and "name the same file" in r.output
    assert data.read_text().startswith("a,b,y")


def test_an_output_may_not_name_an_input(tmp_path):
    import click

    from gpunn.options import distinct_outputs
    (tmp_path / "m.npz").write_bytes(b"model")
    os.symlink(tmp_path / "m.npz", tmp_path / "alias.npz")
    with pytest.raises(click.UsageError, match="--model .*m.npz and --output .*alias.npz name the same file"):
        distinct_outputs((str(tmp_path / "alias.npz"), "--output"), inputs=((str(tmp_path / "m.npz"), "--model"),))
    distinct_outputs((str(tmp_path / "out.csv"), "--output"), (None, "--plot"),
                     inputs=((str(tmp_path / "m.npz"), "--model"),))


def test_distinct_outputs_are_all_written(tmp_path):
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (pip install 'gpunn[plot]')")
    save, ckpt, plot = (str(tmp_path / n) for n in ("m.npz", "run.ckpt", "curves.svg"))
    r = run("train", "--dataset", "xor", "--epochs", "2", "--device", "cpu", "--save", save, "--checkpoint", ckpt,
            "--plot", plot)
    assert r.exit_code == 0, r.output
    assert gpunn.load(save, device="cpu").layers[0].n_in == 2
    assert open(plot, "rb").read(5) in (b"<?xml", b"<svg ")
    assert os.path.getsize(ckpt) > 0


# -- trailing separators ---------------------------------------------------------------------------------------
def test_a_trailing_slash_is_refused_before_any_work(tmp_path):
    path = str(tmp_path / "run.ckpt") + "/"
    r = run("train", "--dataset", "xor", "--epochs", "1", "--checkpoint", path)
    assert r.exit_code == 2 and "names a folder" in r.output
    net = gpunn.Sequential([gpunn.Dense(2, 1)], device="cpu", seed=0)
    before = host(net.flat_parameters())
    with pytest.raises(SaveError, match="names a folder"):
        net.fit(numpy.zeros((4, 2)), numpy.zeros((4, 1)), epochs=1, checkpoint=path)
    for tail in ("/", "/.", "/..", "//"):
        with pytest.raises(SaveError, match="names a folder"):
            net.save(str(tmp_path / "m.npz") + tail)
    numpy.testing.assert_array_equal(host(net.flat_parameters()), before)
    assert net.history is None and os.listdir(tmp_path) == []


# -- long names -----------------------------------------------------------------------------------------------
def _data():
    g = rng(2)
    return g.normal(size=(8, 2)), g.normal(size=(8, 1))


@pytest.mark.parametrize("name", ["m" * 226 + ".npz", "m" * 246 + ".ckpt.npz", "n" * 251 + ".npz",
                                  "é" * 125 + "x.npz"], ids=["230", "255-dotted", "255", "255-utf8"])
def test_names_up_to_255_bytes_are_saved_checkpointed_and_read_back(tmp_path, name):
    assert len(os.fsencode(name)) <= 255
    X, Y = _data()
    path = tmp_path / name
    net = gpunn.Sequential([gpunn.Dense(2, 1)], device="cpu", dtype="float64", seed=0)
    net.save(path)
    numpy.testing.assert_array_equal(host(gpunn.load(path, device="cpu").flat_parameters()),
                                     host(net.flat_parameters()))
    path.unlink()
    net.fit(X, Y, epochs=2, checkpoint=path)
    again = gpunn.Sequential([gpunn.Dense(2, 1)], device="cpu", dtype="float64", seed=0)
    history = again.fit(X, Y, epochs=3, checkpoint=path)        # resumes after 2 epochs: trains one more
    assert [r["epoch"] for r in history.epochs] == [1, 2, 3]
    write_text_atomic(path, "text")
    side = os.path.basename(history_path(path))                  # the checkpoint's history rows beside it
    assert len(os.fsencode(side)) <= 255
    assert path.read_text() == "text" and sorted(os.listdir(tmp_path)) == sorted([name, side])   # no temporary


def test_a_name_over_255_bytes_is_refused_before_training(tmp_path):
    X, Y = _data()
    net = gpunn.Sequential([gpunn.Dense(2, 1)], device="cpu", seed=0)
    with pytest.raises(SaveError, match="too long"):
        net.fit(X, Y, epochs=1, checkpoint=tmp_path / ("c" * 256))
    assert net.history is None


# -- a dangling symbolic link as the first run's checkpoint ----------------------------------------------------
def test_a_dangling_link_is_followed_the_first_save_creates_its_target(tmp_path):
    """Saves write through links (README, Atomic saves); a checkpoint link whose target does not exist yet
    is a first run: the save creates the target, the link stays a link, and the next run resumes from it."""
    X, Y = _data()
    link, target = tmp_path / "run.ckpt", tmp_path / "store" / "run-1.ckpt"
    target.parent.mkdir()
    os.symlink(target, link)
    net = gpunn.Sequential([gpunn.Dense(2, 1)], device="cpu", seed=0)
    net.fit(X, Y, epochs=1, checkpoint=link)
    assert link.is_symlink() and target.is_file()
    again = gpunn.Sequential([gpunn.Dense(2, 1)], device="cpu", seed=0)
    assert [r["epoch"] for r in again.fit(X, Y, epochs=2, checkpoint=link).epochs] == [1, 2]
    os.symlink(tmp_path / "missing" / "x.ckpt", tmp_path / "nowhere.ckpt")     # its folder does not exist
    with pytest.raises(SaveError, match="does not exist"):
        gpunn.Sequential([gpunn.Dense(2, 1)], device="cpu").fit(X, Y, epochs=1, checkpoint=tmp_path / "nowhere.ckpt")


# -- a closed pipe ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [["info"], ["info", "--json"], ["--help"], ["check", "--help"], ["--version"],
                                  ["train", "--dataset", "xor", "--epochs", "1", "--device", "cpu", "--json"]])
def test_output_into_a_closed_pipe_is_quiet(args):
    """``gpunn info | head`` once head has gone: no traceback, no error line, a non-zero exit (click's 1)."""
    read_end, write_end = os.pipe()
    os.close(read_end)                      # the reader is gone before gpunn writes anything
    try:
        p = subprocess.run([sys.executable, "-m", "gpunn.cli", *args], stdout=write_end, stderr=subprocess.PIPE,
                           timeout=120, env=child_env())
    finally:
        os.close(write_end)
    assert p.returncode == 1
    assert p.stderr.decode() == ""


def test_an_output_naming_the_checkpoints_history_file_is_refused_before_work(tmp_path):
    ckpt = tmp_path / "run.ckpt"
    (tmp_path / "m.npz").symlink_to(history_path(ckpt))          # the model would overwrite the history
    r = run("train", "--dataset", "xor", "--epochs", "1", "--checkpoint", str(ckpt), "--save",
            str(tmp_path / "m.npz"))
    assert r.exit_code == 2 and "history file" in r.output, r.output
    assert not ckpt.exists() and not os.path.exists(history_path(ckpt))
