"""The coordinator's side of the SuperLink's Control API: register and unregister enrolled
sites' keys, submit the run, poll it (what ``flwr supernode register``, ``flwr run`` and ``flwr
list`` do, over the control socket, without a ``flwr`` subprocess per call).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedseal.server.config import ServerConfig
from fedseal.server.errors import DeployError
from fedseal.server.roster import Enrolment
from fedseal.server.rundir import NODES_FILE

__all__ = ["ControlApi", "register_sites"]


def register_sites(cfg: ServerConfig, roster: Enrolment, control: ControlApi) -> dict[int, str]:
    path = cfg.coordinator.state_dir / NODES_FILE
    nodes: dict[int, str] = (
        {int(k): str(v) for k, v in json.loads(path.read_text()).items()} if path.exists() else {}
    )
    registered_sites = set(nodes.values())
    keys_dir = cfg.coordinator.state_dir / "site-keys"
    keys_dir.mkdir(parents=True, exist_ok=True)
    for site in roster.active():
        if site.name in registered_sites:
            continue
        # The OpenSSH file is what `flwr supernode register` takes, kept for an operator.
        (keys_dir / f"{site.name}.pub").write_bytes(site.openssh_public_key() + b"\n")
        nodes[control.register(site.name, site.public_key)] = site.name
    for node_id, name in list(nodes.items()):
        entry = roster.get(name)
        if entry is None or entry.status != "active":
            control.unregister(name, node_id)
            del nodes[node_id]
    path.write_text(json.dumps({str(k): v for k, v in nodes.items()}, indent=1))
    return nodes


class ControlApi:
    """The SuperLink's Control API, on its control socket (this user only), from this process.

    Does what ``flwr supernode register/unregister``, ``flwr run`` and ``flwr list --run-id``
    do, with the same requests, without a ``flwr`` subprocess per call (the ``flwr`` CLI cannot
    reach a Unix socket; see :mod:`fedseal.server.superlink` for why the Control API is there).
    """

    def __init__(self, socket_path: Path) -> None:
        from fedseal.server.superlink import control_client

        self.socket_path = socket_path
        self._client = control_client(socket_path)

    def _call(self, step: str, fn: Callable[[Any], Any], request: Any) -> Any:
        try:
            return fn(request)
        except Exception as exc:  # httpx transport/status errors and Flower's API errors alike
            raise DeployError(step, f"Control API {type(request).__name__[:-7]} failed: {type(exc).__name__}: {exc}") from exc

    def register(self, site: str, public_key: Any) -> int:
        """Register a site's EC public key for SuperNode authentication; returns its node id.

        Raises:
            DeployError: The SuperLink refused the key or did not answer.
        """
        from cryptography.hazmat.primitives import serialization
        from flwr.proto.control_pb2 import RegisterNodeRequest

        pem = public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        res = self._call(f"register site {site}", self._client.RegisterNode, RegisterNodeRequest(public_key=pem))
        if not res.node_id:
            raise DeployError(f"register site {site}", "the SuperLink returned no node id")
        return int(res.node_id)

    def unregister(self, site: str, node_id: int) -> None:
        """Remove a (revoked) site's node from the SuperLink.

        Raises:
            DeployError: The SuperLink refused or did not answer.
        """
        from flwr.proto.control_pb2 import UnregisterNodeRequest

        self._call(f"unregister {site}", self._client.UnregisterNode, UnregisterNodeRequest(node_id=node_id))

    def start_run(self, app_dir: Path, run_config: str) -> int:
        """Submit the app directory as a run (what ``flwr run APP_DIR --run-config`` sends).

        Raises:
            DeployError: The SuperLink refused the run or did not answer.
        """
        from fedseal.server.superlink import start_run

        try:
            return start_run(self._client, app_dir, run_config)
        except Exception as exc:  # httpx transport/status errors and Flower's API errors alike
            raise DeployError("start run", f"Control API StartRun failed: {type(exc).__name__}: {exc}") from exc

    def run_status(self, run_id: int) -> str:
        """``pending``, ``starting``, ``running`` or ``finished:<sub-status>`` (as ``flwr list``).

        Raises:
            DeployError: The Control API did not answer or does not know the run.
        """
        from flwr.proto.control_pb2 import ListRunsRequest

        res = self._call("poll run", self._client.ListRuns, ListRunsRequest(run_id=run_id))
        if run_id not in res.run_dict:
            raise DeployError("poll run", f"the SuperLink does not know run {run_id}")
        st = res.run_dict[run_id].status
        return f"{st.status}:{st.sub_status}" if st.status == "finished" else str(st.status)

    def close(self) -> None:
        self._client.close()
