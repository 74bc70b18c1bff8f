"""The public surface: every op of the issues exists, takes ``backend=``, is registered with
the one dispatch mechanism on every backend, and has a benchmark case."""
import inspect

import pytest
import torch

import sslfast
from sslfast import _dispatch
from sslfast.bench import harness

# public function -> the dispatch op(s) behind it
KERNEL_OPS = {
    "apply_mask": ["apply_mask", "apply_mask_backward"],
    "compute_mask_indices": ["compute_mask_indices"],
    "sample_negatives": ["sample_negatives"],
    "contrastive_loss": ["contrastive_loss", "contrastive_loss_backward"],
    "info_nce": ["info_nce", "info_nce_backward"],
    "nt_xent": ["nt_xent"],
    "gumbel_vector_quantize": ["gumbel_vector_quantize", "gumbel_vector_quantize_backward"],
    "random_projection_quantize": ["random_projection_quantize"],
    "nearest_codeword": ["nearest_codeword"],
}
COMPOSITE_OPS = ["wav2vec2_contrastive_loss"]  # built from the ops above


@pytest.mark.cpu
@pytest.mark.parametrize("name", sorted(KERNEL_OPS) + COMPOSITE_OPS)
def test_public_op_takes_backend_keyword(name):
    fn = getattr(sslfast, name)
    param = inspect.signature(fn).parameters.get("backend")
    assert param is not None and param.default is None and param.kind is inspect.Parameter.KEYWORD_ONLY
    assert fn.__doc__ and len(fn.__doc__) > 200, f"{name} needs a docstring stating its semantics"


@pytest.mark.cpu
@pytest.mark.parametrize("name", sorted(KERNEL_OPS))
def test_every_backend_is_registered(name):
    for op in KERNEL_OPS[name]:
        have = set(_dispatch.implemented_backends(op))
        want = {"cpu", "triton", "cuda"} | ({"reference"} if not op.endswith("_backward") else set())
        assert want <= have, f"{op} lacks {want - have}"


@pytest.mark.cpu
def test_every_op_has_a_benchmark_case():
    ops = {c.op for c in harness.collect_cases(torch.device("cpu"), quick=True)}
    missing = (set(KERNEL_OPS) | set(COMPOSITE_OPS)) - ops
    assert not missing, f"no benchmark case for {sorted(missing)}"


@pytest.mark.cpu
def test_modules_exported():
    for name in ("GumbelVectorQuantizer", "Wav2Vec2GumbelVectorQuantizer", "RandomProjectionQuantizer"):
        assert issubclass(getattr(sslfast.nn, name), torch.nn.Module)
