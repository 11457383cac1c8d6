"""PEFT's import path for ``BufferDict`` (``from peft.tuners._buffer_dict import BufferDict``)."""
from .buffer_dict import BufferDict

__all__ = ["BufferDict"]
