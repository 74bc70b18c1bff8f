"""sslfast: fused Triton and CUDA kernels for self-supervised learning ops.

Public ops (each takes ``backend=None | "reference" | "cpu" | "triton" | "cuda"``; None picks
the fastest backend available for the tensors' device, ``SSLFAST_BACKEND`` overrides):
see ``sslfast.ops``. ``python -m sslfast env`` reports what is built and usable.
"""
__version__ = "0.1.0"

from . import random  # noqa: F401
from ._dispatch import BACKENDS, BackendUnavailableError  # noqa: F401
from ._validation import check_finite, set_check_finite  # noqa: F401
from .env import env_info, env_report  # noqa: F401
from .ops.apply_mask import apply_mask  # noqa: F401
from .ops.contrastive import ContrastiveStats, contrastive_loss, wav2vec2_contrastive_loss  # noqa: F401
from .ops.gumbel_quantize import GumbelQuantizeOutput, gumbel_vector_quantize  # noqa: F401
from .ops.info_nce import info_nce, nt_xent  # noqa: F401
from .ops.masked_prediction import GumbelRPQTargets, MaskedPredictionStats, masked_prediction_loss  # noqa: F401
from .ops.masking import compute_mask_indices  # noqa: F401
from .ops.negatives import sample_negatives  # noqa: F401
from .ops.rp_quantize import nearest_codeword, random_projection_quantize  # noqa: F401
from .random import derive_seed  # noqa: F401

from . import nn  # noqa: E402,F401  (modules wrap the ops above)
