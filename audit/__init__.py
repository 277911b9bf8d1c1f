"""fedseal.audit: the signed, append-only Merkle audit log, one layer above the protocol.

It sits between :mod:`fedseal.protocol` (which it imports: message kinds, the masked-input codec,
rosters) and the adapters (the coordinator writes the log, a site checks receipts against it,
``fl-audit`` verifies it offline). It imports neither flwr nor torch.

Modules:

* ``errors``: the audit errors (content: ``AuditError`` family; store: ``AuditLogError`` family);
* ``store``: the SQLite Merkle store (RFC 9162 proofs, the ``nodes`` cache);
* ``entries``: the entry kinds and their fields, rules and canonical bodies;
* ``codec``: an entry's canonical bytes (encode, strict decode, the fast envelope decoder);
* ``treehead``: signed tree heads and the bytes a site signs to call the audit service;
* ``signatures``: the per-envelope checks (site signature, payload agreement), in batches;
* ``rules``: the run rules, shared by the verifier and the writer;
* ``verifier``: the offline verifier of a whole log (``AuditVerifier``, ``verify_audit_log``);
* ``writer``: the coordinator's writer (``AuditLog``) and look-ups (``find_input``,
  ``roster_from_log``);
* ``service``: the read-only gRPC audit service, and ``proto`` its generated code;
* ``receipts``: a site's receipt and tree-head checks;
* ``service_client``: a site's signed gRPC client of the audit service (``GrpcAuditSource``);
* ``witness``: the tree heads sites export for the auditor;
* ``auditor``: ``fl-audit``'s library side (trust anchor, proofs, ``Verdict`` values, verdict words);
* ``verify_run``: the verdict on a whole log, for ``fl-audit verify`` and ``report``;
* ``report``: what ``fl-audit show/report/export`` present (view, HTML report, JSON lines);
* ``cli``: ``fl-audit`` (commands, argument checks, exit codes).
"""

__all__: list[str] = []
