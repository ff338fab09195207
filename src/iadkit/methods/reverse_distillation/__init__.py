"""The reverse-distillation family: RD, AAND (amplified teacher) and ReContrast, with their
networks (:mod:`.networks`) and AAND's amplifiers (:mod:`.amplification`)."""

from .aand import AAND
from .rd import ReverseDistillation, StudentDecoderDetector
from .recontrast import ReContrast

__all__ = ["AAND", "ReContrast", "ReverseDistillation", "StudentDecoderDetector"]
