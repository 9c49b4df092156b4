"""Mail goes out over SMTP when ``SMTP_URL`` is set: a real local SMTP server
(aiosmtpd) receives the activation mail, whose token activates the account,
and nothing is left in the database outbox."""

from __future__ import annotations

import email
import email.policy
import json
import re
import threading
import time
from collections.abc import Iterator
from email.message import EmailMessage
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from tests.accounts.helpers import Browser, unique_email
from tests.helpers.suite import Suite, free_port


class Inbox:
    """Collects every mail the SMTP server accepts."""

    def __init__(self) -> None:
        self.mails: list[tuple[list[str], EmailMessage]] = []
        self._lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        with self._lock:
            self.mails.append((list(envelope.rcpt_tos), message))
        return "250 Message accepted for delivery"

    def wait_for(self, to: str, timeout: float = 60) -> EmailMessage:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                for rcpts, message in self.mails:
                    if to in rcpts:
                        return message
            time.sleep(0.1)
        raise AssertionError(f"no mail for {to}; got {[r for r, _ in self.mails]}")


@pytest.fixture(scope="module")
def smtp() -> Iterator[tuple[Inbox, int]]:
    inbox = Inbox()
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield inbox, port
    finally:
        controller.stop()


@pytest.fixture(scope="module")
def smtp_suite(smtp: tuple[Inbox, int]) -> Iterator[Suite]:
    suite = Suite(extra_env={"SMTP_URL": f"smtp://127.0.0.1:{smtp[1]}",
                             "DOVECOTE_MAIL_FROM": "Dovecote Test <robot@dovecote.test>"})
    try:
        suite.wait_ready()
        yield suite
    finally:
        suite.stop()


def test_activation_mail_is_delivered_over_smtp(smtp: tuple[Inbox, int], smtp_suite: Suite) -> None:
    inbox, _ = smtp
    browser = Browser(smtp_suite)
    address = unique_email("smtp")
    signup = browser.post("/v1/auth/signup", {"email": address, "password": "s3cret-password",
                                               "name": "Mailed"})
    assert signup.status_code == 201, signup.text

    mail = inbox.wait_for(address)
    assert mail["To"] == address
    assert mail["From"] == "Dovecote Test <robot@dovecote.test>"
    assert mail["Subject"] == "Activate your Dovecote account"
    body = mail.get_content()
    assert "Hello Mailed" in body
    match = re.search(r"Activation token: (\S+)", body)
    assert match, body
    token = match.group(1)
    assert f"/activate?token={token}" in body

    activated = browser.post("/v1/auth/activate", {"token": token})
    assert activated.status_code == 200, activated.text
    assert activated.json()["email"] == address
    assert browser.get("/v1/me").json()["email"] == address

    # Delivered, so nothing waits in the database outbox.
    result = smtp_suite.cli("outbox", "--json", "--limit", "200")
    assert result.returncode == 0, result.stderr
    queued = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert queued == []
