"""torch.library custom ops ("fastcl::...") and backend choice. The only place that registers ops."""
from fastcl.ops.contrastive import (  # noqa: F401
    info_nce,
    nt_xent,
    softmax_rows,
    softmax_rows_backward,
    temperature_tensor,
)
from fastcl.ops.momentum import (  # noqa: F401, E402
    ema,
    ema_,
    queue_push,
    queue_push_,
    try_eager_cpu_push,
)
from fastcl.ops.cosine import cosine, cosine_loss, cosine_loss_backward  # noqa: F401, E402
from fastcl.ops import sigmoid  # noqa: F401, E402
from fastcl.ops.sigmoid import sigmoid_pairs, sigmoid_pairs_backward  # noqa: F401, E402
from fastcl.ops import labels  # noqa: F401, E402
from fastcl.ops.labels import label_rows, label_rows_backward  # noqa: F401, E402
