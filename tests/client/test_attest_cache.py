"""The attestation cache: used when nothing changed, never after a write, bypassed by full=True."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from fedseal.client.data import DatasetChangedError, attest
from fedseal.client.data import attestation as attest_module
from fedseal.client.data.cache import AttestCache
from fedseal.client.data.spec import discover_shards
from tests.client._data_support import SALT, flip_byte_in_pages, make_dataset


@pytest.fixture
def trust_recent_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """Files in tests are seconds old: let the cache store them (the racy rule is tested apart)."""
    monkeypatch.setattr("fedseal.client.data.cache.RACY_WINDOW_NS", -(10**12))


def _forbid_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("shard content was read")

    monkeypatch.setattr(attest_module, "hash_range", refuse)
    monkeypatch.setattr("fedseal.client.data.shards.read_footer", refuse)


def test_an_unchanged_dataset_reattests_from_the_cache_without_reading_shards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trust_recent_files: None
) -> None:
    m = make_dataset(tmp_path / "d", [200, 300, 100], chunk_size=500)
    first = attest(tmp_path / "d")
    assert first.root == m.root
    assert not any(f.cached for f in first.files)
    _forbid_reading(monkeypatch)
    again = attest(tmp_path / "d", workers=2)
    assert again.root == m.root
    assert again.rows == m.rows
    assert all(f.cached for f in again.files)


def test_a_write_is_detected_even_when_size_and_mtime_are_restored(
    tmp_path: Path, trust_recent_files: None
) -> None:
    m = make_dataset(tmp_path / "d", [200, 300], chunk_size=500)
    attest(tmp_path / "d")
    shard = tmp_path / "d" / "shard-00001.parquet"
    before = os.stat(shard)
    flip_byte_in_pages(shard, 0.5)
    after = os.stat(shard)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    again = attest(tmp_path / "d")
    assert again.root != m.root
    assert [f.cached for f in again.files] == [True, False]


def test_full_ignores_the_cache(tmp_path: Path, trust_recent_files: None) -> None:
    m = make_dataset(tmp_path / "d", [200], chunk_size=500)
    attest(tmp_path / "d")
    cache_file = tmp_path / "d" / ".fedseal-cache" / "attest-v1.sqlite"
    with sqlite3.connect(cache_file) as conn:
        (blob,) = conn.execute("SELECT leaves FROM shards").fetchone()
        conn.execute("UPDATE shards SET leaves = ?", (bytes(len(blob)),))
    conn.close()
    assert attest(tmp_path / "d").root != m.root  # the (doctored) cache is trusted ...
    assert attest(tmp_path / "d", full=True).root == m.root  # ... unless --full
    assert attest(tmp_path / "d").root == m.root  # and --full refreshed it


def test_files_modified_within_the_racy_window_are_not_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An hour-wide window (instead of 2 s) so that a stalled test machine cannot age the file out.
    monkeypatch.setattr("fedseal.client.data.cache.RACY_WINDOW_NS", 3600 * 10**9)
    make_dataset(tmp_path / "d", [200], chunk_size=500)
    attest(tmp_path / "d")  # the shard was written a moment ago
    shards = discover_shards(tmp_path / "d")
    assert AttestCache(tmp_path / "d").load(SALT, 500, shards) == {}


def test_a_changed_salt_or_chunk_size_misses_the_cache(tmp_path: Path, trust_recent_files: None) -> None:
    make_dataset(tmp_path / "d", [200], chunk_size=500)
    attest(tmp_path / "d")
    shards = discover_shards(tmp_path / "d")
    cache = AttestCache(tmp_path / "d")
    assert set(cache.load(SALT, 500, shards)) == {"shard-00000.parquet"}
    assert cache.load(bytes(32), 500, shards) == {}
    assert cache.load(SALT, 501, shards) == {}


def test_a_configured_cache_dir_is_used_and_the_dataset_dir_left_alone(tmp_path: Path, trust_recent_files: None) -> None:
    make_dataset(tmp_path / "d", [100], chunk_size=500)
    attest(tmp_path / "d", cache_dir=tmp_path / "cache")
    assert (tmp_path / "cache" / "attest-v1.sqlite").is_file()
    assert not (tmp_path / "d" / ".fedseal-cache").exists()


def test_an_unwritable_cache_is_reported_and_attestation_still_succeeds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, trust_recent_files: None
) -> None:
    m = make_dataset(tmp_path / "d", [100], chunk_size=500)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    with caplog.at_level(logging.WARNING):
        assert attest(tmp_path / "d", cache_dir=blocker).root == m.root
    assert "not writable" in caplog.text


def test_a_shard_modified_while_hashing_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_dataset(tmp_path / "d", [300], chunk_size=500)
    real = attest_module.hash_range

    def hash_then_append(shard: Any, *args: Any) -> None:
        real(shard, *args)
        with open(shard.abspath, "ab") as handle:
            handle.write(b"x")

    monkeypatch.setattr(attest_module, "hash_range", hash_then_append)
    with pytest.raises(DatasetChangedError) as info:
        attest(tmp_path / "d", use_cache=False, workers=1)
    assert info.value.path == "shard-00000.parquet"


def test_progress_is_told_the_bytes_to_hash_and_receives_all_of_them(tmp_path: Path) -> None:
    make_dataset(tmp_path / "d", [300, 200], chunk_size=500)

    class Sink:
        def __init__(self) -> None:
            self.total = -1
            self.done = 0
            self.lock = threading.Lock()

        def start(self, total_bytes: int) -> None:
            self.total = total_bytes

        def advance(self, nbytes: int) -> None:  # called from hashing threads
            with self.lock:
                self.done += nbytes

    sink = Sink()
    att = attest(tmp_path / "d", use_cache=False, workers=2, progress=sink)
    assert sink.total == sink.done == att.bytes
