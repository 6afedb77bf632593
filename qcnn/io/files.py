"""File access with clear errors: reading with one-line messages, atomic writing."""

import contextlib
import os
import tempfile

from qcnn.errors import QcnnError


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Open a temporary file next to ``path``; on success it replaces ``path``.

    If the block raises, the temporary file is removed and ``path`` is untouched.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path), dir=directory)
    except OSError as e:
        raise QcnnError(f"{path}: cannot write ({e.strerror})") from None
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would leave models unreadable to others
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def reading(path):
    """Turn the OS errors of reading ``path`` into one-line :class:`QcnnError` messages."""
    try:
        yield
    except FileNotFoundError:
        raise QcnnError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise QcnnError(f"{path}: is a directory, not a file") from None
    except OSError as e:
        raise QcnnError(f"{path}: cannot read ({e.strerror})") from None


def read_bytes(path):
    """The whole content of ``path``, or a :class:`QcnnError` naming it."""
    with reading(path), open(path, "rb") as f:
        return f.read()
