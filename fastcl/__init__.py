"""fastcl: fused kernels for contrastive self-supervised learning."""
from fastcl._config import get_backend, set_backend, use_backend  # noqa: F401
from fastcl.functional import info_nce, nt_xent  # noqa: F401
from fastcl import nn  # noqa: F401

__version__ = "0.1.0"
__all__ = ["nt_xent", "info_nce", "nn", "get_backend", "set_backend", "use_backend"]
