"""Start a local Flower federation (SuperLink + SuperNodes, or a simulation SuperLink) for tests.

Every process is started in its own session and stopped by its PID's process group (its
``flower-superexec`` / ``flwr-clientapp`` children go with it). Ports are free ones picked by
the OS; ``FLWR_HOME`` is a private folder, so nothing touches the user's Flower config.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import REPO

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


class LocalFederation:
    """``num_nodes`` SuperNodes (``partition-id=i num-partitions=num_nodes``) on 127.0.0.1,
    or, with ``simulation``, a SuperLink running the simulation runtime."""

    def __init__(self, root: Path, num_nodes: int = 2, simulation: bool = False, node_config: str = "") -> None:
        self.root, self.num_nodes, self.simulation = root, num_nodes, simulation
        self.node_config = node_config  # extra ``key=value`` pairs for every SuperNode
        self.home = root / "flwr-home"
        self.port = free_port()
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "FLWR_DISABLE_UPDATE_CHECK": "1",
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}

    # -- processes -------------------------------------------------------------------------
    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = (self.root / f"{name}.log").open("w")
        proc = subprocess.Popen(args, cwd=self.root, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def start(self, timeout: float = 60.0) -> LocalFederation:
        self.home.mkdir(parents=True, exist_ok=True)
        args = [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(self.port),
                "--disable-runtime-dependency-installation"]
        self._spawn("superlink", args + (["--simulation"] if self.simulation else []))
        self._wait_healthy(timeout)
        if not self.simulation:
            for i in range(self.num_nodes):
                self._spawn(f"supernode{i}", [
                    str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                    "--port", str(free_port()), "--node-config",
                    f"partition-id={i} num-partitions={self.num_nodes} {self.node_config}".strip(),
                ])
        (self.home / "config.toml").write_text(
            '[superlink]\ndefault = "test"\n\n[superlink.test]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')
        return self

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[0].poll() is not None:
                raise RuntimeError(f"flower-superlink exited: {(self.root / 'superlink.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=0.5).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError("flower-superlink did not become healthy")

    def stop(self) -> None:
        """Stop every process this object started (by PID, with its process group)."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
            try:  # children left in the group (e.g. a clientapp mid-message)
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def __enter__(self) -> LocalFederation:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- runs --------------------------------------------------------------------------------
    def flwr_run(self, run_config: dict[str, Any], name: str, timeout: float = 1500.0,
                 federation_config: str | None = None) -> tuple[Path, str]:
        """``flwr run <repo> test --stream`` with ``run_config`` (a TOML file); returns
        ``(outputs folder, CLI output)`` once the run finished."""
        out_root = self.root / "out" / name
        cfg = dict(run_config, **{"out-dir": str(out_root)})
        rc_file = self.root / f"{name}.run-config.toml"
        rc_file.write_text("".join(f'"{k}" = {_toml_value(v)}\n' for k, v in cfg.items()))
        args = [str(BIN / "flwr"), "run", str(REPO), "test", "--stream", "--run-config", str(rc_file)]
        if federation_config:
            args += ["--federation-config", federation_config]
        proc = subprocess.run(args, cwd=self.root, env=self.env, capture_output=True, text=True, timeout=timeout)
        text = proc.stdout + proc.stderr
        (self.root / f"{name}.flwr-run.log").write_text(text)
        m = re.search(r"Successfully started run (\d+)", text)
        assert proc.returncode == 0 and m, text[-3000:]
        return out_root / m.group(1), text
