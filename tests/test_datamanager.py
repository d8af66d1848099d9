"""Datamanager integration: sampler registry, dataset options, multi-source checks, the plugin
example dataset, and plain torchreid ImageDataManager after register_all()."""
from __future__ import annotations

import importlib.util
import os.path as osp
import sys

import pytest
import torch

from torchreid_vi._torchreid import tr
from torchreid_vi.data import datamanager as vi_dm
from torchreid_vi.data import register_all
from torchreid_vi.data.base import (
    INFRARED,
    VISIBLE,
    CrossModalDataset,
    MultiSourceCrossModalDataset,
    parse_cache_info,
)
from torchreid_vi.data.datamanager import CrossModalImageDataManager
from torchreid_vi.data.regdb import RegDB
from torchreid_vi.data.sampler import ModalityBalancedSampler
from torchreid_vi.registry import list_samplers, register_dataset

register_all()
P, K = 3, 2
COMMON = dict(height=32, width=16, workers=0, use_gpu=False, batch_size_test=64, transforms=[])


class TinyPlainDataset(tr.data.ImageDataset):
    """A torchreid dataset without modality (to check the mixing errors)."""

    def __init__(self, root='', **kwargs):
        kwargs = {k: v for k, v in kwargs.items()
                  if k in ('transform', 'k_tfm', 'mode', 'combineall', 'verbose')}
        items = [(f'{i}.jpg', i % 6, 0, 0) for i in range(24)]
        super().__init__(items, items[:6], items[6:12], **kwargs)


register_dataset('tiny_plain_test', TinyPlainDataset)


def assert_layout(data, p=P, k=K):
    half = p * k
    assert data['modality'].tolist() == [VISIBLE] * half + [INFRARED] * half
    assert torch.equal(data['pid'][:half], data['pid'][half:])
    assert data['pid'][:half:k].unique().numel() == p


def test_install_is_idempotent_and_lists_torchreid_samplers():
    mod = tr.module('data.datamanager')
    vi_dm.install()
    wrapped = mod.build_train_sampler
    vi_dm.install()
    register_all()
    assert mod.build_train_sampler is wrapped is vi_dm.build_train_sampler
    # the sampler and transform builders are the only torchreid functions the plugin replaces
    assert mod.init_image_dataset is tr.module('data.datasets').init_image_dataset
    from torchreid_vi.data.transforms import build_transforms
    assert mod.build_transforms is build_transforms
    names = set(list_samplers())
    assert set(vi_dm.TORCHREID_SAMPLERS) | {'ModalityBalancedSampler'} <= names


def test_plain_torchreid_datamanager_uses_the_plugin_sampler(sysu_root):
    root, manifest = sysu_root
    dm = tr.data.ImageDataManager(root=root, sources='sysu_mm01',
                                  train_sampler='ModalityBalancedSampler',
                                  batch_size_train=2 * P * K, num_instances=K, **COMMON)
    assert isinstance(dm.train_loader.sampler, ModalityBalancedSampler)
    assert dm.num_train_pids == len(manifest['splits']['train']['vis']['ids'])
    assert_layout(next(iter(dm.train_loader)))


def test_torchreid_samplers_still_work(sysu_root):
    root, _ = sysu_root
    samplers = tr.module('data.sampler')
    dm = tr.data.ImageDataManager(root=root, sources='sysu_mm01',
                                  train_sampler='RandomIdentitySampler', batch_size_train=8,
                                  num_instances=4, **COMMON)
    assert isinstance(dm.train_loader.sampler, samplers.RandomIdentitySampler)
    assert type(vi_dm.build_train_sampler(dm.train_loader.dataset.train, 'SequentialSampler')) \
        is torch.utils.data.SequentialSampler
    with pytest.raises(ValueError, match=r'unknown train sampler "Nope".*ModalityBalancedSampler'
                                         r'.*RandomSampler'):
        vi_dm.build_train_sampler(dm.train_loader.dataset.train, 'Nope')


def test_dataset_options_reach_datasets_and_test_datasets_are_exposed(regdb_root):
    root, manifest = regdb_root
    dm = CrossModalImageDataManager(root=root, sources='regdb', batch_size_train=2 * P * K,
                                    num_instances=K, train_sampler='ModalityBalancedSampler',
                                    dataset_options={'regdb': {'trial': 2, 'directions': ['t2v']},
                                                     'sysu_mm01': {'shots': [1]}},
                                    sampler_options={'seed': 5, 'epoch_mode': 'cover'}, **COMMON)
    trial2 = manifest['trial_pids']['2']
    assert (isinstance(dm.train_set, RegDB)
            and dm.train_set.train_raw_pids == sorted(trial2['train']))
    query_ds = dm.test_datasets['regdb']
    assert isinstance(query_ds, RegDB) and query_ds.mode == 'query'
    assert query_ds.protocol_options == {'trial': 2, 'directions': ('t2v',), 'semantics': 'vireid'}
    assert {r[1] for r in query_ds.query} == set(trial2['test'])
    assert dm.test_loader['regdb']['gallery'].dataset.protocol_options['trial'] == 2
    sampler = dm.train_sampler
    assert (sampler.seed, sampler.epoch_mode, sampler.replace) == (5, 'cover', 'auto')
    # Options belong to that datamanager: a plain torchreid build gets the defaults.
    dm1 = tr.data.ImageDataManager(root=root, sources='regdb', batch_size_train=2 * P * K,
                                   num_instances=K, train_sampler='ModalityBalancedSampler',
                                   **COMMON)
    assert dm1.train_loader.dataset.protocol_options['trial'] == 1


