"""Dovecote's QEMU wrapper: guest RAM in a file, for VM templating.

libvirt builds QEMU's command line and offers no way to put a domain's RAM in a
file of our choosing, or to start QEMU waiting for an incoming migration
without libvirt driving it. So the domain's ``<emulator>`` is this small shell
script, which libvirt runs instead of ``qemu-system-x86_64`` (also for its
capability probes: without Dovecote's variables it just ``exec``\\ s QEMU).

Driven by ``<qemu:env>`` variables of the domain (see
:func:`dovecote.vmmgr.domain_xml.emulator_env`):

``DOVECOTE_MEM_PATH`` / ``DOVECOTE_MEM_SHARE``
    libvirt's ``memory-backend-ram`` object for the guest RAM (``pc.ram``)
    becomes a ``memory-backend-file`` over that file. ``share=true`` writes
    the RAM through to the file (a template being made); ``share=false`` maps it
    copy-on-write (a capsule created from a template: pages are read from
    the template's file on first touch, the template is never modified).
``DOVECOTE_INCOMING=defer``
    QEMU starts waiting for an incoming migration (``-incoming defer``), which
    the driver then feeds the template's device state through QMP
    ``migrate-incoming`` with the ``x-ignore-shared`` capability: only device
    state travels, the RAM is the file's.

The script lives in the image directory (``bin/dovecote-qemu``), which the
unprivileged QEMU user can reach, and is rewritten when its text changes.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from dovecote.vmmgr.errors import VmmgrError

QEMU_BINARY = "qemu-system-x86_64"

_SCRIPT = r"""#!/bin/bash
# Dovecote's QEMU wrapper (written by vmmgr; see dovecote/vmmgr/emulator.py).
qemu=@QEMU@
if [ -z "$DOVECOTE_MEM_PATH" ] && [ -z "$DOVECOTE_INCOMING" ]; then exec "$qemu" "$@"; fi
args=()
have_incoming=
for a in "$@"; do
  case "$a" in
    '{"qom-type":"memory-backend-ram","id":"pc.ram",'*)
      if [ -n "$DOVECOTE_MEM_PATH" ]; then
        a="${a/memory-backend-ram/memory-backend-file}"
        a="${a%\}},\"mem-path\":\"$DOVECOTE_MEM_PATH\",\"share\":$DOVECOTE_MEM_SHARE}"
      fi
      ;;
    -incoming) have_incoming=1 ;;
  esac
  args+=("$a")
done
if [ -n "$DOVECOTE_INCOMING" ] && [ -z "$have_incoming" ]; then
  args+=(-incoming "$DOVECOTE_INCOMING")
fi
exec "$qemu" "${args[@]}"
"""


class EmulatorError(VmmgrError):
    """The wrapper cannot be installed (no QEMU binary, unwritable directory)."""


def script_text(qemu: str) -> str:
    """The wrapper for the QEMU binary at ``qemu``."""
    return _SCRIPT.replace("@QEMU@", qemu)


def install_wrapper(directory: Path) -> Path:
    """Write the wrapper into ``directory/bin`` (blocking); returns its path.

    Raises:
        EmulatorError: QEMU is not installed.
    """
    qemu = shutil.which(QEMU_BINARY) or shutil.which(QEMU_BINARY, path="/usr/bin:/usr/local/bin")
    if qemu is None:
        raise EmulatorError(f"{QEMU_BINARY} is not installed")
    path = directory / "bin" / "dovecote-qemu"
    text = script_text(qemu)
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.parent.chmod(0o755)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.chmod(0o755)
        os.replace(tmp, path)
    return path
