"""The one module that knows where torchreid keeps things.

torchreid ships in two layouts with the same code:

* PyPI ``torchreid`` 0.2.5: everything lives under ``torchreid.reid.*``;
* upstream from source (``python setup.py develop``): ``torchreid.*``.

Every other module of torchreid_vi imports torchreid through this module, e.g.::

    from torchreid_vi._torchreid import tr
    tr.data.ImageDataManager(...)
    tr.metrics.evaluate_rank(...)

``tr.layout`` is ``'pypi'`` or ``'upstream'``; ``tr.version`` the torchreid code version.
A failure that is not "this layout does not exist" (e.g. a missing dependency of torchreid such as
``cv2`` or ``gdown``) is re-raised as it is, so the real cause is visible.
"""
from __future__ import annotations

import importlib
import warnings
from types import ModuleType, SimpleNamespace

__all__ = ['tr', 'resolve_torchreid', 'private_dict']

_SUBMODULES = ('data', 'engine', 'losses', 'metrics', 'models', 'optim', 'utils')
# Modules reached by dotted name below the root (``tr.module('data.datamanager')``).


def _import_root(prefix: str) -> ModuleType:
    # PyPI torchreid warns on import that its Cython ranking extension is missing; the plugin does
    # not use that path for cross-modal evaluation, so the warning is noise for users.
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='Cython evaluation')
        return importlib.import_module(prefix)


def _is_missing(exc: ModuleNotFoundError, prefix: str) -> bool:
    """True if ``exc`` says the layout itself is absent (not one of torchreid's dependencies)."""
    name = exc.name or ''
    return prefix == name or prefix.startswith(name + '.')


def resolve_torchreid(candidates=('torchreid.reid', 'torchreid')) -> SimpleNamespace:
    """Find torchreid's layout and return a namespace of its subpackages.

    Args:
        candidates: module prefixes tried in order (PyPI layout first).

    Returns:
        namespace with ``root`` (the package holding ``data``, ``models``...), ``prefix``,
        ``layout`` ('pypi' | 'upstream'), ``version`` and one attribute per subpackage, plus
        ``module(dotted)`` to import a deeper module (``tr.module('data.datamanager')``).

    Raises:
        ImportError: no layout found (message says how to install torchreid), or a dependency of
            torchreid is missing (the original error, chained).
    """
    errors = []
    for prefix in candidates:
        try:
            root = _import_root(prefix)
            for sub in _SUBMODULES:
                importlib.import_module(f'{prefix}.{sub}')
        except ModuleNotFoundError as exc:
            if _is_missing(exc, prefix) or (exc.name or '').startswith(prefix + '.'):
                errors.append(f'{prefix}: {exc}')
                continue
            raise ImportError(
                f'torchreid was found at "{prefix}" but one of its dependencies is missing: '
                f'{exc.name}. PyPI torchreid declares no dependencies; install torchreid_vi '
                f'(pip install -e .) or the package "{exc.name}".'
            ) from exc
        ns = SimpleNamespace(root=root, prefix=prefix)
        ns.layout = 'pypi' if prefix.endswith('.reid') else 'upstream'
        top = importlib.import_module(prefix.split('.')[0])
        ns.version = getattr(root, '__version__', None) or getattr(top, '__version__', 'unknown')
        ns.package_version = getattr(top, '__version__', 'unknown')
        for sub in _SUBMODULES:
            setattr(ns, sub, importlib.import_module(f'{prefix}.{sub}'))
        ns.module = lambda dotted, _p=prefix: importlib.import_module(f'{_p}.{dotted}')
        return ns
    raise ImportError(
        'torchreid is not installed (tried ' + '; '.join(errors) + '). '
        'Install it with "pip install torchreid" or from source '
        '(https://github.com/KaiyangZhou/deep-person-reid).'
    )


def private_dict(module: ModuleType, name: str) -> dict:
    """A module-level registry dict that torchreid keeps private (e.g. ``__model_factory``).

    Names starting with two underscores are not mangled at module level, so ``vars()`` reaches them.
    """
    try:
        return vars(module)[name]
    except KeyError:
        raise RuntimeError(
            f'torchreid module {module.__name__} has no "{name}"; this torchreid version is not '
            f'supported by torchreid_vi (tested with torchreid 1.4.0 code).'
        ) from None


tr = resolve_torchreid()
