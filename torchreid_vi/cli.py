"""The command line: torchreid's ``scripts/main.py`` plus the plugin's registries, made safe for
multi-day runs.

Usage (``torchreid-vi`` and ``python -m torchreid_vi`` are the same)::

    python -m torchreid_vi --config-file xiv/sysu_mm01 --root /data \\
        data.save_dir log/xiv_sysu train.max_epoch 120
    torchrun --nproc_per_node 4 -m torchreid_vi --config-file idkl/sysu_mm01 --root /data
    python -m torchreid_vi --list
    python -m torchreid_vi --plugin projects/custom_dataset/my_dataset.py --config-file ...

``--config-file`` takes a yaml path or a packaged config name (``xiv/sysu_mm01``, see
``--list``). Flow: plugins (``--plugin``, then the config's ``vi.plugins``) → config (defaults,
``--config-file``, ``-s/-t/--transforms/--root``, trailing ``key value`` options) → process group
(under ``torchrun``) → lock of ``data.save_dir`` → log file ``<save_dir>/{train,test}.log-<time>``
→ datamanager → model (registry, with the method's model options; SyncBatchNorm and DDP under
``torchrun``) → optional weights → optimizer / scheduler → engine (registry: ``engine.name``, else
``loss.name``) → optional resume (``model.resume auto``: the newest checkpoint of the save_dir)
→ **pre-flight** (every evaluation option and setting, the test images) → ``engine.run``.

Exit codes:

===  =====================================================================================
0    done
2    a mistake in the command, the config or the data: one ``error:`` line (also in the log)
3    training finished but an evaluation failed: the line names the checkpoint with the
     weights and the command that evaluates it
4    the loss diverged (NaN/inf): the line names the terms and the last good checkpoint
75   stopped by SIGTERM/SIGINT after a step: resumable checkpoint written (``model.resume``)
1    an unexpected internal error (with its traceback)
===  =====================================================================================
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import logging
import os
import os.path as osp
import shlex
import sys
import time
import traceback
import warnings
from typing import List, Optional

import torch

__all__ = ['main', 'build_parser', 'build_config', 'load_plugins', 'UserError', 'EXIT_CODES']

EXIT_OK, EXIT_ERROR, EXIT_USER, EXIT_EVALUATION, EXIT_DIVERGED, EXIT_PREEMPTED = 0, 1, 2, 3, 4, 75
EXIT_CODES = {'ok': EXIT_OK, 'internal_error': EXIT_ERROR, 'user_error': EXIT_USER,
              'evaluation_failed': EXIT_EVALUATION, 'diverged': EXIT_DIVERGED,
              'preempted': EXIT_PREEMPTED}
PROG = 'python -m torchreid_vi'


class _LogFile:
    """The run's log file. A write that fails (a full disk) never stops the run: the file
    pauses with a warning on stderr (the console keeps the log), is reopened every
    ``RETRY_SECONDS`` and, once it can be written again, says which time span it lacks."""

    RETRY_SECONDS = 60.0

    def __init__(self, path: str):
        self.path = path
        self._file = self._open(path)
        self._lost_at: Optional[str] = None  # when the file stopped (local time)
        self._retry_at = 0.0

    def _do(self, action: str, *args) -> None:
        if self._file is None and self._lost_at is not None and action != 'close' \
                and time.monotonic() >= self._retry_at:
            try:
                self._file = self._open(self.path)
                self._file.write(f'\n[log lines from {self._lost_at} to '
                                 f'{time.strftime("%H:%M:%S")} are missing: the file could not '
                                 f'be written]\n')
                self._lost_at = None
            except OSError:
                self._pause(None)
        if self._file is None:
            return
        try:
            getattr(self._file, action)(*args)
        except OSError as exc:
            self._pause(exc)

    @staticmethod
    def _open(path: str):
        return open(path, 'a')

    def _pause(self, exc: Optional[OSError]) -> None:
        broken, self._file = self._file, None
        if broken is not None:
            try:
                broken.close()
            except OSError:
                pass
        if self._lost_at is None:
            self._lost_at = time.strftime('%H:%M:%S')
            print(f'\nWarning: the log file {self.path} cannot be written ({exc}); the log goes '
                  f'on on the console, and the file is tried again every '
                  f'{self.RETRY_SECONDS:g} s', file=sys.stderr, flush=True)
        self._retry_at = time.monotonic() + self.RETRY_SECONDS

    def write(self, msg: str) -> None:
        self._do('write', msg)

    def flush(self) -> None:
        self._do('flush')

    def close(self) -> None:
        self._do('close')
        self._file = None


class _Tee:
    """stdout that also writes to a log file (torchreid's Logger closes the real stdout)."""

    def __init__(self, path: str, stream):
        self.file = _LogFile(path)
        self.stream = stream

    def write(self, msg):
        self.stream.write(msg)
        self.file.write(msg)

    def flush(self):
        self.stream.flush()
        self.file.flush()

    def isatty(self):
        return False

    def close(self):
        self.file.close()


class UserError(Exception):
    """A mistake in the command, the config or the data; reported without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='torchreid-vi', formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description='torchreid with visible-infrared cross-modal datasets, samplers and methods.',
        epilog='examples:\n  torchreid-vi --config-file xiv/sysu_mm01 --root /data\n'
               '  torchreid-vi --list            (datasets, models, engines, packaged configs)')
    p.add_argument('--config-file', type=str, default='',
                   help='yaml config: a path or a packaged name such as xiv/sysu_mm01')
    p.add_argument('-s', '--sources', type=str, nargs='+', help='source datasets')
    p.add_argument('-t', '--targets', type=str, nargs='+', help='target datasets')
    p.add_argument('--transforms', type=str, nargs='+', help='data augmentation')
    p.add_argument('--root', type=str, default='', help='path to data root')
    p.add_argument('--plugin', action='append', default=[],
                   help='python file or module to import first (it may register datasets, '
                        'models, samplers, engines, config nodes); repeatable')
    p.add_argument('--list', action='store_true',
                   help='print the registered datasets, models, samplers, engines and the '
                        'packaged configs, and exit')
    p.add_argument('opts', default=None, nargs=argparse.REMAINDER,
                   help='config options as "key value" pairs, e.g. train.max_epoch 10')
    return p


def load_plugins(names: List[str]) -> None:
    """Import each plugin: a ``.py`` file path or a dotted module name."""
    for name in names:
        if name.endswith('.py') or osp.sep in name:
            if not osp.isfile(name):
                raise UserError(f'plugin file "{name}" does not exist')
            mod_name = 'torchreid_vi_plugin_' + osp.splitext(osp.basename(name))[0]
            if mod_name in sys.modules:
                continue
            spec = importlib.util.spec_from_file_location(mod_name, name)
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod_name] = module
            spec.loader.exec_module(module)
        else:
            try:
                importlib.import_module(name)
            except ModuleNotFoundError as exc:
                raise UserError(f'plugin module "{name}" cannot be imported: {exc}') from exc


def _config_plugins(args) -> List[str]:
    """``vi.plugins`` of the config file and the ``key value`` options, read before the config
    is built so that the plugins can add config nodes."""
    from .config import load_yaml_with_base, resolve_config_file
    plugins: List[str] = []
    if args.config_file:
        data = load_yaml_with_base(resolve_config_file(args.config_file))
        plugins = list((data.get('vi') or {}).get('plugins') or [])
    opts = list(args.opts or [])
    for key, value in zip(opts[0::2], opts[1::2]):
        if key == 'vi.plugins':
            import yaml
            plugins = list(yaml.safe_load(value) or [])
    return plugins


def _is_config_key(cfg, token: str) -> bool:
    node = cfg
    for part in token.split('.'):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return '.' in token


def _split_dataset_lists(args, cfg) -> None:
    """``-s a b model.name x`` → sources ``[a, b]``, options ``model.name x``: argparse's ``+``
    takes every word after ``-s``/``-t``; the first one naming a config key starts the options."""
    for attr in ('sources', 'targets', 'transforms'):
        values = getattr(args, attr)
        if not values:
            continue
        for i, token in enumerate(values):
            if _is_config_key(cfg, token):
                setattr(args, attr, values[:i])
                args.opts = values[i:] + list(args.opts or [])
                break


def build_config(args):
    from .config import ConfigError, get_default_config
    cfg = get_default_config()
    _split_dataset_lists(args, cfg)
    cfg.use_gpu = torch.cuda.is_available()
    try:
        if args.config_file:
            cfg.merge_from_file(args.config_file)
    except ConfigError as exc:
        raise UserError(str(exc)) from exc
    except (KeyError, ValueError, AssertionError) as exc:
        raise UserError(f'in config file "{args.config_file}": {exc}') from exc
    if args.root:
        cfg.data.root = args.root
    for attr in ('sources', 'targets', 'transforms'):
        if getattr(args, attr):
            cfg.data[attr] = getattr(args, attr)
    if args.opts:
        if len(args.opts) % 2:
            raise UserError(f'options must be "key value" pairs, got an odd list: {args.opts}')
        try:
            cfg.merge_from_list(args.opts)
        except ConfigError as exc:
            raise UserError(str(exc)) from exc
        except (KeyError, ValueError, AssertionError) as exc:
            raise UserError(f'in command-line options: {exc}') from exc
    if cfg.loss.name == 'triplet' and cfg.loss.triplet.weight_x == 0 and cfg.train.fixbase_epoch:
        raise UserError('train.fixbase_epoch needs loss.triplet.weight_x > 0: the classifier is '
                        'not in the graph otherwise')
    cfg.freeze()
    return cfg


def print_registries(out=sys.stdout) -> None:
    from .config import packaged_configs
    from .data.transforms import list_transforms
    from .registry import list_datasets, list_engines, list_models, list_samplers
    for title, names in (('datasets', list_datasets()), ('models', list_models()),
                         ('samplers', list_samplers()), ('engines', list_engines()),
                         ('transforms (data.transforms)', list_transforms()),
                         ('packaged configs (--config-file NAME)', packaged_configs())):
        print(f'{title} ({len(names)}):', file=out)
        for n in names:
            print(f'  {n}', file=out)


def build_model(cfg, num_classes: int):
    """The registered model ``model.name`` with its method's options from the config."""
    from .pretrained import explain_offline_downloads
    from .registry import MODEL_OPTIONS, MODELS
    factory = MODELS.get(cfg.model.name)
    options = MODEL_OPTIONS[cfg.model.name](cfg) if cfg.model.name in MODEL_OPTIONS else {}
    with explain_offline_downloads(cfg.model.name):
        return factory(num_classes=num_classes, loss=cfg.loss.name,
                       pretrained=cfg.model.pretrained, use_gpu=cfg.use_gpu, **options)


def build_engine(cfg, datamanager, model, optimizer, scheduler):
    from .registry import ENGINES
    name = cfg.engine.name or cfg.loss.name
    return ENGINES.get(name)(cfg, datamanager, model, optimizer, scheduler)


def _check_test_images(datamanager, workers: int) -> None:
    """Decode every test image of the cross-modal targets once (``vi.eval.check_images``)."""
    from .data.base import CrossModalDataset
    from .data.io import ImageReadError, check_images
    for name, dataset in datamanager.test_datasets.items():
        if not isinstance(dataset, CrossModalDataset):
            continue
        paths = [r[0] for r in (*dataset.query, *dataset.gallery)]
        t0 = time.time()
        bad = check_images(paths, workers=max(2, workers))
        if bad:
            raise ImageReadError(f'{len(bad)} of the {len(paths)} test images of {name} cannot '
                                 f'be read (first: {bad[0]}); fix or remove them before training '
                                 f'(vi.eval.check_images False skips this check)')
        print(f'Pre-flight: the {len(paths)} test images of {name} decode '
              f'({time.time() - t0:.1f}s)')


def _wrap_distributed(cfg, model, device):
    """SyncBatchNorm (``vi.dist.sync_bn``) and DistributedDataParallel under ``torchrun``."""
    from .utils import distributed as dist_utils
    if cfg.vi.dist.sync_bn:
        model = dist_utils.convert_sync_batchnorm(model, device)
    ids = [device.index] if device.type == 'cuda' else None
    # static_graph: the set of parameters a step uses never changes (fixed generators, unused
    # heads are fine) and DDP need not search the graph for unused ones at every step.
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, static_graph=True)


