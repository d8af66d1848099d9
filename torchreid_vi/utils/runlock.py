"""One run per ``data.save_dir``: a lock file naming its holder.

A live run holds ``<save_dir>/.lock`` (JSON: pid, host, start time, command). A second run into
the same folder stops with one message naming the holder; a lock left by a dead process of this
host (a killed run) is taken over with a note; ``vi.train.share_save_dir True`` allows sharing a
folder on purpose.

Example::

    >>> import os, tempfile
    >>> from torchreid_vi.utils.runlock import RunLock, SaveDirInUse
    >>> d = tempfile.mkdtemp()
    >>> with RunLock(d):
    ...     try:
    ...         RunLock(d).acquire()
    ...     except SaveDirInUse as exc:
    ...         print('refused:', 'in use by' in str(exc))
    refused: True
    >>> os.path.exists(os.path.join(d, '.lock'))
    False
"""
from __future__ import annotations

import datetime
import json
import os
import sys
from typing import List, Optional

from .fileio import hostname, pid_alive

__all__ = ['RunLock', 'SaveDirInUse', 'LOCK_NAME']

LOCK_NAME = '.lock'


class SaveDirInUse(RuntimeError):
    """Another live run writes into the same ``data.save_dir``."""


class RunLock:
    """The lock of one run in ``save_dir`` (a context manager; see the module docstring).

    Args:
        save_dir: the run's folder (created when missing).
        command: what to record as the holder's command line (default ``sys.argv``).
        share: do not lock (``vi.train.share_save_dir``): several runs may write the folder.
    """

    def __init__(self, save_dir: str, command: Optional[List[str]] = None, share: bool = False):
        self.path = os.path.join(save_dir, LOCK_NAME)
        self.command = list(sys.argv if command is None else command)
        self.share = share
        self.held = False
        self.note = ''

    def _info(self) -> dict:
        return {'pid': os.getpid(), 'host': hostname(),
                'started': datetime.datetime.now().isoformat(timespec='seconds'),
                'command': self.command}

    def _read(self) -> Optional[dict]:
        try:
            with open(self.path, encoding='utf-8') as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable: treated as stale below

    def acquire(self) -> 'RunLock':
        """Take the lock, or raise :class:`SaveDirInUse` naming the live holder."""
        if self.share:
            return self
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                holder = self._read()
                if holder is None:
                    continue  # released in between: try again
                pid, host = holder.get('pid', -1), holder.get('host', '')
                if host == hostname() and pid_alive(int(pid)):
                    raise SaveDirInUse(
                        f'data.save_dir {os.path.dirname(self.path)} is in use by another run: '
                        f'pid {pid} on {host}, started {holder.get("started", "?")} '
                        f'({" ".join(holder.get("command", []))}); lock file {self.path}. Use '
                        f'another data.save_dir, or vi.train.share_save_dir True to share it on '
                        f'purpose') from None
                if host and host != hostname():
                    raise SaveDirInUse(
                        f'data.save_dir {os.path.dirname(self.path)} is locked by a run on host '
                        f'{host} (pid {pid}, started {holder.get("started", "?")}); this host '
                        f'cannot tell whether it is alive. If it is not, delete {self.path}; or '
                        f'use vi.train.share_save_dir True to share the folder on purpose')
                self.note = (f'took over the stale lock of pid {pid} on {host or "?"} (started '
                             f'{holder.get("started", "?")}, no longer running)')
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, 'w', encoding='utf-8') as f:
                json.dump(self._info(), f)
            self.held = True
            return self
        raise SaveDirInUse(f'could not take the lock {self.path} (it keeps reappearing)')

    def release(self) -> None:
        if self.held:
            holder = self._read()
            if holder and holder.get('pid') == os.getpid():
                os.unlink(self.path)
            self.held = False

    def __enter__(self) -> 'RunLock':
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
