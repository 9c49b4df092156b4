"""Kubernetes Secrets for a suite deployed with ``infra/k8s`` (``dovecote bus-keygen --kubernetes``).

Across machines the bus runs over TCP with CURVE: the broker has a keypair
and admits the public keys it lists, every other process has a client
keypair and knows the broker's public key (:mod:`dovecote.bus.curve`). This
module prints one ``Secret`` holding a fresh broker keypair and one client
keypair shared by the suite's processes, ready for ``kubectl apply -f -``;
the manifests in ``infra/k8s`` map its keys onto the ``DOVECOTE_BUS_CURVE_*``
and ``DOVECOTE_BUS_SERVER_KEY`` variables. Keys never touch the disk here.
"""

from __future__ import annotations

import json

from dovecote.bus import generate_keypair

SECRET_NAME = "dovecote-bus-curve"


def curve_secret(namespace: str = "dovecote") -> dict[str, object]:
    """A ``v1/Secret`` with new CURVE keys for the broker and the suite's processes."""
    broker, client = generate_keypair(), generate_keypair()
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": SECRET_NAME, "namespace": namespace,
                     "labels": {"app.kubernetes.io/part-of": "dovecote"}},
        "type": "Opaque",
        "stringData": {
            "broker-public-key": broker.public,
            "broker-secret-key": broker.secret,
            "client-public-key": client.public,
            "client-secret-key": client.secret,
        },
    }


def render(namespace: str = "dovecote") -> str:
    """:func:`curve_secret` as a manifest (JSON is valid YAML for ``kubectl``)."""
    return json.dumps(curve_secret(namespace), indent=2)
