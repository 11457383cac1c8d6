"""Optimizers built for adapters (PEFT's ``peft.optimizers``)."""
from .loraplus import create_loraplus_optimizer

__all__ = ["create_loraplus_optimizer"]
