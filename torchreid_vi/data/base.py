"""The base class of every cross-modal (visible-infrared) dataset.

A new dataset is a subclass that names its folder and lists its images; the base does the rest
(root lookup, parse caching, train relabelling, validation, image reading, summaries, multi-source
training, evaluation settings)::

    from torchreid_vi.data.base import CrossModalDataset, VISIBLE, INFRARED
    from torchreid_vi.registry import register_dataset

    class MyVI(CrossModalDataset):
        name = 'my_vi'
        dataset_dir = 'my_vi'                   # folder under torchreid's ``root``
        layout = 'my_vi/{visible,infrared}/{train,test}/<pid>/<cam>_<n>.jpg'

        def load_records(self, dataset_root):
            ...                                 # lists of (path, pid, camid, modality)
            return train, query, gallery

    register_dataset('my_vi', MyVI)

Records are torchreid 4-tuples ``(img_path, pid, camid, dsetid)`` where **dsetid is the modality**
(:data:`VISIBLE` = 0, :data:`INFRARED` = 1). ``query`` holds all infrared test images and
``gallery`` all visible test images (the evaluation protocols pick per-trial subsets from them).
"""
from __future__ import annotations

import operator
import os
import os.path as osp
import warnings
from collections import Counter
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .._torchreid import tr
from .io import DataFormatError, read_image, recording_reads

__all__ = [
    'VISIBLE', 'INFRARED', 'MODALITY_NAMES', 'Record', 'DatasetLayoutError',
    'CrossModalDataset', 'MultiSourceCrossModalDataset', 'parse_cache_info', 'clear_parse_cache',
]

VISIBLE = 0
INFRARED = 1
MODALITY_NAMES = ('vis', 'ir')
"""Index = modality code: ``MODALITY_NAMES[VISIBLE] == 'vis'``."""

Record = Tuple[str, int, int, int]
"""``(img_path, pid, camid, modality)``: a torchreid 4-tuple whose dsetid is the modality."""

SPLITS = ('train', 'query', 'gallery')

# Keyword arguments torchreid's datamanager passes to every image dataset; they mean nothing to a
# cross-modal dataset and are accepted and ignored.
_TORCHREID_DATASET_KWARGS = frozenset({
    'split_id', 'cuhk03_labeled', 'cuhk03_classic_split', 'market1501_500k',
    'seq_len', 'sample_method',
})


class DatasetLayoutError(RuntimeError):
    """The dataset folder does not look like the documented layout (missing folder/file, empty
    split). The message names the dataset, the path and sketches the expected tree."""


# ------------------------------------------------------------------------------------------------
# Parse cache. torchreid's datamanager constructs each dataset once for training and twice per
# target (query, gallery); parsing a 46k-image tree three times is wasted time. Entries are keyed
# by (class, resolved dataset folder, options that affect parsing) and re-validated on every hit by
# the modification times of the list files and folders the parse read, so editing a split file in
# the same process is noticed.
_PARSE_CACHE: Dict[tuple, dict] = {}
_CACHE_STATS = Counter()


def parse_cache_info() -> Dict[str, int]:
    """Cache statistics: ``reads`` (trees actually parsed), ``hits``, ``stale`` (hits rejected
    because a file changed) and ``entries``."""
    return {'reads': _CACHE_STATS['reads'], 'hits': _CACHE_STATS['hits'],
            'stale': _CACHE_STATS['stale'], 'entries': len(_PARSE_CACHE)}


def clear_parse_cache() -> None:
    """Forget every cached parse and reset the statistics."""
    _PARSE_CACHE.clear()
    _CACHE_STATS.clear()


