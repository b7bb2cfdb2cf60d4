"""softalign: CLIP-style image-text training with progressive self-distillation (PSD) in JAX/Flax.

``softalign.load(workdir_or_weights)`` returns a `softalign.api.Model`; it is imported on first use (PEP 562), so
``import softalign`` stays light (no JAX).
"""

__version__ = "0.1.0"
__all__ = ["load"]


def __getattr__(name):
    if name == "load":
        from softalign.api import load

        return load
    raise AttributeError(f"module 'softalign' has no attribute {name!r}")
