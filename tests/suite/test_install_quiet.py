"""``infra/system-deps.sh`` is quiet unless it fails (with stand-ins for dpkg-query, id and apt-get).

The real script runs with a PATH whose first directory holds fakes: every
package missing, root, and an apt-get as talkative as the real one (or failing).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "infra" / "system-deps.sh"
NOISE = "Selecting previously unselected package qemu-utils."


def _fakes(tmp_path: Path, *, installed: bool, apt_fails_on: str = "") -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    status = "install ok installed" if installed else "deinstall ok config-files"
    scripts = {
        "dpkg-query": f"#!/bin/sh\nprintf '{status}'\n",
        "id": "#!/bin/sh\necho 0\n",
        "apt-get": f"""#!/bin/sh
echo "$*" >> "{tmp_path}/apt-calls"
echo "Reading package lists..."
echo "debconf: delaying package configuration, since apt-utils is not installed" >&2
echo "{NOISE}"
case "$*" in *"{apt_fails_on or '@never@'}"*) echo "E: Unable to locate package nope" >&2; exit 100;; esac
""",
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def _run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)


def test_nothing_to_install_prints_nothing(tmp_path: Path) -> None:
    result = _run(_fakes(tmp_path, installed=True))
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert not (tmp_path / "apt-calls").exists()


def test_an_install_prints_one_line_and_none_of_apts_output(tmp_path: Path) -> None:
    result = _run(_fakes(tmp_path, installed=False))
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dovecote: installing Debian packages: "), lines
    assert "nftables" in lines[0]  # the network guard's package is part of the set-up
    calls = (tmp_path / "apt-calls").read_text().splitlines()
    assert calls[0] == "-q update" and calls[1].startswith("-q install -y --no-install-recommends ")
    assert "nftables" in calls[1].split()


def test_a_failed_install_shows_apts_whole_output(tmp_path: Path) -> None:
    result = _run(_fakes(tmp_path, installed=False, apt_fails_on="install"))
    assert result.returncode != 0
    assert NOISE in result.stderr and "E: Unable to locate package nope" in result.stderr
    assert "debconf: delaying" in result.stderr  # everything apt said, stderr included
    assert "dovecote: apt-get install" in result.stderr and "failed" in result.stderr
