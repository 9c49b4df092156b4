"""Joining a machine to a suite as a host: ``dovecote vmmgr --register TOKEN
--control-plane URL``.

The control plane's admin (or a BYOC team's owner) creates the host with
``POST /v1/hosts`` and hands its one-time registration token to the
machine's operator. :func:`register_host` sends this machine's specs
(:func:`gather_specs`: architecture, CPUs, memory and disk from ``/proc`` and
``os``) to ``<URL>/v1/hosts/register`` and stores the answer in
``<data_dir>/host.json`` (mode 0600): the host id, the host JWT and the
refresh token. Later starts need only ``--control-plane`` (or nothing: the
URL is in the file; the CLI loads it whenever ``host.json`` exists, so a
registered host restarts as itself, never as the control plane's ``local``
host): :func:`fresh_credentials` refreshes the JWT when it is within a day of
expiry, rotating the refresh token. A control plane that does not answer at
start is retried in the background (:class:`Unreachable`); one that refuses
the credentials (:class:`Revoked`: host deleted, chain revoked) stops vmmgr
with the reason.

:func:`join` is what the CLI calls: it registers or loads the credentials,
sets ``DOVECOTE_HOST_ID`` so vmmgr serves as ``vmmgr.<host id>``, and starts
a daemon thread that heartbeats (``POST /v1/hosts/{id}/heartbeat``) every
``DOVECOTE_HOST_HEARTBEAT_S`` seconds (30), refreshing the token as needed.

``address`` (the reference's "host agent address (ip:port)") is
``DOVECOTE_HOST_ADDRESS`` when set, else this machine's outbound IP address
towards the control plane with port 0: vmmgr listens on no port of its own,
it is reached over the bus.

Only the standard library is used, so the command works on a bare host.
"""

from __future__ import annotations

import base64
import json
import os
import platform
import shutil
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

CREDENTIALS_FILE = "host.json"
REFRESH_MARGIN_S = 24 * 3600
HTTP_TIMEOUT_S = 15.0


class RegistrationError(Exception):
    """The control plane refused or could not be reached; the message says which."""


class Unreachable(RegistrationError):
    """The control plane did not answer (a partition, a restart): retried, never fatal
    for a host that already holds its registration."""


class Revoked(RegistrationError):
    """The control plane no longer knows this host's credentials (deleted host, revoked
    chain): the host must stop and be registered again."""


REVOKED_STATUSES = (401, 403, 404)


# -- this machine -------------------------------------------------------------------


def _memory_mb() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
    except (ValueError, OSError):
        return None


def _outbound_ip(control_plane: str) -> str:
    """The local address used to reach the control plane (no packet is sent)."""
    parsed = urllib.parse.urlsplit(control_plane)
    host = parsed.hostname or "127.0.0.1"
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect((host, parsed.port or 80))
            return str(sock.getsockname()[0])
    except OSError:
        return "127.0.0.1"


def gather_specs(data_dir: Path, control_plane: str) -> dict[str, Any]:
    """The body fields of ``RegisterHostRequest`` that describe this machine."""
    address = os.environ.get("DOVECOTE_HOST_ADDRESS", "").strip()
    if not address:
        ip = _outbound_ip(control_plane)
        address = f"[{ip}]:0" if ":" in ip else f"{ip}:0"
    probe = data_dir if data_dir.exists() else Path("/")
    return {
        "arch": platform.machine() or None,
        "cpu_cores": os.cpu_count(),
        "memory_mb": _memory_mb(),
        "disk_gb": shutil.disk_usage(probe).total // (1024 ** 3),
        "address": address,
    }


# -- HTTP --------------------------------------------------------------------------


