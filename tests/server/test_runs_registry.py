"""The coordinator's run registry (``fl-server submit / runs / logs / stop``): ids, the queue,
stop requests, runs left behind by a dead coordinator."""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedseal.server import rundir
from fedseal.server.runs import Runs, RunsError


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_runs_get_ids_in_submission_order_and_concurrent_submits_never_share_one(tmp_path: Path) -> None:
    runs = Runs(tmp_path)
    first = runs.submit(tmp_path / "a.toml", rounds_planned=3)
    got: list[int] = []
    lock = threading.Lock()

    def submit() -> None:
        rec = runs.submit(tmp_path / "b.toml", rounds_planned=1)
        with lock:
            got.append(rec.id)

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert first.id == 1
    assert sorted(got) == list(range(2, 10))
    assert [r.id for r in runs.all()] == list(range(1, 10))
    assert all(r.status == "queued" for r in runs.all())


def test_the_oldest_queued_run_goes_first_and_one_asked_to_stop_is_cancelled_on_the_way(tmp_path: Path) -> None:
    runs = Runs(tmp_path)
    with runs.driving(tmp_path / "server.toml"):
        one, two, three = (runs.submit(tmp_path / "x.toml", rounds_planned=1) for _ in range(3))
        asked = runs.request_stop(one.id, "wrong  contract\nversion")
        assert asked.status == "queued"  # a driver is up: it acts on the request
        nxt = runs.next_queued()
        assert nxt is not None and nxt.id == two.id
        cancelled = runs.get(one.id)
        assert cancelled.status == "cancelled" and cancelled.stop_reason == "wrong contract version"
        assert three.status == "queued"


def test_a_queued_run_with_no_coordinator_up_is_cancelled_at_once(tmp_path: Path) -> None:
    runs = Runs(tmp_path)
    rec = runs.submit(tmp_path / "x.toml", rounds_planned=2)
    assert runs.request_stop(rec.id, "").status == "cancelled"
    assert runs.get(rec.id).reason == "no reason given"
    with pytest.raises(RunsError, match="run 1 has already ended \\(cancelled\\)"):
        runs.request_stop(rec.id, "again")


def test_a_stop_is_relayed_to_the_serverapp_and_the_ended_run_reads_stopped_with_its_files_kept(
    tmp_path: Path,
) -> None:
    runs = Runs(tmp_path)
    (tmp_path / rundir.STOP_REQUEST_FILE).write_text("an earlier run's request")
    with runs.driving(tmp_path / "server.toml"):
        rec = runs.start(runs.submit(tmp_path / "x.toml", rounds_planned=3))
        assert not (tmp_path / rundir.STOP_REQUEST_FILE).exists()  # not this run's
        assert runs.relay_stop(rec) is None
        runs.request_stop(rec.id, "site-b's data is wrong")
        assert runs.relay_stop(rec) == "site-b's data is wrong"
        assert (tmp_path / rundir.STOP_REQUEST_FILE).read_text() == "site-b's data is wrong"
        rundir.append_round(tmp_path / rundir.ROUNDS_FILE, {"round": 1, "outcome": "committed"})
        (tmp_path / rundir.STATUS_FILE).write_text(json.dumps({"phase": "finished"}))
        assert runs.rounds(runs.get(rec.id)) == [{"round": 1, "outcome": "committed"}]
        ended = runs.finish(rec, "completed", model="m.safetensors")
    assert ended.status == "stopped" and ended.stop_reason == "site-b's data is wrong"
    assert not (tmp_path / rundir.STOP_REQUEST_FILE).exists()
    (tmp_path / rundir.ROUNDS_FILE).unlink()  # the next run starts afresh: the kept copy stays
    assert runs.rounds(runs.get(rec.id)) == [{"round": 1, "outcome": "committed"}]
    assert runs.status_doc(runs.get(rec.id)) == {"phase": "finished"}


