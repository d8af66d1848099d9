"""Atomic file writes: a file holds either its old content or its new content, never half of it.

Every file the package writes that a run depends on (checkpoints, ``results.json``, downloaded
ImageNet weights) goes through :func:`atomic_write`: the bytes go to a hidden temporary file in
the same folder (``.<name>.<pid>.<random>.part``), are flushed and fsynced, get the permissions
an ordinary ``open()`` would give under the current umask, and are renamed over the target. A
killed process leaves at worst a ``.part`` file, which :func:`remove_stale_parts` (called when a
run starts in a folder) deletes once its writer is dead.

Example::

    >>> import json, os, tempfile
    >>> from torchreid_vi.utils.fileio import atomic_write, write_json_atomic
    >>> d = tempfile.mkdtemp()
    >>> _ = atomic_write(os.path.join(d, 'a.txt'), lambda f: f.write(b'hello'))
    >>> open(os.path.join(d, 'a.txt')).read()
    'hello'
    >>> write_json_atomic(os.path.join(d, 'r.json'), {'x': 1})
    >>> json.load(open(os.path.join(d, 'r.json')))
    {'x': 1}
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import tempfile
from typing import Any, Callable, List

__all__ = ['atomic_write', 'atomic_produce', 'write_json_atomic', 'remove_stale_parts',
           'current_umask', 'pid_alive', 'hostname', 'free_bytes', 'PART_SUFFIX']

PART_SUFFIX = '.part'


def current_umask() -> int:
    """The process umask (read without changing it for longer than one call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _part_prefix(path: str) -> str:
    return f'.{os.path.basename(path)}.{os.getpid()}.'


def atomic_write(path: str, write: Callable, *, binary: bool = True) -> str:
    """Write ``path`` atomically: ``write(f)`` fills an open temporary file, which replaces
    ``path``.

    Args:
        path: the final file; its folder is created when missing.
        write: called with the open temporary file (binary unless ``binary=False``).
        binary: open the temporary file in ``'wb'`` (default) or ``'w'`` (utf-8) mode.

    Returns: ``path``. On any error (a full disk, an exception in ``write``) the temporary file is
    removed, ``path`` keeps its previous content and the error propagates.
    """
    def produce(tmp: str) -> None:
        with open(tmp, 'wb' if binary else 'w', **({} if binary else {'encoding': 'utf-8'})) \
                as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    return atomic_produce(path, produce)


def atomic_produce(path: str, produce: Callable[[str], None]) -> str:
    """Like :func:`atomic_write`, for writers that want a file name: ``produce(tmp_path)`` creates
    the content at ``tmp_path``, which then replaces ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=_part_prefix(path), suffix=PART_SUFFIX)
    os.close(fd)
    try:
        produce(tmp)
        # mkstemp creates the file 0600; give it what open() would under the umask.
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json_atomic(path: str, data: Any, indent: int = 1) -> None:
    """``json.dump(data)`` to ``path`` atomically (keys keep their order, one trailing newline)."""
    def write(f):
        json.dump(data, f, indent=indent, sort_keys=False)
        f.write('\n')
    atomic_write(path, write, binary=False)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM  # exists, owned by someone else
    return True


def remove_stale_parts(folder: str, recursive: bool = True) -> List[str]:
    """Delete the ``.part`` files that dead writers of this host left in ``folder``.

    A temporary file's name carries its writer's pid (``.<name>.<pid>.<random>.part``); files of
    live processes (another run writing right now) are kept. Returns the removed paths.
    """
    removed = []
    if not os.path.isdir(folder):
        return removed
    walker = os.walk(folder) if recursive else [(folder, [], os.listdir(folder))]
    for root, _, files in walker:
        for name in files:
            if not (name.startswith('.') and name.endswith(PART_SUFFIX)):
                continue
            parts = name[1:-len(PART_SUFFIX)].rsplit('.', 2)
            pid = int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else -1
            if pid_alive(pid):
                continue
            try:
                os.unlink(os.path.join(root, name))
                removed.append(os.path.join(root, name))
            except FileNotFoundError:
                pass
    return removed


def free_bytes(path: str) -> int:
    """Free bytes on the disk that holds ``path``, or will once it is created (its nearest
    existing parent folder is measured)."""
    folder = os.path.abspath(path)
    while not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    return shutil.disk_usage(folder).free


def hostname() -> str:
    """This machine's name (recorded in run locks)."""
    return socket.gethostname()
