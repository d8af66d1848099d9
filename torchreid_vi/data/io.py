"""Small, strict readers for the files of cross-modal re-ID datasets.

* :func:`parse_id_list`: SYSU/LLCM id lists (one comma-separated line: ``6,10,17,...``);
* :func:`parse_idx_file`: RegDB/LLCM index lists (``<root-relative path> <int label>`` per line);
* :func:`safe_join`: join a root with a relative path read from a file, refusing paths that leave
  the root (``../``, absolute paths);
* :func:`read_image`: decode an image as 3-channel RGB, failing once, with the file name, instead
  of retrying forever as torchreid's ``read_image`` does on a corrupt file.

Every error names the file (and line number where there is one) and says what was expected.

Example::

    >>> import os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> with open(os.path.join(d, 'test_id.txt'), 'w') as f:
    ...     _ = f.write('6,10, 17\\n')
    >>> parse_id_list(os.path.join(d, 'test_id.txt'))
    [6, 10, 17]
    >>> with open(os.path.join(d, 'train_visible_1.txt'), 'w') as f:
    ...     _ = f.write('Visible/5/female_front_v_00500_5.bmp 0\\n\\n')
    >>> parse_idx_file(os.path.join(d, 'train_visible_1.txt'))
    [IdxLine(rel_path='Visible/5/female_front_v_00500_5.bmp', label=0, line_no=1)]
"""
from __future__ import annotations

import os
import os.path as osp
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator, List, NamedTuple, Optional

import numpy as np
from PIL import Image

__all__ = [
    'DataFormatError', 'ImageReadError', 'IdxLine',
    'parse_id_list', 'parse_idx_file', 'safe_join', 'read_image', 'check_images',
    'recording_reads', 'note_read',
]


class DataFormatError(ValueError):
    """A dataset file exists but its content does not have the expected format."""


class ImageReadError(OSError):
    """An image file is missing, truncated or not an image."""


class IdxLine(NamedTuple):
    """One line of an index file: ``<rel_path> <label>`` found at 1-based ``line_no``."""
    rel_path: str
    label: int
    line_no: int


# The dataset parse cache (base.py) re-validates a cached parse by the modification times of the
# list files and folders that were read to build it; readers report them here while recording.
_READS: ContextVar[Optional[list]] = ContextVar('torchreid_vi_reads', default=None)


@contextmanager
def recording_reads() -> Iterator[list]:
    """Collect the paths passed to :func:`note_read` (and read by the parsers) inside the block."""
    token = _READS.set([])
    try:
        yield _READS.get()
    finally:
        _READS.reset(token)


def note_read(path: str) -> None:
    """Tell an active :func:`recording_reads` that ``path`` (a list file or a walked folder)
    was read."""
    log = _READS.get()
    if log is not None:
        log.append(path)


def _read_text(path: str) -> List[str]:
    note_read(path)
    # utf-8-sig drops a byte-order mark that Windows editors like to add.
    with open(path, 'r', encoding='utf-8-sig') as f:
        return f.read().splitlines()


def parse_id_list(path: str) -> List[int]:
    """Read a one-line, comma-separated id list (SYSU ``exp/*_id.txt``, LLCM ``idx/test_id.txt``).

    The first non-empty line is used; later lines are ignored (the reference loaders read only
    ``readlines()[0]``). Tokens are stripped and empty tokens skipped, so ``'1,2,'``, ``'1, 2'``
    and a missing or present trailing newline all parse alike.

    Args:
        path: the id file.

    Returns:
        the ids as ints, in file order.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataFormatError: no non-empty line, or a token that is not a decimal integer
            (message gives file, line number and token).
    """
    lines = _read_text(path)
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        ids = []
        for token in line.split(','):
            token = token.strip()
            if not token:
                continue
            try:
                ids.append(int(token))
            except ValueError:
                raise DataFormatError(
                    f'{path}, line {line_no}: "{token}" is not an integer id; expected one line '
                    f'of comma-separated integers such as "6,10,17"'
                ) from None
        return ids
    raise DataFormatError(f'{path}: the file has no ids; expected one line of comma-separated '
                          f'integers such as "6,10,17"')


