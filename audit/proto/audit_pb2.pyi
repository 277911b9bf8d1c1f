from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RequestAuth(_message.Message):
    __slots__ = ("site_id", "timestamp_ms", "nonce", "signature")
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    site_id: str
    timestamp_ms: int
    nonce: bytes
    signature: bytes
    def __init__(self, site_id: _Optional[str] = ..., timestamp_ms: _Optional[int] = ..., nonce: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class TreeHeadRequest(_message.Message):
    __slots__ = ("auth",)
    AUTH_FIELD_NUMBER: _ClassVar[int]
    auth: RequestAuth
    def __init__(self, auth: _Optional[_Union[RequestAuth, _Mapping]] = ...) -> None: ...

class TreeHeadResponse(_message.Message):
    __slots__ = ("signed_tree_head",)
    SIGNED_TREE_HEAD_FIELD_NUMBER: _ClassVar[int]
    signed_tree_head: bytes
    def __init__(self, signed_tree_head: _Optional[bytes] = ...) -> None: ...

class InclusionProofRequest(_message.Message):
    __slots__ = ("auth", "leaf_index", "tree_size")
    AUTH_FIELD_NUMBER: _ClassVar[int]
    LEAF_INDEX_FIELD_NUMBER: _ClassVar[int]
    TREE_SIZE_FIELD_NUMBER: _ClassVar[int]
    auth: RequestAuth
    leaf_index: int
    tree_size: int
    def __init__(self, auth: _Optional[_Union[RequestAuth, _Mapping]] = ..., leaf_index: _Optional[int] = ..., tree_size: _Optional[int] = ...) -> None: ...

class InclusionProofResponse(_message.Message):
    __slots__ = ("leaf_index", "tree_size", "entry", "audit_path")
    LEAF_INDEX_FIELD_NUMBER: _ClassVar[int]
    TREE_SIZE_FIELD_NUMBER: _ClassVar[int]
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    AUDIT_PATH_FIELD_NUMBER: _ClassVar[int]
    leaf_index: int
    tree_size: int
    entry: bytes
    audit_path: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, leaf_index: _Optional[int] = ..., tree_size: _Optional[int] = ..., entry: _Optional[bytes] = ..., audit_path: _Optional[_Iterable[bytes]] = ...) -> None: ...

class ConsistencyProofRequest(_message.Message):
    __slots__ = ("auth", "old_size", "new_size")
    AUTH_FIELD_NUMBER: _ClassVar[int]
    OLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    NEW_SIZE_FIELD_NUMBER: _ClassVar[int]
    auth: RequestAuth
    old_size: int
    new_size: int
    def __init__(self, auth: _Optional[_Union[RequestAuth, _Mapping]] = ..., old_size: _Optional[int] = ..., new_size: _Optional[int] = ...) -> None: ...

class ConsistencyProofResponse(_message.Message):
    __slots__ = ("old_size", "new_size", "proof")
    OLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    NEW_SIZE_FIELD_NUMBER: _ClassVar[int]
    PROOF_FIELD_NUMBER: _ClassVar[int]
    old_size: int
    new_size: int
    proof: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, old_size: _Optional[int] = ..., new_size: _Optional[int] = ..., proof: _Optional[_Iterable[bytes]] = ...) -> None: ...

class EntriesRequest(_message.Message):
    __slots__ = ("auth", "start", "end")
    AUTH_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    auth: RequestAuth
    start: int
    end: int
    def __init__(self, auth: _Optional[_Union[RequestAuth, _Mapping]] = ..., start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class Entry(_message.Message):
    __slots__ = ("index", "data")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    index: int
    data: bytes
    def __init__(self, index: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class EntriesResponse(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[Entry]
    def __init__(self, entries: _Optional[_Iterable[_Union[Entry, _Mapping]]] = ...) -> None: ...

class FindInputRequest(_message.Message):
    __slots__ = ("auth", "run_id", "round")
    AUTH_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    auth: RequestAuth
    run_id: bytes
    round: int
    def __init__(self, auth: _Optional[_Union[RequestAuth, _Mapping]] = ..., run_id: _Optional[bytes] = ..., round: _Optional[int] = ...) -> None: ...

class FindInputResponse(_message.Message):
    __slots__ = ("found", "leaf_index")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    LEAF_INDEX_FIELD_NUMBER: _ClassVar[int]
    found: bool
    leaf_index: int
    def __init__(self, found: _Optional[bool] = ..., leaf_index: _Optional[int] = ...) -> None: ...

class FindModelRequest(_message.Message):
    __slots__ = ("auth", "run_id", "model_digest")
    AUTH_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    auth: RequestAuth
    run_id: bytes
    model_digest: bytes
    def __init__(self, auth: _Optional[_Union[RequestAuth, _Mapping]] = ..., run_id: _Optional[bytes] = ..., model_digest: _Optional[bytes] = ...) -> None: ...

class FindModelResponse(_message.Message):
    __slots__ = ("found", "leaf_index")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    LEAF_INDEX_FIELD_NUMBER: _ClassVar[int]
    found: bool
    leaf_index: int
    def __init__(self, found: _Optional[bool] = ..., leaf_index: _Optional[int] = ...) -> None: ...
