"""Adapter configurations: the dataclasses behind adapter_config.json.

`PeftConfig` and its subclasses carry the same fields, defaults and JSON layout as PEFT's, so a
config written by either library loads in the other.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

from .utils.constants import CONFIG_NAME
from .utils.peft_types import PeftType, TaskType

# The PEFT release whose on-disk format these files follow (written as ``peft_version``).
PEFT_FORMAT_VERSION = "0.21.2"


class ConfigError(ValueError):
    """An adapter configuration is invalid or cannot be used by peftfast."""


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(_jsonable(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


@dataclass
class PeftConfigMixin:
    """Serialisation shared by every adapter config."""

    task_type: Optional[Union[str, TaskType]] = field(default=None, metadata={"help": "The type of task."})
    peft_type: Optional[Union[str, PeftType]] = field(default=None, metadata={"help": "The type of PEFT model."})
    auto_mapping: Optional[dict] = field(default=None, metadata={"help": "Auto mapping for the base model."})
    peft_version: Optional[str] = field(default=None, metadata={"help": "Format version of the saved files."})

    def __post_init__(self) -> None:
        if self.task_type is not None:
            valid = [t.value for t in TaskType]
            value = self.task_type.value if isinstance(self.task_type, TaskType) else self.task_type
            if value not in valid:
                raise ConfigError(f"task_type {self.task_type!r} is not one of {', '.join(valid)}")
            self.task_type = TaskType(value)
        if self.peft_version is None:
            self.peft_version = PEFT_FORMAT_VERSION

    # -- serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    def to_json_dict(self) -> dict:
        """What goes into adapter_config.json: plain JSON types, sets as sorted lists."""
        return {k: _jsonable(v) for k, v in self.to_dict().items()}

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        if os.path.isfile(save_directory):
            raise ConfigError(f"save_directory {save_directory!r} is a file; pass a directory")
        os.makedirs(save_directory, exist_ok=True)
        output = self.to_json_dict()
        output.update(_jsonable(kwargs))
        from .utils.io import atomic_write_text

        atomic_write_text(os.path.join(save_directory, CONFIG_NAME), json.dumps(output, indent=2, sort_keys=True))

    @classmethod
    def from_peft_type(cls, **kwargs: Any) -> "PeftConfig":
        """Build the config class named by ``kwargs['peft_type']`` from a dict as read from JSON."""
        from .mapping import PEFT_TYPE_TO_CONFIG_MAPPING

        peft_type = kwargs.get("peft_type")
        if peft_type is None:
            if cls in PEFT_TYPE_TO_CONFIG_MAPPING.values() and cls is not PeftConfig:
                config_cls = cls
            else:
                raise ConfigError("the config has no 'peft_type'; peftfast supports: "
                                  + ", ".join(t.value for t in PEFT_TYPE_TO_CONFIG_MAPPING))
        else:
            key = peft_type.value if isinstance(peft_type, PeftType) else str(peft_type)
            try:
                config_cls = PEFT_TYPE_TO_CONFIG_MAPPING[PeftType(key)]
            except (KeyError, ValueError):
                raise ConfigError(
                    f"peft_type {key!r} is not supported by peftfast; supported: "
                    + ", ".join(t.value for t in PEFT_TYPE_TO_CONFIG_MAPPING)
                ) from None
        return config_cls._from_json_dict(kwargs)

    @classmethod
    def _from_json_dict(cls, data: dict) -> "PeftConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in data if k not in known)
        if unknown:
            warnings.warn(
                f"{cls.__name__}: ignoring fields peftfast does not know: {', '.join(unknown)}",
                UserWarning,
                stacklevel=3,
            )
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_json_file(cls, path_json_file: str, **kwargs: Any) -> dict:
        with open(path_json_file, encoding="utf-8") as f:
            return json.load(f)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None,
                        **kwargs: Any) -> "PeftConfig":
        from .utils.hub import resolve_file

        path = resolve_file(pretrained_model_name_or_path, CONFIG_NAME, subfolder=subfolder, **kwargs)
        data = read_config_json(path)
        hub_keys = {"revision", "cache_dir", "token", "force_download", "local_files_only"}
        data.update({k: v for k, v in kwargs.items() if k not in hub_keys})
        if cls is PeftConfig or cls is PeftConfigMixin:
            return cls.from_peft_type(**data)
        return cls._from_json_dict(data)

    @property
    def is_prompt_learning(self) -> bool:
        return False

    @property
    def is_adaption_prompt(self) -> bool:
        return False


def read_config_json(path: str) -> dict:
    """Read adapter_config.json with messages that name the file and the problem."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"no {CONFIG_NAME} at {path}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text: {e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


@dataclass
class PeftConfig(PeftConfigMixin):
    """Base configuration of every adapter method."""

    base_model_name_or_path: Optional[str] = field(default=None, metadata={"help": "The base model."})
    revision: Optional[str] = field(default=None, metadata={"help": "Revision of the base model."})
    inference_mode: bool = field(default=False, metadata={"help": "Whether to use inference mode."})
