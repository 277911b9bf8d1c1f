"""fedseal.audit: the signed, append-only Merkle audit log, one layer above the protocol.

It sits between :mod:`fedseal.protocol` (which it imports: message kinds, the masked-input codec,
rosters) and the adapters (the coordinator writes the log, a site checks receipts against it,
``fl-audit`` verifies it offline). It imports neither flwr nor torch.

Modules: ``store`` (the SQLite Merkle store, RFC 9162 proofs), ``log`` (entry codec, signed tree
heads, the run rules and the verifier, the coordinator's writer), ``service`` (the read-only
gRPC audit service and its ``proto``), ``receipts`` (a site's receipt and tree-head checks),
``witness`` (tree heads sites export for the auditor), ``cli`` (``fl-audit``).
"""

__all__: list[str] = []
