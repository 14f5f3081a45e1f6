"""docs/supported_models.md is the table tests/zoo_table.py generates from the zoo tests, and every test it
names exists."""
from __future__ import annotations

import importlib

import zoo_table


def test_every_row_names_an_existing_test():
    for *_, test, _build in zoo_table.ROWS:
        path, _, func = test.partition(" ")[0].partition("::")
        module = importlib.import_module(path.removesuffix(".py"))
        if func:
            assert callable(getattr(module, func, None)), test


def test_supported_models_table_is_up_to_date():
    assert zoo_table.DOC.read_text() == zoo_table.table(), (
        "docs/supported_models.md is out of date: run `python tests/zoo_table.py`")
