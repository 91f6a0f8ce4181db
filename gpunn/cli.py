"""The ``gpunn`` command line (also ``python -m gpunn``): info, train, evaluate, predict, check, plot, bench.

Runtime errors print one line on stderr and exit 1 (``gpunn --debug ...`` shows the traceback); bad
options get click's usage message and exit 2.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import math
import os
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import click
import numpy

from . import activations, cpukernels, losses, ops, optim, recipes, threads, userdata
from .backend import LOGGER, Device, available_devices, cuda_unavailable_reason, parse_spec, to_host
from .bench import WORKLOADS, environment, format_table, time_workload
from .check import run_check
from .checkpoint import history_path
from .distributed import init as init_distributed
from .errors import DistributedError, GpunnError
from .exports import model_format
from .io import check_writable, write_text_atomic
from .options import Count, Number, distinct_outputs
from .plots import format_of, plot_activations, plot_history
from .scalars import integer

EPILOG_STYLE: dict[str, Any] = {"context_settings": {"help_option_names": ["-h", "--help"]}}


def _friendly(fn):
    """Turn gpunn errors (and OS errors) into one line on stderr and exit 1, unless --debug."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        ctx = click.get_current_context()
        try:
            with warnings.catch_warnings(), _notes_on_stderr():
                warnings.showwarning = _show_warning
                return fn(*args, **kwargs)
        except BrokenPipeError:
            raise       # the reader of stdout went away (gpunn info | head): click exits quietly
        except (GpunnError, OSError, MemoryError) as exc:
            if ctx.find_root().params.get("debug"):
                raise
            text = str(exc) if not isinstance(exc, MemoryError) else (
                f"out of memory ({exc or 'MemoryError'}); use smaller layers or batches")
            click.echo(f"gpunn: error: {text}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            hint = ("; run it with --checkpoint FILE to be able to resume where it stopped"
                    if "checkpoint" in ctx.params and ctx.params["checkpoint"] is None else "")
            click.echo(f"gpunn: interrupted{hint}", err=True)
            ctx.exit(130)
    return wrapper


class _NoteHandler(logging.Handler):
    """gpunn's log records (the auto device's fallback to cpu) as ``gpunn: note: ...`` lines on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"gpunn: note: {record.getMessage().removeprefix('gpunn: ')}", err=True)


@contextlib.contextmanager
def _notes_on_stderr() -> Iterator[None]:
    """While a command runs, gpunn's log records are notes on stderr (and not also on the root logger)."""
    handler, propagate = _NoteHandler(logging.INFO), LOGGER.propagate
    LOGGER.addHandler(handler)
    LOGGER.propagate = False
    try:
        yield
    finally:
        LOGGER.removeHandler(handler)
        LOGGER.propagate = propagate


_show_original = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """gpunn's own notices (the auto device's fallback to cpu) as one line on stderr, not as a Python
    warning pointing into click's code; other warnings as usual."""
    text = str(message)
    if text.startswith("gpunn: "):
        click.echo(f"gpunn: note: {text.removeprefix('gpunn: ')}", err=True)
    else:
        _show_original(message, category, filename, lineno, file, line)


def _csv(kind: str, value: str, convert=str) -> list:
    """Comma-separated items; BadParameter (exit 2) for an empty item or one ``convert`` refuses."""
    parts = [v.strip() for v in value.split(",")]
    if not any(parts):
        raise click.BadParameter(f"expected at least one {kind}")
    if not all(parts):
        raise click.BadParameter(f"empty item in {value!r}: expected comma-separated {kind}s")
    try:
        return [convert(v) for v in parts]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated {kind}s, got {value!r}") from None


def _device_spec(ctx: click.Context | None, param: click.Parameter | None, value: str | None) -> str | None:
    """Check device specs (one, or comma-separated) when the options are parsed: exit 2 if malformed."""
    if value is None:
        return None
    for spec in _csv("device", value):
        try:
            parse_spec(spec)
        except GpunnError as exc:
            raise click.BadParameter(str(exc)) from None
    return value


