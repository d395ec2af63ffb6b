"""The CI skip rule (tests/ci_skips.py): a skip fails the run under CI=true and stays a skip
otherwise, for skips inside a test and at module level."""

import os
import pathlib
import subprocess
import sys

TESTS = pathlib.Path(__file__).resolve().parent

SAMPLE = '''
import pytest

def test_runs():
    assert True

def test_skips():
    pytest.skip('no frobnicator here')

@pytest.mark.xfail(reason='known')
def test_xfails():
    assert False
'''
MODULE_SKIP = '''
import pytest
pytest.importorskip('a_module_that_does_not_exist_anywhere')

def test_never():
    pass
'''


def _pytest(tmp_path, ci: str):
    (tmp_path / 'test_sample.py').write_text(SAMPLE)
    (tmp_path / 'test_module_skip.py').write_text(MODULE_SKIP)
    env = {k: v for k, v in os.environ.items() if k != 'CI'}
    env.update(CI=ci, PYTHONPATH=str(TESTS))
    return subprocess.run([sys.executable, '-m', 'pytest', '-p', 'ci_skips', '-q', '-rA', '-p', 'no:cacheprovider',
                           str(tmp_path)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)


def test_skips_fail_under_ci(tmp_path):
    proc = _pytest(tmp_path, 'true')
    assert proc.returncode == 1, proc.stdout
    assert 'skipped under CI=true, where nothing may skip: Skipped: no frobnicator here' in proc.stdout
    assert "could not import 'a_module_that_does_not_exist_anywhere'" in proc.stdout
    assert '1 failed, 1 passed, 1 xfailed, 1 error' in proc.stdout, proc.stdout


def test_skips_stay_skips_locally(tmp_path):
    proc = _pytest(tmp_path, '')
    assert proc.returncode == 0, proc.stdout
    assert '1 passed, 2 skipped, 1 xfailed' in proc.stdout
    assert 'no frobnicator here' in proc.stdout
