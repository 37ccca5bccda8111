"""Files that are written whole or not at all, checked when read back.

- ``atomic_write``: a file is written beside its destination and renamed over it (one atomic
  step), with the permissions a new file normally gets (not ``mkstemp``'s 0600).
- ``staging_dir`` + ``swap_into_place``: a folder is built beside its destination and switched in
  with one atomic rename (Linux ``renameat2(RENAME_EXCHANGE)`` when a previous version is there),
  so a reader sees the old folder or the new one, never a mix or nothing. Staging folders left by a
  killed writer carry its pid and are removed by the next writer (``clean_stale_staging``).
- ``sha256_file``, ``crc32_of``: checksums recorded at save time and verified at load.
- ``count_nonfinite``: NaN/Inf per tensor, vectorised (a bit test on the exponent for 16-bit
  floats), cheap enough to run on every tensor of an 8B checkpoint once at load.
- ``failpoint``: named places where the fault-injection tests kill the process (SIGKILL, as a
  crash or the out-of-memory killer would), set by ``LRAGENT_FAILPOINT=name[:n]``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import signal
import socket
import zlib
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np

STAGING_MARK = ".staging-"
FAILPOINT_ENV = "LRAGENT_FAILPOINT"
_failpoint_hits: dict[str, int] = {}


def failpoint(name: str) -> None:
    """Kill this process the n-th time it passes ``name`` when ``$LRAGENT_FAILPOINT`` is
    ``name:n`` (``name`` alone: the first time). A no-op otherwise."""
    spec = os.environ.get(FAILPOINT_ENV)
    if not spec:
        return
    target, _, count = spec.partition(":")
    if target != name:
        return
    _failpoint_hits[name] = _failpoint_hits.get(name, 0) + 1
    if _failpoint_hits[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
_CHUNK = 1 << 24  # elements per slice of the finiteness test (bounds its temporary)
# all-ones exponent = Inf or NaN
_EXPONENT_BITS = {
    np.dtype(np.float16): (np.uint16, 0x7C00),
    np.dtype(ml_dtypes.bfloat16): (np.uint16, 0x7F80),
}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def normal_mode(directory: bool = False) -> int:
    """The mode ``open``/``mkdir`` give a new file or folder under the current umask."""
    return (0o777 if directory else 0o666) & ~_umask()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """``write(tmp_path)`` then rename the result over ``path`` (never a half-written file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{STAGING_MARK}{os.getpid()}-{os.urandom(4).hex()}")
    try:
        write(str(tmp))
        os.chmod(tmp, normal_mode())
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


# ------------------------------------------------------------------------------------ folders


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host is running (a zombie counts as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (tells a reused pid apart), or None where unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def host_name() -> str:
    return socket.gethostname()


def staging_dir(destination: str | os.PathLike) -> Path:
    """A new empty folder beside ``destination`` (same filesystem: the final rename is atomic),
    named after this process so that a later writer can tell it is stale."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(destination)
    path = destination.with_name(f".{destination.name}{STAGING_MARK}{os.getpid()}-"
                                 f"{os.urandom(4).hex()}")
    path.mkdir(mode=0o700)
    os.chmod(path, normal_mode(directory=True))
    return path


def clean_stale_staging(destination: str | os.PathLike) -> list[Path]:
    """Remove staging folders and files of ``destination`` whose writer process is gone."""
    destination = Path(destination)
    removed = []
    prefix = f".{destination.name}{STAGING_MARK}"
    if not destination.parent.is_dir():
        return removed
    for path in destination.parent.iterdir():
        if not path.name.startswith(prefix):
            continue
        try:
            pid = int(path.name[len(prefix):].split("-", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not pid_alive(pid):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    old = destination.with_name(f".{destination.name}.old")  # left by earlier versions
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
        removed.append(old)
    return removed


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: the filesystem cannot exchange
        return False
    raise OSError(errno, f"cannot swap {a} and {b}: {os.strerror(errno)}")


def swap_into_place(staging: Path, destination: Path) -> None:
    """Make ``staging`` the folder at ``destination`` in one atomic step; the previous
    ``destination`` (if any) is deleted afterwards."""
    os.chmod(staging, normal_mode(directory=True))
    for path in staging.rglob("*"):
        if path.is_symlink():
            continue
        if path.is_dir():
            os.chmod(path, normal_mode(directory=True))
        elif path.is_file():
            os.chmod(path, normal_mode())  # some writers (safetensors) create files 0600
            _fsync(path)
    if not destination.exists():
        os.replace(staging, destination)
        return
    if _exchange(staging, destination):
        failpoint("swap.exchanged")
        shutil.rmtree(staging, ignore_errors=True)  # now the previous version
        return
    # No atomic exchange on this filesystem: two renames. A crash between them leaves the
    # previous version under the staging name (kept until the next write) and none at
    # ``destination``; readers then fail with "not found", never read a mix.
    previous = destination.with_name(f".{destination.name}{STAGING_MARK}{os.getpid()}-previous")
    os.replace(destination, previous)
    os.replace(staging, destination)
    shutil.rmtree(previous, ignore_errors=True)


# ------------------------------------------------------------------------------------ checks


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def crc32_of(array: np.ndarray) -> str:
    """CRC-32 of an array's bytes in C order (hex): the per-tensor checksum of saved weights."""
    data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    return f"{zlib.crc32(data):08x}"


def count_nonfinite(array: np.ndarray) -> int:
    """How many elements of a float array are NaN or +-Inf (0 for integer arrays)."""
    array = np.asarray(array)
    if array.dtype.kind in "biu" or array.size == 0:
        return 0
    flat = array.ravel(order="K")  # no copy for C- or F-ordered arrays
    bits = _EXPONENT_BITS.get(array.dtype)
    count = 0
    for start in range(0, flat.size, _CHUNK):
        chunk = flat[start:start + _CHUNK]
        if bits is None:
            if not np.isfinite(chunk).all():
                count += int(chunk.size - np.count_nonzero(np.isfinite(chunk)))
        else:
            kind, mask = bits
            exponent = chunk.view(kind) & kind(mask)
            if exponent.max() == mask:
                count += int(np.count_nonzero(exponent == mask))
    return count


def is_float_dtype(dtype) -> bool:
    """Float32/16/64 or bfloat16 (ml_dtypes' bfloat16 is not a numpy 'f' kind)."""
    dtype = np.dtype(dtype)
    return dtype.kind == "f" or dtype == np.dtype(ml_dtypes.bfloat16)
