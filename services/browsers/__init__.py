"""Dovecote services/browsers: browser sessions driven over CDP (the browser sessions reference).

Table of contents:

- :mod:`.service`: the process (``dovecote browsers``), its config, the sessions and the bus handlers;
- :mod:`.browser`: one live session: the DevTools connection, the relay, the monitor, captures;
- :mod:`.relay`: the I/O-free CDP relay core (many clients over one connection; observed actions);
- :mod:`.status`: the status machine as a table;
- :mod:`.host`: the host provider (Chromium in a bubblewrap sandbox, ``--remote-debugging-pipe``);
- :mod:`.store`: the SQL of sessions, actions, captures and artifacts.
"""
