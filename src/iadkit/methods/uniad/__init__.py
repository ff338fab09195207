"""UniAD: its detector and its transformer (:mod:`.networks`)."""

from .uniad import UniAD

__all__ = ["UniAD"]