def _post(url: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else b""
    req = urllib.request.Request(url, data=data, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": "dovecote-host", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw) if raw else None
        except ValueError:
            return exc.code, None
    except (OSError, ValueError) as exc:
        raise Unreachable(f"cannot reach the control plane at {url}: {exc}") from None


def _error_text(status: int, body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return f"{status} {body['error'].get('code')}: {body['error'].get('message')}"
    return f"HTTP {status}"


# -- credentials ----------------------------------------------------------------------


def jwt_expiry(token: str) -> float:
    """The ``exp`` claim of a JWT (not verified: the control plane does that)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(claims["exp"])
    except (IndexError, ValueError, KeyError, TypeError):
        return 0.0


def save_credentials(data_dir: Path, creds: dict[str, Any]) -> None:
    """Write ``host.json`` with mode 0600 (atomically: written aside, then renamed)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / CREDENTIALS_FILE
    aside = data_dir / f".{CREDENTIALS_FILE}.{os.getpid()}"
    fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(creds, f, indent=2)
    os.chmod(aside, 0o600)
    os.replace(aside, path)


def load_credentials(data_dir: Path) -> dict[str, Any] | None:
    """The stored credentials, or None when this machine never registered."""
    try:
        creds = json.loads((data_dir / CREDENTIALS_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise RegistrationError(f"cannot read {data_dir / CREDENTIALS_FILE}: {exc}") from None
    return creds if isinstance(creds, dict) else None


def _store(data_dir: Path, control_plane: str, body: dict[str, Any]) -> dict[str, Any]:
    creds = {"control_plane": control_plane.rstrip("/"), "host_id": body["host"]["id"],
             "token": body["token"], "token_expires_at": jwt_expiry(body["token"]),
             "refresh_token": body["refresh_token"], "updated_at": time.time()}
    save_credentials(data_dir, creds)
    return creds


def register_host(control_plane: str, token: str, data_dir: Path,
                  specs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Register this machine with a one-time token; store and return the credentials."""
    control_plane = control_plane.rstrip("/")
    body = {"token": token, **(specs or gather_specs(data_dir, control_plane))}
    status, answer = _post(control_plane + "/v1/hosts/register",
                           {k: v for k, v in body.items() if v is not None})
    if status != 201 or not isinstance(answer, dict):
        raise RegistrationError(f"registration refused: {_error_text(status, answer)}")
    return _store(data_dir, control_plane, answer)


def refresh_credentials(data_dir: Path, creds: dict[str, Any]) -> dict[str, Any]:
    """Trade the refresh token for a new JWT and refresh token; store them."""
    status, answer = _post(creds["control_plane"] + "/v1/hosts/auth/refresh",
                           {"refresh_token": creds["refresh_token"]})
    if status != 200 or not isinstance(answer, dict):
        kind = Revoked if status in REVOKED_STATUSES else RegistrationError
        raise kind(f"token refresh refused: {_error_text(status, answer)}; "
                   "register the host again with a new token")
    return _store(data_dir, creds["control_plane"], answer)


def fresh_credentials(data_dir: Path, margin_s: float = REFRESH_MARGIN_S) -> dict[str, Any]:
    """The stored credentials, refreshed first if the JWT expires within ``margin_s``."""
    creds = load_credentials(data_dir)
    if creds is None:
        raise RegistrationError("this machine is not registered: use --register TOKEN")
    if float(creds.get("token_expires_at", 0)) - time.time() < margin_s:
        creds = refresh_credentials(data_dir, creds)
    return creds


def send_heartbeat(data_dir: Path) -> None:
    """One heartbeat with the stored JWT (refreshed when near expiry, or once on 401)."""
    creds = fresh_credentials(data_dir)
    for attempt in range(2):
        status, answer = _post(f"{creds['control_plane']}/v1/hosts/{creds['host_id']}/heartbeat",
                               headers={"X-Host-Token": creds["token"]})
        if status == 204:
            return
        if status == 401 and attempt == 0:
            creds = refresh_credentials(data_dir, creds)
            continue
        kind = Revoked if status in REVOKED_STATUSES else RegistrationError
        raise kind(f"heartbeat refused: {_error_text(status, answer)}")


def heartbeat_forever(data_dir: Path, interval_s: float, stop: threading.Event) -> None:
    """Heartbeat until ``stop`` is set; failures are reported and retried.

    A revoked registration (:class:`Revoked`) stops this process with SIGTERM:
    vmmgr then shuts down gracefully instead of serving capsules for a control
    plane that no longer knows the host.
    """
    while not stop.wait(interval_s):
        try:
            send_heartbeat(data_dir)
        except Revoked as exc:
            print(f"dovecote vmmgr: {exc}; stopping", file=sys.stderr)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        except RegistrationError as exc:
            print(f"dovecote vmmgr: {exc}", file=sys.stderr)


def has_registration(data_dir: Path | None = None) -> bool:
    """Whether this machine holds a registration (``host.json`` in its data directory)."""
    data_dir = data_dir or Path(os.environ.get("DOVECOTE_DATA_DIR", ".dovecote"))
    return (data_dir / CREDENTIALS_FILE).exists()


def join(token: str | None, control_plane: str | None, data_dir: Path | None = None) -> int:
    """Register (or load the registration of) this machine before vmmgr starts.

    Returns 0 when ready (``DOVECOTE_HOST_ID`` set, heartbeats running), else
    an exit status after printing why.
    """
    data_dir = data_dir or Path(os.environ.get("DOVECOTE_DATA_DIR", ".dovecote"))
    try:
        if token:
            if not control_plane:
                raise RegistrationError("--register needs --control-plane URL")
            creds = register_host(control_plane, token, data_dir)
            print(f"registered as host {creds['host_id']} with {creds['control_plane']}",
                  file=sys.stderr)
        else:
            existing = load_credentials(data_dir)
            if existing and control_plane and existing["control_plane"] != control_plane.rstrip("/"):
                raise RegistrationError("this machine is registered with "
                                        f"{existing['control_plane']}; use --register TOKEN")
            creds = fresh_credentials(data_dir)
        try:
            send_heartbeat(data_dir)
        except Unreachable as exc:
            if token:  # a new registration answered a moment ago: something is wrong
                raise
            # A registered host restarts as itself even while the control plane is
            # away: its capsules keep being served, heartbeats resume when it answers.
            print(f"dovecote vmmgr: {exc}; serving as host {creds['host_id']} and retrying",
                  file=sys.stderr)
    except RegistrationError as exc:
        print(f"dovecote vmmgr: {exc}", file=sys.stderr)
        return 1
    os.environ["DOVECOTE_HOST_ID"] = creds["host_id"]
    interval = float(os.environ.get("DOVECOTE_HOST_HEARTBEAT_S", "30") or 30)
    threading.Thread(target=heartbeat_forever, args=(data_dir, interval, threading.Event()),
                     name="host-heartbeat", daemon=True).start()
    return 0