def test_a_run_whose_coordinator_died_reads_interrupted_and_the_next_coordinator_records_it(tmp_path: Path) -> None:
    runs = Runs(tmp_path)
    rec = runs.submit(tmp_path / "x.toml", rounds_planned=3)
    runs.update(rec, status="running", driver_pid=_dead_pid(), started=1.0)
    rundir.append_round(tmp_path / rundir.ROUNDS_FILE, {"round": 1, "outcome": "committed"})
    assert runs.get(rec.id).status == "interrupted"
    with runs.driving(tmp_path / "server.toml"):
        stored = json.loads((tmp_path / "runs" / "1" / "run.json").read_text())
        assert stored["status"] == "interrupted" and stored["ended"] is not None
        assert runs.rounds(runs.get(rec.id)) == [{"round": 1, "outcome": "committed"}]
        with pytest.raises(RunsError, match="already ended \\(interrupted\\)"):
            runs.request_stop(rec.id, "")


def test_a_second_coordinator_on_the_same_state_directory_is_refused(tmp_path: Path) -> None:
    runs = Runs(tmp_path)
    holder = subprocess.Popen(["sleep", "30"])
    try:
        (tmp_path / "runs").mkdir()
        (tmp_path / "runs" / "driver.json").write_text(json.dumps({"pid": holder.pid, "config": "/x/server.toml"}))
        assert runs.driver() == holder.pid and runs.driver_config() == Path("/x/server.toml")
        with pytest.raises(RunsError, match=f"another coordinator \\(pid {holder.pid}\\) is driving runs"), runs.driving(tmp_path / "s.toml"):
            pass
    finally:
        holder.kill()
        holder.wait()
    assert runs.driver() is None and runs.driver_config() is None
    with runs.driving(tmp_path / "s.toml"):  # the holder is gone: taken over
        assert runs.driver_config() == (tmp_path / "s.toml").resolve()
    assert runs.driver() is None


def test_an_unknown_run_is_named_with_the_runs_there_are(tmp_path: Path) -> None:
    runs = Runs(tmp_path)
    with pytest.raises(RunsError, match=r"no run 4 .*runs: none yet"):
        runs.get(4)
    runs.submit(tmp_path / "x.toml", rounds_planned=1)
    with pytest.raises(RunsError, match="runs: 1\\)"):
        runs.get(4)


@settings(max_examples=40, deadline=None)
@given(reason=st.text(max_size=400))
def test_a_stop_reason_is_kept_as_one_bounded_line(tmp_path_factory: pytest.TempPathFactory, reason: str) -> None:
    runs = Runs(tmp_path_factory.mktemp("runs"))
    rec = runs.submit(Path("x.toml"), rounds_planned=1)
    kept = runs.request_stop(rec.id, reason).stop_reason
    assert kept.isprintable() and kept == kept.strip() and 0 < len(kept) <= 200
    words = " ".join("".join(c if c.isprintable() else " " for c in reason).split())
    assert kept == (words[:200] or "no reason given")


def test_two_coordinators_starting_together_cannot_both_drive_one_state_directory(tmp_path: Path) -> None:
    """An exclusive lock, not only driver.json: the second finds the lock taken at once."""
    first, second = Runs(tmp_path), Runs(tmp_path)
    with first.driving(tmp_path / "a.toml"):
        with pytest.raises(RunsError, match=r"another coordinator .*is driving runs"), second.driving(tmp_path / "b.toml"):
            pass
    with second.driving(tmp_path / "b.toml"):  # released with the first
        assert second.driver_config() == (tmp_path / "b.toml").resolve()


@pytest.mark.parametrize("name", ['q"uote', "tab\there", "new\nline"])
def test_a_configuration_path_that_would_break_out_of_flowers_run_config_string_is_refused(
    tmp_path: Path, name: str
) -> None:
    bad = tmp_path / name.replace("\\t", "\t").replace("\\n", "\n") / "server.toml"
    with pytest.raises(RunsError, match="cannot hold a double quote or a control character"):
        Runs(tmp_path).submit(bad, rounds_planned=1)
    assert Runs(tmp_path).all() == []


def test_a_path_with_a_backslash_or_spaces_reaches_the_serverapp_as_it_is(tmp_path: Path) -> None:
    import json

    from flwr.common.config import parse_config_args

    path = tmp_path / "a b" / "c\\d" / "server.toml"
    rec = Runs(tmp_path).submit(path, rounds_planned=1)
    parsed = parse_config_args([f"fedseal-config={json.dumps(rec.config)} fedseal-resume=false"])
    assert parsed["fedseal-config"] == str(path.resolve())  # what server/deploy.py sends