def _positive(kind: str):
    def convert(v: str) -> int:
        return integer(kind, int(v), low=1)     # a ConfigError is a ValueError: _csv makes it exit 2
    convert.__name__ = kind
    return convert


def _writable(path: str | None, option: str, picture: bool = False, model: bool = False) -> None:
    """BadParameter now (exit 2, before any work) if ``path`` could not be written at the end."""
    if path is None:
        return
    try:
        if picture:
            format_of(path)
        if model:
            model_format(path)
        check_writable(path)
    except GpunnError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None


def _inputs(spec: str | None, option: str) -> tuple[tuple[str, str], ...]:
    """The files a data spec (FILE, or X.npy,y.npy) reads, as (path, option) pairs for distinct_outputs."""
    return tuple((path.strip(), option) for path in (spec or "").split(",") if path.strip())


def _json(data: object) -> str:
    """JSON that is valid JSON: a non-finite number becomes null."""
    def clean(v: object) -> object:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return json.dumps(clean(data), indent=2, allow_nan=False)


@click.group(**EPILOG_STYLE)
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(package_name="gpunn", prog_name="gpunn")
def main(debug: bool) -> None:
    """gpunn: neural networks on NumPy (CPU) or CuPy (NVIDIA GPU).

    \b
    Examples:
      gpunn info
      gpunn train --epochs 30 --device cpu
      gpunn train --data my.csv --target label --save m.npz
      gpunn evaluate m.npz test.csv --json
      gpunn predict m.npz new.csv --output predictions.csv
      gpunn check --device cpu,cuda:0
      gpunn bench --workload mlp --device cpu
    """


# -- info -------------------------------------------------------------------------------------------
@main.command(**EPILOG_STYLE)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@_friendly
def info(as_json: bool) -> None:
    """Versions, BLAS, devices, TF32 state, and why CUDA is unusable when it is.

    \b
    Example:
      GPUNN_DEVICE=cuda:0 gpunn info
    """
    env = environment()
    env["devices"] = ["cpu"] + [g["device"] for g in env["gpus"]]
    env["default_device_spec"] = os.environ.get("GPUNN_DEVICE") or "auto"
    spec = env["default_device_spec"]
    try:
        kind, idx = parse_spec(spec)
    except GpunnError as exc:
        kind, env["default_device_unusable_reason"] = None, str(exc)
    if kind == "cuda":
        env["default_device_unusable_reason"] = cuda_unavailable_reason(idx)
    if as_json:
        click.echo(json.dumps(env, indent=2))
        return
    click.echo(f"gpunn {env['gpunn']}  Python {env['python']}  NumPy {env['numpy']}")
    click.echo(f"BLAS: {env['blas'] or 'unknown (install threadpoolctl to see it)'}")
    click.echo(f"BLAS threads: {threads.summary(env['threads'])}")
    click.echo("fused CPU kernels: " + (f"numba {env['numba']}" + ("" if ops.fused_enabled() else " (off: GPUNN_FUSED)")
                                        if env["numba"] else f"off ({env['cpu_kernels_unavailable_reason']})"))
    if env["numba"]:
        inside, why = cpukernels.exp_inside()
        click.echo("float32 exp: " + ("inside the kernels (gpunn.cpuexp gives NumPy's bits here)" if inside
                                      else f"NumPy's, between two kernels ({why})"))
    click.echo(f"CPU: {env['cpu']} ({env['cores']} cores)")
    if env.get("openblas_coretype"):
        click.echo(f"OPENBLAS_CORETYPE={env['openblas_coretype']}")
    click.echo(f"CuPy: {env['cupy'] or 'not in use'}   TF32: {'on' if env['tf32'] else 'off'}")
    click.echo(f"devices: {', '.join(env['devices'])}")
    for g in env["gpus"]:
        click.echo(f"  {g['device']}: {g['name']}, {g['memory_total_gib']:.1f} GiB "
                   f"({g['memory_free_gib']:.1f} GiB free), {g['sm_count']} SMs")
    if env["cuda_unavailable_reason"]:
        click.echo(f"CUDA unusable: {env['cuda_unavailable_reason']}")
    click.echo(f"default device: {spec}"
               + (f" (unusable: {env['default_device_unusable_reason']})"
                  if env.get("default_device_unusable_reason") else ""))


