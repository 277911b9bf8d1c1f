"""The tabular example federated: three sites, each with its own CSV prepared by
``fl-client data prepare``, enrolled with the dataset roots they attested, run by the real
coordinator (``run_federation``, secure rounds) against the real site ClientApps built as
``fl-client run`` builds them, reach the accuracy of the same recipe trained centrally on the
union of their training rows (measured on the same validation rows), and the recipe's own
metrics reach the coordinator's signed audit log.

In-process: the grid below hands each message straight to the site's ClientApp (no SuperLink,
TLS or Ray), so the run takes seconds.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from typer.testing import CliRunner

from fedseal.audit.codec import decode_entry
from fedseal.audit.entries import EntryKind
from fedseal.audit.store import MerkleLogStore
from fedseal.client.cli import app as fl_client
from fedseal.client.config import load_client_config
from fedseal.client.models import build_model
from fedseal.client.policy import SiteRefusal
from fedseal.client.site_data import load_site_data
from fedseal.client.training import TrainRequest, evaluate, fit_preprocessing, train
from fedseal.server import flower_app, rundir
from fedseal.server.config import load_server_config
from fedseal.sim.demo import prepare_federation
from fedseal.sim.sites import real_site_app
from tests.server._fedgrid import Reply

NAME = "fedseal_example_tabular:recipe"
SITES = [(700, 11, 0.30), (550, 12, 0.40), (450, 13, 0.45)]  # rows, seed, prevalence: one CSV each
ROUNDS, EPOCHS, LR, BATCH = 5, 2, 0.005, 32


class InProcessGrid:
    """The coordinator's ``Grid``: each pushed message is answered at once by the node's
    ClientApp; an exception becomes an error reply as the site's executor sends it."""

    def __init__(self, apps: dict[int, ClientApp]) -> None:
        self.apps = apps
        self._replies: dict[str, Reply] = {}
        self._count = 0

    def get_node_ids(self) -> list[int]:
        return list(self.apps)

    def push_messages(self, messages: Sequence[Message]) -> list[str]:
        ids = []
        for m in messages:
            self._count += 1
            mid = f"msg-{self._count}"
            node = int(m.metadata.dst_node_id)
            context = Context(
                run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={}
            )
            try:
                reply = self.apps[node](m, context)
            except Exception as exc:
                reason = (
                    str(exc) if isinstance(exc, SiteRefusal) else f"{type(exc).__name__}: {exc}"
                )
                reply = Message(Error(code=0, reason=reason), reply_to=m)
            self._replies[mid] = Reply(reply, mid)  # the reply names its node (reply_to)
            ids.append(mid)
        return ids

    def pull_messages(self, ids: Sequence[str]) -> list[Reply]:
        return [self._replies.pop(i) for i in ids if i in self._replies]


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 7), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


def prepare_sites(workdir: Path) -> list[Path]:
    """Each site writes its CSV and runs ``fl-client data prepare site.csv data/ --label diagnosis``."""
    from fedseal_example_tabular.data import LABEL, write_csv

    dirs = []
    for i, (rows, seed, prevalence) in enumerate(SITES):
        csv = write_csv(workdir / "csv" / f"site-{i}.csv", rows, seed=seed, prevalence=prevalence)
        out = workdir / "data" / f"site-{i}"
        result = CliRunner().invoke(
            fl_client, ["data", "prepare", str(csv), str(out), "--label", LABEL, "--json"]
        )
        assert result.exit_code == 0, result.output
        dirs.append(out)
    return dirs


def central_accuracy(site_dirs: list[Path], validation_fraction: float) -> float:
    """The same recipe on the union of the sites' training parts, evaluated on the union of
    their validation parts (the rows the coordinator's per-round accuracy covers)."""
    from fedseal_example_tabular import recipe

    parts = [load_site_data(d, validation_fraction=validation_fraction, seed=7) for d in site_dirs]
    x = np.concatenate([np.asarray(p.x_train) for p in parts])
    y = np.concatenate([np.asarray(p.y_train) for p in parts])
    xv = np.concatenate([np.asarray(p.x_val) for p in parts])
    yv = np.concatenate([np.asarray(p.y_val) for p in parts])
    model = build_model(NAME, seed=0, num_features=x.shape[1], num_classes=2)
    transform = fit_preprocessing(recipe, x)
    req = TrainRequest(epochs=ROUNDS * EPOCHS, batch_size=BATCH, learning_rate=LR)
    train(model, x, y, req, seed=1, recipe=recipe, transform=transform)
    return evaluate(model, xv, yv, num_classes=2, recipe=recipe, transform=transform).accuracy


@pytest.mark.timeout(180)
def test_three_sites_with_their_own_csv_reach_the_accuracy_of_the_recipe_trained_centrally(
    tmp_path: Path,
) -> None:
    import torch

    threads = torch.get_num_threads()
    site_dirs = prepare_sites(tmp_path)
    fed = prepare_federation(
        tmp_path,
        num_sites=len(SITES),
        run_overrides={
            "model": NAME, "rounds": ROUNDS, "epochs": EPOCHS, "learning_rate": LR, "batch_size": BATCH,
            "secure": True, "min_sites": len(SITES), "stage_timeout_s": 60.0, "sites_wait_timeout_s": 10.0,
        },
    )  # fmt: skip
    for sdir in fed.sites:  # each site allows the recipe it installed
        toml = sdir / "client.toml"
        toml.write_text(toml.read_text() + f'\n[limits]\nallowed_models = ["mlp", "{NAME}"]\n')
    cfg = load_server_config(fed.server_toml)
    nodes = {100 + i: sdir for i, sdir in enumerate(fed.sites)}
    cfg.coordinator.state_dir.mkdir(parents=True, exist_ok=True)
    (cfg.coordinator.state_dir / rundir.NODES_FILE).write_text(
        json.dumps({str(n): sdir.name for n, sdir in nodes.items()})
    )
    try:
        grid = InProcessGrid({n: real_site_app(sdir, ()) for n, sdir in nodes.items()})
        flower_app.run_federation(grid, cfg, resume=False)  # type: ignore[arg-type]
    finally:
        torch.set_num_threads(threads)

    rounds = rundir.read_rounds(cfg.coordinator.state_dir / rundir.ROUNDS_FILE)
    assert [r["outcome"] for r in rounds] == ["committed"] * ROUNDS
    federated = float(rounds[-1]["accuracy"])
    central = central_accuracy(
        site_dirs, load_client_config(fed.sites[0] / "client.toml").validation_fraction
    )
    assert central > 0.9
    assert federated >= central - 0.025, (federated, central)
    # The recipe's own metrics reach the coordinator and its signed audit log.
    with MerkleLogStore.open(cfg.coordinator.state_dir / "audit.sqlite", read_only=True) as store:
        logged = [
            decode_entry(e.data) for e in store.iter_entries() if e.kind == EntryKind.EVALUATION
        ]
    assert len(logged) == ROUNDS
    last = logged[-1].metric_values  # type: ignore[union-attr]
    assert {"sensitivity", "specificity", "auroc"} <= set(last) and last["auroc"] > 0.95
    assert last["accuracy"] == pytest.approx(federated, abs=1e-6)
    # ... and rounds.jsonl, beside fedseal's own three.
    assert rounds[-1]["metrics"]["auroc"] == pytest.approx(last["auroc"], abs=1e-6)
