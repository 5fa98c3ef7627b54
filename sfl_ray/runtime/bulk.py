"""Bulk payloads go once, by reference: device -> server without passing through the coordinator.

A client program declares some of its upload kinds bulk (`ClientContext.by_reference`, e.g.
Ampere's whole activation set, SGLR's per-batch activations). The pool counts them on the link
as it counts any upload, then stores them (one object per reply) and its reply carries a `Bulk`
handle per kind instead of the arrays: on the Ray backend the handle holds an object-store
reference (the coordinator receives a few hundred bytes, whatever the payload's size), on the
local backend the value itself. The schedule passes handles on, alone or inside lists, tuples
and dicts, as arguments of `rt.server(...)`; the server block fetches every handle in its
arguments at once and decodes them (link.compression) before the program method runs, so a
server program sees arrays as before. A server program may hand bulk values back the same way
(`ServerContext.bulk`), and a pool resolves handles in what it is sent before counting it.

An object belongs to the process that stored it: if that pool or server block dies, the object
is lost with it and whoever fetches it raises `ActorLost`, like a lost actor; the coordinator's
retry of the round then re-runs the clients, which store their payloads again.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from sfl_ray.runtime.codec import decode_array
from sfl_ray.runtime.wire import payload_nbytes

_ENCODED = ("fp16", "bf16", "int8")  # the codec's wire forms (runtime.codec.Codec.encode_array)

# Stores one object (kind -> value) and returns what refers to it; fetches many objects at once.
Put = Callable[[dict], Any]
Fetch = Callable[[list], list]


@dataclass(frozen=True)
class Bulk:
    """A handle on one bulk payload value: where it is stored and what it is, not the value."""

    ref: Any                 # an object-store reference (Ray) or the stored object itself (local)
    kind: str                # the value's key inside the stored object
    shape: tuple[int, ...]   # of the array (its decoded form, if encoded)
    nbytes: int              # bytes as sent (the encoded form under link.compression)
    encoded: bool = False    # in a codec's wire form: decoded to float32 where it is used

    def __len__(self) -> int:
        return self.shape[0] if self.shape else 0


def _describe(kind: str, ref: Any, value: Any) -> Bulk:
    encoded = isinstance(value, Mapping) and any(k in value for k in _ENCODED)
    arr = value[next(k for k in _ENCODED if k in value)] if encoded else value
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"bulk payload {kind!r} must be an array, not {type(arr).__name__}")
    return Bulk(ref, kind, tuple(arr.shape), payload_nbytes(value), encoded)


def by_reference(payload: Mapping[str, Any], kinds: Iterable[str], put: Put) -> dict:
    """`payload` (packed, encoded, already counted) with `kinds` stored as one object by `put`
    and replaced by handles."""
    kinds = [k for k in kinds if k in payload]
    if not kinds:
        return dict(payload)
    stored = {k: payload[k] for k in kinds}
    ref = put(stored)
    return {k: (_describe(k, ref, v) if k in stored else v) for k, v in payload.items()}


def _handles(value: Any, out: list[Bulk]) -> None:
    if isinstance(value, Bulk):
        out.append(value)
    elif isinstance(value, Mapping):
        for v in value.values():
            _handles(v, out)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _handles(v, out)


def _replace(value: Any, got: Callable[[Bulk], Any]) -> Any:
    if isinstance(value, Bulk):
        return got(value)
    if isinstance(value, Mapping):
        return {k: _replace(v, got) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_replace(v, got) for v in value)
    return value


def _stored(value: Any) -> tuple[dict, list]:
    """The distinct stored objects `value`'s handles refer to: key -> position, and the refs."""
    found: list[Bulk] = []
    _handles(value, found)
    keys, refs = {}, []
    for h in found:
        key = _key(h.ref)
        if key not in keys:
            keys[key] = len(refs)
            refs.append(h.ref)
    return keys, refs


def resolve(value: Any, fetch: Fetch, decoded: bool = True) -> Any:
    """`value` (arguments: nested lists, tuples, dicts) with every handle replaced by its value,
    all objects fetched by one `fetch`; decoded to float32 (decoded=True) or in the wire form
    (for a receiver that counts what it received before decoding it)."""
    keys, refs = _stored(value)
    if not refs:
        return value
    objects = fetch(refs)

    def got(h: Bulk) -> Any:
        v = objects[keys[_key(h.ref)]][h.kind]
        return decode_array(v) if decoded and h.encoded else v

    return _replace(value, got)


def rehome(value: Any, store: Callable[[list], list]) -> Any:
    """`value` with every handle's object stored again by `store` (the objects' refs -> the copies'
    refs, in order): the handles then refer to copies that no longer depend on whoever stored
    the originals."""
    keys, refs = _stored(value)
    if not refs:
        return value
    new = store(refs)
    return _replace(value, lambda h: replace(h, ref=new[keys[_key(h.ref)]]))


def _key(ref: Any) -> tuple:
    """Handles of one stored object share a key: an object-store reference, or (local backend)
    the stored dict itself, which is unhashable."""
    try:
        hash(ref)
    except TypeError:
        return ("id", id(ref))
    return ("ref", ref)


def local_fetch(refs: Sequence[Any]) -> list:
    """The local backend's store: a handle's reference is the stored object."""
    return list(refs)
