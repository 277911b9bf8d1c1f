"""Generated protobuf / gRPC code of the audit service (``audit.proto`` beside this file).

Example::

    from fedseal.audit.proto import audit_pb2, audit_pb2_grpc

    stub = audit_pb2_grpc.AuditLogStub(channel)
    head = stub.GetTreeHead(audit_pb2.TreeHeadRequest(auth=...))

Choice: the generated ``audit_pb2.py``, ``audit_pb2.pyi`` and ``audit_pb2_grpc.py`` are
*committed* (ruff excludes them), so installing fedseal needs no protoc and no build step. They
were generated with grpcio-tools 1.81.1 (protoc for protobuf 6.33.5), so the runtime needs
protobuf >= 6.33.5 and grpcio >= 1.81.1. After editing ``audit.proto``, regenerate from the
repository root with::

    d=$(mktemp -d) && mkdir -p $d/fedseal/audit/proto && \\
      cp audit/proto/audit.proto $d/fedseal/audit/proto/ && \\
      (cd $d && python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. \\
        fedseal/audit/proto/audit.proto) && \\
      cp $d/fedseal/audit/proto/audit_pb2*.py* audit/proto/

(the temporary ``fedseal/audit/proto`` prefix makes the generated gRPC module import
``fedseal.audit.proto.audit_pb2`` rather than a top-level ``audit_pb2``).
"""

__all__ = ["audit_pb2", "audit_pb2_grpc"]

from . import audit_pb2, audit_pb2_grpc
