"""Dovecote services/desktops: desktop sessions an agent can drive.

Table of contents:

- :mod:`.service`: the process (``dovecote desktops``), its config and bus handlers;
- :mod:`.sessions`: live sessions, their providers, actions in order, teardown, idle timeout;
- :mod:`.actions`: I/O-free action checks, the commands each kind runs, receipts;
- :mod:`.readiness`: the readiness ladder as a decision table (:func:`~.readiness.plan`);
- :mod:`.xvfb`: the xvfb provider (Xvfb + openbox in a bubblewrap sandbox);
- :mod:`.qemu`: the qemu provider (a capsule of the desktop template, through vmmgr);
- :mod:`.store`: the SQL of sessions, tasks, action history and audit;
- :mod:`.errors`: the service's refusals.
"""
