"""ligo_core/catalog.py is the one list of strategies, options, defaults and bounds: the CLI, the
API's schemas, the web form and README all say what it says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ligo_core import catalog
from ligo_core.errors import TargetError

ROOT = Path(__file__).resolve().parents[1]


def _readme_strategy_table() -> dict[str, tuple[str, str, bool]]:
    rows = {}
    for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and (m := re.fullmatch(r"`(\w+)`( \(default\))?", cells[0])):
            rows[m.group(1)] = (cells[1], cells[2], cells[3].startswith("yes"))
    return rows


def test_readme_strategy_table_is_the_catalog():
    assert _readme_strategy_table() == {s.name: (s.width, s.depth, s.fitted) for s in catalog.STRATEGIES}


def test_cli_choices_and_defaults_come_from_the_catalog():
    from ligo_core.cli import build_parser

    grow = build_parser()._subparsers._group_actions[0].choices["grow"]
    actions = {a.dest: a for a in grow._actions}
    assert tuple(actions["strategy"].choices) == catalog.STRATEGY_NAMES
    assert tuple(actions["ligo_init"].choices) == tuple(catalog.LIGO_INITS)
    assert (actions["strategy"].default, actions["fit_steps"].default, actions["ligo_init"].default) == (
        catalog.DEFAULT_STRATEGY, catalog.DEFAULT_FIT_STEPS, catalog.DEFAULT_LIGO_INIT)
    assert "0 for net2net and preserve, 2 for ligo and stack and interpolate" in actions["spread"].help


@pytest.mark.parametrize("option, field", [
    (catalog.FIT_STEPS, "steps"), (catalog.FIT_LR, "lr"), (catalog.BATCH_SIZE, "batch_size"),
    (catalog.SEQ_LEN, "seq_len"),
])
def test_fit_schema_bounds_are_the_catalogs(option, field):
    from pydantic import ValidationError

    from app.schemas import FitOptions

    FitOptions(**{field: option.high})
    for wrong in (option.high * 2, option.low if option.low_open else option.low - 1):
        with pytest.raises(ValidationError):
            FitOptions(**{field: wrong})


@pytest.mark.parametrize("kwargs, field", [
    ({"strategy": "grow-it"}, "strategy"), ({"ligo_init": "random"}, "ligo_init"),
    ({"noise": 1.5}, "noise"), ({"spread": -0.1}, "spread"), ({"spread": catalog.SPREAD.high + 1}, "spread"),
])
def test_one_check_names_the_wrong_option(kwargs, field):
    options = {"strategy": "ligo", "ligo_init": "preserve", "noise": 1.0, "spread": None, **kwargs}
    with pytest.raises(TargetError) as caught:
        catalog.check_growth_options(**options)
    assert caught.value.field == field and field.split("_")[0] in str(caught.value)


def test_catalog_stays_free_of_torch():
    import subprocess
    import sys

    # Loaded on its own (the package's __init__ brings transformers): the module itself needs no torch.
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('c', 'ligo_core/catalog.py'); "
            "m = sys.modules['c'] = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
