"""The demo's tools: ``torchreid_vi.tools.plot_run`` (pictures of any run's save_dir) and the parts
of ``torchreid_vi.tools.demo`` that do not train (stage timing from events, the summary)."""
import json

import numpy as np
import pytest
from PIL import Image

from torchreid_vi.results import ResultsFile, read_results, run_config
from torchreid_vi.tools import plot_run as pr

SETTINGS = ['sysu_mm01/all/single/official_perm', 'sysu_mm01/all/multi/official_perm',
            'sysu_mm01/indoor/single/official_perm', 'sysu_mm01/indoor/multi/official_perm']
LOG_LINE = ('epoch: [{e}/2][{b}/3]\ttime 0.300 (0.310)\tdata 0.020 (0.021)\teta 0:00:03\t'
            'id_ir {v:.4f} (3.1000)\ttri_ir 0.5000 (0.6000)\tloss {t:.4f} (9.0000)\tlr {lr:.6f}\n')


def write_results(folder, with_cmc=True, final=True):
    metrics = {}
    for i, key in enumerate(SETTINGS):
        cmc = np.minimum(1.0, 0.3 + 0.05 * i + 0.035 * np.arange(20))
        res = {'mean': {'rank1': float(cmc[0]), 'mAP': 0.3}, 'num_trials': 10}
        if with_cmc:
            res['mean_cmc'] = cmc.tolist()
        metrics[key] = res
    # the project's own writer (format 2: runs + evaluations), as a training run leaves it
    results = ResultsFile(str(folder / 'results.json'),
                          config={'data': {'root': str(folder / 'no-such-data')}}, environment={})
    results.add_evaluation(epoch=2, dataset='sysu_mm01', metrics=metrics, final=final)


def write_events(folder, steps=6):
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(log_dir=str(folder))
    for s in range(steps):
        writer.add_scalar('Train/time', 0.3, s)
        writer.add_scalar('Train/id_ir', 3.0 - 0.1 * s, s)
        writer.add_scalar('Train/loss', 9.0 - 0.5 * s, s)
        writer.add_scalar('Train/lr', 1e-4 * (s + 1), s)
    writer.add_scalar('Test/sysu_mm01/rank1', 0.3, 1)
    writer.close()


def assert_png(path):
    with Image.open(path) as image:
        assert image.format == 'PNG' and image.size[0] > 300 and image.size[1] > 200
        pixels = np.asarray(image.convert('L'))
    assert pixels.std() > 5  # something is drawn, not a blank canvas


def test_plot_run_draws_cmc_and_training_from_results_and_events(tmp_path):
    write_results(tmp_path)
    write_events(tmp_path)
    chance = {k: {'mean': {'rank1': 0.04}, 'mean_cmc': (0.04 * np.arange(1, 21)).tolist()}
              for k in SETTINGS}
    (tmp_path / 'chance.json').write_text(json.dumps(chance))
    assert pr.main([str(tmp_path)]) == 0
    assert_png(tmp_path / 'cmc.png')
    assert_png(tmp_path / 'training.png')

    curves, source = pr.load_training_curves(str(tmp_path))
    assert 'tensorboard' in source and set(curves) == {'id_ir', 'loss', 'lr'}  # timings left out
    steps, values = curves['loss']
    assert steps.tolist() == list(range(6)) and np.allclose(values, 9.0 - 0.5 * np.arange(6))
    cmc, info = pr.load_cmc(str(tmp_path))
    assert list(cmc) == SETTINGS and info['epoch'] == 2 and cmc[SETTINGS[0]].shape == (20,)
    loaded, where = pr.load_chance(str(tmp_path), info)
    assert where.endswith('chance.json') and np.allclose(loaded[SETTINGS[1]][:2], [0.04, 0.08])


def test_plot_run_falls_back_to_train_log_lines_without_events(tmp_path):
    write_results(tmp_path, final=False)
    lines = ['=> Start training\n']
    for e in (1, 2):
        for b in (1, 2, 3):
            step = 3 * (e - 1) + b - 1
            lines.append(LOG_LINE.format(e=e, b=b, v=3.0 - 0.1 * step, t=9.0 - step, lr=1e-3 / e))
    (tmp_path / 'train.log-2026-01-01-00-00-00').write_text(''.join(lines))
    out = tmp_path / 'pictures'
    written = pr.plot_run(str(tmp_path), str(out))
    assert set(written) == {'cmc', 'training'}
    assert_png(out / 'training.png')
    assert_png(out / 'cmc.png')  # no chance.json, data root absent: drawn without chance
    curves, source = pr.load_training_curves(str(tmp_path))
    assert 'train.log' in source and set(curves) == {'id_ir', 'tri_ir', 'loss', 'lr'}
    steps, values = curves['id_ir']
    assert steps.tolist() == list(range(6)) and np.allclose(values, 3.0 - 0.1 * np.arange(6))
    assert np.allclose(curves['lr'][1], [1e-3] * 3 + [5e-4] * 3)


