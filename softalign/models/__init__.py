"""Flax linen CLIP: ViT image tower, causal text tower, presets (see docs/architecture.md)."""

from softalign.models.clip import CLIP, abstract_params, build_model, example_inputs
from softalign.models.presets import list_presets, model_preset

__all__ = ["CLIP", "abstract_params", "build_model", "example_inputs", "list_presets", "model_preset"]

__all__ = ["CLIP", "build_model", "list_presets", "model_preset"]