# -- train ------------------------------------------------------------------------------------------
@main.command(**EPILOG_STYLE)
@click.option("--dataset", type=click.Choice(sorted(recipes.DATASETS)), default="digits", show_default=True,
              help="Embedded or synthetic data set.")
@click.option("--layers", "layer_spec", default=None,
              help="Layer sizes, input to output, e.g. 64,32,10 (default: digits n_features,32,n_classes; "
                   "moons, spirals, xor 2,64,64,n_outputs).")
@click.option("--activation", type=click.Choice(sorted(set(activations.names()) - {"softmax"})), default=None,
              help="Hidden-layer activation (default: sigmoid for digits, relu for the synthetic sets).")
@click.option("--loss", type=click.Choice(losses.names()), default="cross_entropy", show_default=True)
@click.option("--optimizer", type=click.Choice(optim.names()), default="sgd", show_default=True)
@click.option("--lr", type=Number(0.0, low_open=True), default=None,
              help="Learning rate (default: adam 0.01; sgd 0.1 on digits, 0.03 there for squared_error after "
                   "an unbounded activation, 0.05 on the synthetic sets).")
@click.option("--momentum", type=Number(0.0, 1.0, high_open=True), default=None,
              help="SGD momentum (default 0.9; refused with adam).")
@click.option("--epochs", type=Count(0), default=None,
              help="Most epochs to train (default: 40 for digits and your own data, 300 for the synthetic sets).")
@click.option("--batch-size", type=Count(1), default=None, help="Default: 32 (xor: 4).")
@click.option("--patience", type=Count(1), default=None,
              help="Stop when the validation loss has not improved for this many epochs, keeping the best "
                   "weights (the validation set is 15 % of the training data; default: no early stopping).")
@click.option("--data", "data_spec", default=None,
              help="Your own data instead of --dataset: FILE.csv (header row), FILE.npz (arrays X, y) or "
                   "X.npy,y.npy. Features are standardised, the scaling folded into the saved model.")
@click.option("--target", default=None,
              help="With --data: the CSV column (or .npz array) holding the target (default: the last column, "
                   "or y). String labels are kept in the model file.")
@click.option("--device", default=None, callback=_device_spec,
              help="cpu, cuda, cuda:N or auto (default: $GPUNN_DEVICE or auto).")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True)
@click.option("--seed", type=Count(0), default=0, show_default=True)
@click.option("--distributed", is_flag=True,
              help="Data-parallel over the MPI ranks this was launched with (mpiexec -n N gpunn train "
                   "--distributed); --batch-size is the global batch; rank 0 prints and writes files.")
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
              help="Write the run's state here after every epoch; the same command run again resumes from it.")
@click.option("--save", "save_path", type=click.Path(dir_okay=False), default=None,
              help="Save the model here: .npz (gpunn), .onnx (ONNX export) or .safetensors.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Write loss/accuracy curves: .png, .svg or .pdf (needs matplotlib: pip install 'gpunn[plot]').")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_friendly
