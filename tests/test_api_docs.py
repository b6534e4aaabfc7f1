"""The API reference builds from the docstrings (docs/api.py, pdoc) and covers the public API."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_api_reference_builds_and_documents_the_public_api(tmp_path):
    if importlib.util.find_spec("pdoc") is None:
        pytest.skip("pdoc is not installed (pip install -e '.[docs]'; the test extra has it)")
    spec = importlib.util.spec_from_file_location("api_docs", DOCS / "api.py")
    api = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(api)
    index = api.build(tmp_path)
    assert index.is_file()
    pages = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.html")}
    for module in api.MODULES:
        assert module.replace(".", "/") + ".html" in pages, module
    import transflow

    top = (tmp_path / "transflow.html").read_text()
    for name in transflow.__all__:
        assert re.search(rf'id="{re.escape(name)}"', top), name
    flow = (tmp_path / "transflow" / "flows" / "base.html").read_text()
    for method in ("inverse", "sample", "as_distribution", "from_pretrained", "units"):
        assert f'id="Flow.{method}"' in flow, method
