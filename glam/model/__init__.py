"""GLaM model: decoder (`transformer`), dense layers (`layers`), MoE layer (`moe`), gating (`routing`)."""

from flax import nnx

from glam.model.moe import RouterBias
from glam.model.transformer import GLaM, MoEOutputs, param_count

# The variables a trained model consists of (exported, loaded): its parameters and the router
# selection biases of bias balancing, which are state but no parameters.
WEIGHTS = nnx.Any(nnx.Param, RouterBias)

__all__ = ["GLaM", "MoEOutputs", "RouterBias", "WEIGHTS", "param_count"]