def _fingerprint(paths: Sequence[str]) -> tuple:
    out = []
    for p in sorted(set(paths)):
        try:
            st = os.stat(p)
            out.append((p, st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((p, None, None))
    return tuple(out)


def _freeze(value: Any) -> Any:
    """A hashable stand-in for an option value (lists from yaml become tuples)."""
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    return value


class CrossModalDataset(tr.data.ImageDataset):
    """A torchreid image dataset whose items carry a modality (visible 0 / infrared 1).

    Subclass contract:

    * ``name``: the registered name (messages, evaluation keys); defaults to the class name.
    * ``dataset_dir``: folder under torchreid's ``root``.
    * ``layout``: a short sketch of the expected tree, shown in every layout error.
    * ``layout_markers``: paths relative to the dataset folder whose presence shows that ``root``
      itself is the dataset folder (optional).
    * ``default_options``: protocol options (constructor keyword arguments, e.g. RegDB
      ``trial``) with their defaults; ``validate_options`` may check values.
    * ``parse_options``: the option names that change what ``load_records`` returns (cache key);
      ``None`` = all of them.
    * ``load_records(dataset_root) -> (train, query, gallery)``: lists of
      ``(path, pid, camid, modality)``; train pids may be raw (relabelled here).
    * ``protocol``: the evaluation protocol's name in
      :data:`torchreid_vi.evaluation.protocols.PROTOCOLS` (default ``'generic'``: every IR image
      against every VIS image, torchreid's same-pid-same-camera removal; it reads the options
      ``directions``, ``removal`` and ``cmc_mode`` when the dataset declares them).

    Root lookup: ``<root>/<dataset_dir>`` is used when it is a folder; otherwise ``root`` itself
    when it is named ``dataset_dir`` or holds all ``layout_markers``. ``<root>/<dataset_dir>``
    wins when both qualify.

    After loading, every split is sorted by (pid, camid, file name) and train pids are
    relabelled 0..N-1 in ascending raw-pid order, shared by both modalities
    (``train_raw_pids[label]`` gives the raw pid back); query and gallery keep raw pids.
    Records are validated (non-empty splits, 4-tuples, int pid/camid, modality in {0, 1}).

    Args:
        root: torchreid's data root (``~`` expanded).
        transform, k_tfm, mode, combineall, verbose: as torchreid's ``ImageDataset``.
        **options: protocol options declared in ``default_options``; torchreid's own dataset
            keywords (``split_id``, ``cuhk03_labeled``...) are accepted and ignored. Anything else
            raises ``TypeError`` naming the dataset and the key.

    ``__getitem__`` returns torchreid's dict ``{'img', 'pid', 'camid', 'impath', 'dsetid'}`` plus
    ``'modality'`` (== ``dsetid``); images are decoded as 3-channel RGB.
    """

    name: str = ''
    dataset_dir: str = ''
    layout: str = ''
    layout_markers: Tuple[str, ...] = ()
    default_options: Dict[str, Any] = {}
    parse_options: Optional[Tuple[str, ...]] = None
    protocol: str = 'generic'

    def __init__(self, root: str = '', transform=None, k_tfm: int = 1, mode: str = 'train',
                 combineall: bool = False, verbose: bool = True, **kwargs):
        self.protocol_options = self._resolve_options(kwargs)
        self.root = osp.abspath(osp.expanduser(root or '.'))
        self.dataset_root = self.resolve_root(self.root)
        train, query, gallery, raw_pids = self._load_cached()
        self.train_raw_pids: Optional[List[int]] = list(raw_pids)
        super().__init__(list(train), list(query), list(gallery), transform=transform, k_tfm=k_tfm,
                         mode=mode, combineall=combineall, verbose=verbose)

    # ---------------------------------------------------------------------------- subclass API
    def load_records(self, dataset_root: str) -> Tuple[List[Record], List[Record], List[Record]]:
        """Return ``(train, query, gallery)`` lists of ``(path, pid, camid, modality)`` in any
        order (the base sorts them). A missing file may simply raise ``FileNotFoundError``: it
        becomes a :class:`DatasetLayoutError` with the layout sketch."""
        raise NotImplementedError(
            f'{type(self).__name__} must implement load_records(dataset_root)')

    def validate_options(self, options: Dict[str, Any]) -> None:
        """Check option values; raise ``ValueError`` naming the option and the allowed values."""

    # ---------------------------------------------------------------------------- helpers
    @property
    def dataset_name(self) -> str:
        return self.name or type(self).__name__

    @classmethod
    def option_names(cls) -> List[str]:
        return sorted(cls.default_options)

    def layout_error(self, problem: str, path: str = '') -> DatasetLayoutError:
        """A :class:`DatasetLayoutError` naming the dataset, ``path`` and the expected layout."""
        where = f': {path}' if path else ''
        sketch = self.layout.strip('\n') or f'{self.dataset_dir or "<dataset folder>"}/...'
        sketch = '\n'.join('    ' + line for line in sketch.splitlines())
        return DatasetLayoutError(
            f'{self.dataset_name}: {problem}{where}\n'
            f'  root = {getattr(self, "root", "?")} (the dataset folder is looked up as '
            f'<root>/{self.dataset_dir}, or <root> itself)\n'
            f'  expected layout:\n{sketch}'
        )

    def require(self, path: str, what: str = 'required path') -> str:
        """Return ``path`` if it exists, else raise a layout error naming it."""
        if not osp.exists(path):
            raise self.layout_error(f'{what} not found', path)
        return path

    def require_files(self, paths: Sequence[str],
                      what: str = 'images listed in the index files') -> None:
        """Raise one layout error listing the paths that are not files (a stat per image: a few
        milliseconds per thousand, paid once per parse)."""
        missing = [p for p in paths if not osp.isfile(p)]
        if missing:
            raise self.layout_error(
                f'{len(missing)} {what} do not exist (first {min(3, len(missing))}: '
                f'{", ".join(missing[:3])})', missing[0])

    def resolve_root(self, root: str) -> str:
        """The dataset folder: ``<root>/<dataset_dir>``, else ``root`` itself (see class doc)."""
        if not self.dataset_dir:
            if osp.isdir(root):
                return root
            raise self.layout_error('dataset folder not found', root)
        nested = osp.join(root, self.dataset_dir)
        if osp.isdir(nested):
            return nested
        if osp.isdir(root) and (
                osp.basename(osp.normpath(root)) == self.dataset_dir
                or (self.layout_markers
                    and all(osp.exists(osp.join(root, m)) for m in self.layout_markers))):
            return root
        raise self.layout_error(f'dataset folder not found (also checked {root} itself)', nested)

    # ---------------------------------------------------------------------------- internals
    def _resolve_options(self, kwargs: Dict[str, Any]) -> Dict[str, Any]:
        opts = dict(self.default_options)
        for key, value in kwargs.items():
            if key in _TORCHREID_DATASET_KWARGS:
                continue
            if key not in opts:
                allowed = ', '.join(self.option_names()) or 'none'
                raise TypeError(f'{self.dataset_name}: unknown dataset option "{key}" '
                                f'(options of {self.dataset_name}: {allowed})')
            if isinstance(self.default_options[key], tuple) and isinstance(value, list):
                value = tuple(value)  # yaml gives lists
            opts[key] = value
        self.validate_options(opts)
        return opts

    def _cache_key(self) -> tuple:
        names = self.option_names() if self.parse_options is None else sorted(self.parse_options)
        return (type(self), self.dataset_root,
                tuple((n, _freeze(self.protocol_options.get(n))) for n in names))

    def _load_cached(self):
        key = self._cache_key()
        entry = _PARSE_CACHE.get(key)
        if entry is not None:
            if _fingerprint(entry['reads']) == entry['fingerprint']:
                _CACHE_STATS['hits'] += 1
                return entry['records']
            _CACHE_STATS['stale'] += 1
        with recording_reads() as reads:
            reads.append(self.dataset_root)
            try:
                train, query, gallery = self.load_records(self.dataset_root)
            except FileNotFoundError as exc:
                missing = exc.filename or str(exc)
                raise self.layout_error('required file not found', missing) from None
        _CACHE_STATS['reads'] += 1
        records = self._finalize(train, query, gallery)
        _PARSE_CACHE[key] = {'records': records, 'reads': list(reads),
                             'fingerprint': _fingerprint(reads)}
        return records

    def _finalize(self, train, query, gallery):
        """Validate the three splits and relabel train pids; returns tuples (shared by the
        cache)."""
        splits = {}
        for split, records in zip(SPLITS, (train, query, gallery)):
            if not records:
                raise self.layout_error(f'the {split} split is empty (no images found)',
                                        self.dataset_root)
            checked = [self._check_record(split, r) for r in records]
            unique = list(dict.fromkeys(checked))
            if len(unique) < len(checked):
                # e.g. a repeated line in an index file: it would weigh that image twice in
                # training and give a gallery a duplicate entry
                seen, first = set(), None
                for r in checked:
                    if r in seen:
                        first = r[0]
                        break
                    seen.add(r)
                warnings.warn(f'{self.dataset_name}: {len(checked) - len(unique)} {split} '
                              f'image(s) are listed more than once (first: {first}); each is '
                              f'used once', stacklevel=3)
                checked = unique
            # The documented order, whatever order the subclass produced: (pid, camera, file name).
            checked.sort(key=lambda r: (r[1], r[2], r[0].rpartition(os.sep)[2], r[0]))
            splits[split] = tuple(checked)
        raw_pids = sorted({r[1] for r in splits['train']})
        label_of = {pid: label for label, pid in enumerate(raw_pids)}
        train = tuple((p, label_of[pid], cam, mod) for p, pid, cam, mod in splits['train'])
        return train, splits['query'], splits['gallery'], tuple(raw_pids)

    def _check_record(self, split: str, record) -> Record:
        if type(record) is tuple and len(record) == 4 and type(record[0]) is str \
                and type(record[1]) is int and type(record[2]) is int \
                and type(record[3]) is int and record[3] in (0, 1):
            return record  # the common, valid case without the slow path below
        if not isinstance(record, (tuple, list)) or len(record) != 4:
            raise DataFormatError(f'{self.dataset_name}: {split} item {record!r} is not a 4-tuple '
                                  f'(img_path, pid, camid, modality)')
        path, pid, camid, modality = record
        try:
            pid, camid, modality = (operator.index(pid), operator.index(camid),
                                    operator.index(modality))
        except TypeError:
            raise DataFormatError(f'{self.dataset_name}: {split} item {record!r}: pid, camid and '
                                  f'modality must be integers') from None
        if modality not in (VISIBLE, INFRARED):
            raise DataFormatError(f'{self.dataset_name}: {split} item {path}: modality {modality} '
                                  f'is not {VISIBLE} (visible) or {INFRARED} (infrared)')
        if not isinstance(path, str):
            raise DataFormatError(f'{self.dataset_name}: {split} item {record!r}: the image path '
                                  f'must be a string')
        return path, pid, camid, modality

    # ---------------------------------------------------------------------------- torchreid API
    def __getitem__(self, index: int) -> dict:
        img_path, pid, camid, dsetid = self.data[index]
        img = read_image(img_path)
        if self.transform is not None:
            img = self._transform_image(self.transform, self.k_tfm, img)
        return {'img': img, 'pid': pid, 'camid': camid, 'impath': img_path, 'dsetid': dsetid,
                'modality': dsetid}

    def combine_all(self):
        """Add query and gallery to the training set (``combineall=True``).

        Test pids (of both modalities) are relabelled after the train labels, in ascending raw
        pid order; modalities are kept.
        """
        test_pids = sorted({r[1] for r in self.query} | {r[1] for r in self.gallery})
        offset = self.num_train_pids
        label_of = {pid: offset + i for i, pid in enumerate(test_pids)}
        extra = [(p, label_of[pid], cam, mod) for p, pid, cam, mod in (*self.query, *self.gallery)]
        self.train = list(self.train) + extra
        if self.train_raw_pids is not None:
            self.train_raw_pids = list(self.train_raw_pids) + test_pids
        self.num_train_pids = self.get_num_pids(self.train)

    def __add__(self, other):
        """Multi-source training: concatenate train sets, keeping modality in ``dsetid``.

        Like torchreid, pids of ``other`` are offset by this set's number of train pids and
        camids by this set's largest camid (torchreid offsets by the camera *count*, which
        equals the largest camid for 1-based contiguous cameras and cannot collide otherwise).
        Query and gallery are this set's. Mixing with a dataset without modality raises.
        """
        if not isinstance(other, CrossModalDataset):
            raise _modality_loss_error(self, other)
        pid_offset = self.num_train_pids
        cam_offset = max(r[2] for r in self.train)
        train = list(self.train) + [(p, pid + pid_offset, cam + cam_offset, mod)
                                    for p, pid, cam, mod in other.train]
        raw = None
        if self.train_raw_pids is not None and other.train_raw_pids is not None:
            raw = self._qualified_raw_pids() + other._qualified_raw_pids()
        return MultiSourceCrossModalDataset(
            train, self.query, self.gallery, names=self._source_names() + other._source_names(),
            eval_source=self, train_raw_pids=raw, transform=self.transform, k_tfm=self.k_tfm,
            mode=self.mode)

    def __radd__(self, other):
        # Called before torchreid's ImageDataset.__add__ when a plain dataset is on the left
        # (a subclass's reflected method wins), so sum([market, sysu]) fails loudly too.
        if isinstance(other, int) and other == 0:
            return self
        if isinstance(other, CrossModalDataset):
            return other.__add__(self)
        raise _modality_loss_error(other, self)

    def _source_names(self) -> List[str]:
        return [self.dataset_name]

    def _qualified_raw_pids(self) -> List[Tuple[str, Any]]:
        """``(dataset name, raw pid)`` per train label (multi-source bookkeeping)."""
        return [(self.dataset_name, p) for p in self.train_raw_pids]

    def _summary_train_ids(self) -> Optional[Sequence]:
        """What ``summary()`` reports per train label (``None``: the labels themselves)."""
        return self.train_raw_pids

    # ---------------------------------------------------------------------------- summaries
    def summary(self) -> Dict[str, Dict[str, Dict[str, Any]]]:
        """Per split and modality: ``{'ids': sorted pids, 'num_images': int, 'cams': sorted}``.

        Train ids are the raw (on-disk) pids, so the dict has the shape of the synthetic
        generator's manifest (``manifest['splits']``). Both modalities are always present (a
        modality without images has ``num_images == 0``, e.g. ``query['vis']``).
        """
        out: Dict[str, Dict[str, Dict[str, Any]]] = {}
        for split in SPLITS:
            records = getattr(self, split)
            raw = self._summary_train_ids() if split == 'train' else None
            per_mod: Dict[str, Dict[str, Any]] = {}
            for code, mod_name in enumerate(MODALITY_NAMES):
                rows = [r for r in records if r[3] == code]
                pids = {r[1] for r in rows}
                if raw is not None:
                    pids = {raw[p] for p in pids}
                per_mod[mod_name] = {'ids': sorted(pids), 'num_images': len(rows),
                                     'cams': sorted({r[2] for r in rows})}
            out[split] = per_mod
        return out

    def show_summary(self):
        """Print ids / images / cameras per split and modality (torchreid's table, split by
        modality)."""
        line = '  ' + '-' * 58
        print(f'=> Loaded {type(self).__name__} ({self.dataset_name})')
        if getattr(self, 'dataset_root', None):
            print(f'  folder: {self.dataset_root}')
        if self.protocol_options:
            print('  options: ' + ', '.join(f'{k}={v}' for k, v in self.protocol_options.items()))
        print(line)
        print('  subset   | modality | # ids | # images | cameras')
        print(line)
        for split, per_mod in self.summary().items():
            for mod_name, s in per_mod.items():
                if not s['num_images']:
                    continue
                cams = ','.join(str(c) for c in s['cams'])
                print(f'  {split:8s} | {mod_name:8s} | {len(s["ids"]):5d} | '
                      f'{s["num_images"]:8d} | {cams}')
        print(line)


class MultiSourceCrossModalDataset(CrossModalDataset):
    """The sum of several cross-modal datasets (built by ``+``; not constructed from a root).

    ``train_raw_pids[label]`` is ``(dataset name, raw pid)``; query/gallery, protocol and
    protocol options are those of the first source.
    """

    def __init__(self, train, query, gallery, *, names: Sequence[str], eval_source=None,
                 train_raw_pids=None, transform=None, k_tfm=1, mode='train', verbose=False):
        self.source_names = list(names)
        self.name = '+'.join(self.source_names)
        self.protocol = getattr(eval_source, 'protocol', 'generic')
        self.protocol_options = dict(getattr(eval_source, 'protocol_options', {}))
        self.root = self.dataset_root = getattr(eval_source, 'dataset_root', None)
        self.train_raw_pids = train_raw_pids
        tr.data.ImageDataset.__init__(self, train, query, gallery, transform=transform,
                                      k_tfm=k_tfm, mode=mode, combineall=False, verbose=verbose)

    def _source_names(self) -> List[str]:
        return list(self.source_names)

    def _qualified_raw_pids(self) -> List[Tuple[str, Any]]:
        return list(self.train_raw_pids)

    def _summary_train_ids(self) -> Optional[Sequence]:
        # Raw pids of different sources may coincide: report "name:pid" strings.
        if self.train_raw_pids is None:
            return None
        return [f'{name}:{pid}' for name, pid in self.train_raw_pids]


def _modality_loss_error(left, right) -> ValueError:
    def describe(d):
        n = getattr(d, 'dataset_name', None) or type(d).__name__
        return f'{n} ({"cross-modal" if isinstance(d, CrossModalDataset) else "no modality"})'
    return ValueError(
        f'cannot combine {describe(left)} with {describe(right)} for multi-source training: '
        f'torchreid would turn the sum into a plain ImageDataset and the per-image modality '
        f'(dsetid: 0 visible / 1 infrared) that modality-balanced sampling and the cross-modal '
        f'losses need would be lost. Use only cross-modal datasets (CrossModalDataset subclasses) '
        f'as sources.')

