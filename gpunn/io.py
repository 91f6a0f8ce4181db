"""Files: the model file format, safe reading of untrusted files, and atomic writes. Knows bytes on
disk, not networks.

A model file is an ``.npz`` (a zip archive of two stored ``.npy`` members): ``header``, UTF-8 JSON
bytes, and ``params``, the flat float32/float64 parameters. The header records the format name and
version, the gpunn version, the network's configuration (dtype, each layer's sizes, activation with
its parameters, initialiser) and a SHA-256 of the header and parameters. The checksum detects
accidents (truncation, corruption, a file of another format); it is no defence against deliberate
tampering, since whoever edits the file can recompute it. What a file can do to the reader is bounded
instead: :func:`read_model` opens regular files only (never blocking on a FIFO or device), reads no
member larger than the file itself (members must be stored, not compressed, so nothing inflates),
checks every ``.npy`` header's dtype and shape against the bytes really there before reading them,
never unpickles, and turns every malformed input into :class:`~gpunn.errors.ModelFileError`.

Writes (:func:`atomic_write`) go to a temporary file beside the target, then replace it in one rename:
a failed or killed save leaves any earlier file intact. They write through symbolic links, refuse
special files and read-only files, give a new file the umask's permissions and keep an existing
file's mode, and remove temporaries left behind by killed saves. :meth:`gpunn.Sequential.save` and
:func:`gpunn.load` build on this module.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import stat
import struct
import threading
import zipfile
import zlib
from collections.abc import Callable, Set
from typing import IO, Any

import numpy
from numpy.lib import format as npy_format

from .errors import ModelFileError, SaveError
from .types import PathLike
from .version import __version__

__all__ = ["FORMAT", "FORMAT_VERSION", "MAX_HEADER_BYTES", "atomic_write", "check_writable", "digest",
           "open_regular", "read_archive", "read_model", "write_archive", "write_model", "write_text_atomic"]

FORMAT = "gpunn-model"
FORMAT_VERSION = 1
#: Largest JSON header a model file may have (a real one is a few hundred bytes per layer).
MAX_HEADER_BYTES = 1 << 20
#: Everything a malformed zip archive or .npy member can raise while it is parsed.
_PARSE_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, TypeError, KeyError,
                 IndexError, NotImplementedError, RuntimeError, OverflowError, SyntaxError, struct.error,
                 zlib.error, UnicodeDecodeError, RecursionError)


def digest(header: dict, arrays: numpy.ndarray | dict[str, numpy.ndarray]) -> str:
    """SHA-256 of the header (without its ``sha256`` field, keys sorted) and the arrays' bytes (by name)."""
    if not isinstance(arrays, dict):
        arrays = {"params": arrays}
    h = hashlib.sha256(json.dumps({k: v for k, v in header.items() if k != "sha256"}, sort_keys=True).encode())
    for name in sorted(arrays):
        h.update(numpy.ascontiguousarray(arrays[name]).tobytes())
    return h.hexdigest()


# -- writing ------------------------------------------------------------------------------------------
def write_model(path: PathLike, config: dict, params: numpy.ndarray) -> None:
    """Write a model file: ``config`` (JSON-able; its ``dtype`` names the parameters' dtype) and the flat
    host array ``params``, atomically."""
    write_archive(path, FORMAT, {**config, "n_parameters": int(params.size)}, {"params": params})


def write_archive(path: PathLike, fmt: str, header: dict, arrays: dict[str, numpy.ndarray]) -> None:
    """Write ``header`` (JSON-able; stamped with the format ``fmt``, its version and a SHA-256) and the
    flat float ``arrays`` by name, as one archive, atomically."""
    header = {"format": fmt, "format_version": FORMAT_VERSION, "gpunn_version": __version__, **header}
    header["sha256"] = digest(header, arrays)
    head = numpy.frombuffer(json.dumps(header, sort_keys=True).encode(), dtype=numpy.uint8)
    atomic_write(path, lambda fh: _write_npz(fh, head, arrays))


