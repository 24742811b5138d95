"""The Dask engine preparation runs its work on: local worker processes, or a running cluster."""

from __future__ import annotations

import logging
import os

from glam.config import ConfigError

CONNECT_TIMEOUT = "15s"  # for a Dask scheduler to answer


class Engine:
    """A Dask client: local worker processes, or the cluster at `address`.

    Raises (on construction):
      ConfigError: no scheduler answers at `address` within CONNECT_TIMEOUT.
    """

    def __init__(self, address: str | None, workers: int):
        # Dask logs every worker start and stop, and a task error twice; the error reaches the
        # caller anyway.
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "critical")
        from dask.distributed import Client, LocalCluster

        logging.getLogger("distributed").setLevel(logging.CRITICAL)
        self.cluster = None
        if address:
            try:
                self.client = Client(address, timeout=CONNECT_TIMEOUT)
            except (OSError, TimeoutError) as err:
                raise ConfigError(f"data.engine.address: no Dask scheduler answers at "
                                  f"{address!r} ({err}); start one (`dask scheduler`) or leave "
                                  "the address null to use local worker processes.") from err
        else:
            self.cluster = LocalCluster(n_workers=workers or os.cpu_count() or 1,
                                        threads_per_worker=1, processes=True,
                                        dashboard_address=":0")  # any free port
            self.client = Client(self.cluster)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()

    def map(self, fn, jobs: list[tuple]):
        """Submit fn(*job) for every job; yields results as they complete (an error passes on
        once the tasks already running are cancelled)."""
        from dask.distributed import as_completed

        futures = [self.client.submit(fn, *job, pure=False) for job in jobs]
        try:
            for future in as_completed(futures):
                yield future.result()
        finally:
            self.client.cancel(futures)
