"""Every function in the shared API reference exists here with the same signature."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path, PosixPath
from typing import Any

import pytest

#: The shared reference when it sits beside the checkout (authoritative), else the copy
#: kept in the repository so the check also runs on a bare clone.
_SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "seed"
SEED_FILES = sorted(_SHARED.glob("*.txt")) or [Path(__file__).parent / "data" / "api-reference.txt"]
_HEADER = re.compile(r"^scitex_container\.([A-Za-z_][\w.]*)\((.*)\)(?:\[source\])?\s*$")


def _reference() -> list[tuple[str, list[tuple[str, str, Any]]]]:
    """``[(dotted name, [(param, kind, default or inspect._empty)])]`` from the seed text."""
    entries = []
    for seed in SEED_FILES:
        for line in seed.read_text(encoding="utf-8").splitlines():
            match = _HEADER.match(line)
            if not match:
                continue
            func = ast.parse(f"def f({match.group(2)}): pass").body[0]
            assert isinstance(func, ast.FunctionDef)
            args = func.args
            params: list[tuple[str, str, Any]] = []
            positional = args.args
            pos_defaults = [inspect.Parameter.empty] * (len(positional) - len(args.defaults)) + [
                _eval(d) for d in args.defaults
            ]
            params += [(a.arg, "positional", d) for a, d in zip(positional, pos_defaults)]
            params += [
                (a.arg, "keyword", inspect.Parameter.empty if d is None else _eval(d))
                for a, d in zip(args.kwonlyargs, args.kw_defaults)
            ]
            entries.append((match.group(1), params))
    return entries


def _eval(node: ast.expr) -> Any:
    return eval(compile(ast.Expression(node), "<seed>", "eval"), {"PosixPath": PosixPath, "__builtins__": {}})


REFERENCE = _reference()


def _resolve(dotted: str) -> Any:
    module_path, _, name = dotted.rpartition(".")
    module = importlib.import_module("broker.container" + (f".{module_path}" if module_path else ""))
    return getattr(module, name)


def _same_default(ours: Any, ref: Any) -> bool:
    if ours == ref:
        return True
    # The rendered reference doubles backslashes once more (sandbox_configure_ps1's '\W $ ').
    return isinstance(ours, str) and isinstance(ref, str) and ours.replace("\\", "\\\\") == ref


def test_reference_was_parsed() -> None:
    names = {name for name, _ in REFERENCE}
    assert len(REFERENCE) >= 53  # 14 top-level + 31 apptainer + 4 docker + 4 host
    assert {"build", "switch", "apptainer.build_instance_start_script", "host.install_packages"} <= names
    assert "apptainer.sandbox_configure_ps1" in names


@pytest.mark.parametrize(("dotted", "params"), REFERENCE, ids=[name for name, _ in REFERENCE])
def test_signature_matches_reference(dotted: str, params: list[tuple[str, str, Any]]) -> None:
    signature = inspect.signature(_resolve(dotted))
    ours = []
    for p in signature.parameters.values():
        assert p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY), f"{dotted}: unexpected kind for {p.name}"
        ours.append((p.name, "positional" if p.kind is p.POSITIONAL_OR_KEYWORD else "keyword", p.default))
    assert [(n, k) for n, k, _ in ours] == [(n, k) for n, k, _ in params]
    for (name, _, mine), (_, _, ref) in zip(ours, params):
        assert (mine is inspect.Parameter.empty) == (ref is inspect.Parameter.empty), f"{dotted}.{name}"
        if ref is not inspect.Parameter.empty:
            assert _same_default(mine, ref), f"{dotted}.{name}: {mine!r} != {ref!r}"


def test_top_level_aliases_are_the_submodule_functions() -> None:
    import broker.container as bc
    from broker.container import apptainer, docker, host, snapshot

    assert bc.switch is apptainer.switch_version
    assert bc.docker_rebuild is docker.rebuild and bc.docker_restart is docker.restart
    assert bc.host_check is host.check_packages and bc.host_install is host.install_packages
    assert bc.env_snapshot is snapshot.env_snapshot
    for name in ("build", "cleanup", "deploy", "list_versions", "rollback", "sandbox_create", "status", "verify"):
        assert getattr(bc, name) is getattr(apptainer, name)
    assert sorted(bc.__all__) == sorted(
        "build cleanup deploy docker_rebuild docker_restart env_snapshot host_check host_install "
        "list_versions rollback sandbox_create status switch verify".split()
    )
