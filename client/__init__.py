"""fedseal.client: the partner site (fl-client): data, attestation, local training.

Usage::

    $ fl-client keys init --out site.key          # ECDSA P-256, mode 0600 (send site.key.pub)
    $ fl-client data split mnist-5k demo-data --sites 3
    $ fl-client run --config client.toml          # re-attest, SuperNode, pinned ClientApp

    from fedseal.client.config import load_client_config

Modules: ``config`` (client.toml), ``models`` and ``training`` (torch), ``site_data`` (the attested
shards streamed into training and evaluation, train/validation split by a keyed row hash),
``supernode`` (Flower's SuperNode with a short poll), ``flower_patches`` (every patch of
Flower internals the site applies), ``receipts`` (audit receipts), ``flower_app`` (the ClientApp: plain and secure stages), ``executor`` (runs
only the installed ClientApp, never a FAB's code), ``node`` (``fl-client run``), ``data``.

This package's ``__init__`` stays light: importing it must not import torch or flwr.
"""

__all__: list[str] = []