def parse_idx_file(path: str) -> List[IdxLine]:
    """Read an index file of ``<root-relative path><space><int label>`` lines.

    Blank lines (including a trailing newline) are skipped. The path is everything before the
    last run of whitespace, so only the label must be a separate token.

    Args:
        path: the index file (e.g. RegDB ``idx/train_visible_1.txt``).

    Returns:
        one :class:`IdxLine` per non-blank line, in file order.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataFormatError: a line without a label or with a non-integer label (file + line number).
    """
    out = []
    for line_no, line in enumerate(_read_text(path), start=1):
        text = line.strip()
        if not text:
            continue
        parts = text.rsplit(None, 1)
        label = None
        if len(parts) == 2:
            try:
                label = int(parts[1])
            except ValueError:
                pass
        if label is None:
            raise DataFormatError(
                f'{path}, line {line_no}: "{text}" is not "<relative path> <integer label>", '
                f'e.g. "Visible/5/female_front_v_00500_5.bmp 0"'
            )
        out.append(IdxLine(parts[0], label, line_no))
    return out


def safe_join(root: str, rel_path: str, *, source: str = '') -> str:
    """Join ``root`` and a relative path read from a data file, refusing escapes from ``root``.

    Args:
        root: the dataset folder.
        rel_path: a path relative to ``root`` with ``/`` or the OS separator.
        source: where ``rel_path`` came from (e.g. ``'idx/test_nir.txt, line 3'``), for messages.

    Returns:
        the normalised joined path (inside ``root``).

    Raises:
        DataFormatError: ``rel_path`` is absolute, or ``..`` components take it outside ``root``.

    >>> safe_join('/data/RegDB', 'Visible/1/a.bmp')
    '/data/RegDB/Visible/1/a.bmp'
    """
    where = f'{source}: ' if source else ''
    rel = rel_path.replace('\\', '/') if os.sep == '/' else rel_path
    if osp.isabs(rel) or rel.startswith('/') or (len(rel) > 1 and rel[1] == ':'):
        raise DataFormatError(f'{where}path "{rel_path}" is absolute; dataset lists must hold '
                              f'paths relative to the dataset folder {root}')
    norm = osp.normpath(rel)
    if norm == '..' or norm.startswith('..' + os.sep) or norm.startswith('../'):
        raise DataFormatError(f'{where}path "{rel_path}" leaves the dataset folder {root}; '
                              f'paths must stay inside it')
    return osp.join(root, norm)


# 16-bit gray modes PIL reads (thermal cameras store 16-bit PNG/TIFF); 'I' is a 32-bit int image.
_WIDE_GRAY_MODES = ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I')
_UINT16_MAX = 65535


def _wide_gray_to_rgb(img: Image.Image, path: str) -> Image.Image:
    """A 16-bit gray image scaled linearly to 8 bits (``v * 255 / 65535``, rounded), as RGB.

    PIL's own ``convert('RGB')`` clips such images at 255 instead of scaling them, which turns
    most of a thermal image white.
    """
    values = np.asarray(img, dtype=np.float64)
    if values.size and (values.min() < 0 or values.max() > _UINT16_MAX):
        raise ImageReadError(f'cannot use image {path}: mode {img.mode} with values '
                             f'{values.min():.0f}..{values.max():.0f} is not a 16-bit image '
                             f'(expected 0..{_UINT16_MAX}); convert it to 8-bit RGB or gray')
    gray = np.rint(values * (255.0 / _UINT16_MAX)).astype(np.uint8)
    return Image.fromarray(gray, mode='L').convert('RGB')


def read_image(path: str) -> Image.Image:
    """Decode ``path`` into a 3-channel RGB PIL image (gray/'L' and palette images included).

    16-bit gray images (``I;16`` PNG, thermal cameras) are scaled linearly to 8 bits
    (``round(v * 255 / 65535)``); floating-point images (mode ``F``) are refused, there is no
    agreed range to scale them from.

    Raises:
        ImageReadError: the file is missing, truncated, or not a decodable image; the message
            names the file. It fails at once: no retry loop (torchreid's reader retries forever
            on a corrupt file, which hangs a training run).
    """
    try:
        with Image.open(path) as img:
            if img.mode in _WIDE_GRAY_MODES:
                return _wide_gray_to_rgb(img, path)
            if img.mode == 'F':
                raise ImageReadError(f'cannot use image {path}: floating-point mode F has no '
                                     f'defined 8-bit range; save it as 8-bit RGB or gray')
            return img.convert('RGB')  # convert() forces the full decode inside the try
    except FileNotFoundError:
        raise ImageReadError(f'image file not found: {path}') from None
    except ImageReadError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageReadError(f'cannot decode image {path}: {exc}') from exc


def check_images(paths: List[str], workers: int = 4) -> List[str]:
    """Decode every image of ``paths`` once (threads; PIL releases the GIL while decoding) and
    return one message per unreadable file, in ``paths`` order (empty: all readable)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(path):
        try:
            read_image(path)
            return None
        except ImageReadError as exc:
            return str(exc)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return [m for m in pool.map(one, paths, chunksize=64) if m is not None]
