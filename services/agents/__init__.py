"""The agents service: the agent runtime (``/api/agent/*`` and ``/v1/agent/*``)."""
