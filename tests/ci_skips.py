"""pytest plugin: under CI (`CI=true`) a skipped test or module fails the run, with its reason.

CI has torch, torchvision, pycocotools and `../shared`, so no test has a reason to skip there: a
skip would hide a check that silently stopped running. Locally, skips stay skips with their
reasons (`-ra` lists them). Expected failures (xfail) are not skips and are left alone.
"""

import os

import pytest


def under_ci() -> bool:
    return os.environ.get('CI', '').strip().lower() in ('1', 'true', 'yes')


def _reason(longrepr) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:   # (file, line, 'Skipped: reason')
        return str(longrepr[2])
    return str(longrepr)


def _fail(report) -> None:
    report.outcome = 'failed'
    report.longrepr = f'skipped under CI=true, where nothing may skip: {_reason(report.longrepr)}'


def pytest_configure(config):
    if under_ci():
        # A module that skips at import becomes a collection error; the other tests still run.
        config.option.continue_on_collection_errors = True


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if under_ci() and report.skipped and not hasattr(report, 'wasxfail'):
        _fail(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if under_ci() and report.skipped:      # e.g. a module's pytest.importorskip
        _fail(report)
