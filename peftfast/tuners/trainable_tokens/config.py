"""TrainableTokensConfig: PEFT's fields, defaults and JSON layout for training a few rows of an embedding."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from ...config import ConfigError, PeftConfig
from ...utils.peft_types import PeftType


def check_token_indices(indices: object, what: str) -> list[int]:
    """A list of distinct non-negative ints (the rows to train); ConfigError naming ``what`` otherwise."""
    if not isinstance(indices, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices):
        raise ConfigError(f"{what} must be a list of non-negative token ids (ints), got {indices!r}")
    if len(set(indices)) != len(indices):
        raise ConfigError(f"{what} lists a token id more than once: {list(indices)!r}; give each id once")
    return list(indices)


@dataclass
class TrainableTokensConfig(PeftConfig):
    """Train only the embedding rows of ``token_indices`` (new or re-trained tokens), leaving the rest frozen.

    ``target_modules`` defaults to the model's input embedding (``get_input_embeddings()``), else ``embed_tokens``.
    ``init_weights=True`` starts the trained rows from the current rows (the adapter is then a no-op);
    ``False`` starts them from random values.
    """

    token_indices: list[int] = field(default_factory=list)
    target_modules: Optional[Union[list[str], str]] = field(default=None)
    init_weights: bool = field(default=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.TRAINABLE_TOKENS
        check_token_indices(self.token_indices, "token_indices")
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"init_weights must be True or False, got {self.init_weights!r}")
        if self.target_modules is not None and not isinstance(self.target_modules, (str, list, tuple, set)):
            raise ConfigError(f"target_modules must be a list of module names, a regex string or None, "
                              f"got {type(self.target_modules).__name__}")
