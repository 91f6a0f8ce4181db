"""Resumed and long runs: a diverging resumed run rolls back as the uninterrupted one does (momentum kept), a
checkpoint's header stays small however long the run, every file written reads back (at the header limit),
and a checkpoint edited with its SHA-256 recomputed is a ModelFileError, field by field."""
from __future__ import annotations

import json
import os
import re

import numpy
import pytest

import gpunn
from gpunn import io
from gpunn.checkpoint import history_path, row_chain
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
            assert "history" not in z.files       # the rows are in the file beside it, appended per epoch
        rows = numpy.fromfile(history_path(tmp_path / f"c{epochs}"), dtype="<f8")
        assert rows.size == epochs * len(header["history"]["fields"])
    assert sizes[1] - sizes[0] < 16         # only the digits of the counts grow
    again = _lin()
    hist = _fit(again, 50, 4, lr=1e-4, checkpoint=tmp_path / "c50")   # nothing left to train: history read back
    ref = _fit(net, 50, 4, lr=1e-4)
    assert hist.epochs[:-1] == [dict(r, seconds=h["seconds"]) for r, h in zip(ref.epochs[:-1], hist.epochs)]


def test_a_history_of_100000_epochs_writes_and_reads_back(tmp_path):
    from gpunn.checkpoint import HistoryTable
    records = [{"epoch": k + 1, "loss": 1.0 / (k + 1), "accuracy": None, "seconds": 0.001, "flag": k % 2 == 0,
                **({"note": "lr cut"} if k == 7 else {})} for k in range(100_000)]
    table = HistoryTable.of(records)
    io.write_archive(tmp_path / "h", "test-history", {"dtype": "float64", "h": table.header()},
                     {"history": table.array()}, typed={"history": "float64"})
    header, arrays = io.read_archive(tmp_path / "h", "test-history", {"history"}, typed={"history": "float64"})
    assert len(json.dumps(header)) < 4096
    assert HistoryTable.records(header["h"], arrays["history"], 100_000, "h") == records


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
    """Edit a checkpoint as its owner could: header and arrays (the history rows included), every SHA-256
    (the archive's and the history file's chain) recomputed."""
    header, arrays = io.read_archive(path, "gpunn-checkpoint", {"params"},
                                     {"best_weights", "last_params", "optimizer_velocity",
                                      "last_optimizer_velocity"})
    for k in ("format", "format_version", "gpunn_version", "sha256"):
        header.pop(k)
    arrays["history"] = numpy.fromfile(history_path(path), dtype="<f8")
    change(header, arrays)
    rows = arrays.pop("history")
    width = max(1, len(header["history"]["fields"])) if isinstance(header.get("history"), dict) and \
        isinstance(header["history"].get("fields"), list) else 1
    table = rows.reshape(-1, width) if rows.size % width == 0 else rows.reshape(-1, 1)
    rows.astype("<f8").tofile(history_path(path))
    if isinstance(header.get("history"), dict):
        header["history"]["file"] = {"rows": table.shape[0], "width": table.shape[1], "sha256": row_chain("", table)}
    io.write_archive(path, "gpunn-checkpoint", header, arrays)


EDITS = {
    "one-element-params": lambda h, a: a.update(params=a["params"][:1]),
    "short-velocity": lambda h, a: a.update(optimizer_velocity=a["optimizer_velocity"][:-1]),
    "no-velocity": lambda h, a: a.pop("optimizer_velocity"),
    "long-last-params": lambda h, a: a.update(last_params=numpy.concatenate([a["last_params"], [1.0]])),
    "no-last-start": lambda h, a: h.pop("last_start"),
    "short-best-weights": lambda h, a: a.update(best_weights=a["best_weights"][:3]),
    "history-short": lambda h, a: a.update(history=a["history"][:-1]),
    "history-fields-text": lambda h, a: h["history"].update(fields="loss"),
    "history-kind": lambda h, a: h["history"]["kinds"].update(loss="complex"),
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
def test_each_epoch_appends_one_row_and_rewrites_no_earlier_one(tmp_path, monkeypatch):
    """The cost of an epoch's checkpoint does not grow with the epochs before it: after the first epochs,
    each save writes exactly one history row (width × 8 bytes) and never rewrites the history file."""
    import gpunn.checkpoint as ckpt
    path = tmp_path / "c"
    side = history_path(path)
    written, rewrites = [], []
    real_write, real_atomic = os.write, ckpt.io.atomic_write
    monkeypatch.setattr(ckpt.os, "write", lambda fd, data: written.append(len(data)) or real_write(fd, data))
    monkeypatch.setattr(ckpt.io, "atomic_write",
                        lambda p, w: (rewrites.append(os.fspath(p)) if os.fspath(p) == side else None)
                        or real_atomic(p, w))
    _fit(_lin(), 40, 4, lr=1e-4, checkpoint=path)
    width = json.loads(bytes(numpy.load(path)["header"]))["history"]["file"]["width"]
    assert len(rewrites) <= 2                                  # the first epoch, and once if a field appears
    assert written and set(written) == {width * 8}             # then one row per epoch
    assert os.path.getsize(side) == 40 * width * 8


def test_rows_a_crash_left_after_the_last_checkpoint_are_ignored_then_overwritten(tmp_path):
    path = tmp_path / "c"
    _fit(_lin(), 3, 4, lr=1e-4, checkpoint=path)
    with open(history_path(path), "ab") as fh:                 # epoch 4 appended, then the process died
        fh.write(numpy.full(7, 123.0).tobytes())
    resumed = _fit(_lin(), 6, 4, lr=1e-4, checkpoint=path)
    whole = _fit(_lin(), 6, 4, lr=1e-4)
    assert [r["loss"] for r in resumed.epochs] == [r["loss"] for r in whole.epochs]
    again = _fit(_lin(), 6, 4, lr=1e-4, checkpoint=path)      # what was written since reads back
    assert [r["loss"] for r in again.epochs] == [r["loss"] for r in whole.epochs]


@pytest.mark.parametrize("damage", ["missing", "truncated", "row-changed", "replaced-same-size"])
def test_a_damaged_history_file_is_a_model_file_error(tmp_path, damage):
    path = tmp_path / "c"
    _fit(_lin(), 3, 4, lr=1e-4, checkpoint=path)
    side = history_path(path)
    rows = numpy.fromfile(side, dtype="<f8")
    if damage == "missing":
        os.remove(side)
    elif damage == "truncated":
        rows[:-1].tofile(side)
    elif damage == "row-changed":
        rows[1] += 1e-9
        rows.tofile(side)
    else:
        numpy.zeros_like(rows).tofile(side)
    net = _lin()
    start = host(net.flat_parameters())
    with pytest.raises(ModelFileError):
        _fit(net, 6, 4, lr=1e-4, checkpoint=path)
    numpy.testing.assert_array_equal(host(net.flat_parameters()), start)
