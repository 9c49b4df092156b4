"""A new user's first minutes, without VMs: a key in one step, JSON bodies as curl sends them, clear errors.

One ``dovecote up`` (no VM driver) for the module. The VM half (the README's
commands end to end, ``dovecote capsule ...`` on a real capsule) is in
``tests/capsules/test_capsule_cli_vm.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers.suite import Suite

pytestmark = pytest.mark.slow


class World:
    def __init__(self, suite: Suite, home: Path) -> None:
        self.suite, self.home = suite, home

    def cli(self, *args: str, env: dict[str, str] | None = None, timeout: float = 60,
            ) -> subprocess.CompletedProcess[str]:
        """``dovecote ARGS`` as the new user: their own HOME, the suite's data dir and gateway."""
        # suite.env has no DOVECOTE_* of the caller's (no API key, no config path).
        full = {k: v for k, v in self.suite.env.items() if k != "XDG_CONFIG_HOME"}
        full.update({"DOVECOTE_DATA_DIR": str(self.suite.data_dir), "HOME": str(self.home),
                     "DOVECOTE_URL": self.suite.url, **(env or {})})
        return subprocess.run([sys.executable, "-m", "dovecote.services.cli", *args], env=full,
                              capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    suite = Suite()
    try:
        suite.wait_ready()
        yield World(suite, Path(tempfile.mkdtemp(prefix="dovecote-home-")))
    finally:
        suite.stop()


def test_up_says_capsules_are_disabled_instead_of_leaving_the_user_to_a_503(world: World) -> None:
    # DOVECOTE_VM_DRIVER=none: the line after "Dovecote is up" says so.
    end = time.monotonic() + 30
    while time.monotonic() < end and not any("Capsules are" in line for line in world.suite.output):
        time.sleep(0.2)
    said = [line for line in world.suite.output if line.startswith("Capsules are")]
    assert said and said[0].startswith("Capsules are disabled on this machine"), world.suite.output[-20:]


def test_key_create_gives_a_new_user_a_key_that_works_at_once_and_saves_it(world: World) -> None:
    result = world.cli("key", "create", "--email", "newcomer@example.com")
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip()
    assert key.startswith("wrn_") and "\n" not in key
    assert "created the account newcomer@example.com" in result.stderr
    # Saved for the CLI, readable by the user only.
    config = world.home / ".config" / "dovecote" / "config.toml"
    assert config.stat().st_mode & 0o777 == 0o600
    assert f'api_key = "{key}"' in config.read_text()
    assert f'url = "{world.suite.url}"' in config.read_text()
    # The key works on the public API at once.
    listed = httpx.get(world.suite.url + "/v1/capsules", headers={"X-API-Key": key}, timeout=10)
    assert listed.status_code == 200 and listed.json() == []
    # And through the CLI, from the config file alone.
    listing = world.cli("capsule", "list", env={"DOVECOTE_URL": ""})
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.split() == ["ID", "STATUS", "TEMPLATE", "VCPUS", "MEMORY_MB", "CREATED"]
    # A second key for the same account: the same team, a different key; both work.
    again = world.cli("key", "create", "--email", "Newcomer@Example.com", "--no-save")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() != key and "account newcomer@example.com" in again.stderr
    assert f'api_key = "{key}"' in config.read_text()  # --no-save kept the file as it was
    for k in (key, again.stdout.strip()):
        assert httpx.get(world.suite.url + "/v1/capsules", headers={"X-API-Key": k},
                         timeout=10).status_code == 200


def test_key_create_refuses_a_bad_address_and_says_when_the_suite_is_not_there(world: World) -> None:
    bad = world.cli("key", "create", "--email", "not-an-address")
    assert bad.returncode == 1 and "valid email" in bad.stderr and "(invalid_email)" in bad.stderr
    assert bad.stdout == ""
    elsewhere = world.cli("key", "create", "--email", "a@example.com",
                          "--data-dir", tempfile.mkdtemp(prefix="dovecote-none-"), timeout=120)
    assert elsewhere.returncode == 1 and "is `dovecote up` running?" in elsewhere.stderr


def test_capsule_commands_report_the_api_errors_clearly(world: World) -> None:
    key = world.cli("key", "create", "--email", "errors@example.com", "--no-save").stdout.strip()
    env = {"DOVECOTE_API_KEY": key}
    created = world.cli("capsule", "create", env=env)
    assert created.returncode == 1
    assert created.stderr.startswith("dovecote capsule create: ")
    assert "(vm_driver_disabled)" in created.stderr and "Traceback" not in created.stderr
    missing = world.cli("capsule", "exec", "cap-0000000000000000", "--", "true", env=env)
    assert missing.returncode == 1 and "(not_found)" in missing.stderr, missing.stderr
    shell = world.cli("capsule", "shell", "cap-0000000000000000", env=env)
    assert shell.returncode == 1 and "(not_found)" in shell.stderr, shell.stderr
    copy = world.cli("capsule", "cp", "cap-0000000000000000:/etc/hostname", "-", env=env)
    assert copy.returncode == 1 and "(not_found)" in copy.stderr, copy.stderr
    wrong = world.cli("capsule", "list", env={"DOVECOTE_API_KEY": "wrn_" + "0" * 48})
    assert wrong.returncode == 1 and "(unauthorized)" in wrong.stderr, wrong.stderr
    nokey = world.cli("capsule", "list", env={"HOME": tempfile.mkdtemp(prefix="dovecote-home-")})
    assert nokey.returncode == 1 and "dovecote key create" in nokey.stderr
    down = world.cli("capsule", "list", env={**env, "DOVECOTE_URL": "http://127.0.0.1:9"})
    assert down.returncode == 1 and "is `dovecote up` running?" in down.stderr


def test_json_bodies_are_accepted_as_curl_sends_them_and_forms_get_a_clear_415(world: World) -> None:
    key = world.cli("key", "create", "--email", "curl@example.com", "--no-save").stdout.strip()
    url, auth = world.suite.url, {"X-API-Key": key}
    body = json.dumps({"cmd": "true"}).encode()
    exec_path = "/v1/capsules/cap-0000000000000000/exec"

    def post(content_type: str | None, data: bytes, **headers: str) -> httpx.Response:
        sent = {**auth, **headers}
        if content_type is not None:
            sent["Content-Type"] = content_type
        return httpx.post(url + exec_path, content=data, headers=sent, timeout=10)

    # The body is read as JSON, whatever curl -d labels it: the unknown capsule is the answer.
    for content_type in ("application/x-www-form-urlencoded", None, "application/json"):
        response = post(content_type, body)
        assert response.status_code == 404, (content_type, response.text)
        assert response.json()["error"]["code"] == "not_found"
    # Real curl, as the README says it.
    curl = subprocess.run(["curl", "-s", "-X", "POST", url + exec_path, "-H", f"X-API-Key: {key}",
                           "-d", '{"cmd":"echo hello"}'], capture_output=True, text=True, timeout=30)
    assert json.loads(curl.stdout)["error"]["code"] == "not_found", curl.stdout
    # A form that is not JSON, or another type: 415 naming the fix; broken JSON: 400.
    form = post("application/x-www-form-urlencoded", b"cmd=true")
    assert form.status_code == 415 and "application/json" in form.json()["error"]["message"]
    assert post("text/plain", body).status_code == 415
    assert post("application/json", b"{nope").json()["error"]["code"] == "invalid_json"
    assert post(None, b"{nope").json()["error"]["code"] == "invalid_json"
    # A page of another site cannot slip JSON past CORS by calling it a form.
    cross = post("application/x-www-form-urlencoded", body, **{"Sec-Fetch-Site": "cross-site"})
    assert cross.status_code == 415
    # Validation still names the field.
    bad = post("application/x-www-form-urlencoded", b'{"cmd": 5}')
    assert bad.status_code == 400 and "cmd" in bad.json()["error"]["message"]


def test_the_dovecote_script_hands_over_to_the_venv_command() -> None:
    # The README's commands say ./dovecote; the VM test runs them with the venv's
    # `dovecote`, which is what the script executes after its install steps.
    script = (Path(__file__).resolve().parents[2] / "dovecote").read_text()
    assert script.rstrip().splitlines()[-1] == 'exec "$venv/bin/dovecote" "$@"'
    assert os.access(Path(__file__).resolve().parents[2] / "dovecote", os.X_OK)
