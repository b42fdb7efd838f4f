"""Decoding a pickled config (builtins or omegaconf nodes) into plain dicts and lists.

flex_gen pickles its constructor arguments into the checkpoint (`config`,
protocol 4). Arguments that came from a training yaml are omegaconf
`DictConfig` / `ListConfig` nodes, and every node keeps a reference to its
parent, so the pickle also drags along what was left of the whole training
config. This module reads such a pickle without importing omegaconf:

* the omegaconf classes are replaced by stand-ins that only record the state
  pickle hands them (`__setstate__`), so no omegaconf code ever runs;
* a container's state holds `_content` (key -> node for a DictConfig, a list
  of nodes for a ListConfig); a value node's state holds `_val`;
* only `_content` / `_val` are followed, so the parent tree (and its
  unresolved `${...}` interpolations) is ignored.

Everything else goes through the same allow-list as the checkpoint itself
(`torch_pickle.AllowListUnpickler`): a config pickle naming `os.system` or
`builtins.eval` is refused before it runs.
"""

from __future__ import annotations

import collections
import io
from typing import Any

from gsq_jax.utils.torch_pickle import AllowListUnpickler


class _Node:
  """Stand-in for an omegaconf class: records the pickled state, runs nothing."""

  kind = "node"

  def __setstate__(self, state):
    self.state = state


class _DictConfig(_Node):
  kind = "dict"


class _ListConfig(_Node):
  kind = "list"


class _ValueNode(_Node):
  kind = "value"


class _Metadata(_Node):
  kind = "metadata"


class _TypingAny:
  """Stand-in for `typing.Any` (omegaconf metadata names it as a type)."""


_VALUE_NODES = ("AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode",
                "BytesNode", "PathNode")

ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("omegaconf.dictconfig", "DictConfig"): _DictConfig,
    ("omegaconf.listconfig", "ListConfig"): _ListConfig,
    ("omegaconf.base", "ContainerMetadata"): _Metadata,
    ("omegaconf.base", "Metadata"): _Metadata,
    **{("omegaconf.nodes", name): _ValueNode for name in _VALUE_NODES},
    ("typing", "Any"): _TypingAny,
    ("collections", "defaultdict"): collections.defaultdict,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("builtins", t.__name__): t for t in (dict, list, tuple, set, frozenset, int, float,
                                              bool, str, bytes, complex)},
    ("builtins", "NoneType"): type(None),
}


def to_plain(obj: Any) -> Any:
  """Omegaconf stand-ins -> dicts/lists, recursively; builtins pass through."""
  if isinstance(obj, _ValueNode):
    return to_plain(obj.state.get("_val"))
  if isinstance(obj, _DictConfig):
    content = obj.state.get("_content")
    # None / "???" / "${...}" are whole-container None, missing and interpolation.
    return {k: to_plain(v) for k, v in content.items()} if isinstance(content, dict) else content
  if isinstance(obj, _ListConfig):
    content = obj.state.get("_content")
    return [to_plain(v) for v in content] if isinstance(content, list) else content
  if isinstance(obj, _Node):
    raise ValueError(f"config pickle: unexpected omegaconf object {type(obj).__name__} as a value")
  if isinstance(obj, dict):
    return {k: to_plain(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(to_plain(v) for v in obj)
  return obj


def loads_config(data: bytes, *, source: str) -> Any:
  """A pickled config (from file `source`, for errors) as plain Python containers."""
  if not isinstance(data, (bytes, bytearray)):
    raise ValueError(f"{source}: the pickled config is a {type(data).__name__}, expected bytes")
  obj = AllowListUnpickler(io.BytesIO(data), ALLOWED_GLOBALS, source=f"{source} (config)").load()
  return to_plain(obj)
