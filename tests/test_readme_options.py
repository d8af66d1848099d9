"""The README's option table says what the config does: every plugin key (``vi.*`` and the
plugin's keys in torchreid's nodes) is listed, with the default the config really has."""
import re
from pathlib import Path

import pytest
import yaml

from torchreid_vi.config import get_default_config

README = Path(__file__).resolve().parent.parent / 'README.md'
# Keys the plugin adds to torchreid's own nodes (all listed in the table).
PLUGIN_KEYS_OUTSIDE_VI = ['engine.name', 'train.amp', 'train.channels_last', 'train.compile',
                          'data.pin_memory', 'data.persistent_workers', 'data.prefetch_factor']


def _cells(text):
    """Top-level ', '-separated items of a table cell (brackets kept together), backticks off."""
    items, depth, cur = [], 0, ''
    for ch in text:
        depth += ch == '['
        depth -= ch == ']'
        if ch == ',' and depth == 0:
            items.append(cur)
            cur = ''
        else:
            cur += ch
    items.append(cur)
    return [i.strip().strip('`') for i in items]


def _table_rows():
    """{full key: default as written} from the '## Options' table."""
    section = README.read_text(encoding='utf-8').split('\n## Options', 1)[1].split('\n## ', 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r'\| (`[^|]+) \| ([^|]+) \| ', line)
        if not m:
            continue
        keys, defaults = _cells(m[1]), _cells(m[2])
        if keys[0].endswith('.*'):  # the methods' nodes: documented in the projects' READMEs
            continue
        prefix = keys[0].rsplit('.', 1)[0]
        full = [keys[0]] + [k if '.' in k else f'{prefix}.{k}' for k in keys[1:]]
        assert len(full) == len(defaults), f'README row {line!r}: {len(full)} keys, ' \
                                           f'{len(defaults)} defaults'
        for key, default in zip(full, defaults):
            rows[key] = default
    return rows


def _leaves(node, prefix):
    for k, v in node.items():
        if hasattr(v, 'items'):
            yield from _leaves(v, f'{prefix}{k}.')
        else:
            yield f'{prefix}{k}', v


def _expand(rows, cfg):
    """``vi.<dataset>.x`` rows stand for every dataset node that has x."""
    out = {}
    for key, default in rows.items():
        if key.startswith('vi.<dataset>.'):
            leaf = key.split('.', 2)[2]
            for name, node in cfg.vi.items():
                if hasattr(node, 'items') and leaf in node:
                    out[f'vi.{name}.{leaf}'] = default
        else:
            out[key] = default
    return out


def _value(cfg, key):
    node = cfg
    for part in key.split('.'):
        node = node[part]
    return node


def test_every_plugin_option_is_in_the_readme_table():
    cfg = get_default_config()
    listed = _expand(_table_rows(), cfg)
    keys = [k for k, _ in _leaves(cfg.vi, 'vi.')] + PLUGIN_KEYS_OUTSIDE_VI
    missing = [k for k in keys if k not in listed]
    assert not missing, f'README.md "## Options" does not list {missing}'


@pytest.mark.parametrize('key', sorted(_expand(_table_rows(), get_default_config())))
def test_readme_default_is_the_config_default(key):
    cfg = get_default_config()
    written = _expand(_table_rows(), cfg)[key]
    expected = _value(cfg, key)
    parsed = yaml.safe_load(written) if written not in ("''", '') else ''
    if isinstance(expected, (list, tuple)):
        expected = list(expected)
    assert parsed == expected, f'README.md says {key} defaults to {written!r}; the config ' \
                               f'has {expected!r}'
