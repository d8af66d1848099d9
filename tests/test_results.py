"""results.json never loses what it holds: an unreadable file is moved aside, not overwritten."""
import glob
import json

import pytest

from torchreid_vi.results import ResultsFile


@pytest.mark.parametrize('content', ['{"format_version": 2, "runs": [', '[1, 2]'])
def test_an_unreadable_results_file_is_moved_aside_with_a_warning(tmp_path, content):
    path = tmp_path / 'results.json'
    path.write_text(content)
    with pytest.warns(UserWarning, match='could not be read'):
        results = ResultsFile(str(path), config={'a': 1}, environment={})
    aside = glob.glob(str(tmp_path / 'results.json.unreadable-*'))
    assert len(aside) == 1 and open(aside[0]).read() == content  # kept byte for byte
    results.add_evaluation(epoch=1, dataset='toy', metrics={})
    data = json.loads(path.read_text())
    assert [r['run_id'] for r in data['runs']] == [results.run_id]
    assert len(data['evaluations']) == 1
