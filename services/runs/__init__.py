"""Dovecote services/runs: agent runs of scenarios and live sessions on desktop sessions.

Table of contents:

- :mod:`.service`: the process (``dovecote runs``), its config and bus handlers (memory, history, health);
- :mod:`.runs`: a run's ladder from ``Draft`` to its final status, stop, retry, the replay zip;
- :mod:`.live`: live sessions (one instruction at a time, confirmations, screen frames);
- :mod:`.agent`: the scripted agent's steps and the planner's desktop tools, the run policy;
- :mod:`.desk`: a desktop session driven over the bus, events and their wake-ups;
- :mod:`.scenarios`: scenario folders, input validation, placeholders;
- :mod:`.store`: the SQL of runs, live sessions, events, screenshots and memory.
"""
