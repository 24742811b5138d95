"""Checkpoint records: refused, with the reason, when written under another run identity."""

import jax.numpy as jnp
import pytest
from flax import nnx

from glam.checkpoint import Checkpointer
from glam.config import CheckpointConfig, ConfigError


def test_a_checkpoint_of_an_earlier_identity_version_is_refused_with_the_reason(tmp_path):
    class Tiny(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones((2,)))

    ckpt = Checkpointer(tmp_path, CheckpointConfig(async_save=False))
    old_record = {"model": {"d_model": 8}, "data_fingerprint": "fp"}  # no identity_version
    ckpt.save(0, nnx.state(Tiny()), old_record)
    ckpt.wait()
    identity = {"model": {"d_model": 8}, "data_fingerprint": "fp", "identity_version": 2}
    with pytest.raises(ConfigError, match=r"another version of glam \(run identity version 1"):
        ckpt.read_record(0, identity)
    ckpt.close()
