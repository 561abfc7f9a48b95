"""``import broker.container`` is cheap: lazy names, stdlib only, no processes."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "broker" / "container"


def test_import_is_lazy_and_runs_nothing() -> None:
    code = (
        "import sys, subprocess as s\n"
        "calls = []\n"
        "s.Popen.__init__ = lambda *a, **k: calls.append(a)\n"
        "import broker.container as c\n"
        "assert 'broker.container.apptainer' not in sys.modules, 'eager import'\n"
        "c.switch; c.host_check; c.docker_rebuild; c.env_snapshot\n"
        "assert 'broker.container.apptainer' in sys.modules\n"
        "assert calls == [], calls\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr


def test_toolkit_imports_only_the_standard_library() -> None:
    stdlib = set(sys.stdlib_module_names)
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots = [node.module.split(".")[0]]
            else:
                continue
            for root in roots:
                assert root in stdlib or root == "broker", f"{path.name} imports {root}"
