"""A torch.compile backend for the seed tests: aot_eager, after checking that the traced graph
reads no tensor value on the host. ``fullgraph=True`` alone does not show that: torch 2.13
traces ``int(t)`` / ``t.item()`` into the graph (an unbacked symbolic int) without a graph
break, yet on a GPU that read is a device synchronisation and breaks CUDA-graph capture."""
import torch
from torch._dynamo.backends.registry import lookup_backend

_HOST_READS = {"item", "tolist", "__int__", "__index__", "__bool__", "__float__"}
_HOST_READ_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default}


def host_reads(gm: torch.fx.GraphModule) -> list[str]:
    """The nodes of a Dynamo graph that read a tensor's value on the host."""
    return [node.format_node() for node in gm.graph.nodes
            if (node.op == "call_method" and node.target in _HOST_READS)
            or (node.op == "call_function" and node.target in _HOST_READ_OPS)]


def aot_eager_no_host_reads(gm: torch.fx.GraphModule, example_inputs):
    reads = host_reads(gm)
    assert not reads, f"the compiled graph reads tensors on the host: {reads}"
    return lookup_backend("aot_eager")(gm, example_inputs)