def train(dataset, layer_spec, activation, loss, optimizer, lr, momentum, epochs, batch_size, patience, data_spec,
          target, device, dtype, seed, distributed, checkpoint, save_path, plot_path, as_json):
    """Train a network on a data set; report validation figures per epoch and test accuracy at the end.

    With no options: a 64-32-10 sigmoid network on the embedded 8x8 digits, softmax +
    cross-entropy, SGD with momentum 0.9, on the default device. The test set (25 %) is only used
    for the final figures; early stopping (--patience) watches a validation set carved from the
    training data. --data trains on your own file with the same split and the digits' defaults
    (cross-entropy classifies the target's values; squared_error regresses a numeric target).

    \b
    Examples:
      gpunn train
      gpunn train --layers 64,64,10 --activation relu --optimizer adam --epochs 20 --save digits.npz
      gpunn train --dataset moons --loss binary_cross_entropy --plot curves.svg
      gpunn train --epochs 200 --patience 10 --checkpoint run.ckpt   # run again after a crash: it resumes
      gpunn train --data iris.csv --target species --save iris.npz
    """
    if plot_path:
        _need_matplotlib()
    if momentum is not None and optimizer != "sgd":
        raise click.BadParameter(f"--momentum is SGD's; {optimizer} has none (leave it out, or use --optimizer sgd)",
                                 param_hint="--momentum")
    if data_spec is not None and click.get_current_context().get_parameter_source("dataset") not in (
            click.core.ParameterSource.DEFAULT, None):
        raise click.BadParameter("give --dataset or --data, not both", param_hint="--data")
    if target is not None and data_spec is None:
        raise click.BadParameter("--target names a column of --data FILE; give --data too", param_hint="--target")
    _check_outputs(save_path, plot_path, checkpoint, data_spec)
    sizes = _csv("positive integer", layer_spec, _positive("positive integer")) if layer_spec else None
    prepared = _user_data(data_spec, target, loss, seed) if data_spec else None
    data = _split_of(prepared) if prepared else recipes.split(dataset, loss, seed)
    name = prepared.info["source"] if prepared else dataset
    dataset = "digits" if prepared else dataset     # your own data takes the digits' defaults
    if sizes and (sizes[0] != data.n_features or sizes[-1] != data.n_outputs):
        raise click.BadParameter(f"{name} with {loss} needs --layers to start with {data.n_features} and end "
                                 f"with {data.n_outputs}", param_hint="--layers")
    comm = _communicator(device) if distributed else None
    if comm is not None:
        device = comm.device
    shown = epochs if epochs is not None else recipes.defaults(dataset)[2]
    resuming = bool(checkpoint) and os.path.exists(checkpoint)
    printer = _progress_printer(shown, as_json or (comm is not None and not comm.is_root),
                                checkpoint if resuming else None)
    with printer as report:
        net, summary = recipes.train(dataset, sizes, activation, loss, optimizer, lr, 0.9 if momentum is None
                                     else momentum, epochs, batch_size, patience, device, dtype, seed, checkpoint,
                                     report, comm=comm, data=data, output=prepared.output if prepared else None)
    if comm is not None and not comm.is_root:
        return                                     # rank 0 reports and writes for the job
    summary["dataset"] = name
    summary["resumed_after_epoch"] = printer.resumed_after
    if prepared:
        userdata.fold_scaling(net, prepared.scaling)
        summary["data"] = prepared.info
    _write_outputs(net, summary, prepared, save_path, plot_path, seed)
    _report_train(summary, net, dtype, as_json)


def _check_outputs(save_path: str | None, plot_path: str | None, checkpoint: str | None,
                   data_spec: str | None) -> None:
    """Exit 2 before any work unless every output can be written and no two name one file (or an input)."""
    for path, option in ((save_path, "--save"), (plot_path, "--plot"), (checkpoint, "--checkpoint")):
        _writable(path, option, picture=option == "--plot", model=option == "--save")
    distinct_outputs((save_path, "--save"), (plot_path, "--plot"), (checkpoint, "--checkpoint"),
                     (checkpoint and history_path(checkpoint), "--checkpoint's history file"),
                     inputs=_inputs(data_spec, "--data"))


