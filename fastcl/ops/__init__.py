"""torch.library custom ops ("fastcl::...") and backend choice. The only place that registers ops."""
from fastcl.ops.contrastive import (  # noqa: F401
    info_nce_lse,
    info_nce_lse_backward,
    nt_xent_lse,
    nt_xent_lse_backward,
    temperature_tensor,
)
