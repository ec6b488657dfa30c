"""The method registry: capabilities recorded at registration, read by merge() and the CLI,
and `symmerge methods [--json]` listing them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from symmerge import methods
from symmerge.cli import main
from symmerge.merging import merge
from symmerge.methods import MethodInfo, list_methods, method_info, register_method
from symmerge.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")

CAPABILITIES = ("needs_data", "max_models", "unequal_widths", "target_width")
FIELDS = {"name", "summary", "paper", "url", *CAPABILITIES}


def _models(n: int) -> list[torch.nn.Module]:
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        out.append(create_model("mlp", width=8, depth=2)[0].eval())
    return out


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g))]


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


# ---- registration ---------------------------------------------------------------------------


def test_registering_an_existing_name_raises() -> None:
    for name in list_methods():
        with pytest.raises(ValueError, match=f"method '{name}' is already registered"):
            register_method(name, paper="x")


def test_register_records_and_validates_capabilities() -> None:
    name = "test-registry-method"
    try:

        @register_method(name, paper="p", url="u", needs_data=True, max_models=3)
        def fn(spec, models, *, data=None, lam=0.5, seed=0):  # type: ignore[no-untyped-def]
            """A test method.

            Second paragraph, not in the summary.
            """

        info = method_info(name)
        assert (info.needs_data, info.max_models) == (True, 3)
        assert (info.unequal_widths, info.target_width) == (False, False)  # the defaults
        assert info.summary == "A test method."
        assert [info.accepts(n) for n in (1, 2, 3, 4)] == [False, True, True, False]
        assert info.to_dict() == {
            "name": name, "summary": "A test method.", "paper": "p", "url": "u",
            "needs_data": True, "max_models": 3, "unequal_widths": False, "target_width": False,
        }  # fmt: skip
    finally:
        methods._REGISTRY.pop(name, None)
    bad = [({"max_models": 1}, "max_models"), ({"max_models": 2.0}, "max_models"),
           ({"max_models": True}, "max_models"), ({"needs_data": 1}, "needs_data"),
           ({"unequal_widths": "yes"}, "unequal_widths"),
           ({"target_width": None}, "target_width")]  # fmt: skip
    for kwargs, param in bad:
        with pytest.raises(ValueError, match=f"The '{param}' parameter of register_method"):
            register_method(name, **kwargs)  # type: ignore[arg-type]
    assert name not in list_methods()


def test_capabilities_of_the_builtin_methods() -> None:
    assert method_info("activation").needs_data and method_info("ste").needs_data
    for name in ("naive", "weight", "mergemany", "c2m3"):
        assert not method_info(name).needs_data, name
    assert method_info("weight").max_models == 2 and method_info("ste").max_models == 2
    for name in ("naive", "activation", "mergemany", "c2m3"):
        assert method_info(name).max_models is None, name


# ---- the registry is what merge() and the CLI read -------------------------------------------


@pytest.mark.parametrize("name", [m for m in list_methods() if method_info(m).needs_data])
def test_merge_without_data_names_the_method(name: str) -> None:
    with pytest.raises(ValueError, match=f"the '{name}' method needs data"):
        merge(_models(2), name, example_inputs=(torch.randn(2, 1, 28, 28),))


@pytest.mark.parametrize("name", list_methods())
def test_max_models_tells_the_truth(name: str) -> None:
    """Three models merge exactly when the registry says the method takes three."""
    info = method_info(name)
    models = _models(3)
    data = _batches() if info.needs_data else None
    kwargs = {"steps": 1} if name == "ste" else {}
    x = (torch.randn(2, 1, 28, 28),)
    if info.accepts(3):
        merged, result = merge(models, name, data=data, example_inputs=x, **kwargs)
        assert result.method == name and torch.isfinite(merged(x[0])).all()
    else:
        with pytest.raises(ValueError, match=f"'{name}' method merges 2 models, got 3"):
            merge(models, name, data=data, example_inputs=x, **kwargs)


def test_cli_checks_capabilities_before_loading(tmp_path: Path) -> None:
    # The files are not checkpoints: the capability errors come before anything is read.
    paths = [tmp_path / f"{k}.safetensors" for k in range(3)]
    for p in paths:
        p.write_bytes(b"not a checkpoint")
    out = str(tmp_path / "out.safetensors")
    code, text = _run("merge", *map(str, paths), "-m", "weight", "-o", out)
    many = [m for m in list_methods() if method_info(m).accepts(3)]
    assert code == 2 and "'weight' method merges at most 2 models, got 3" in text
    assert f"methods that merge 3: {', '.join(many)}" in text
    code, text = _run("merge", *map(str, paths[:2]), "-m", "activation", "-o", out)
    assert code == 2 and "'activation' method needs data: pass --data" in text
    code, text = _run("interpolate", *map(str, paths[:2]), "-m", "ste")
    assert code == 2 and "'ste' method needs data" in text
    assert not Path(out).exists()


# ---- `symmerge methods` ----------------------------------------------------------------------


def test_methods_json_lists_every_method() -> None:
    code, text = _run("methods", "--json")
    assert code == 0, text
    rows = json.loads(text)
    assert [r["name"] for r in rows] == list_methods()
    for row in rows:
        assert set(row) == FIELDS
        assert row == method_info(row["name"]).to_dict()


def test_methods_table() -> None:
    code, text = _run("methods")
    assert code == 0, text
    lines = text.splitlines()
    assert lines[0].split() == ["method", "needs", "data", "N>2", "models", "unequal", "widths",
                                "target", "width"]  # fmt: skip
    table = {line.split()[0]: line.split()[1:] for line in lines[2 : 2 + len(list_methods())]}
    assert set(table) == set(list_methods())
    assert table["activation"][:2] == ["yes", "yes"] and table["weight"][:2] == ["no", "no"]
    assert table["ste"][:2] == ["yes", "no"]
    for name in list_methods():
        assert f"{name}: {method_info(name).summary}" in text
    assert "methods" in _run("--help")[1]


# ---- meta-test: conventions every registered method keeps ------------------------------------


@pytest.mark.parametrize("name", list_methods())
def test_every_method_is_described(name: str) -> None:
    info = method_info(name)
    assert isinstance(info, MethodInfo) and info.name == name
    assert info.summary, "a docstring whose first paragraph is the one-line summary"
    assert "\n" not in info.summary and info.summary == info.to_dict()["summary"]
    for flag in ("needs_data", "unequal_widths", "target_width"):
        assert isinstance(getattr(info, flag), bool), flag
    assert info.max_models is None or (type(info.max_models) is int and info.max_models >= 2), (
        "max_models: None (any N) or an int >= 2"
    )
    assert json.loads(json.dumps(info.to_dict())) == info.to_dict()