def _communicator(device: str | None) -> Any:
    """The data-parallel communicator; a launcher without a working MPI is a usage error (exit 2)."""
    try:
        return init_distributed(device)
    except DistributedError as exc:
        raise click.UsageError(str(exc)) from None


def _user_data(spec: str, target: str | None, loss: str, seed: int) -> userdata.Prepared:
    """The user's file, read and split for ``loss`` (DataError, one line, for anything unreadable)."""
    return userdata.prepare(userdata.read_table(spec, target), loss, seed)


def _split_of(p: userdata.Prepared) -> recipes.Split:
    x_train, y_train, x_val, y_val, x_test, y_test = p.parts
    return recipes.Split(x_train, y_train, x_val, y_val, x_test, y_test, p.n_features, p.n_outputs)


def _write_outputs(net: Any, summary: dict, prepared: Any, save_path: str | None, plot_path: str | None,
                   seed: int) -> None:
    if save_path:
        userdata.save_model(net, save_path, prepared.info if prepared else None)
        summary["saved"] = save_path
    if plot_path:
        o = summary["optimizer"]
        lr_text = f"{o['lr']:g}" if isinstance(o["lr"], float) else str(o["lr"])
        plot_history(net.history, plot_path,
                     title=f"{summary['dataset']}: {'-'.join(map(str, summary['layers']))} {summary['activation']}, "
                           f"{summary['loss']}, {o['name']} lr={lr_text}, batch {summary['batch_size']}, seed {seed}")
        summary["plot"] = plot_path


def _report_train(summary: dict, net: Any, dtype: str, as_json: bool) -> None:
    if as_json:
        click.echo(_json(summary))
        return
    acc = summary["test_accuracy"]
    click.echo(f"test accuracy {acc * 100:.2f} %" if acc is not None else "test accuracy n/a", nl=False)
    click.echo(f", test loss {summary['test_loss']:.4f}, {summary['epochs']} epochs in {summary['seconds']:.2f} s "
               f"on {net.device} ({dtype})")
    if net.history is not None and net.history.stopped_early and summary.get("best_epoch") is not None:
        click.echo(f"early stopping restored the weights of epoch {summary['best_epoch']} (the best validation "
                   "loss)")
    if summary.get("saved"):
        click.echo(f"saved model to {summary['saved']}")
    if summary.get("plot"):
        click.echo(f"wrote curves to {summary['plot']}")


class _progress_printer:
    """A click progress bar on a terminal, one line per epoch otherwise, nothing with --json. With
    ``resumed`` (the checkpoint a run starts from) it first says from which epoch the run goes on."""

    def __init__(self, epochs: int, quiet: bool, resumed: str | None = None):
        self.epochs, self.quiet, self.resumed = epochs, quiet, resumed
        self.resumed_after: int | None = None
        self.bar: Any = None

    def __enter__(self):
        if not self.quiet and sys.stderr.isatty():
            self.bar = click.progressbar(length=self.epochs, label="training", file=sys.stderr,
                                         item_show_func=lambda r: r)
            self.bar.__enter__()
        return self.report

    def report(self, record: dict) -> None:
        if self.resumed and record["epoch"] > 1:
            self.resumed_after = record["epoch"] - 1
            if not self.quiet:
                click.echo(f"gpunn: note: resumed from {self.resumed} after epoch {self.resumed_after}", err=True)
            if self.bar is not None:
                self.bar.update(self.resumed_after)
        self.resumed = None
        if self.quiet:
            return
        acc = record.get("val_accuracy")
        line = (f"epoch {record['epoch']}/{self.epochs}  loss {record['loss']:.4f}"
                + (f"  val_acc {acc:.4f}" if acc is not None else ""))
        if self.bar is not None:
            self.bar.update(1, line)
        else:
            click.echo(line, err=True)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        if self.resumed and exc[0] is None and not self.quiet:
            click.echo(f"gpunn: note: {self.resumed} holds a finished run; nothing left to train (delete it to "
                       "start afresh)", err=True)
        return False


