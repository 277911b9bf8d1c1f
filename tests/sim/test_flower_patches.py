"""The simulation's patches of Flower's engine internals (fedseal.sim.flower_patches): each fails
here first when the Flower underneath changes (the patched attribute exists with the signature
and behaviour the patch assumes). What the patches do is tested in test_engine_wake.py
(dispatcher and exchange wake-ups) and test_sim_batching.py (the batched worker)."""

from __future__ import annotations

import inspect

import pytest
from flwr.server.superlink.fleet.vce import vce_api

from fedseal.sim import flower_patches


def test_the_installed_flower_is_a_supported_one() -> None:
    version = flower_patches.require_supported_flower()
    assert ".".join(version.split(".")[:2]) in flower_patches.FLOWER_VERSIONS


def test_another_flower_is_refused_with_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    flower_patches.require_supported_flower.cache_clear()
    monkeypatch.setattr(flower_patches.metadata, "version", lambda name: "1.50.0")
    try:
        with pytest.raises(RuntimeError, match=r"flwr 1\.50\.0 is installed.*simulation.*flwr==1\.42"):
            flower_patches.require_supported_flower()
        with pytest.raises(RuntimeError, match=r"flwr 1\.50\.0"):
            with flower_patches.batched_engine(2):
                pass  # every patch passes the gate first
    finally:
        flower_patches.require_supported_flower.cache_clear()


def _params(fn: object) -> list[str]:
    return list(inspect.signature(getattr(fn, "__wrapped__", fn)).parameters)  # type: ignore[arg-type]


def test_patch_1_run_api_starts_the_module_level_worker_with_the_signature_replaced() -> None:
    assert _params(vce_api.worker) == [
        "messageins_queue", "messageres_queue", "node_info_store", "backend", "f_stop", "metrics",
    ]
    run_api = inspect.getsource(vce_api.run_api)
    assert "worker," in run_api and "backend.num_workers" in run_api  # submitted by name
    flower_worker = vce_api.worker
    with flower_patches.batched_engine(3):
        assert vce_api.worker.func is flower_patches.batched_worker  # type: ignore[attr-defined]
        assert vce_api.worker.keywords == {"batch": 3}  # type: ignore[attr-defined]
    assert vce_api.worker is flower_worker  # put back


def test_patch_2_the_dispatcher_and_the_link_state_it_reads_are_as_assumed() -> None:
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    flowers = getattr(vce_api.add_messages_to_queue, "__wrapped__", vce_api.add_messages_to_queue)
    assert _params(flowers) == ["state", "queue", "nodes_mapping", "f_stop"]
    assert "get_message_ins(node_id=node_id, limit=1)" in inspect.getsource(flowers)
    assert "target=add_messages_to_queue" in inspect.getsource(vce_api.run_api)
    assert _params(InMemoryLinkState.store_message_ins) == ["self", "message"]
    assert {"node_id", "limit"} <= set(_params(InMemoryLinkState.get_message_ins))
    assert _params(InMemoryLinkState._check_stored_messages)[:2] == ["self", "message_ids"]
    source = inspect.getsource(InMemoryLinkState)
    assert "self.lock = threading.RLock()" in source
    assert "self.message_ins_store: dict[str, Message]" in source
    assert "delivered_at" in inspect.getsource(InMemoryLinkState.get_message_ins)


def test_patch_3_the_link_state_stores_replies_through_store_message_res() -> None:
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    assert _params(InMemoryLinkState.store_message_res) == ["self", "message"]


def test_patch_4_flowers_worker_writes_reply_ids_as_set_message_id_does() -> None:
    from flwr.app import Metadata, RecordDict
    from flwr.app.message import make_message

    assert 'metadata.__dict__["_message_id"]' in inspect.getsource(vce_api.worker)
    message = make_message(
        metadata=Metadata(
            run_id=1, message_id="", src_node_id=1, dst_node_id=5, reply_to_message_id="",
            group_id="1", created_at=1.0, ttl=3600.0, message_type="train",
        ),
        content=RecordDict(),
    )
    flower_patches.set_message_id(message, "reply-1")
    assert message.metadata.message_id == "reply-1"
