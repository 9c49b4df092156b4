"""Entry point: ``python3 -m dovecote.vmmgr.guest.agent`` or ``python3 <dir>/dovecote/vmmgr/guest/agent``.

Run by path (the guest's init, the xvfb desktop), Python puts this package's
own directory first on ``sys.path`` and runs this file outside any package; the
directory that holds ``dovecote/`` (four levels up) takes that place instead,
so the package imports itself by its full name.
"""

import os
import sys

if not __package__:
    sys.path[0] = os.path.abspath(os.path.join(os.path.dirname(__file__), *[os.pardir] * 4))

from dovecote.vmmgr.guest.agent.serve import main

main()
