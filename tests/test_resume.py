"""Resumed and long runs: a diverging resumed run rolls back as the uninterrupted one does (momentum kept), a
checkpoint's header stays small however long the run, every file written reads back (at the header limit),
and a checkpoint edited with its SHA-256 recomputed is a ModelFileError, field by field."""
from __future__ import annotations

import json
import math
import os
import re

import numpy
import pytest

import gpunn
from gpunn import io
from gpunn.checkpoint import HistoryLog, history_path, line_chain
from gpunn.errors import DivergenceError, ModelFileError, SaveError
from helpers import host, rng

XD, YD = rng(2).normal(size=(8, 4)) * 10, rng(3).normal(size=(8, 2)) * 10


def _lin():
    return gpunn.Sequential([gpunn.Dense(4, 6, "identity"), gpunn.Dense(6, 2, "identity")], device="cpu",
                            dtype="float64", seed=0)


def _fit(net, epochs, batch_size, lr=0.05, **kw):
    return net.fit(XD, YD, loss="squared_error", optimizer=gpunn.SGD(lr=lr, momentum=0.9), epochs=epochs,
                   batch_size=batch_size, **kw)


def _diverge(net, epochs, batch_size, **kw):
    with pytest.raises(DivergenceError) as exc:
        _fit(net, epochs, batch_size, **kw)
    return tuple(map(int, re.search(r"epoch (\d+), step (\d+)", str(exc.value)).groups()))


@pytest.mark.parametrize("batch_size", [8, 4], ids=["one-step-epochs", "two-step-epochs"])
def test_a_resumed_run_diverges_exactly_as_the_uninterrupted_one(tmp_path, batch_size):
    whole = _lin()
    epoch, step = _diverge(whole, 500, batch_size)
    assert epoch > 2
    _fit(_lin(), epoch - 1, batch_size, checkpoint=tmp_path / "c")     # stopped just before the failing epoch
    resumed = _lin()
    assert _diverge(resumed, 500, batch_size, checkpoint=tmp_path / "c") == (epoch, step)
    numpy.testing.assert_array_equal(host(resumed.flat_parameters()), host(whole.flat_parameters()))
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in whole.history]
    if batch_size == 8:            # step 1 of the resumed epoch: the state left is the previous epoch's start,
        assert step == 1           # whose loss (the last step of the checkpoint's epoch) was finite
        last = resumed.predict(XD)
        assert numpy.isfinite(0.5 * ((last - YD) ** 2).sum(1).mean())


def test_a_continued_fit_that_diverges_at_once_says_so_and_keeps_its_start(tmp_path):
    net = _lin()
    net.fit(XD, YD, loss="squared_error", optimizer=gpunn.SGD(lr=0.01), epochs=2, batch_size=8)
    start = host(net.flat_parameters())
    with pytest.raises(DivergenceError, match="already") as exc:
        net.fit(XD * 1e300, YD, epochs=1, batch_size=8)
    assert "epoch 1, step 1" in str(exc.value)
    numpy.testing.assert_array_equal(host(net.flat_parameters()), start)


# -- long runs ------------------------------------------------------------------------------------------
def test_the_checkpoint_header_does_not_grow_with_the_epochs(tmp_path):
    net = _lin()
    sizes = []
    for epochs in (5, 50):
        _fit(_lin(), epochs, 4, lr=1e-4, checkpoint=tmp_path / f"c{epochs}")
        with numpy.load(tmp_path / f"c{epochs}") as z:
            sizes.append(z["header"].size)
            header = json.loads(bytes(z["header"]))
            assert "history" not in z.files       # the records are in the file beside it, appended per epoch
        lines = open(history_path(tmp_path / f"c{epochs}"), "rb").read().splitlines()
        assert [json.loads(line)["epoch"] for line in lines] == list(range(1, epochs + 1))
        assert header["history"]["file"]["records"] == epochs
    assert sizes[1] - sizes[0] < 16         # only the digits of the counts grow
    again = _lin()
    hist = _fit(again, 50, 4, lr=1e-4, checkpoint=tmp_path / "c50")   # nothing left to train: history read back
    ref = _fit(net, 50, 4, lr=1e-4)
    assert hist.epochs[:-1] == [dict(r, seconds=h["seconds"]) for r, h in zip(ref.epochs[:-1], hist.epochs)]


