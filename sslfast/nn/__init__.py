"""Drop-in ``nn.Module`` wrappers of sslfast ops, with the constructors, parameter names and
state_dict keys of the implementations they replace."""
from .rp_quantize import RandomProjectionQuantizer  # noqa: F401
from .gumbel_quantize import GumbelVectorQuantizer, Wav2Vec2GumbelVectorQuantizer  # noqa: F401,E402
from .masked_prediction import HubertPredictionHead, MultiSoftmaxHead  # noqa: F401,E402
