"""ImageNet weights that fail loudly and clearly when they cannot be had.

torchreid and torchvision download weights on first use. Offline, that ends in a traceback from
deep inside urllib. Everything here turns it into one message: what was being downloaded, from
which URL, where to put the file so no download is needed, and how to run without it.

Example (no network needed: the file is looked up in the torch hub cache first)::

    >>> from torchreid_vi.pretrained import hub_checkpoint_path
    >>> hub_checkpoint_path('https://download.pytorch.org/models/resnet50-19c8e357.pth').name
    'resnet50-19c8e357.pth'
"""
from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

import torch

from .utils.fileio import atomic_produce

__all__ = ['PretrainedWeightsUnavailable', 'hub_checkpoint_path', 'load_imagenet_state_dict',
           'explain_offline_downloads']
_DOWNLOAD_TIMEOUT_S = 60  # an unreachable host must not hang a run


class PretrainedWeightsUnavailable(RuntimeError):
    """Pretrained weights are neither cached nor downloadable."""


def hub_checkpoint_path(url: str) -> Path:
    """Where torch's hub cache keeps the file of ``url``
    (``$TORCH_HOME/hub/checkpoints/<name>``)."""
    return Path(torch.hub.get_dir()) / 'checkpoints' / os.path.basename(url.split('?')[0])


def _message(what: str, url: str, cause: BaseException, target: Path = None) -> str:
    where = f'\n  or put the file at: {target}' if target is not None else (
        f'\n  or put the file in the torch hub cache: {Path(torch.hub.get_dir()) / "checkpoints"}')
    return (
        f'Could not download the ImageNet weights of {what} (no network?).\n'
        f'  URL: {url}\n'
        f'  cause: {type(cause).__name__}: {cause}\n'
        f'Fix one of:\n'
        f'  download it on a machine with network access{where}\n'
        f'  or train from scratch with `model.pretrained False`\n'
        f'  or load your own weights with `model.load_weights PATH`.'
    )


def _is_network_error(exc: BaseException) -> bool:
    if isinstance(exc, (OSError, ConnectionError, TimeoutError)):
        return True
    mod = type(exc).__module__ or ''
    return mod.split('.')[0] in ('requests', 'urllib3', 'gdown', 'http')


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def load_imagenet_state_dict(url: str, what: str) -> dict:
    """Return the state dict at ``url`` from the torch hub cache, downloading it if needed.

    Args:
        url: the weights' URL; the cached file name is its basename.
        what: a human name for the message (e.g. ``'resnet50 (torchvision V1)'``).

    Raises:
        PretrainedWeightsUnavailable: not cached and the download failed; the message names the
            URL, the cache path to put the file at, and the ``model.pretrained False`` /
            ``model.load_weights PATH`` alternatives.
    """
    target = hub_checkpoint_path(url)
    if not target.is_file():
        try:
            with _socket_timeout(_DOWNLOAD_TIMEOUT_S):
                # a killed download leaves no truncated file
                atomic_produce(str(target), lambda tmp: torch.hub.download_url_to_file(
                    url, tmp, progress=False))
        except Exception as exc:
            if not _is_network_error(exc):
                raise
            raise PretrainedWeightsUnavailable(_message(what, url, exc, target)) from exc
    return torch.load(target, map_location='cpu', weights_only=True)


@contextlib.contextmanager
def explain_offline_downloads(what: str):
    """Run torchreid code that may download weights; turn a network failure into one clear error.

    torchreid's models call ``torch.utils.model_zoo.load_url`` (resnets, densenets...) or gdown
    (OSNet). Inside this context, ``load_url`` goes through :func:`load_imagenet_state_dict`, and
    any other network error is re-raised as :class:`PretrainedWeightsUnavailable`.
    """
    import torch.utils.model_zoo as model_zoo

    original = model_zoo.load_url

    def load_url(url, *args, **kwargs):
        return load_imagenet_state_dict(url, what)

    model_zoo.load_url = load_url
    try:
        with _socket_timeout(_DOWNLOAD_TIMEOUT_S):
            yield
    except PretrainedWeightsUnavailable:
        raise
    except Exception as exc:
        if not _is_network_error(exc):
            raise
        raise PretrainedWeightsUnavailable(
            _message(what, '(torchreid/gdown download)', exc)) from exc
    finally:
        model_zoo.load_url = original