def run(cfg, command: Optional[List[str]] = None) -> object:
    """Build everything from a frozen config and run it; returns the engine."""
    from ._torchreid import tr
    from .checkpoint import load_model_weights
    from .data.datamanager import CrossModalImageDataManager
    from .engine.base import latest_checkpoint
    from .optim import optimizer_from_config, scheduler_from_config
    from .results import ResultsFile, environment_info
    from .utils import distributed as dist_utils

    device = dist_utils.init_from_environment(cfg.use_gpu, cfg.vi.dist.timeout_minutes)
    tr.utils.set_random_seed(cfg.train.seed)
    if cfg.vi.train.deterministic:
        torch.use_deterministic_algorithms(True)
    if cfg.use_gpu:
        torch.backends.cudnn.benchmark = not cfg.vi.train.deterministic
    print(f'Show configuration\n{cfg}\n')
    env = environment_info('cuda' if cfg.use_gpu else 'cpu')
    env['world_size'] = dist_utils.world_size()
    print('Environment: ' + ', '.join(f'{k}={v}' for k, v in env.items()))

    datamanager = CrossModalImageDataManager.from_config(cfg)
    print(f'Building model: {cfg.model.name}')
    model = build_model(cfg, datamanager.num_train_pids)
    n_all = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f'Model parameters: {n_all:,} ({n_train:,} trainable)')
    weights = cfg.model.load_weights
    if weights:
        load_model_weights(model, weights)
    device = device or torch.device('cuda' if cfg.use_gpu else 'cpu')
    model = model.to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if dist_utils.is_distributed():
        model = _wrap_distributed(cfg, model, device)
        # every rank starts from rank 0's weights (DDP broadcast them); dropout and other
        # in-step randomness differ per rank, reproducibly for a fixed world size
        tr.utils.set_random_seed(cfg.train.seed + dist_utils.rank())
    if cfg.train.compile:
        model = torch.compile(model)
    optimizer = optimizer_from_config(cfg, model)
    scheduler = scheduler_from_config(cfg, optimizer)
    engine = build_engine(cfg, datamanager, model, optimizer, scheduler)
    start_epoch = cfg.train.start_epoch
    resume = cfg.model.resume
    if resume == 'auto':
        resume = latest_checkpoint(cfg.data.save_dir)
        print(f'model.resume auto: {resume or "no checkpoint in the save_dir, starting fresh"}')
    if resume:
        start_epoch = engine.resume(resume)
    if cfg.test.evaluate:
        source = resume or weights
        if not source:
            print('Warning: evaluating without model.load_weights or model.resume: the weights '
                  'are ' + ('ImageNet-pretrained' if cfg.model.pretrained else 'random') + '.')
        else:
            start_epoch = engine.checkpoint_epoch(source)
            engine.last_checkpoint = source
    # pre-flight: whatever the evaluation needs is checked now, before the first step
    targets = engine.prepare_evaluation()
    if targets:
        print(f'Pre-flight: evaluation settings of {", ".join(targets)} built and checked')
    if cfg.vi.eval.check_images and dist_utils.is_main_process():
        _check_test_images(datamanager, cfg.data.workers)
    if cfg.vi.train.check_disk_space and not cfg.test.evaluate \
            and start_epoch < cfg.train.max_epoch:
        plan = engine.check_disk_space(cfg.data.save_dir, start_epoch, cfg.train.max_epoch,
                                       cfg.test.start_eval, cfg.test.eval_freq)
        print(f'Pre-flight: {plan}')
    if dist_utils.is_main_process():
        engine.results = ResultsFile(osp.join(cfg.data.save_dir, 'results.json'), cfg, env,
                                     kind='evaluate' if cfg.test.evaluate else 'train',
                                     command=command)
    from .engine.base import NothingToTrain
    try:
        engine.run(save_dir=cfg.data.save_dir, max_epoch=cfg.train.max_epoch,
                   start_epoch=start_epoch, print_freq=cfg.train.print_freq,
                   fixbase_epoch=cfg.train.fixbase_epoch, open_layers=cfg.train.open_layers,
                   start_eval=cfg.test.start_eval, eval_freq=cfg.test.eval_freq,
                   test_only=cfg.test.evaluate)
    except NothingToTrain:
        # a relaunched job (e.g. requeued after preemption) finds its run complete: that is
        # success, not a mistake; an explicit checkpoint past max_epoch stays an error
        if cfg.model.resume != 'auto' or start_epoch != cfg.train.max_epoch:
            raise
        print(f'=> model.resume auto: the run in {cfg.data.save_dir} is complete ({start_epoch} '
              f'of {cfg.train.max_epoch} epochs, its evaluations in results.json); nothing to do')
    return engine