def test_a_history_of_100000_epochs_writes_and_reads_back(tmp_path):
    records = [{"epoch": k + 1, "loss": 1.0 / (k + 1), "accuracy": None, "seconds": 0.001, "flag": k % 2 == 0,
                **({"note": "lr cut"} if k == 7 else {})} for k in range(100_000)]
    log = HistoryLog()
    for r in records:
        log.append(r)
    info = log.sync(str(tmp_path / "h"))
    assert len(json.dumps(info)) < 200
    assert HistoryLog.read(str(tmp_path / "h"), info, 100_000, "h").records() == records

#: What a callback may put in a record that a float64 can hold only roughly or not at all: a nanosecond time
#: stamp (past 2**53), a 64-bit seed or hash, a value past float64's range, NaN and infinity (not None), text.
ODD_VALUES = {"stamp_ns": 1796178912534190218, "seed": 2**64 - 1, "low": -(2**53) - 1, "huge": 10**400,
              "nan": math.nan, "inf": -math.inf, "text": "lr cut at 2026-12-02T02:37:50", "none": None}


def _odd(record):
    record.update(ODD_VALUES, stamp_ns=ODD_VALUES["stamp_ns"] + record["epoch"])
    if record["epoch"] % 3 == 0:
        record["every_third"] = record["epoch"] * (2**60 + 1)      # a field in some records only


def _same(a, b):
    """Records equal value for value and type, NaN equal to NaN."""
    def same(x, y):
        return type(x) is type(y) and (x == y or (isinstance(x, float) and math.isnan(x) and math.isnan(y)))
    return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)


def test_every_value_a_callback_records_reads_back_exactly(tmp_path):
    run = dict(lr=1e-4, checkpoint=tmp_path / "c", callbacks=[gpunn.callbacks.LambdaCallback(_odd)])
    first = _fit(_lin(), 4, 4, **run).epochs
    assert first[0]["stamp_ns"] == ODD_VALUES["stamp_ns"] + 1 and first[2]["every_third"] == 3 * (2**60 + 1)
    resumed = _fit(_lin(), 4, 4, **run).epochs              # nothing left to train: all read back from the file
    assert len(resumed) == 4 and all(_same(a, b) for a, b in zip(first, resumed))


def test_the_checkpoint_header_does_not_grow_whatever_the_records_hold(tmp_path):
    """Records with text, NaN, huge integers and a field in some epochs only: each epoch's save writes that
    epoch's record once and a header of the same size, as plain records do."""
    sizes = []
    for epochs in (5, 60):
        _fit(_lin(), epochs, 4, lr=1e-4, checkpoint=tmp_path / f"c{epochs}",
             callbacks=[gpunn.callbacks.LambdaCallback(_odd)])
        with numpy.load(tmp_path / f"c{epochs}") as z:
            sizes.append(z["header"].size)
    assert sizes[1] - sizes[0] < 16

@pytest.mark.parametrize("slack", [0, -1], ids=["at-the-limit", "one-byte-over"])
def test_every_file_written_reads_back_at_the_header_limit(tmp_path, monkeypatch, slack):
    net = gpunn.mlp([3, 4, 2], device="cpu", seed=0)
    net.save(tmp_path / "probe.npz")
    with numpy.load(tmp_path / "probe.npz") as z:
        size = z["header"].size
    monkeypatch.setattr(io, "MAX_HEADER_BYTES", size + slack)
    if slack == 0:
        net.save(tmp_path / "m.npz")
        numpy.testing.assert_array_equal(host(gpunn.load(tmp_path / "m.npz").flat_parameters()),
                                         host(net.flat_parameters()))
    else:
        with pytest.raises(SaveError, match="header"):
            net.save(tmp_path / "m.npz")
        assert not (tmp_path / "m.npz").exists()


