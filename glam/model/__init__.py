"""GLaM model: decoder (`transformer`), dense layers (`layers`), MoE layer (`moe`), gating (`routing`)."""

from glam.model.transformer import GLaM, MoEOutputs, param_count

__all__ = ["GLaM", "MoEOutputs", "param_count"]
