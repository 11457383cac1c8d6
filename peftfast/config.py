"""Adapter configurations: the dataclasses behind adapter_config.json.

`PeftConfig` and its subclasses carry the same fields, defaults and JSON layout as PEFT's, so a
config written by either library loads in the other.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import numbers
import os
import types
import typing
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Optional, Union

from .utils import registry
from .utils.constants import CONFIG_NAME
from .utils.errors import ConfigError, ConfigKeysMissingError, cap_message, short_repr
from .utils.peft_types import PeftType, TaskType

# The PEFT release whose on-disk format these files follow (written as ``peft_version``).
PEFT_FORMAT_VERSION = "0.21.2"
# PEFT's module attribute of the same name: the version a new config records as ``peft_version``. It is the PEFT
# format version (not peftfast's own ``peftfast.__version__``), so PEFT reading the file knows what wrote it.
__version__ = PEFT_FORMAT_VERSION


def _get_commit_hash(pkg_name: str) -> Optional[str]:
    """The VCS commit an installed distribution was built from (pip's direct_url.json), if recorded."""
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution(pkg_name)
    except importlib.metadata.PackageNotFoundError:
        return None
    for path in dist.files or []:
        if path.name == "direct_url.json":
            info = json.loads(dist.locate_file(path).read_text()).get("vcs_info") or {}
            if "commit_id" in info:
                return info["commit_id"]
    return None


def _current_version() -> str:
    """``__version__``, with the commit hash appended for a development version (``X.Y.devN@<hash>``), as PEFT
    records it; a hash that cannot be determined is written as UNKNOWN, with a warning if looking it up failed."""
    from packaging.version import InvalidVersion, Version

    version = __version__
    try:
        is_dev = Version(version).dev is not None
    except InvalidVersion:
        return version
    if not is_dev:
        return version
    try:
        commit = _get_commit_hash("peftfast")
    except Exception as e:  # never fail a config because metadata could not be read
        warnings.warn(f"A dev version of PEFT is used but there was an error while trying to determine the commit "
                      f"hash of the installed peftfast: {type(e).__name__}: {e}. Recording {version}@UNKNOWN",
                      UserWarning)
        commit = None
    return f"{version}@{commit or 'UNKNOWN'}"


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
                raise ConfigError(f"{type(self).__name__}.task_type: Invalid task type: '{value}'. Must be one of the following task types: "
                                  f"{', '.join(valid)}.")
            self.task_type = TaskType(value)
        if self.peft_version is None:
            self.peft_version = _current_version()

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
        return cls._config_class(kwargs)._from_json_dict(kwargs)

    @classmethod
    def _config_class(cls, data: dict, source: Optional[str] = None) -> type:
        where = f" in {source}" if source else ""
        supported = registry.supported_names()
        peft_type = data.get("peft_type")
        if peft_type is None:
            if registry.peft_type_of_config_class(cls) is not None:
                return cls
            raise ConfigError(f"the adapter config{where} has no 'peft_type'; peftfast supports: {supported}")
        key = peft_type.value if isinstance(peft_type, PeftType) else peft_type
        try:
            return registry.config_class(key)
        except registry.UnknownPeftTypeError:
            known = " (a PEFT method peftfast does not implement)" \
                if isinstance(key, str) and key in {t.value for t in PeftType} else ""
            raise ConfigError(f"peft_type {key!r}{where} is not supported by peftfast{known}; "
                              f"supported: {supported}") from None

    @classmethod
    def _from_json_dict(cls, data: dict, source: Optional[str] = None) -> "PeftConfig":
        """Build the config from a dict read from JSON, checking every value before the dataclass sees it.

        Forward compatibility: a field this version does not declare (written by a newer PEFT) is dropped with
        one warning when its value is None, False or empty (what PEFT writes for a feature that is off), and refused
        with ConfigError for any other value, since ignoring a switched-on feature would change the model's math.
        """
        where = f" in {source}" if source else ""
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(k for k in data if k not in known)
        switched_on = [k for k in unknown if not _is_off(data[k])]
        if switched_on:
            found = ", ".join(f"{k[:60]}={short_repr(data[k])}" for k in switched_on[:10])
            if len(switched_on) > 10:
                found += f" (and {len(switched_on) - 10} more)"
            raise ConfigError(
                f"{cls.__name__}{where}: unknown field{'s' if len(switched_on) > 1 else ''} {found} "
                f"(written by PEFT {data.get('peft_version', '?')}; peftfast follows PEFT {PEFT_FORMAT_VERSION}). "
                "peftfast cannot honour a feature it does not know, and ignoring it would change the adapter's "
                "outputs; unknown fields are only accepted when they are off (null, false or empty)"
            )
        if unknown:
            warnings.warn(
                cap_message(f"{cls.__name__}{where}: ignoring fields peftfast does not know, all off "
                            f"(null/false/empty): {', '.join(unknown[:50])}"
                            + (f" (and {len(unknown) - 50} more)" if len(unknown) > 50 else "")),
                UserWarning,
                stacklevel=3,
            )
        values = {k: v for k, v in data.items() if k in known}
        _check_json_types(cls, values, where)
        try:
            return cls(**values)
        except ConfigError as e:
            if not where:
                raise
            raise ConfigError(f"{cls.__name__}{where}: {e}") from None
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise ConfigError(f"{cls.__name__}{where}: invalid configuration: {type(e).__name__}: {e}") from None

    @classmethod
    def from_json_file(cls, path_json_file: str, **kwargs: Any) -> dict:
        """The JSON object in ``path_json_file`` (checked as adapter_config.json files are), without a stray
        ``runtime_config`` entry, which only has a meaning at run time (PEFT drops it the same way)."""
        data = read_config_json(path_json_file)
        if "runtime_config" in data:
            warnings.warn("The configuration file contains a `runtime_config` key. This is ignored: runtime "
                          "configurations are only valid at runtime.", UserWarning, stacklevel=2)
            del data["runtime_config"]
        return data

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None,
                        **kwargs: Any) -> "PeftConfig":
        from .utils.hub import resolve_file

        path = resolve_file(pretrained_model_name_or_path, CONFIG_NAME, subfolder=subfolder, **kwargs)
        data = read_config_json(path)
        hub_keys = {"revision", "cache_dir", "token", "force_download", "local_files_only"}
        data.update({k: v for k, v in kwargs.items() if k not in hub_keys})
        if cls is PeftConfig or cls is PeftConfigMixin:
            return cls._config_class(data, path)._from_json_dict(data, path)
        declared = data.get("peft_type")
        declared = declared.value if isinstance(declared, PeftType) else declared
        if declared is None:
            raise ConfigKeysMissingError(
                f"The {cls.__name__} config that is trying to be loaded is missing required keys: {{'peft_type'}}. "
                f"{path} does not look like an adapter config (it has no 'peft_type')")
        own_type = registry.peft_type_of_config_class(cls)
        own = own_type.value if own_type is not None else None
        if declared is not None and own is not None and declared != own:
            raise ConfigError(f"{path} holds a {declared!r} adapter, not {own!r}; load it with "
                              "PeftConfig.from_pretrained to get the right config class")
        return cls._from_json_dict(data, path)

    @property
    def is_prompt_learning(self) -> bool:
        """True for methods that prepend virtual tokens / past_key_values (PromptLearningConfig) instead of
        injecting layers; PeftModel's task wrappers branch on it."""
        return False

    @property
    def is_adaption_prompt(self) -> bool:
        return False


