"""How long does building a datamanager on a SYSU-MM01-sized tree take, and what does the parse
cache save?

torchreid's ImageDataManager constructs each dataset three times (train, query, gallery); the
plugin parses a tree once per process and serves the other constructions from its cache. This
script writes a synthetic SYSU-MM01 with the real pid range (533 pids, about as many images as
the real dataset's 45,863; tiny 16×8 images since only parsing speed matters), then times:

* one cold parse (cache empty) and one cached construction of the dataset;
* building a ``CrossModalImageDataManager`` with the cache (1 tree read, 2 hits);
* the same three constructions with the cache cleared before each (3 tree reads);
* building the ModalityBalancedSampler and drawing one epoch of indices.

Usage::

    python benchmarks/bench_datamanager.py [--num-ids 533] [--root DIR] [--keep]

``--root`` reuses a tree written by an earlier run (``--keep``) instead of generating one.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import os.path as osp
import shutil
import sys
import tempfile
import time

sys.path.insert(0, osp.join(osp.dirname(osp.abspath(__file__)), '..'))

from torchreid_vi.data import register_all  # noqa: E402
from torchreid_vi.data.base import clear_parse_cache, parse_cache_info  # noqa: E402
from torchreid_vi.data.datamanager import CrossModalImageDataManager  # noqa: E402
from torchreid_vi.data.sampler import ModalityBalancedSampler  # noqa: E402
from torchreid_vi.data.sysu_mm01 import SYSUMM01  # noqa: E402


class Seconds(float):
    """Wall seconds that also carry the process CPU seconds of the same run (``.cpu``); CPU
    time is the steadier figure on a shared machine."""

    def __new__(cls, wall, cpu):
        obj = super().__new__(cls, wall)
        obj.cpu = cpu
        return obj

    def __format__(self, spec):
        return f'{float(self) * 1e3:8.1f} ms wall {self.cpu * 1e3:8.1f} ms cpu'


def timed(fn, repeat=1):
    """(best time over ``repeat`` runs, last result); prints of ``fn`` are swallowed."""
    best, out = Seconds(float('inf'), float('inf')), None
    for _ in range(repeat):
        with contextlib.redirect_stdout(io.StringIO()):
            start, cpu = time.perf_counter(), time.process_time()
            out = fn()
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        if wall < best:
            best = Seconds(wall, cpu)
    return best, out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--num-ids', type=int, default=533, help='SYSU pid range (real: 533)')
    parser.add_argument('--root', default='', help='data root holding SYSU-MM01/ (reused)')
    parser.add_argument('--keep', action='store_true', help='keep the generated tree')
    parser.add_argument('--repeat', type=int, default=3, help='timing repeats (best is shown)')
    args = parser.parse_args(argv)
    register_all()

    root = args.root or tempfile.mkdtemp(prefix='bench_dm_')
    dataset_dir = osp.join(root, 'SYSU-MM01')
    if not osp.isdir(dataset_dir):
        from torchreid_vi.tools.synthesize import synthesize
        start = time.perf_counter()
        synthesize('sysu_mm01', dataset_dir, seed=0, num_ids=args.num_ids, size=(16, 8))
        print(f'generated {dataset_dir} ({args.num_ids} pids, 16x8) in '
              f'{time.perf_counter() - start:.1f} s')
    try:
        n_files = sum(len(files) for _, _, files in os.walk(dataset_dir))
        print(f'tree: {n_files} files')

        def cold():
            clear_parse_cache()
            return SYSUMM01(root=root, verbose=False)

        t_cold, ds = timed(cold, args.repeat)
        t_warm, _ = timed(lambda: SYSUMM01(root=root, verbose=False), args.repeat)
        print(f'dataset: {len(ds.train)} train ({ds.num_train_pids} ids), {len(ds.query)} query, '
              f'{len(ds.gallery)} gallery images')
        print(f'  cold parse + construct   : {t_cold}')
        print(f'  cached construct         : {t_warm}')

        kwargs = dict(root=root, sources='sysu_mm01', height=32, width=16, workers=0,
                      use_gpu=False, batch_size_train=64, num_instances=4,
                      train_sampler='ModalityBalancedSampler')

        def build_cached():
            clear_parse_cache()
            dm = CrossModalImageDataManager(**kwargs)
            return dm, parse_cache_info()

        def build_uncached():
            # What building costs without the cache: every construction re-reads the tree.
            reads = 0
            original = SYSUMM01._load_cached

            def reread(self):
                nonlocal reads
                clear_parse_cache()
                reads += 1
                return original(self)
            SYSUMM01._load_cached = reread
            try:
                CrossModalImageDataManager(**kwargs)
            finally:
                SYSUMM01._load_cached = original
            return reads

        t_cached, (dm, info) = timed(build_cached, args.repeat)
        t_uncached, reads = timed(build_uncached, args.repeat)
        print('datamanager (train + query + gallery constructions):')
        print(f'  with cache               : {t_cached}   tree reads {info["reads"]}, '
              f'cache hits {info["hits"]}')
        print(f'  cache cleared each time  : {t_uncached}   tree reads {reads}')

        t_sampler, sampler = timed(lambda: ModalityBalancedSampler(ds.train, 64, 4, seed=0),
                                   args.repeat)
        t_epoch, idx = timed(lambda: list(sampler), args.repeat)
        print(f'sampler (P=8, K=4), {len(idx) // 64} batches, {len(idx)} indices per epoch:')
        print(f'  build                    : {t_sampler}')
        print(f'  one epoch of indices     : {t_epoch}')
        assert len(dm.train_loader) == len(idx) // 64
    finally:
        if not args.root and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        elif not args.root:
            print(f'kept {root} (reuse with --root {root})')


if __name__ == '__main__':
    main()
