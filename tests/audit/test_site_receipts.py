"""``fl-client run``'s receipt flow (:class:`SiteReceipts`) over a real signed log: verified
rounds are counted, a bad receipt is loud and blocks, an unreachable service is retried."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from fedseal.audit.entries import INPUT_MESSAGE_TYPE
from fedseal.audit.errors import AuditServiceError
from fedseal.audit.receipts import (
    ContributionBlockedError,
    ReceiptChecker,
    SiteReceipts,
)
from fedseal.audit.store import MerkleLogStore
from tests.audit.logbuilder import build_run_log
from tests.audit.test_audit_service import LocalSource, _payload


class FlakySource(LocalSource):
    """The real log, behind a service that is down for the first ``down`` tree-head calls."""

    def __init__(self, store: MerkleLogStore, site: str, down: int) -> None:
        super().__init__(store, site)
        self.down = down

    def latest_tree_head(self) -> bytes:
        if self.down > 0:
            self.down -= 1
            raise AuditServiceError("connection refused", code="UNAVAILABLE")
        return super().latest_tree_head()


def test_rounds_whose_input_is_in_the_log_are_verified_and_recorded(tmp_path: Path) -> None:
    built = build_run_log(tmp_path / "audit.sqlite")
    with MerkleLogStore.open(built.path) as store:
        checker = ReceiptChecker(tmp_path / "state", site="site-b", coordinator_key=built.coordinator.public_key())
        receipts = SiteReceipts(checker, LocalSource(store, "site-b"), INPUT_MESSAGE_TYPE)
        for rnd in (1, 2):
            receipts.before_round()
            receipts.sent_masked_input(built.run_id, rnd, _payload(store, built.input_index[("site-b", rnd)]))
            receipts.after_round(built.run_id, rnd)
        receipts.after_round(built.run_id, 3)  # no input sent in round 3: nothing to check
    assert receipts.verified == 2
    lines = (tmp_path / "state" / "receipts.jsonl").read_text().splitlines()
    assert len(lines) == 2
    receipts.before_round()


def test_a_payload_the_log_does_not_hold_is_logged_as_an_error_and_blocks_the_site(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    built = build_run_log(tmp_path / "audit.sqlite")
    with MerkleLogStore.open(built.path) as store:
        checker = ReceiptChecker(tmp_path / "state", site="site-b", coordinator_key=built.coordinator.public_key())
        receipts = SiteReceipts(checker, LocalSource(store, "site-b"), INPUT_MESSAGE_TYPE)
        other = _payload(store, built.input_index[("site-b", 2)])  # not what round 1 holds
        receipts.sent_masked_input(built.run_id, 1, other)
        with caplog.at_level(logging.ERROR, logger="fedseal.client"):
            receipts.after_round(built.run_id, 1)
    assert receipts.verified == 0
    assert any("stops contributing" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
    assert (tmp_path / "state" / "BLOCKED").exists()
    with pytest.raises(ContributionBlockedError):
        receipts.before_round()


def test_an_unreachable_audit_service_is_retried_before_the_next_round(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    built = build_run_log(tmp_path / "audit.sqlite")
    with MerkleLogStore.open(built.path) as store:
        checker = ReceiptChecker(tmp_path / "state", site="site-b", coordinator_key=built.coordinator.public_key())
        receipts = SiteReceipts(checker, FlakySource(store, "site-b", down=1), INPUT_MESSAGE_TYPE)
        receipts.sent_masked_input(built.run_id, 1, _payload(store, built.input_index[("site-b", 1)]))
        with caplog.at_level(logging.ERROR, logger="fedseal.client"):
            receipts.after_round(built.run_id, 1)
        assert receipts.verified == 0
        assert any("UNAVAILABLE" in r.getMessage() for r in caplog.records)
        receipts.before_round()  # the service is back: the pending receipt is checked now
    assert receipts.verified == 1
    assert not (tmp_path / "state" / "BLOCKED").exists()


def test_an_input_the_log_lacks_blocks_the_site_only_if_the_site_knew_it_was_aggregated(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A rejected or dropped input (or an abandoned round) leaves no accepted entry: an honest
    coordinator's log, not tampering. Once the site signed a survivor set naming itself, the
    same absence is tampering."""
    built = build_run_log(tmp_path / "audit.sqlite")
    with MerkleLogStore.open(built.path) as store:
        payload = _payload(store, built.input_index[("site-b", 1)])
        checker = ReceiptChecker(tmp_path / "a", site="site-b", coordinator_key=built.coordinator.public_key())
        receipts = SiteReceipts(checker, LocalSource(store, "site-b"), INPUT_MESSAGE_TYPE)
        receipts.sent_masked_input(built.run_id, 4, payload)  # the log has no round-4 input of ours
        with caplog.at_level(logging.DEBUG, logger="fedseal.client"):
            receipts.after_round(built.run_id, 4)
        assert receipts.verified == 0
        assert any("not used" in r.getMessage() for r in caplog.records)
        assert not (tmp_path / "a" / "BLOCKED").exists()
        receipts.before_round()  # nothing pending, not blocked

        checker = ReceiptChecker(tmp_path / "b", site="site-b", coordinator_key=built.coordinator.public_key())
        receipts = SiteReceipts(checker, LocalSource(store, "site-b"), INPUT_MESSAGE_TYPE)
        receipts.sent_masked_input(built.run_id, 4, payload)
        receipts.included(built.run_id, 4)
        receipts.after_round(built.run_id, 4)
        assert (tmp_path / "b" / "BLOCKED").exists()
        with pytest.raises(ContributionBlockedError):
            receipts.before_round()