# -- checkpoints edited with the SHA-256 recomputed ------------------------------------------------------
def _edit(path, change):
    """Edit a checkpoint as its owner could: header and arrays (the history records included, as a list of
    lines), every SHA-256 (the archive's and the history file's chain) recomputed."""
    header, arrays = io.read_archive(path, "gpunn-checkpoint", {"params"},
                                     {"best_weights", "last_params", "optimizer_velocity",
                                      "last_optimizer_velocity"})
    for k in ("format", "format_version", "gpunn_version", "sha256"):
        header.pop(k)
    with open(history_path(path), "rb") as fh:
        arrays["history"] = fh.read().splitlines(keepends=True)
    change(header, arrays)
    lines = arrays.pop("history")
    with open(history_path(path), "wb") as fh:
        fh.write(b"".join(lines))
    if isinstance(header.get("history"), dict) and isinstance(header["history"].get("file"), dict):
        header["history"]["file"].update(bytes=sum(map(len, lines)), sha256=line_chain("", lines))
    io.write_archive(path, "gpunn-checkpoint", header, arrays)


EDITS = {
    "one-element-params": lambda h, a: a.update(params=a["params"][:1]),
    "short-velocity": lambda h, a: a.update(optimizer_velocity=a["optimizer_velocity"][:-1]),
    "no-velocity": lambda h, a: a.pop("optimizer_velocity"),
    "long-last-params": lambda h, a: a.update(last_params=numpy.concatenate([a["last_params"], [1.0]])),
    "no-last-start": lambda h, a: h.pop("last_start"),
    "short-best-weights": lambda h, a: a.update(best_weights=a["best_weights"][:3]),
    "history-short": lambda h, a: a.update(history=a["history"][:-1]),
    "history-count-text": lambda h, a: h["history"]["file"].update(records="3"),
    "history-not-a-record": lambda h, a: a["history"].__setitem__(1, b"[2]\n"),
    "history-not-json": lambda h, a: a["history"].__setitem__(1, b'{"epoch": 2\n'),
    "history-epoch-repeated": lambda h, a: a["history"].__setitem__(2, a["history"][1]),
    "history-epoch-float": lambda h, a: a["history"].__setitem__(0, a["history"][0].replace(b'"epoch":1,',
                                                                                            b'"epoch":1.0,')),
    "history-two-lines-as-one": lambda h, a: a.update(history=[a["history"][0] + a["history"][1].rstrip(b"\n")]
                                                      + a["history"][2:]),
    "history-nested-deep": lambda h, a: a["history"].__setitem__(1, a["history"][1].replace(
        b'"epoch":2,', b'"epoch":2,"deep":' + b"[" * 100_000 + b"]" * 100_000 + b",")),
    "history-value-a-list": lambda h, a: a["history"].__setitem__(1, a["history"][1].replace(
        b'"epoch":2,', b'"epoch":2,"loss_parts":[1,2],')),
    "history-value-an-object": lambda h, a: a["history"].__setitem__(1, a["history"][1].replace(
        b'"epoch":2,', b'"epoch":2,"x":{"y":1},')),
    "history-int-of-5000-digits": lambda h, a: a["history"].__setitem__(1, a["history"][1].replace(
        b'"epoch":2,', b'"epoch":2,"n":' + b"9" * 5000 + b",")),
    "epoch-text": lambda h, a: h.update(epoch="3"),
    "epoch-negative": lambda h, a: h.update(epoch=-1),
    "epoch-more-than-history": lambda h, a: h.update(epoch=h["epoch"] + 1),
    "t-bool": lambda h, a: h.update(optimizer_t=True),
    "t-float": lambda h, a: h.update(optimizer_t=2.5),
    "rng-garbage": lambda h, a: h.update(shuffle_rng={"bit_generator": "PCG64", "state": 5}),
    "rng-list": lambda h, a: h.update(shuffle_rng=[1, 2]),
    "last-rng": lambda h, a: h["last_start"].update(shuffle_rng="x"),
    "best-none": lambda h, a: h.update(best=None),
    "best-loss-text": lambda h, a: h["best"].update(loss="low"),
    "best-epoch-late": lambda h, a: h["best"].update(epoch=99),
    "stopped-text": lambda h, a: h.update(stopped_early="no"),
    "version": lambda h, a: h.pop("checkpoint_version"),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_an_edited_checkpoint_is_a_model_file_error(tmp_path, edit):
    path = tmp_path / "c"
    _fit(_lin(), 3, 4, lr=1e-4, checkpoint=path, patience=5, validation_data=(XD, YD))
    _edit(path, EDITS[edit])
    net = _lin()
    start = host(net.flat_parameters())
    with pytest.raises(ModelFileError):
        _fit(net, 6, 4, lr=1e-4, checkpoint=path, patience=5, validation_data=(XD, YD))
    numpy.testing.assert_array_equal(host(net.flat_parameters()), start)


MODEL_EDITS = {
    "loss-number": lambda h: h.update(loss=5),
    "loss-unknown": lambda h: h.update(loss="nope"),
    "loss-list": lambda h: h.update(loss=["cross_entropy"]),
    "optimizer-list": lambda h: h.update(optimizer=[1]),
    "optimizer-text": lambda h: h.update(optimizer="sgd"),
    "optimizer-no-name": lambda h: h.update(optimizer={"lr": 0.1}),
    "optimizer-bad-lr": lambda h: h["optimizer"].update(lr="fast"),
    "optimizer-bogus-key": lambda h: h["optimizer"].update(bogus=1),
    "schedule-missing-args": lambda h: h["optimizer"].update(lr={"name": "cosine_decay"}),
    "schedule-list": lambda h: h["optimizer"].update(lr=[0.1]),
    "dtype-number": lambda h: h.update(dtype=5),
    "activation-number": lambda h: h["layers"][0].update(activation=5),
    "layers-dict": lambda h: h.update(layers={"0": 1}),
}


@pytest.mark.parametrize("edit", list(MODEL_EDITS))
def test_an_edited_model_file_is_a_model_file_error(tmp_path, edit):
    net = gpunn.mlp([3, 4, 2], device="cpu", seed=0)
    net.fit(numpy.eye(3), [0, 1, 1], loss="cross_entropy", optimizer=gpunn.SGD(lr=0.1), epochs=1)
    net.save(tmp_path / "m.npz")
    header, arrays = io.read_archive(tmp_path / "m.npz", io.FORMAT, {"params"})
    for k in ("format", "format_version", "gpunn_version", "sha256"):
        header.pop(k)
    MODEL_EDITS[edit](header)
    io.write_archive(tmp_path / "m.npz", io.FORMAT, header, arrays)
    with pytest.raises(ModelFileError):
        gpunn.load(tmp_path / "m.npz")


def test_an_overflowed_adam_state_checkpoints_and_resumes(tmp_path):
    """Adam's v overflows (g² > float32's max) while the weights stay finite: the checkpoint holds the inf,
    reads back, and the run resumes as the uninterrupted one continues."""
    X = numpy.full((4, 2), 1e10, dtype=numpy.float32)
    Y = numpy.zeros((4, 1), dtype=numpy.float32)

    def run(epochs, **kw):
        net = gpunn.Sequential([gpunn.Dense(2, 1, "identity")], device="cpu", seed=0)
        net.fit(X, Y, loss="squared_error", optimizer=gpunn.Adam(lr=1e-3), epochs=epochs, batch_size=4, **kw)
        return net
    first = run(1, checkpoint=tmp_path / "c")
    assert numpy.isinf(host(first.optimizer.state["v"])).any()
    numpy.testing.assert_array_equal(host(run(3, checkpoint=tmp_path / "c").flat_parameters()),
                                     host(run(3).flat_parameters()))


def test_weights_no_file_may_hold_are_refused_at_save(tmp_path):
    net = gpunn.mlp([3, 4, 2], device="cpu", seed=0)
    net.save(tmp_path / "m.npz")
    good = (tmp_path / "m.npz").read_bytes()
    net.flat_parameters()[0] = numpy.inf
    with pytest.raises(SaveError, match="infinite"):
        net.save(tmp_path / "m.npz")
    assert (tmp_path / "m.npz").read_bytes() == good


def test_records_a_callback_extended_load_back(tmp_path):
    def extend(r):
        r["note"] = "slow" if r["epoch"] == 2 else None
        r[7] = numpy.float32(0.5)
        r["flag"] = r["epoch"] % 2 == 0
    run = dict(lr=1e-4, checkpoint=tmp_path / "c", callbacks=[gpunn.callbacks.LambdaCallback(extend)])
    first = _fit(_lin(), 3, 4, **run).epochs
    resumed = _fit(_lin(), 3, 4, **run).epochs            # nothing left to train: all read back
    assert [r["note"] for r in resumed] == [None, "slow", None] and [r["flag"] for r in resumed] == [0, 1, 0]
    assert [r["7"] for r in resumed] == [0.5] * 3 and [r["loss"] for r in resumed] == [r["loss"] for r in first]


# -- the history file beside a checkpoint: appended, checked ---------------------------------------------
def test_each_epoch_appends_its_record_and_rewrites_no_earlier_one(tmp_path, monkeypatch):
    """The cost of an epoch's checkpoint does not grow with the epochs before it, whatever the records hold
    (a field in some epochs only, text, NaN, huge integers): after the first epoch, each save writes exactly
    that epoch's record, one line, and never rewrites the history file."""
    import gpunn.checkpoint as ckpt
    path = tmp_path / "c"
    side = history_path(path)
    written, rewrites = [], []
    real_write, real_atomic = os.write, ckpt.io.atomic_write
    monkeypatch.setattr(ckpt.os, "write", lambda fd, data: written.append(bytes(data)) or real_write(fd, data))
    monkeypatch.setattr(ckpt.io, "atomic_write",
                        lambda p, w: (rewrites.append(os.fspath(p)) if os.fspath(p) == side else None)
                        or real_atomic(p, w))
    _fit(_lin(), 40, 4, lr=1e-4, checkpoint=path, callbacks=[gpunn.callbacks.LambdaCallback(_odd)])
    assert rewrites == [side]                                  # the first epoch's save makes the file
    assert [json.loads(line)["epoch"] for line in written] == list(range(2, 41))     # then one record per epoch
    with open(side, "rb") as fh:
        assert fh.read().splitlines(keepends=True)[1:] == written


def test_bytes_a_crash_left_after_the_last_checkpoint_are_ignored_then_overwritten(tmp_path):
    path = tmp_path / "c"
    _fit(_lin(), 3, 4, lr=1e-4, checkpoint=path)
    with open(history_path(path), "ab") as fh:                 # epoch 4 half appended, then the process died
        fh.write(b'{"epoch":4,"loss":1')
    resumed = _fit(_lin(), 6, 4, lr=1e-4, checkpoint=path)
    whole = _fit(_lin(), 6, 4, lr=1e-4)
    assert [r["loss"] for r in resumed.epochs] == [r["loss"] for r in whole.epochs]
    again = _fit(_lin(), 6, 4, lr=1e-4, checkpoint=path)      # what was written since reads back
    assert [r["loss"] for r in again.epochs] == [r["loss"] for r in whole.epochs]


@pytest.mark.parametrize("damage", ["missing", "truncated", "digit-changed", "replaced-same-size"])
def test_a_damaged_history_file_is_a_model_file_error(tmp_path, damage):
    path = tmp_path / "c"
    _fit(_lin(), 3, 4, lr=1e-4, checkpoint=path)
    side = history_path(path)
    with open(side, "rb") as fh:
        data = fh.read()
    if damage == "missing":
        os.remove(side)
    else:
        if damage == "truncated":
            data = data[:-1]
        elif damage == "digit-changed":
            at = data.index(b'"loss":') + 9                   # a digit of epoch 1's loss
            data = data[:at] + (b"1" if data[at:at + 1] != b"1" else b"2") + data[at + 1:]
        else:
            data = b" " * len(data)
        with open(side, "wb") as fh:
            fh.write(data)
    net = _lin()
    start = host(net.flat_parameters())
    with pytest.raises(ModelFileError):
        _fit(net, 6, 4, lr=1e-4, checkpoint=path)
    numpy.testing.assert_array_equal(host(net.flat_parameters()), start)


@pytest.mark.parametrize("change", ["cut", "replaced"])
def test_a_history_file_cut_or_replaced_between_saves_is_written_whole_not_appended_to(tmp_path, change):
    """A callback (or another process) emptying the history file or putting another file in its place between
    two saves: the next save writes the log whole; appending at the remembered offset would have left a hole of
    NUL bytes (or another run's lines) and every later checkpoint unreadable."""
    path = tmp_path / "c"
    side = history_path(path)

    def meddle(record):
        if record["epoch"] == 2:
            if change == "cut":
                with open(side, "r+b") as fh:
                    fh.truncate(0)
            else:
                os.replace(_write(tmp_path / "other", b'{"epoch":1,"loss":7}\n' * 30), side)
    _fit(_lin(), 5, 4, lr=1e-4, checkpoint=path, callbacks=[gpunn.callbacks.LambdaCallback(meddle)])
    with open(side, "rb") as fh:
        data = fh.read()
    assert b"\0" not in data and b'"loss":7' not in data
    resumed = _fit(_lin(), 5, 4, lr=1e-4, checkpoint=path)
    whole = _fit(_lin(), 5, 4, lr=1e-4)
    assert [r["loss"] for r in resumed.epochs] == [r["loss"] for r in whole.epochs]


def _write(path, data):
    with open(path, "wb") as fh:
        fh.write(data)
    return path


def test_a_full_disk_while_appending_the_history_is_a_save_error_and_the_last_checkpoint_stays(tmp_path,
                                                                                                monkeypatch):
    import errno

    import gpunn.checkpoint as ckpt
    path = tmp_path / "c"
    real, calls = os.write, []

    def full(fd, data):
        calls.append(1)
        if len(calls) == 2:                      # epoch 3's append: the disk fills after 5 bytes
            real(fd, bytes(data)[:5])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)
    monkeypatch.setattr(ckpt.os, "write", full)
    with pytest.raises(SaveError, match=r"history to .*c\.history: No space left on device"):
        _fit(_lin(), 6, 4, lr=1e-4, checkpoint=path)
    monkeypatch.setattr(ckpt.os, "write", real)
    resumed = _fit(_lin(), 6, 4, lr=1e-4, checkpoint=path)
    whole = _fit(_lin(), 6, 4, lr=1e-4)
    assert [r["loss"] for r in resumed.epochs] == [r["loss"] for r in whole.epochs]


