"""Orbax checkpoints of a run: train state (model + optimizer) plus a JSON record of the step,
data position, RNG seed, MLflow run id and the model config it was written for; for prepared
text, the grain iterator's state too (one file per process: grain's orbax handler).

The RNG needs no array of its own: every random draw of a step is a pure function of
(train.seed, data order, step), all of which are in the record.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import json

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx

from glam.config import CheckpointConfig, ConfigError


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message says which and what to do."""


def _differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: checkpoint {a!r}, config {b!r}")
    return out


class Checkpointer:
    def __init__(self, directory: Path, cfg: CheckpointConfig):
        self.directory = Path(directory).resolve()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=cfg.keep, create=True, enable_async_checkpointing=cfg.async_save))

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, record: dict, data_state: dict | None = None) -> None:
        """Write asynchronously; `state` is an nnx.State, `record` plain JSON, `data_state` the
        grain iterator's state at this step (text data; None for the world)."""
        items = {"state": ocp.args.StandardSave(nnx.to_pure_dict(state)),
                 "record": ocp.args.JsonSave(record)}
        if data_state is not None:
            items["data"] = grain.checkpoint.CheckpointSave(_Snapshot(data_state))
        self.manager.save(step, args=ocp.args.Composite(**items))

    def restore_data(self, step: int, iterator) -> None:
        """Set the grain `iterator` to its state at checkpoint `step`.

        Raises:
          CheckpointError: the checkpoint holds no data state for this process (written for
            the world, or by another number of processes), or it is unreadable.
        """
        self.manager.wait_until_finished()
        try:
            self.manager.restore(step, args=ocp.args.Composite(
                data=grain.checkpoint.CheckpointRestore(_Restoring(iterator))))
        except Exception as err:
            raise CheckpointError(self._unreadable(step, err)) from err

    def read_record(self, step: int, identity: dict) -> dict:
        """The JSON record of checkpoint `step`, refused unless it matches `identity` (the model,
        data and optimisation settings it must share with the resuming config,
        `glam.identity.checkpoint_identity`). Cheap: no arrays are read, nothing is compiled.

        Raises:
          CheckpointError: the checkpoint cannot be read.
          ConfigError: it was written for another config (the differing fields are named) or
            under another identity version.
        """
        self.manager.wait_until_finished()
        try:
            record = self.manager.restore(step, args=ocp.args.Composite(
                record=ocp.args.JsonRestore())).record
        except Exception as err:  # orbax raises many types for a damaged directory
            raise CheckpointError(self._unreadable(step, err)) from err
        version = identity.get("identity_version")
        if record.get("identity_version") != version:
            raise ConfigError(
                f"checkpoint {self.directory / str(step)} was written by another version of "
                f"glam (run identity version {record.get('identity_version', 1)}, now {version}: "
                "the identity now holds the resolved dispatch, expert width and group size). "
                "Start a new run directory (a different hydra.run.dir), or resume it with the "
                "glam version that wrote it.")
        diffs = _differences({k: record.get(k) for k in identity}, identity)
        if diffs:
            raise ConfigError(
                f"checkpoint {self.directory / str(step)} was written for another config:\n  "
                + "\n  ".join(diffs)
                + "\nResume with the model config it was written for, or start a new run "
                  "directory (a different hydra.run.dir).")
        return record

    def restore_state(self, step: int, state: Any) -> Any:
        """`state` with its arrays replaced by checkpoint `step`'s."""
        self.manager.wait_until_finished()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.to_pure_dict(state))
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract))).state
        except Exception as err:
            raise CheckpointError(self._unreadable(step, err)) from err
        nnx.replace_by_pure_dict(state, restored)
        return state

    def set_aside(self, step: int) -> Path:
        """Move the damaged checkpoint `step` out of the way (renamed into a sibling folder
        `checkpoints.damaged/`, never deleted) so the previous one becomes the newest. Returns
        where it went."""
        self.manager.wait_until_finished()
        target = self.directory.parent / f"{self.directory.name}.damaged" / str(step)
        n = 1
        while target.exists():
            target = target.with_name(f"{step}.{n}")
            n += 1
        target.parent.mkdir(parents=True, exist_ok=True)
        (self.directory / str(step)).rename(target)
        self.manager.reload()
        return target

    def _unreadable(self, step: int, err: Exception) -> str:
        first_line = (str(err).splitlines() or [""])[0][:200]
        return (f"checkpoint {self.directory / str(step)} is unreadable "
                f"({type(err).__name__}: {first_line})")

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


class _Snapshot:
    """An iterator state taken at save time (the save may complete after the iterator moved)."""

    def __init__(self, state: dict):
        self.text = json.dumps(state)

    def get_state(self) -> bytes:
        return self.text.encode()


class _Restoring:
    """Hands a grain iterator its saved state as it was before JSON: grain's packing marks "no
    partial document" with the tuple (-1, -1), which JSON returns as a list that compares
    unequal, so a document would be dropped."""

    def __init__(self, iterator):
        self.iterator = iterator

    def set_state(self, raw: bytes) -> None:
        self.iterator.set_state(_with_slice_tuples(json.loads(raw)))

    def start_prefetch(self) -> None:
        self.iterator.start_prefetch()


def _with_slice_tuples(state):
    if isinstance(state, dict):
        return {k: ({f: tuple(v) for f, v in value.items()} if k == "remainder_slices"
                    else _with_slice_tuples(value)) for k, value in state.items()}
    if isinstance(state, list):
        return [_with_slice_tuples(x) for x in state]
    return state
