"""fastcl: fused kernels for contrastive self-supervised learning."""
from fastcl._config import get_backend, set_backend, use_backend  # noqa: F401
from fastcl.functional import (  # noqa: F401
    byol_loss,
    clip_loss,
    dcl_loss,
    cosine_momentum,
    ema_,
    info_nce,
    nt_xent,
    queue_push_,
    siglip_loss,
    supcon_loss,
)
from fastcl import nn  # noqa: F401
from fastcl import models  # noqa: F401, E402

__version__ = "0.1.0"
__all__ = [
    "nt_xent", "info_nce", "dcl_loss", "clip_loss", "siglip_loss", "supcon_loss", "byol_loss", "ema_", "cosine_momentum", "queue_push_", "nn", "models",
    "get_backend", "set_backend", "use_backend",
]