def test_datamanager_reads_each_tree_once(llcm_root):
    root, _ = llcm_root
    CrossModalImageDataManager(root=root, sources='llcm', batch_size_train=2 * P * K,
                               num_instances=K, train_sampler='ModalityBalancedSampler',
                               **COMMON)
    before = parse_cache_info()
    CrossModalImageDataManager(root=root, sources='llcm', targets=['llcm', 'llcm'],
                               batch_size_train=2 * P * K, num_instances=K, **COMMON)
    after = parse_cache_info()
    assert after['reads'] == before['reads'] and after['hits'] - before['hits'] == 5


def test_unknown_dataset_option_names_dataset_and_key(regdb_root):
    root, _ = regdb_root
    with pytest.raises(TypeError, match=r'dataset "regdb": unknown dataset option "trail"'):
        CrossModalImageDataManager(root=root, sources='regdb', dataset_options={
            'regdb': {'trail': 2}}, **COMMON)
    with pytest.raises(TypeError, match='tiny_plain_test.*not a cross-modal dataset'):
        CrossModalImageDataManager(root=root, sources='regdb', dataset_options={
            'tiny_plain_test': {'x': 1}}, **COMMON)


def test_batch_size_must_be_2pk(sysu_root):
    root, _ = sysu_root
    with pytest.raises(ValueError, match=r'train.batch_size=10 must be 2·P·K.*num_instances'):
        CrossModalImageDataManager(root=root, sources='sysu_mm01', batch_size_train=10,
                                   num_instances=K, train_sampler='ModalityBalancedSampler',
                                   **COMMON)


def test_multi_source_keeps_modality(sysu_root, llcm_root):
    root, _ = sysu_root
    assert llcm_root[0] == root  # the fixtures share one data root
    dm = CrossModalImageDataManager(root=root, sources=['sysu_mm01', 'llcm'],
                                    targets=['sysu_mm01', 'llcm'], batch_size_train=2 * P * K,
                                    num_instances=K, train_sampler='ModalityBalancedSampler',
                                    **COMMON)
    assert isinstance(dm.train_set, MultiSourceCrossModalDataset)
    assert set(dm.test_datasets) == {'sysu_mm01', 'llcm'}
    assert dm.test_datasets['llcm'].dataset_name == 'llcm'
    assert_layout(next(iter(dm.train_loader)))


def test_mixing_with_a_dataset_without_modality_is_refused(sysu_root):
    root, _ = sysu_root
    kw = dict(root=root, targets='sysu_mm01', batch_size_train=2 * P * K, num_instances=K,
              **COMMON)
    with pytest.raises(ValueError, match=r"ModalityBalancedSampler needs the per-image modality.*"
                                         r"\['tiny_plain_test'\].*modality would be lost"):
        CrossModalImageDataManager(sources=['sysu_mm01', 'tiny_plain_test'],
                                   train_sampler='ModalityBalancedSampler', **kw)
    with pytest.raises(ValueError, match=r"cannot be mixed.*\['tiny_plain_test'\]"):
        CrossModalImageDataManager(sources=['tiny_plain_test', 'sysu_mm01'], **kw)
    with pytest.raises(ValueError, match=r'ModalityBalancedSampler needs the per-image modality'):
        CrossModalImageDataManager(sources=['tiny_plain_test'],
                                   train_sampler='ModalityBalancedSampler', **kw)
    # Plain torchreid: a cross-modal dataset first refuses the sum itself.
    with pytest.raises(ValueError, match='modality .* would be lost'):
        tr.data.ImageDataManager(sources=['sysu_mm01', 'tiny_plain_test'], **kw)


def load_example_plugin():
    """Import projects/custom_dataset/my_dataset.py under the name the CLI's --plugin uses."""
    name = 'torchreid_vi_plugin_my_dataset'
    if name not in sys.modules:
        path = osp.join(osp.dirname(__file__), '..', 'projects', 'custom_dataset', 'my_dataset.py')
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_example_plugin_dataset_builds_a_datamanager(tmp_path):
    plugin = load_example_plugin()
    folder = plugin.write_example_tree(str(tmp_path), num_ids=8, images_per_cam=2, size=(32, 16))
    assert folder == str(tmp_path / 'my_vi')
    dm = CrossModalImageDataManager(root=str(tmp_path), sources='my_vi',
                                    train_sampler='ModalityBalancedSampler', batch_size_train=8,
                                    num_instances=2, **COMMON)
    ds = dm.test_datasets['my_vi']
    assert isinstance(ds, CrossModalDataset) and isinstance(dm.train_set, plugin.MyVIDataset)
    s = ds.summary()
    assert s['train']['vis'] == {'ids': [1, 2, 3, 4], 'num_images': 16, 'cams': [1, 2]}
    assert s['train']['ir'] == {'ids': [1, 2, 3, 4], 'num_images': 16, 'cams': [3, 4]}
    assert s['query']['ir']['ids'] == [5, 6, 7, 8] and s['gallery']['vis']['num_images'] == 16
    assert s['query']['vis']['num_images'] == 0
    assert_layout(next(iter(dm.train_loader)), p=2, k=2)
    with pytest.raises(Exception, match='my_vi: dataset folder not found'):
        plugin.MyVIDataset(root=str(tmp_path / 'empty'))
