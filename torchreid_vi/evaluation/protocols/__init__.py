"""Evaluation protocols: which queries meet which gallery, per trial (datasets_and_protocols.md §2).

One small module per dataset protocol (:mod:`.sysu_mm01`, :mod:`.regdb`, :mod:`.llcm`,
:mod:`.generic`); each turns a test set (``dataset.query`` IR records, ``dataset.gallery`` VIS
records and ``dataset.protocol_options``) into a list of :class:`EvalSetting`. A dataset names its
protocol in its ``protocol`` class attribute; :func:`settings_for` dispatches through the
:data:`PROTOCOLS` registry, where a plugin registers a protocol of its own::

    from torchreid_vi.evaluation.protocols import PROTOCOLS, generic_settings

    def my_protocol(dataset):
        return generic_settings(dataset.query, dataset.gallery, dataset_name=dataset.dataset_name,
                                directions=('ir2vis',), removal='none', cmc_mode='identity')

    PROTOCOLS.register('my_protocol', my_protocol)     # and `protocol = 'my_protocol'` on the class

Settings are pure index arrays into the two record lists, so features and distances are computed
once per test set and every trial is a slice; the evaluator builds them once per dataset.
"""
from __future__ import annotations

from typing import List

from ...registry import Registry
from . import generic, llcm, regdb, sysu_mm01
from .common import EvalSetting, agw_seed_gallery, record_fields
from .generic import generic_settings
from .llcm import llcm_settings
from .regdb import regdb_settings
from .sysu_mm01 import (
    SysuPermutation,
    find_sysu_perm_file,
    read_sysu_perm,
    sysu_gallery_official_perm,
    sysu_settings,
)

__all__ = ['EvalSetting', 'PROTOCOLS', 'settings_for', 'register_protocol', 'sysu_settings',
           'regdb_settings', 'llcm_settings', 'generic_settings', 'agw_seed_gallery',
           'SysuPermutation', 'read_sysu_perm', 'find_sysu_perm_file',
           'sysu_gallery_official_perm', 'record_fields']

PROTOCOLS = Registry('protocol')
PROTOCOLS.register('sysu_mm01', sysu_mm01.settings_for)
PROTOCOLS.register('regdb', regdb.settings_for)
PROTOCOLS.register('llcm', llcm.settings_for)
PROTOCOLS.register('generic', generic.settings_for)


def register_protocol(name: str, settings_fn, *, overwrite: bool = False):
    """Register ``settings_fn(dataset) -> List[EvalSetting]`` as protocol ``name``."""
    return PROTOCOLS.register(name, settings_fn, overwrite=overwrite)


def settings_for(dataset) -> List[EvalSetting]:
    """The evaluation settings of a cross-modal test set, by its ``protocol`` attribute."""
    settings = PROTOCOLS.get(getattr(dataset, 'protocol', 'generic'))(dataset)
    keys = [s.key for s in settings]
    if len(set(keys)) != len(keys):
        raise ValueError(f'{dataset.dataset_name}: protocol {dataset.protocol!r} produced '
                         f'duplicate setting keys {sorted({k for k in keys if keys.count(k) > 1})}')
    return settings