def _is_off(value: Any) -> bool:
    """What PEFT writes for a feature switch that is off: null, false, or an empty string/list/object."""
    return value is None or value is False or (isinstance(value, (str, list, dict)) and len(value) == 0)


def _json_kinds(tp: Any) -> Optional[tuple]:
    """The JSON value kinds a field annotation admits, as (python types, element annotation) or None for anything."""
    origin = typing.get_origin(tp)
    if tp is Any or tp is object:
        return None
    if origin in (Union, types.UnionType):
        kinds: list = []
        for arg in typing.get_args(tp):
            sub = _json_kinds(arg)
            if sub is None:
                return None
            kinds.extend(sub)
        return tuple(kinds)
    if tp is type(None):
        return ((type(None), None),)
    if origin is Literal:
        return tuple((type(v), None) for v in typing.get_args(tp))
    if tp is bool:
        return ((bool, None),)
    if tp in (int, float):  # JSON numbers: 16 and 16.0 are both written for lora_alpha; configs check ranges
        return ((numbers.Real, None),)
    if tp is str or (isinstance(tp, type) and issubclass(tp, str)):
        return ((str, None),)
    if origin in (list, tuple, set, frozenset) or tp in (list, tuple, set, frozenset):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        element = Union[tuple(args)] if args else Any
        return ((list, element),)
    if origin is dict or tp is dict:
        args = typing.get_args(tp)
        return ((dict, args[1] if len(args) == 2 else Any),)
    return None  # a config object or something else this check does not describe


def _describe(kinds: tuple) -> str:
    names = {type(None): "null", bool: "true/false", numbers.Real: "a number", str: "a string", list: "a list",
             dict: "an object"}
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t, _ in kinds))


