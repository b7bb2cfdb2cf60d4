"""softalign: CLIP-style image-text training with progressive self-distillation (PSD) in JAX/Flax."""

__version__ = "0.1.0"
