"""A service's life through its public surfaces: the bus, HTTP, signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import trio

from dovecote.bus import Broker, BusEndpoints, Ping, Pong, open_bus
from dovecote.gateway.service import SPEC as GATEWAY
from dovecote.gateway.state import GatewayConfig
from dovecote.libs.config import load_config
from dovecote.libs.runtime import serve_service
from dovecote.notifier.service import SPEC as NOTIFIER


def _service_env(endpoints: BusEndpoints, postgres_url: str, data_dir: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOVECOTE_")}
    env.update(endpoints.to_env())
    env.update({"DATABASE_URL": postgres_url, "DOVECOTE_DATA_DIR": data_dir,
                "DOVECOTE_SHUTDOWN_GRACE_S": "5"})
    return env


async def test_a_service_answers_ping_and_counts_its_starts(
        endpoints: BusEndpoints, broker: Broker, postgres_url: str, tmp_path: object) -> None:
    env = _service_env(endpoints, postgres_url, str(tmp_path))
    config = load_config(NOTIFIER.config_cls, env)
    with trio.fail_after(30):
        async with open_bus(endpoints, "probe") as bus, trio.open_nursery() as nursery:
            ctx = await nursery.start(lambda task_status: serve_service(
                NOTIFIER, config, environ=env, task_status=task_status))
            first = await bus.request("notifier", Ping(), timeout=5)
            assert isinstance(first, Pong)
            assert first.service == "notifier" and first.status == "ok"
            assert first.details["pid"] == str(os.getpid())
            ctx.stop()
        async with open_bus(endpoints, "probe") as bus, trio.open_nursery() as nursery:
            ctx = await nursery.start(lambda task_status: serve_service(
                NOTIFIER, config, environ=env, task_status=task_status))
            second = await bus.request("notifier", Ping(), timeout=5)
            assert int(second.details["starts"]) == int(first.details["starts"]) + 1
            ctx.stop()


async def test_healthz_is_503_and_names_the_services_that_do_not_answer(
        endpoints: BusEndpoints, broker: Broker, tmp_path: object) -> None:
    env = {**endpoints.to_env(), "DOVECOTE_HTTP_PORT": "0", "DOVECOTE_DATA_DIR": str(tmp_path),
           "DOVECOTE_HEALTH_TIMEOUT_S": "0.5", "DOVECOTE_HEALTH_SERVICES": "gateway,auth"}
    config = load_config(GatewayConfig, env)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            ctx = await nursery.start(lambda task_status: serve_service(
                GATEWAY, config, environ=env, task_status=task_status))
            url = "http://" + ctx.health_details["listen"].split("//", 1)[1] + "/healthz"
            status, body = await trio.to_thread.run_sync(_get, url)
            assert status == 503
            assert body["failing"] == ["auth"]
            assert body["services"]["gateway"]["status"] == "ok"
            assert body["services"]["auth"]["status"] == "down"
            ctx.stop()


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def test_sigterm_stops_a_service_process_cleanly(
        endpoints: BusEndpoints, broker: Broker, postgres_url: str, tmp_path: object) -> None:
    env = _service_env(endpoints, postgres_url, str(tmp_path))
    log_path = trio.Path(str(tmp_path)) / "notifier.log"
    with open(str(log_path), "wb") as log_file:  # noqa: ASYNC230 - opening a local file
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "dovecote.services.cli", "notifier"], env=env, stderr=log_file)
    try:
        with trio.fail_after(30):
            async with open_bus(endpoints, "probe") as bus:
                while True:
                    try:
                        pong = await bus.request("notifier", Ping(), timeout=1)
                        break
                    except Exception:
                        await trio.sleep(0.1)
            assert pong.details["pid"] == str(proc.pid)
            proc.send_signal(signal.SIGTERM)
            code = await proc.wait()
        assert code == 0
        assert '"msg":"service stopped"' in await log_path.read_text()
    finally:
        if proc.returncode is None:
            proc.kill()


def test_a_bad_setting_refuses_to_start_and_names_the_variable() -> None:
    env = {**os.environ, "DOVECOTE_HTTP_PORT": "eighty"}
    result = subprocess.run([sys.executable, "-m", "dovecote.services.cli", "gateway"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "DOVECOTE_HTTP_PORT" in result.stderr


@pytest.mark.parametrize("path", ["/openapi.json"])
def test_openapi_document_describes_healthz(path: str) -> None:
    from dovecote.gateway.app import create_app

    app = create_app(load_config(GatewayConfig, {}), bus=None)
    doc = app.extensions["dovecote"].api.document()
    assert doc["openapi"] == "3.1.0"
    assert set(doc["paths"]) >= {"/healthz", path}
    health = doc["paths"]["/healthz"]["get"]
    assert set(health["responses"]) >= {"200", "503"}
    assert "Health" in doc["components"]["schemas"]