def _write_npz(fh: IO[bytes], header: numpy.ndarray, arrays: dict[str, numpy.ndarray]) -> None:
    numpy.savez(fh, header=header, **arrays)  # type: ignore[arg-type]


def write_text_atomic(path: PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (reports and JSON)."""
    atomic_write(path, lambda fh: fh.write(text.encode()))


def atomic_write(path: PathLike, write: Callable[[IO[bytes]], object]) -> None:
    """Call ``write(fh)`` on a temporary file beside ``path``, flush it to disk, then rename it over
    ``path``. Every file gpunn writes goes through here.

    Raises :class:`~gpunn.errors.SaveError` (naming ``path``) for a path that cannot be written: a
    missing folder, a folder, a special file (FIFO, device, socket), a read-only file, a bad path
    value. Any earlier file stays intact and no temporary is left behind, also on Ctrl-C.
    """
    shown = _save_path_text(path)
    target = os.path.realpath(shown)            # write through symbolic links: the link stays a link
    folder, name = os.path.split(target)
    mode = _mode_for(shown, target, folder)
    prefix = _temporary_prefix(folder, name)
    _remove_stale_temporaries(folder, prefix)
    tmp = os.path.join(folder, f"{prefix}{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            with os.fdopen(fd, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, mode)
            os.replace(tmp, target)
        except BaseException:
            _unlink_quietly(tmp)
            raise
    except OSError as exc:
        hint = f" (is {folder} writable?)" if isinstance(exc, PermissionError) else ""
        raise SaveError(f"cannot save to {shown}: {exc.strerror or exc}{hint}; any earlier file there is "
                        "unchanged") from None


def check_writable(path: PathLike) -> None:
    """SaveError now if :func:`atomic_write` could not replace ``path`` (checked before long work)."""
    shown = _save_path_text(path)
    target = os.path.realpath(shown)
    _mode_for(shown, target, os.path.dirname(target))


def _save_path_text(path: PathLike) -> str:
    """``path`` as text for a save; SaveError when it ends in a separator, which names a folder (writing a
    file there instead would make the path the caller holds never find it again)."""
    shown = _path_text(path, SaveError, "save to")
    last = os.path.basename(shown.replace(os.altsep, os.sep) if os.altsep else shown)
    if last in ("", ".", ".."):
        raise SaveError(f"cannot save to {shown}: a path ending in {last or os.sep!r} names a folder; give a file "
                        "name as its last part")
    return shown


#: Characters a temporary name adds to its prefix: the pid (at most 7 digits on Linux, 10 elsewhere), '-',
#: 8 hex digits and '.tmp'.
_TEMPORARY_SUFFIX = 10 + 1 + 8 + 4


def _temporary_prefix(folder: str, name: str) -> str:
    """``.{name}.gpunn-`` with ``name`` cut (at a character boundary) so that the whole temporary name stays
    within the file system's limit on a name's bytes (NAME_MAX): a valid 255-byte name stays savable."""
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        limit = 255
    room = max(1, (limit if limit > 0 else 255) - len(".") - len(".gpunn-") - _TEMPORARY_SUFFIX)
    raw = os.fsencode(name)
    if len(raw) > room:
        cut = raw[:room]
        while cut:          # drop a partial UTF-8 character at the end; fsdecode keeps undecodable bytes
            try:
                cut.decode("utf-8")
                break
            except UnicodeDecodeError:
                cut = cut[:-1]
        name = os.fsdecode(cut or raw[:room])
    return f".{name}.gpunn-"


def _mode_for(shown: str, target: str, folder: str) -> int:
    """The permission bits the saved file gets; SaveError where the target cannot be replaced."""
    if not os.path.isdir(folder):
        raise SaveError(f"cannot save to {shown}: folder {folder} does not exist; create it first")
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return 0o666 & ~_umask()
    except OSError as exc:
        raise SaveError(f"cannot save to {shown}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise SaveError(f"cannot save to {shown}: it is a folder")
    if not stat.S_ISREG(st.st_mode):
        raise SaveError(f"cannot save to {shown}: it is a special file ({_kind(st.st_mode)}), not a regular "
                        "file; gpunn never replaces those")
    if not st.st_mode & 0o222:
        raise SaveError(f"cannot save to {shown}: the file is read-only (mode {stat.filemode(st.st_mode)}); "
                        "make it writable or save elsewhere")
    return stat.S_IMODE(st.st_mode)


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process umask (read without changing it where /proc says it)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _remove_stale_temporaries(folder: str, prefix: str) -> None:
    """Delete temporaries (named ``prefix``, pid, token) of earlier saves whose process no longer runs (killed
    saves)."""
    try:
        entries = [e for e in os.listdir(folder) if e.startswith(prefix) and e.endswith(".tmp")]
    except OSError:
        return
    for entry in entries:
        pid_text = entry[len(prefix):].split("-", 1)[0]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and not _alive(int(pid_text)):
            _unlink_quietly(os.path.join(folder, entry))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# -- reading ------------------------------------------------------------------------------------------
def read_model(path: PathLike) -> tuple[dict, numpy.ndarray]:
    """(header, flat parameters) of a model file, after checking its format, version and checksum.

    Time and memory are bounded by the file's real size; anything malformed is a ModelFileError.
    """
    header, arrays = read_archive(path, FORMAT, {"params"})
    return header, arrays["params"]


def read_archive(path: PathLike, fmt: str, required: set[str], optional: Set[str] = frozenset(),
                 what: str = "gpunn model") -> tuple[dict, dict[str, numpy.ndarray]]:
    """(header, arrays) of an archive written by :func:`write_archive` in format ``fmt``, holding the
    ``required`` arrays and any of the ``optional`` ones, all finite and of the header's ``dtype``."""
    shown = _path_text(path, ModelFileError, "load")
    with open_regular(shown, what=f"{what} file") as fh:
        size = os.fstat(fh.fileno()).st_size
        try:
            head, arrays = _read_members(fh, size, shown, required, optional, what)
        except ModelFileError:
            raise
        except _PARSE_ERRORS as exc:
            raise ModelFileError(f"{shown} is truncated or corrupt ({type(exc).__name__}: "
                                 f"{str(exc)[:200]})") from None
    try:
        header = json.loads(bytes(head).decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except (ValueError, RecursionError) as exc:
        raise ModelFileError(f"{shown} has an unreadable header ({type(exc).__name__}: {str(exc)[:100]}); the "
                             "file is corrupt") from None
    _check_header(header, arrays, shown, fmt, what)
    return header, arrays


def open_regular(path: PathLike, error: type[Exception] = ModelFileError, what: str = "model file") -> IO[bytes]:
    """Open ``path`` for reading without blocking, and only if it is a regular file; ``error`` (naming
    ``what`` was expected) for a missing file, a folder, a special file, permission denied, a bad path."""
    shown = _path_text(path, error, "read")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(shown, flags)
    except FileNotFoundError:
        raise error(f"no {what} at {shown}") from None
    except PermissionError:
        raise error(f"cannot read {shown}: permission denied") from None
    except OSError as exc:
        if exc.errno == errno.EISDIR:
            raise error(f"{shown} is a folder, not a {what}") from None
        raise error(f"cannot read {shown}: {exc.strerror or exc}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a folder" if stat.S_ISDIR(mode) else f"a special file ({_kind(mode)})"
        raise error(f"{shown} is {kind}, not a {what}")
    return os.fdopen(fd, "rb")


def _read_members(fh: IO[bytes], size: int, shown: str, required: Set[str], optional: Set[str],
                  what: str) -> tuple[numpy.ndarray, dict[str, numpy.ndarray]]:
    """The header and the named arrays of the archive, each checked before its bytes are read."""
    if not zipfile.is_zipfile(fh):
        raise ModelFileError(f"{shown} is not a {what} file (not an .npz archive); it may be truncated "
                             "or of another format")
    fh.seek(0)
    with zipfile.ZipFile(fh) as zf:
        infos = {info.filename: info for info in zf.infolist()}
        expected = sorted(f"{n}.npy" for n in {"header"} | required)
        names = set(infos)
        if not set(expected) <= names or not names <= {f"{n}.npy" for n in {"header"} | required | optional}:
            raise ModelFileError(f"{shown} is an .npz archive but not a {what} (members: "
                                 f"{sorted(infos)[:10]}; expected {expected})")
        for info in infos.values():
            if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1 or info.file_size > size:
                raise ModelFileError(f"{shown}: member {info.filename} is compressed, encrypted or larger than "
                                     "the file; gpunn writes stored members only, so this file is not one of its")
        head = _read_npy(zf, infos["header.npy"], ("u",), MAX_HEADER_BYTES, shown)
        arrays = {name.removesuffix(".npy"): _read_npy(zf, info, ("f",), size, shown)
                  for name, info in infos.items() if name != "header.npy"}
    return head, arrays


def _read_npy(zf: zipfile.ZipFile, info: zipfile.ZipInfo, kinds: tuple[str, ...], limit: int,
              shown: str) -> numpy.ndarray:
    """A 1-D ``.npy`` member of a plain dtype of ``kinds``, read only after its header proved to describe
    exactly the bytes the member holds (at most ``limit``)."""
    with zf.open(info) as stream:
        version = npy_format.read_magic(stream)
        read_header = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
        shape, fortran, dtype = read_header(stream)
        name = info.filename.removesuffix(".npy")
        if dtype.hasobject:
            raise ModelFileError(f"{shown}: {name} holds pickled Python objects; gpunn never unpickles, so it "
                                 "refuses the file")
        if (dtype.fields is not None or dtype.subdtype is not None or dtype.kind not in kinds or dtype.hasobject
                or len(shape) != 1):
            raise ModelFileError(f"{shown}: {name} is an array of shape {shape} and dtype {dtype}; a gpunn model "
                                 f"holds a flat array of plain {'/'.join(kinds)} numbers there")
        nbytes = int(shape[0]) * dtype.itemsize
        if nbytes > limit or nbytes != info.file_size - stream.tell():
            raise ModelFileError(f"{shown}: {name} claims {shape[0]} elements ({nbytes} bytes) but the member "
                                 f"holds {info.file_size - stream.tell()} bytes; the file is corrupt")
        data = stream.read(nbytes + 1)          # reading to the end makes zipfile check the CRC
    return numpy.frombuffer(data, dtype=dtype).astype(dtype.newbyteorder("="))


def _check_header(header: dict, arrays: dict[str, numpy.ndarray], shown: str, fmt: str, what: str) -> None:
    if header.get("format") != fmt:
        raise ModelFileError(f"{shown} is not a {what} (format {str(header.get('format'))[:50]!r})")
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelFileError(f"{shown} has model format version {str(version)[:20]}; this gpunn reads "
                             f"version {FORMAT_VERSION} (saved by gpunn {str(header.get('gpunn_version'))[:20]}); "
                             "load it with a matching gpunn version")
    if header.get("sha256") != digest(header, arrays):
        raise ModelFileError(f"{shown} failed its checksum: the header or the weights were changed after "
                             "saving (corrupt, or edited)")
    for name, a in arrays.items():
        if a.dtype.name != header.get("dtype"):
            raise ModelFileError(f"{shown}: {name} is {a.dtype}, but the header says {str(header.get('dtype'))[:20]}")
        if not numpy.all(numpy.isfinite(a)):
            raise ModelFileError(f"{shown}: {name} holds {int(numpy.count_nonzero(~numpy.isfinite(a)))} NaN or "
                                 "infinite value(s); a trained gpunn network never has them")


# -- paths --------------------------------------------------------------------------------------------
def _path_text(path: Any, error: type[Exception], verb: str) -> str:
    """``path`` as a str (bytes are decoded as the file system does); ``error`` for anything else."""
    try:
        text = os.fsdecode(os.fspath(path))
    except (TypeError, ValueError, UnicodeError):
        raise error(f"cannot {verb} {path!r}: a path must be a str or os.PathLike") from None
    if "\0" in text or not text:
        raise error(f"cannot {verb} {text!r}: {'a path cannot contain a NUL byte' if text else 'the path is empty'}")
    return text


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"