def _user_errors() -> tuple:
    """Exceptions that mean "the input is wrong": one ``error:`` line, exit code 2."""
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data.base import DatasetLayoutError
    from .data.io import DataFormatError, ImageReadError
    from .engine.base import NothingToTrain
    from .pretrained import PretrainedWeightsUnavailable
    from .utils.runlock import SaveDirInUse
    return (UserError, ConfigError, DatasetLayoutError, DataFormatError, ImageReadError,
            CheckpointError, PretrainedWeightsUnavailable, SaveDirInUse, NothingToTrain)


def _one_line(exc: BaseException) -> str:
    """The message of ``exc`` without a DataLoader worker's embedded traceback."""
    text = str(exc)
    if 'Original Traceback' in text:
        text = text.strip().splitlines()[-1]
    return text


def _evaluation_hint(command: List[str], checkpoint: Optional[str]) -> str:
    if not checkpoint:
        return ''
    args = ' '.join(shlex.quote(a) for a in command)
    return (f'\nThe trained weights are in {checkpoint}; once the cause is fixed, evaluate them '
            f'with:\n  {PROG} {args} test.evaluate True model.resume "" model.load_weights '
            f'{shlex.quote(checkpoint)}')


@contextlib.contextmanager
def _warnings_to(log_file):
    """Python warnings and the package's logging go to the log file too."""
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        text = warnings.formatwarning(message, category, filename, lineno, line)
        sys.stderr.write(text)
        if log_file is not None:
            log_file.write(text)
            log_file.flush()
    warnings.showwarning = show
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter('%(levelname)s %(name)s: %(message)s'))
    logger = logging.getLogger('torchreid_vi')
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        warnings.showwarning = previous
        logger.removeHandler(handler)
        logger.setLevel(level)