def test_the_run_config_is_the_one_of_the_run_that_made_the_evaluation(tmp_path):
    path = str(tmp_path / 'results.json')
    first = ResultsFile(path, config={'data': {'root': '/train-run'}}, environment={})
    first.add_evaluation(epoch=4, dataset='sysu_mm01', metrics={}, final=True)
    ResultsFile(path, config={'data': {'root': '/later-run'}}, environment={}, kind='evaluate')
    data = read_results(path)
    assert run_config(data)['data']['root'] == '/train-run'  # the last evaluation's run
    assert run_config(data, data['runs'][1]['run_id'])['data']['root'] == '/later-run'
    assert run_config({'runs': [], 'evaluations': []}) == {}
    # a file of the first format (one run, config at the top) reads the same way
    (tmp_path / 'old.json').write_text(json.dumps(
        {'config': {'data': {'root': '/old'}}, 'evaluations': [{'epoch': 1, 'metrics': {}}]}))
    assert run_config(read_results(str(tmp_path / 'old.json')))['data']['root'] == '/old'
    (tmp_path / 'list.json').write_text('[]')
    with pytest.raises(ValueError, match='list.json: top level is a list'):
        read_results(str(tmp_path / 'list.json'))


def test_plot_run_on_an_empty_folder_fails_with_one_message_and_writes_nothing(tmp_path, capsys):
    assert pr.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path) in err
    assert 'results.json' in err and 'events.out.tfevents' in err and 'train.log' in err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(pr.RunDataMissing, match='not a folder'):
        pr.plot_run(str(tmp_path / 'absent'))


def test_plot_run_names_what_is_missing_when_one_input_is_absent(tmp_path):
    write_events(tmp_path)
    with pytest.raises(pr.RunDataMissing) as info:
        pr.plot_run(str(tmp_path))
    assert 'results.json' in str(info.value) and 'events' not in str(info.value).split('lacks')[1]
    assert not (tmp_path / 'training.png').exists()  # all or nothing
    assert set(pr.plot_run(str(tmp_path), only='training')) == {'training'}
    write_results(tmp_path, with_cmc=False)
    with pytest.raises(pr.RunDataMissing, match='mean_cmc'):
        pr.plot_run(str(tmp_path), only='cmc')


# ------------------------------------------------------------------------------------------------
# demo helpers (no training)

def test_demo_data_is_made_once_reused_and_remade_when_the_arguments_change(tmp_path, capsys):
    from torchreid_vi.tools import demo
    args = {'seed': 0, 'num_ids': 30, 'num_test_ids': 8, 'size': (32, 16)}
    root = demo.prepare_data(str(tmp_path), args)
    stamp = json.loads((tmp_path / 'data' / 'synthetic.json').read_text())
    assert stamp['arguments'] == {**args, 'size': [32, 16]} and stamp['test_ids'] == 8
    assert stamp['train_ids'] > 8 and stamp['query_images'] > 0
    marker = tmp_path / 'data' / 'SYSU-MM01' / 'exp' / 'test_id.txt'
    before = marker.stat().st_mtime_ns
    assert demo.prepare_data(str(tmp_path), args) == root
    assert 'reusing' in capsys.readouterr().out and marker.stat().st_mtime_ns == before
    demo.prepare_data(str(tmp_path), dict(args, num_test_ids=6))
    assert 're-making' in capsys.readouterr().out
    assert json.loads((tmp_path / 'data' / 'synthetic.json').read_text())['test_ids'] == 6
    (tmp_path / 'data' / 'synthetic.json').unlink()  # a tree the demo did not make is never deleted
    with pytest.raises(FileExistsError, match='synthetic.json'):
        demo.prepare_data(str(tmp_path), args)
    assert marker.exists()


def test_training_span_reads_the_first_and_last_training_step_times(tmp_path):
    from torchreid_vi.tools.demo import training_span
    assert training_span(str(tmp_path)) is None
    write_events(tmp_path, steps=4)
    first, last = training_span(str(tmp_path))
    assert 1e9 < first <= last  # wall-clock seconds since the epoch


def test_summary_has_the_results_chance_baseline_pictures_and_stage_times():
    from torchreid_vi.tools.demo import summary_markdown
    metrics = {k: {'rank1': 0.5 + 0.01 * i, 'rank10': 0.9, 'mAP': 0.45, 'mINP': 0.3}
               for i, k in enumerate(SETTINGS)}
    chance = {k: {'rank1': 0.04, 'mAP': 0.094} for k in SETTINGS}
    baseline = {k: {'rank1': 0.35, 'mAP': 0.33} for k in SETTINGS}
    text = summary_markdown('xiv', metrics, chance, baseline,
                            [('synthetic data', 9.0), ('xiv run: training', 150.0)], 200.0,
                            (1.0, 0.5, 0.2), (1.5, 0.9, 0.3), {'train_ids': 200, 'test_ids': 24},
                            {'text': 'xiv_resnet18', 'threads': 2},
                            {'cmc': 'xiv/cmc.png', 'training': 'xiv/training.png'}, [])
    assert f'| {SETTINGS[0]} | 50.00 | 90.00 | 45.00 | 30.00 | 4.00 | 9.40 |' in text
    assert '| baseline (L_V + L_I; no X, no CMG, no fusion) | 35.00 | 33.00 | 4.00 | 9.40 |' in text
    assert '](xiv/cmc.png)' in text and '](xiv/training.png)' in text
    assert '| xiv run: training | 150.0 |' in text and '**200.0**' in text
    assert '1.00 / 0.50 / 0.20' in text and '1.50 / 0.90 / 0.30' in text
    no_baseline = summary_markdown('xiv', metrics, chance, None, [], 1.0, None, None, {}, {},
                                   {}, [])
    # no load average on this platform
    assert 'baseline' not in no_baseline and 'n/a' in no_baseline
