"""Outbound mail: SMTP when ``SMTP_URL`` is set, else the database outbox.

``SMTP_URL`` is ``smtp://[user:password@]host[:port]`` (STARTTLS when the
server offers it) or ``smtps://...`` (implicit TLS). Without it, each mail is
stored in the ``outbox`` table so a local user can read it with
``dovecote outbox``; the log says a mail is waiting but never prints its body,
which holds one-time tokens.
"""

from __future__ import annotations

import smtplib
import ssl
import urllib.parse
from email.message import EmailMessage

import trio

from dovecote.libs.db import Database
from dovecote.libs.logs import get_logger

log = get_logger("dovecote.auth.mail")


class Mailer:
    """Sends mail through SMTP or into the outbox."""

    def __init__(self, db: Database, smtp_url: str | None, sender: str) -> None:
        self.db = db
        self.smtp_url = smtp_url
        self.sender = sender
        self._limiter = trio.CapacityLimiter(4)

    async def send(self, to: str, subject: str, body: str) -> None:
        """Deliver one plain-text mail (never raises for a delivery failure)."""
        if not self.smtp_url:
            mail_id = await self.db.fetchval(
                "INSERT INTO outbox (to_addr, subject, body) VALUES (%s, %s, %s) RETURNING id",
                (to, subject, body))
            log.info("mail queued in the outbox (read it with `dovecote outbox`)",
                     extra={"mail_id": mail_id, "subject": subject})
            return
        message = EmailMessage()
        message["From"] = self.sender
        message["To"] = to
        message["Subject"] = subject
        message.set_content(body)
        try:
            await trio.to_thread.run_sync(_smtp_send, self.smtp_url, message,
                                          limiter=self._limiter)
            log.info("mail sent", extra={"subject": subject})
        except (OSError, smtplib.SMTPException) as exc:
            log.error("mail delivery failed", extra={"subject": subject, "error": str(exc)})


def _smtp_send(url: str, message: EmailMessage) -> None:
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "localhost"
    if parts.scheme == "smtps":
        client: smtplib.SMTP = smtplib.SMTP_SSL(host, parts.port or 465, timeout=15,
                                                context=ssl.create_default_context())
    else:
        client = smtplib.SMTP(host, parts.port or 25, timeout=15)
    with client:
        if parts.scheme == "smtp" and client.has_extn("starttls"):
            client.starttls(context=ssl.create_default_context())
        if parts.username:
            client.login(urllib.parse.unquote(parts.username),
                         urllib.parse.unquote(parts.password or ""))
        client.send_message(message)
