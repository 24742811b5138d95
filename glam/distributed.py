"""Multi-host JAX: one process per host, all running the same program on one global mesh.

`initialize` must run before anything touches a JAX backend (`glam-train` calls it right after
the config is validated). Then `jax.devices()` lists every process's devices, `make_mesh`
spans them all, and every jitted step is one SPMD program. What differs by process:

- each process builds only its own rows of a training batch (`jax.make_array_from_callback`);
  evaluation batches are small and built whole on every process;
- only process 0 writes MLflow, glam's files in the run directory and the progress bar (work
  the others wait on goes through `on_primary`, so an error there stops every process);
- every process takes part in checkpoint save and restore (orbax coordinates them);
- host copies of results go through `fetch`, which gathers arrays spread over processes.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
from collections.abc import Mapping
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from glam.config import ConfigError, DistributedConfig

log = logging.getLogger("glam.distributed")


def _int(environ: Mapping[str, str], *keys: str) -> int:
    """The first of `keys` set to a number, else 1."""
    return next((int(environ[k]) for k in keys if environ.get(k, "").isdigit()), 1)


def detect_cluster(environ: Mapping[str, str]) -> str | None:
    """The multi-process launcher this process runs under, if any: `slurm` (srun with more than
    one task), `openmpi` (mpirun -n > 1), `tpu` (a TPU slice of more than one host), or
    `submitit_local` (Hydra's submitit_local launcher with tasks_per_node > 1: the SLURM
    launch path, on one machine)."""
    in_job_step = "SLURM_JOB_ID" in environ and "SLURM_PROCID" in environ
    if in_job_step and _int(environ, "SLURM_NTASKS") > 1:
        return "slurm"
    if _int(environ, "OMPI_COMM_WORLD_SIZE") > 1:
        return "openmpi"
    hosts = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES") or ""
    if "," in hosts:
        return "tpu"
    if _int(environ, "SUBMITIT_LOCAL_NTASKS") > 1:
        return "submitit_local"
    return None


def _slurm_devices(environ: Mapping[str, str]) -> list[int] | None:
    """The GPUs of this SLURM task: the host's GPUs split evenly over its tasks, so one task per
    host drives them all. (Left alone, JAX gives each task the one GPU of its local rank.)"""
    tasks_per_node = _int(environ, "SLURM_NTASKS") // _int(environ, "SLURM_STEP_NUM_NODES",
                                                            "SLURM_NNODES")
    gpus = _int(environ, "SLURM_GPUS_ON_NODE")
    if "SLURM_GPUS_ON_NODE" not in environ or not tasks_per_node or gpus % tasks_per_node:
        return None
    per_task = gpus // tasks_per_node
    first = _int(environ, "SLURM_LOCALID") * per_task
    return list(range(first, first + per_task))


def initialize_args(cfg: DistributedConfig, environ: Mapping[str, str]) -> dict | None:
    """Keyword arguments for `jax.distributed.initialize`, or None for a single process. Fields
    left unset are detected by JAX from the cluster environment."""
    if cfg.init == "never":
        return None
    cluster = detect_cluster(environ)
    if cfg.init == "auto" and cluster is None and (cfg.num_processes or 1) == 1:
        return None
    args = {"coordinator_address": cfg.coordinator_address, "num_processes": cfg.num_processes,
            "process_id": cfg.process_id, "local_device_ids": cfg.local_device_ids}
    if cluster == "slurm" and args["local_device_ids"] is None:
        args["local_device_ids"] = _slurm_devices(environ)
    if cluster == "submitit_local":  # JAX does not know this one: fill in what it would detect
        port = 61440 + _int(environ, "SUBMITIT_LOCAL_JOB_ID") % 4096
        detected = {"coordinator_address": f"127.0.0.1:{port}",
                    "num_processes": _int(environ, "SUBMITIT_LOCAL_NTASKS"),
                    "process_id": int(environ.get("SUBMITIT_LOCAL_GLOBALID", "0"))}
        args = {k: detected[k] if v is None and k in detected else v for k, v in args.items()}
    if cluster is None and cfg.init == "auto":
        missing = [k for k in ("coordinator_address", "process_id") if args[k] is None]
        if missing:
            raise ConfigError(
                f"distributed: num_processes={cfg.num_processes} but "
                + " and ".join(f"distributed.{k}" for k in missing)
                + " unset and no SLURM / Open MPI / TPU launch detected; give every process the "
                  "same coordinator_address (host:port of process 0) and its own process_id "
                  "(or $GLAM_COORDINATOR_ADDRESS / $GLAM_PROCESS_ID).")
    address = args["coordinator_address"]
    if address is not None and _is_ip(address.rpartition(":")[0]):
        # Process 0's coordinator listens where it was told (JAX's default: every interface).
        # A host name is left to that default: it may resolve to a loopback alias locally.
        args["coordinator_bind_address"] = address
    return {k: v for k, v in args.items() if v is not None}


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


def initialize(cfg: DistributedConfig) -> None:
    """Join the other processes of a multi-host run (no-op for a single process)."""
    args = initialize_args(cfg, os.environ)
    if args is None or jax.distributed.is_initialized():
        return
    # CPU processes exchange collectives over gloo; accelerators ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**args)
    log.info("process %d of %d: %d local of %d devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())


def is_primary() -> bool:
    """Process 0: the one that writes MLflow, glam's run-directory files and the progress bar."""
    return jax.process_index() == 0


def broadcast(text: str) -> str:
    """Process 0's `text`, on every process."""
    if jax.process_count() == 1:
        return text
    data = np.frombuffer(text.encode(), np.uint8)
    length = int(multihost_utils.broadcast_one_to_all(np.int32(len(data))))
    buffer = data if is_primary() else np.zeros(length, np.uint8)
    return bytes(multihost_utils.broadcast_one_to_all(buffer)).decode(errors="replace")


def agree(text: str, what: str) -> None:
    """Refuse, on every process, to go on unless all processes hold the same `text`."""
    if jax.process_count() == 1:
        return
    digest = np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint8)
    digests = multihost_utils.process_allgather(digest)  # [processes, 32], the same everywhere
    differ = [i for i, d in enumerate(digests) if not np.array_equal(d, digests[0])]
    if differ:
        theirs = broadcast(text)
        raise ConfigError(f"{what}: processes {differ} differ from process 0 ({theirs!r}); "
                          "every process of a run must use the same value.")


def on_primary(fn: Callable[[], str]) -> str:
    """Run `fn` on process 0 alone and return its result on every process; if it raises, every
    process raises (the others would otherwise wait for process 0 at the next collective)."""
    if jax.process_count() == 1:
        return fn()
    result, error = "", None
    if is_primary():
        try:
            result = fn()
        except Exception as err:  # re-raised below, once the other processes know
            error = err
    message = broadcast(f"{type(error).__name__}: {error}" if error else "")
    if error is not None:
        raise error
    if message:
        raise RuntimeError(f"process 0 failed, so this process stops too: {message}")
    return broadcast(result)


def any_process(value: int) -> int:
    """The largest of every process's `value`, on every process (a collective: all processes
    call it at the same point). Used to share a stop signal."""
    if jax.process_count() == 1:
        return value
    return int(np.max(multihost_utils.process_allgather(np.int32(value))))


def fetch(tree: Any) -> Any:
    """`jax.device_get` for arrays that may span processes: every process gets the global
    value of each array (other leaves pass through)."""

    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return jax.device_get(x)
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return multihost_utils.process_allgather(x, tiled=True)

    return jax.tree.map(one, tree)
