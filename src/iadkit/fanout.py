"""Fanning independent jobs out on Ray: benchmark cells as tasks, batch prediction on actors.

``iadkit benchmark GRID --executor ray`` and ``iadkit predict ... --executor ray`` hand their
work to a Ray cluster (``--address HOST:PORT``) or to a Ray instance started on this machine
(no address). Results are written by the driver exactly as the local path writes them, so a
grid or a prediction stays resumable whichever executor ran its parts. The files the workers
read and write (data, models, cell folders, heatmaps) must be on a filesystem every node
sees.

Ray is an optional dependency: ``pip install 'iadkit[ray]'``.
"""

from __future__ import annotations

import socket
from types import ModuleType

from .errors import ConfigError

EXECUTORS = ("local", "ray")


def check_executor(executor: str, address: str | None) -> None:
    """Refuse an unknown executor, or an address without Ray (before any work)."""
    if executor not in EXECUTORS:
        raise ConfigError(f"--executor {executor!r}: one of {', '.join(EXECUTORS)}")
    if address is not None and executor != "ray":
        raise ConfigError("--address is the Ray cluster's: it needs --executor ray")


def start_ray(address: str | None = None, num_cpus: int | None = None) -> ModuleType:
    """The ``ray`` module, connected to the cluster at ``address`` or to a local instance.

    Raises:
        ConfigError: Ray is not installed, or nothing answers at ``address`` (checked with a
            plain connection first: Ray itself waits minutes before it gives up).
    """
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor ray needs Ray: pip install 'iadkit[ray]'") from None
    if address is not None and address != "auto":
        _check_reachable(address)
    if ray.is_initialized():
        return ray
    ray.init(address=address, num_cpus=num_cpus if address is None else None,
             include_dashboard=False, log_to_driver=False, configure_logging=False)
    return ray


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--address {address!r}: expected HOST:PORT (or ray://HOST:PORT)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as error:
        raise ConfigError(f"--address {address}: no Ray cluster answers there "
                          f"({error.strerror or error})") from None
