"""Item 7: the image toolkit, run as root, uses only admin-owned paths and never writes through a link.

A user plants ``/tmp/<dir>/containers/evil.def`` (whose ``%setup`` would run on the
host as root) and waits for an admin to run ``sbroker image ...`` from there; or
hands the admin a recipe or directory they own; or plants a symlink where the build
log will be created. None of these may reach root.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.container.apptainer import build, find_containers_dir

from ..container.conftest import FakeApptainer, fake_apptainer  # noqa: F401  (fixture)

NOBODY = 65534
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the toolkit's root rules need root")


@pytest.fixture
def planted() -> Iterator[Path]:
    """A world-writable-parented dir owned by an ordinary user, with a ``containers/evil.def``."""
    base = Path(tempfile.mkdtemp(prefix="sbhostile-plant-", dir="/tmp"))
    base.chmod(0o755)
    (base / "containers").mkdir()
    (base / "containers" / "evil.def").write_text("Bootstrap: localimage\nFrom: x\n%setup\n  touch /PWNED\n")
    for path in (base, base / "containers", base / "containers" / "evil.def"):
        os.chown(path, NOBODY, NOBODY)
    yield base
    subprocess.run(["rm", "-rf", str(base)], check=True)


def test_root_never_uses_user_owned_recipes_or_dirs(planted: Path, fake_apptainer: FakeApptainer,  # noqa: F811
                                                    monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(planted)
    monkeypatch.setenv("SCITEX_DIR", str(tmp_path / "nothing-here"))
    found = find_containers_dir()
    assert found != planted / "containers" and not str(found).startswith(str(planted))
    with pytest.raises(PermissionError, match="not root"):  # an explicit user-owned recipe is refused too
        build(def_path=planted / "containers" / "evil.def", output_dir=tmp_path / "out")
    assert [c for c in fake_apptainer.calls() if c.startswith("build")] == []
    cli = subprocess.run([sys.executable, "-m", "broker.container.cli", "image", "list", "--dir",
                          str(planted / "containers")], capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert cli.returncode == 1 and cli.stderr.startswith("error: --dir ") and "not root" in cli.stderr


def test_build_log_is_never_opened_through_a_planted_link(fake_apptainer: FakeApptainer,  # noqa: F811
                                                          tmp_path: Path) -> None:
    recipe = tmp_path / "img.def"
    recipe.write_text("Bootstrap: docker\nFrom: debian:12\n")
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    image_dir = tmp_path / "out" / "img"
    image_dir.mkdir(parents=True)
    now = time.time()
    for delta in range(-2, 30):  # every name the log may get while this test runs
        stamp = time.strftime("%Y-%m%d-%H%M%S", time.localtime(now + delta))
        (image_dir / f"img.build-{stamp}.log").symlink_to(victim)
    build(def_path=recipe, output_dir=tmp_path / "out")
    assert victim.read_text() == "precious\n"
    logs = [p for p in image_dir.glob("img.build-*.log") if not p.is_symlink()]
    assert len(logs) == 1 and logs[0].stat().st_nlink == 1