def main(argv: Optional[List[str]] = None) -> int:
    from . import registration
    from .config import ConfigError
    from .engine.base import EvaluationFailed, NonFiniteLoss, Preempted
    from .utils import distributed as dist_utils
    from .utils.fileio import remove_stale_parts
    from .utils.runlock import RunLock

    command = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not command:
        parser.print_usage(sys.stderr)
        print('error: nothing to do: give a config, e.g. --config-file xiv/sysu_mm01 --root '
              '<data root> (see --help, and --list for the packaged configs)', file=sys.stderr)
        return EXIT_USER
    args = parser.parse_args(command)
    try:
        registration.register_all()
        load_plugins(args.plugin)
        if args.list:
            print_registries()
            return EXIT_OK
        load_plugins(_config_plugins(args))
        cfg = build_config(args)
    except (UserError, ConfigError, KeyError, ImportError) as exc:
        print(f'error: {exc}', file=sys.stderr)
        return EXIT_USER

    main_process = int(os.environ.get('RANK', '0')) == 0
    save_dir = cfg.data.save_dir
    lock = RunLock(save_dir, command=command, share=cfg.vi.train.share_save_dir or not
                   main_process)
    stdout, tee = sys.stdout, None
    try:
        if main_process:
            os.makedirs(save_dir, exist_ok=True)
            lock.acquire()
            log_name = ('test.log' if cfg.test.evaluate else 'train.log') + time.strftime(
                '-%Y-%m-%d-%H-%M-%S')
            tee = _Tee(osp.join(save_dir, log_name), stdout)
            sys.stdout = tee
            if lock.note:
                print(f'Note: {lock.note}')
            for path in remove_stale_parts(save_dir):
                print(f'Removed the unfinished file of a killed run: {path}')
        else:
            sys.stdout = open(os.devnull, 'w')  # rank 0 alone logs
    except (OSError, *_user_errors()) as exc:
        sys.stdout = stdout
        lock.release()
        where = f' (data.save_dir {save_dir})' if isinstance(exc, OSError) else ''
        print(f'error: {exc}{where}', file=sys.stderr)
        return EXIT_USER

    def report(message: str, code: int) -> int:
        print(f'error: {message}', file=sys.stderr)
        if tee is not None:
            tee.file.write(f'error: {message}\n')
        return code

    try:
        with _warnings_to(tee.file if tee is not None else None):
            run(cfg, command)
        return EXIT_OK
    except Preempted as exc:
        return report(f'{exc}. Resume with the same command plus model.resume '
                      f'{shlex.quote(exc.checkpoint or "auto")} (or model.resume auto).',
                      EXIT_PREEMPTED)
    except EvaluationFailed as exc:
        return report(f'{_one_line(exc)}{_evaluation_hint(command, exc.checkpoint)}',
                      EXIT_EVALUATION)
    except NonFiniteLoss as exc:
        return report(str(exc), EXIT_DIVERGED)
    except _user_errors() as exc:
        return report(_one_line(exc), EXIT_USER)
    except (ValueError, TypeError, KeyError, FileNotFoundError) as exc:
        # Option and input checks raise these while the run is built; the full traceback goes
        # to the log file for a bug report, the console gets one line.
        if tee is not None:
            tee.file.write(traceback.format_exc())
        return report(_one_line(exc), EXIT_USER)
    except KeyboardInterrupt:
        return report('interrupted (second SIGINT): no checkpoint was written for the current '
                      'step', 130)
    except BaseException:
        if tee is not None:
            tee.file.write(traceback.format_exc())
        raise
    finally:
        if tee is not None:
            tee.flush()
        sys.stdout = stdout
        if tee is not None:
            tee.close()
        lock.release()
        if dist_utils.is_distributed():
            torch.distributed.destroy_process_group()


if __name__ == '__main__':  # pragma: no cover
    sys.exit(main())
