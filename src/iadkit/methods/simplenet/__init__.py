"""The SimpleNet family: SimpleNet and Adapted-MoE (SimpleNet experts per subclass), with their
networks (:mod:`.networks`) and Adapted-MoE's routing and test-time adaption (:mod:`.mixture`)."""

from .adapted_moe import AdaptedMoE
from .simplenet import SimpleNet

__all__ = ["AdaptedMoE", "SimpleNet"]