def _need_matplotlib() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise click.UsageError("plotting needs matplotlib: pip install 'gpunn[plot]'")


# -- evaluate, predict ------------------------------------------------------------------------------
@main.command(**EPILOG_STYLE)
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("data")
@click.option("--target", default=None, help="The target column (default: the one the model was trained on, else "
                                              "the last column; for .npz the array y).")
@click.option("--device", default=None, callback=_device_spec, help="cpu, cuda, cuda:N or auto.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_friendly
def evaluate(model, data, target, device, as_json):
    """Mean loss (the model's training loss) and accuracy of MODEL on DATA (.csv, .npz or X.npy,y.npy).

    \b
    Examples:
      gpunn evaluate m.npz test.csv --target label
      gpunn evaluate m.safetensors test.npz --json
    """
    net, info = userdata.load_model(model, device)
    table = userdata.read_table(data, target, need_target=True, model_info=info)
    loss = net.loss.name if net.loss is not None else "squared_error"
    labels = info.get("labels") if info else None
    assert table.y is not None
    Y = userdata.targets_for(table.y, loss, labels, table.source, net.n_out)
    result = net.evaluate(table.X.astype(net.dtype), Y)
    out = {"model": model, "data": data, "samples": int(table.X.shape[0]), "loss_function": loss,
           "loss": result.loss, "accuracy": result.accuracy}
    if as_json:
        click.echo(_json(out))
        return
    acc = f"accuracy {result.accuracy * 100:.2f} %, " if result.accuracy is not None else ""
    click.echo(f"{acc}{loss} {result.loss:.6g} on {out['samples']} samples")


@main.command(**EPILOG_STYLE)
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("data")
@click.option("--output", "-o", "output", type=click.Path(dir_okay=False), required=True,
              help="Where to write the predictions: .npy or .csv (labels in their original form).")
@click.option("--device", default=None, callback=_device_spec, help="cpu, cuda, cuda:N or auto.")
@_friendly
def predict(model, data, output, device):
    """Predict with MODEL on the features in DATA (.csv, .npz with X, or X.npy); a target column the model was
    trained on is ignored when present.

    \b
    Examples:
      gpunn predict m.npz new.csv --output predictions.csv
      gpunn predict m.npz X.npy -o labels.npy
    """
    if os.path.splitext(output)[1].lower() not in (".npy", ".csv"):
        raise click.BadParameter("end the name with .npy or .csv", param_hint="--output")
    _writable(output, "--output")
    distinct_outputs((output, "--output"), inputs=((model, "MODEL"), *_inputs(data, "DATA")))
    net, info = userdata.load_model(model, device)
    table = userdata.read_table(data, None, need_target=False, model_info=info)
    y = to_host(net.predict(table.X.astype(net.dtype)))
    loss = net.loss.name if net.loss is not None else None
    classify = (info or {}).get("task") == "classification" or (info is None and loss in _CLASSIFY)
    if classify:
        codes = (y[:, 0] > 0.5).astype(int) if y.shape[1] == 1 else y.argmax(axis=1)
        labels = (info or {}).get("labels")
        y = numpy.asarray(labels)[codes] if labels else codes
    userdata.write_predictions(output, y, (info or {}).get("target") or "prediction")
    click.echo(f"wrote {table.X.shape[0]} predictions to {output}")


_CLASSIFY = ("cross_entropy", "binary_cross_entropy")


# -- check ------------------------------------------------------------------------------------------
@main.command(**EPILOG_STYLE)
@click.option("--device", "devices", default=None, callback=_device_spec,
              help="Comma-separated devices to check against the NumPy float64 reference (default: every "
                   "usable device). A device named here that cannot be used fails the check.")
@click.option("--dtype", "dtypes", default="float32,float64", show_default=True)
@click.option("--steps", type=Count(1), default=20, show_default=True)
@click.option("--seed", type=Count(0), default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@_friendly
def check(devices, dtypes, steps, seed, as_json):
    """Train the same seeded network on every backend and compare with a NumPy float64 reference.

    Prints max relative differences of outputs, gradients and weights after N steps, with
    pass/fail per dtype tolerance; exits 1 when any row fails.

    \b
    Example:
      gpunn check --device cpu,cuda:0 --steps 50
    """
    dev_list = _csv("device", devices) if devices else available_devices()
    dt_list = _csv("dtype", dtypes)
    for dt in dt_list:
        if dt not in ("float32", "float64"):
            raise click.BadParameter(f"dtype must be float32 or float64, got {dt!r}", param_hint="--dtype")
    result = run_check(dev_list, dt_list, steps=steps, seed=seed)
    if as_json:
        click.echo(_json(result))
    else:
        click.echo(f"agreement with NumPy float64: steps 1 and {steps} of {steps} SGD steps (seed {seed})")
        click.echo(f"{'backend':<34} {'quantity':<24} {'max rel diff':>13} {'tolerance':>10}  result")
        for r in result["rows"]:
            click.echo(f"{r['backend']:<34} {r['quantity']:<24} {r['max_rel_diff']:>13.3e} "
                       f"{r['tolerance']:>10.0e}  {'pass' if r['passed'] else 'FAIL'}")
        for note in result["notes"]:
            click.echo(f"note: {note}")
        click.echo("all passed" if result["passed"] else "FAILED"
                   + (": a device asked for was not checked" if result["skipped"] else ""))
    if not result["passed"]:
        sys.exit(1)


# -- plot -------------------------------------------------------------------------------------------
@main.group(**EPILOG_STYLE)
def plot() -> None:
    """Pictures (needs matplotlib: pip install 'gpunn[plot]').

    \b
    Examples:
      gpunn plot activations activations.png
      gpunn train --plot curves.svg          # training curves come with a run
    """


@plot.command("activations", **EPILOG_STYLE)
@click.argument("path", type=click.Path(dir_okay=False))
@_friendly
def plot_activations_cmd(path: str) -> None:
    """The lecture's Figure 1: the six activation functions and their derivatives, as one PNG.

    \b
    Example:
      gpunn plot activations activations.png
    """
    _need_matplotlib()
    _writable(path, "PATH", picture=True)
    plot_activations(path)
    click.echo(f"wrote {path}")


# -- bench ------------------------------------------------------------------------------------------
@main.command(**EPILOG_STYLE)
@click.option("--workload", "workloads", default="lecture,mlp", show_default=True,
              help="Comma-separated: lecture, mlp, wide.")
@click.option("--device", "devices", default="cpu", show_default=True, callback=_device_spec,
              help="Comma-separated devices.")
@click.option("--batch-size", "batch_sizes", default=None,
              help="Comma-separated batch sizes (default: the workload's).")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True)
@click.option("--repeats", type=Count(1), default=5, show_default=True)
@click.option("--min-time", type=Number(0.0, low_open=True), default=0.2, show_default=True,
              help="Seconds per repeat.")
@click.option("--fused/--unfused", default=None,
              help="Fused kernels, CUDA or numba on the CPU (default: on unless GPUNN_FUSED=0).")
@click.option("--threads", "threads_setting", default=None,
              help="BLAS threads: a number, 'auto' (gpunn's policy), 'steady' (the policy without the machine's load) "
                   "or 'off' (default: GPUNN_THREADS, else auto).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write results as JSON.")
@click.option("--markdown", is_flag=True, help="Print the table as Markdown.")
@_friendly
def bench(workloads, devices, batch_sizes, dtype, repeats, min_time, fused, threads_setting, json_path, markdown):
    """Time training steps: µs/step, samples/s, GFLOP/s and share of the matmul ceiling.

    \b
    Examples:
      gpunn bench --workload mlp --device cpu --batch-size 256,2048
      gpunn bench --workload lecture,mlp,wide --device cuda:0 --json bench.json --markdown
    """
    _writable(json_path, "--json")
    names = _csv("workload", workloads)
    for w in names:
        if w not in WORKLOADS:
            raise click.BadParameter(f"unknown workload {w!r}; choose from {', '.join(WORKLOADS)}",
                                     param_hint="--workload")
    sizes = _csv("positive integer", batch_sizes, _positive("positive integer")) if batch_sizes else None
    devs = [Device(d) for d in _csv("device", devices)]
    if threads_setting is not None:
        try:
            threads.set_threads(threads_setting)
        except GpunnError as exc:
            raise click.BadParameter(str(exc), param_hint="--threads") from None
    if "wide" in names and any(not d.is_cuda for d in devs):
        click.echo("gpunn: note: the wide workload (4096-wide layers, batch 4096, ~0.4 TFLOP a step) is GPU-sized; "
                   "on a CPU each step takes seconds", err=True)
    env = environment(dtype)
    _print_header(env)
    rows = []
    for w in names:
        for b in sizes or WORKLOADS[w][4]:
            for dev in devs:
                click.echo(f"timing {w} batch {b} on {dev} ...", err=True)
                rows.append(time_workload(w, dev, dtype, b, repeats=repeats, min_time=min_time, fused=fused))
    _print_table(rows, markdown)
    if json_path:
        write_text_atomic(json_path, _json({"environment": env, "rows": rows}))
        click.echo(f"wrote {json_path}", err=True)


def _print_header(env: dict) -> None:
    click.echo(f"# gpunn {env['gpunn']}, Python {env['python']}, NumPy {env['numpy']}, BLAS {env['blas']}")
    click.echo(f"# CPU {env['cpu']} ({env['cores']} cores); CuPy {env['cupy']}; dtype {env.get('dtype')}; "
               f"TF32 {'on' if env['tf32'] else 'off'}"
               + (f"; OPENBLAS_CORETYPE={env['openblas_coretype']}" if env.get("openblas_coretype") else ""))
    if env.get("cuda_runtime"):
        click.echo(f"# CUDA runtime {env['cuda_runtime']}, driver {env.get('cuda_driver')}")
    for g in env["gpus"]:
        click.echo(f"# GPU {g['device']}: {g['name']}, {g['memory_total_gib']:.0f} GiB, {g['sm_count']} SMs")
    if env["cuda_unavailable_reason"]:
        click.echo(f"# CUDA: {env['cuda_unavailable_reason']}")
    click.echo(f"# BLAS threads: {threads.summary(env['threads'])}; fused CPU kernels: "
               + ((f"numba {env['numba']}" + ("" if ops.fused_enabled() else " (off: GPUNN_FUSED)"))
                  if env["numba"] else "off"))


def _print_table(rows: list[dict], markdown: bool) -> None:
    head = ["workload", "device", "batch", "threads", "us/step", "spread", "samples/s", "GFLOP/s", "ceiling",
            "share", "h2d ms"]
    body = [[r["workload"], r["device"] + (" fused" if r["fused"] else " unfused"), str(r["batch"]),
             "-" if r.get("threads") is None else str(r["threads"]),
             f"{r['us_per_step']:.1f}", f"{r['us_min']:.0f}-{r['us_max']:.0f}",
             f"{r['samples_per_s']:.0f}", f"{r['gflops']:.1f}", f"{r['ceiling_gflops']:.1f}",
             f"{100 * r['share_of_ceiling']:.0f}%" if r["share_of_ceiling"] is not None else "noisy",
             f"{r['h2d_ms']:.2f}"] for r in rows]
    click.echo(format_table(head, body, markdown))


if __name__ == "__main__":  # pragma: no cover
    main()