def test_a_history_with_lines_added_is_refused_before_they_are_split_or_hashed(tmp_path, monkeypatch):
    """Lines beyond the epochs (SHA-256 recomputed) cost a count, not a split and a hash of each."""
    import gpunn.checkpoint as ckpt
    path = tmp_path / "c"
    _fit(_lin(), 3, 4, lr=1e-4, checkpoint=path)
    _edit(path, lambda h, a: a["history"].extend([b" \n"] * 1000))
    monkeypatch.setattr(ckpt, "line_chain", lambda *a: pytest.fail("hashed a history of the wrong length"))
    with pytest.raises(ModelFileError, match=r"1003 line\(s\) for 3 epoch"):
        _fit(_lin(), 6, 4, lr=1e-4, checkpoint=path)


def test_records_that_would_not_read_back_elsewhere_are_kept_as_text(tmp_path):
    """An integer past 4,300 digits (written where PYTHONINTMAXSTRDIGITS=0 lifts Python's limit) would not
    parse where the default limit holds; a number whose float() fails: both kept as text, readable anywhere."""
    import sys

    class BadFloat(float):
        def __float__(self):
            raise TypeError("no")
    huge = 10 ** 5000
    log = HistoryLog()
    before = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    try:
        log.append({"epoch": 1, "n": huge, "x": BadFloat(1.5), "ok": 10 ** 4299})
    finally:
        sys.set_int_max_str_digits(before)
    record = log.records()[0]
    assert isinstance(record["n"], str) and isinstance(record["x"], str) and record["ok"] == 10 ** 4299
