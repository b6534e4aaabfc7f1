"""Bad inputs and faults through the real command line, one process per case (the table and
its runner: tests/cli_matrix.py): exit code 2, exactly one line on stderr, no traceback, no
temporary file left behind, no existing file changed."""

from __future__ import annotations

import pytest

import cli_matrix as M


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    root = tmp_path_factory.mktemp("matrix") / "root"
    M.build(root)
    full, why = M.mount_full_disk(root)
    yield root, full, why
    M.unmount(full)


def _check(selected, results):
    assert len(results) == len(selected)
    failures = {c.name: (M.verdict(c, r), r["stderr"][-400:])
                for c, r in zip(selected, results, strict=True) if M.verdict(c, r)}
    assert not failures, failures


@pytest.mark.slow
def test_bad_inputs_and_corrupted_files(matrix):
    root, full, _ = matrix
    selected = [c for c in M.cases() if not c.full_disk]
    assert len(selected) >= 40
    _check(selected, M.run(root, full, selected))


@pytest.mark.slow
def test_full_disk_while_writing_checkpoints_models_and_samples(matrix):
    root, full, why = matrix
    if full is None:
        pytest.skip(f"no small full filesystem: {why}")
    selected = [c for c in M.cases() if c.full_disk]
    assert {c.issue for c in selected} == {"2", "3"}
    _check(selected, M.run(root, full, selected))
    assert (full / "existing.npz").read_bytes()  # the earlier output is still there, whole