def _value_fits(value: Any, tp: Any) -> bool:
    kinds = _json_kinds(tp)
    if kinds is None:
        return True
    for kind, element in kinds:
        if kind is numbers.Real:
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        elif kind is bool:
            ok = isinstance(value, bool)
        else:
            ok = isinstance(value, kind)
        if not ok:
            continue
        if kind is list and element is not None:
            return all(_value_fits(v, element) for v in value)
        if kind is dict and element is not None:
            return all(isinstance(k, str) for k in value) and all(_value_fits(v, element) for v in value.values())
        return True
    return False


def _check_json_types(cls: type, values: dict, where: str) -> None:
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation that cannot be resolved: leave the checks to the config class
        return
    for name, value in values.items():
        tp = hints.get(name)
        if tp is not None and not _value_fits(value, tp):
            raise ConfigError(f"{cls.__name__}{where}: field {name}={short_repr(value)} has the wrong type; expected "
                              f"{_describe(_json_kinds(tp))}")


# Bounds on adapter_config.json (README, "Bounds on inputs"): PEFT's configs are a few kB and nest three levels
# (rank_pattern, layer_replication, loftq_config); the bounds leave room for 10^6 target module names.
MAX_CONFIG_BYTES = 32 * 2**20
MAX_CONFIG_DEPTH = 32


def _nesting_depth(data: Any) -> int:
    """Depth of nested lists/objects in parsed JSON (a scalar is 0), without recursion."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (list, dict)):
            deepest = max(deepest, depth)
            if depth > MAX_CONFIG_DEPTH:
                return depth
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


def read_config_json(path: str) -> dict:
    """Read adapter_config.json with messages that name the file and the problem. Files over MAX_CONFIG_BYTES are
    refused before being read, and nesting deeper than MAX_CONFIG_DEPTH is refused (not a RecursionError)."""
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"no {CONFIG_NAME} at {path}") from None
    too_big = (f"{path} is larger than {MAX_CONFIG_BYTES} bytes, the most peftfast reads for an adapter config "
               f"(peftfast.config.MAX_CONFIG_BYTES); a PEFT adapter config is a few kB")
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(too_big.replace("is larger", f"has {size} bytes, more"))
    try:
        with open(path, "rb") as f:  # in chunks: a file that grows, or a device that never ends, stops at the cap
            chunks, read = [], 0
            while read <= MAX_CONFIG_BYTES:
                chunk = f.read(min(max(size, 1), 2**20) + 1)
                if not chunk:
                    break
                chunks.append(chunk)
                read += len(chunk)
            raw = b"".join(chunks)
    except FileNotFoundError:
        raise FileNotFoundError(f"no {CONFIG_NAME} at {path}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(too_big)
    try:
        text = raw.decode("utf-8-sig")  # tolerate a byte-order mark some editors add
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text: {e}") from None
    deep = (f"{path} nests lists/objects more than {MAX_CONFIG_DEPTH} levels deep, the most peftfast accepts "
            f"(peftfast.config.MAX_CONFIG_DEPTH); a PEFT adapter config nests at most 3")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e.msg}: line {e.lineno}, column {e.colno})") from None
    except RecursionError:  # deeper than the parser's own limit
        raise ConfigError(deep) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, found {type(data).__name__}")
    if _nesting_depth(data) > MAX_CONFIG_DEPTH:
        raise ConfigError(deep)
    return data


@dataclass
class PeftConfig(PeftConfigMixin):
    """Base configuration of every adapter method."""

    base_model_name_or_path: Optional[str] = field(default=None, metadata={"help": "The base model."})
    revision: Optional[str] = field(default=None, metadata={"help": "Revision of the base model."})
    inference_mode: bool = field(default=False, metadata={"help": "Whether to use inference mode."})


@dataclass
class PromptLearningConfig(PeftConfig):
    """Base configuration of the prompt-learning methods (prompt tuning, p-tuning, prefix tuning), PEFT's fields.

    Subclassed by PromptTuningConfig, PromptEncoderConfig and PrefixTuningConfig; ``is_prompt_learning`` makes
    ``PeftModel`` take its prompt-learning branch. Sizes left None are filled from the model's config.
    """

    num_virtual_tokens: Optional[int] = field(default=None, metadata={"help": "Number of virtual tokens"})
    token_dim: Optional[int] = field(default=None, metadata={"help": "The hidden embedding dimension of the base model"})
    num_transformer_submodules: Optional[int] = field(default=None,
                                                      metadata={"help": "Number of transformer submodules"})
    num_attention_heads: Optional[int] = field(default=None, metadata={"help": "Number of attention heads"})
    num_layers: Optional[int] = field(default=None, metadata={"help": "Number of transformer layers"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={
        "help": "Extra modules to be set as trainable and saved in the final checkpoint"})

    @property
    def is_prompt_learning(self) -> bool:
        return True
