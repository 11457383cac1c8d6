from .mapping import get_peft_model

__all__ = ["get_peft_model"]
