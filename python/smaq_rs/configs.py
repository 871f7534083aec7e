"""Codec configurations as plain data: one dataclass per registered codec.

Every codec of the Rust registry gets a dataclass here whose fields are the codec's parameters
with their defaults (``smaq_rs.list_codecs()`` lists the same). A config is plain, serializable
data:

>>> from smaq_rs.configs import IntConfig, from_config
>>> cfg = IntConfig(bits=4, block_size=64)
>>> d = cfg.get_config()            # {"id": "int", "bits": 4, ...}: JSON-ready
>>> from_config(d) == cfg
True
>>> packed = cfg.compress(np.ones(128, np.float32))   # doctest: +SKIP

Invalid values raise ``CodecError`` naming what is allowed (checked by the Rust core when the
config is built). ``get_config(packed)`` recovers the config a PackedTensor was encoded with.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Dict, Type, Union

from . import _core
from ._core import CodecError

__all__ = ["CodecConfig", "CONFIGS", "config_class", "from_config", "get_config"]


class CodecConfig:
    """Base of the generated config dataclasses."""

    codec: ClassVar[str] = ""

    def __post_init__(self) -> None:
        _core.resolve_params(self.codec, self.params())

    def params(self) -> Dict[str, Any]:
        """The parameters as keyword arguments of ``compress``."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def get_config(self) -> Dict[str, Any]:
        """Plain data: ``{"id": codec name, **parameters}``."""
        return {"id": self.codec, **self.params()}

    @classmethod
    def from_config(cls, config: Dict[str, Any]) -> "CodecConfig":
        config = dict(config)
        cid = config.pop("id", cls.codec)
        if cid != cls.codec:
            raise CodecError(f"config is for codec {cid!r}, not {cls.codec!r}")
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(config) - names)
        if unknown:
            raise CodecError(
                f"codec {cls.codec!r} has no parameter {unknown[0]!r}; its parameters are: "
                + ", ".join(sorted(names))
            )
        return cls(**config)

    def compress(self, x: Any):
        from ._api import compress

        return compress(x, self.codec, **self.params())


def _class_name(codec: str) -> str:
    return "".join(p.capitalize() for p in codec.split("_")) + "Config"


def _make(entry: Dict[str, Any]) -> Type[CodecConfig]:
    fields = []
    for k, v in sorted(entry["defaults"].items()):
        typ = Any if v is None else type(v)
        fields.append((k, typ, dataclasses.field(default=v)))
    cls = dataclasses.make_dataclass(
        _class_name(entry["name"]),
        fields,
        bases=(CodecConfig,),
        namespace={"codec": entry["name"], "__doc__": entry["doc"]},
        eq=True,
    )
    cls.__module__ = __name__
    return cls


#: codec name -> config dataclass, for every registered codec.
CONFIGS: Dict[str, Type[CodecConfig]] = {e["name"]: _make(e) for e in _core.codecs()}
globals().update({c.__name__: c for c in CONFIGS.values()})
__all__ += [c.__name__ for c in CONFIGS.values()]


def config_class(codec: str) -> Type[CodecConfig]:
    try:
        return CONFIGS[codec]
    except KeyError:
        raise CodecError(
            f"unknown codec {codec!r}; available: {', '.join(CONFIGS)}"
        ) from None


def from_config(config: Dict[str, Any]) -> CodecConfig:
    """The config object for plain data ``{"id": name, **params}``."""
    if "id" not in config:
        raise CodecError("a codec config needs an 'id' naming the codec")
    return config_class(config["id"]).from_config(config)


def get_config(x: Union[str, Any]) -> CodecConfig:
    """The default config of a codec name, or the config a PackedTensor was encoded with."""
    if isinstance(x, str):
        return config_class(x)()
    cls = config_class(x.codec)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in x.params.items() if k in names})

