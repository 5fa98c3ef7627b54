"""Optional compression of the link's tensors: activations going up, cut-layer gradients coming down.

What moves is the compressed form, so the bytes counted are its size (the Ledger counts the
encoded payload like any other):
- fp16: a float16 array, 2 bytes a value (round to nearest even).
- bf16: the upper half of each float32 (its sign, exponent and 7 mantissa bits), 2 bytes a
  value, round to nearest even, sent as a uint16 array (numpy has no bfloat16).
- int8: symmetric, q = rint(x / s) clipped to [-127, 127] with s = max|x| / 127 per tensor or per
  channel; 1 byte a value plus a float32 scale (4 bytes) per tensor or channel. The channel axis
  is dim 1 of a feature map with 4 or more dims (N, C, H, W: one scale per conv channel) and
  the last dim otherwise ((B, F): one per feature; a transformer's (B, T, H): one per hidden unit).
Rounding is deterministic (no stochastic rounding), so both backends move the same bytes.
A tensor whose compressed form would not be finite (NaN or Inf in it, or beyond fp16's +-65504)
is refused with NonFiniteError, naming the cause: a cast would silently turn it into inf.

Only the payload kinds in COMPRESSIBLE, and only when they are float32 arrays, are encoded:
weights, labels and every other kind travel as they are. An encoded value is a small dict
({"fp16": a}, {"bf16": a} or {"int8": q, "scale": s}) that says how to decode it, so a
receiver needs no configuration: it decodes whatever arrives to float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from sfl_ray.runtime.finite import NonFiniteError
from sfl_ray.runtime.wire import payload_nbytes

COMPRESSIBLE = ("activations", "gradients")
MODES = ("none", "fp16", "bf16", "int8")
INT8_MAX = 127


def channel_axis(ndim: int) -> int:
    """The axis an int8 'channel' scale runs along (see the module docstring)."""
    return 1 if ndim >= 4 else ndim - 1


def to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even; NaN stays NaN."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    # A NaN's low mantissa bits may round into the exponent (or its sign); keep it a quiet NaN.
    return np.where(np.isnan(a), np.uint16(0x7FC0), rounded.astype(np.uint16))


def from_bf16_bits(b: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exactly."""
    return (b.astype(np.uint32) << np.uint32(16)).view(np.float32)


def quantize_int8(a: np.ndarray, per_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """(q int8, scale float32) with a ~= q * scale; scale broadcasts against a (keepdims)."""
    if not np.isfinite(a).all():
        # max|x| would be inf or NaN and every value would quantize to garbage: fail loudly.
        raise NonFiniteError("non-finite values cannot be quantized to int8 (training has diverged?)")
    if per_channel and a.ndim >= 2:
        axis = channel_axis(a.ndim)
        others = tuple(d for d in range(a.ndim) if d != axis)
        amax = np.max(np.abs(a), axis=others, keepdims=True, initial=0.0)
    else:
        amax = np.max(np.abs(a), keepdims=True, initial=0.0)
    scale = (amax / np.float32(INT8_MAX)).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1.0))  # an all-zero channel: q = 0 whatever the scale
    q = np.clip(np.rint(a / safe), -INT8_MAX, INT8_MAX).astype(np.int8)
    return q, scale


@dataclass(frozen=True)
class Codec:
    """The link's compression: `mode` (none, fp16, bf16, int8) and, for int8, the scale's extent."""

    mode: str = "none"
    int8_scale: str = "channel"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown link compression {self.mode!r}; one of {MODES}")
        if self.int8_scale not in ("tensor", "channel"):
            raise ValueError(f"unknown int8 scale {self.int8_scale!r}; tensor or channel")

    def encode_array(self, a: np.ndarray) -> Any:
        """One array in its wire form (unchanged if not float32 or mode none)."""
        if self.mode == "none" or not isinstance(a, np.ndarray) or a.dtype != np.float32:
            return a
        if self.mode == "fp16":
            with np.errstate(over="ignore"):
                h = a.astype(np.float16)
            if not np.isfinite(h).all():
                what = "non-finite values" if not np.isfinite(a).all() else "values beyond fp16's +-65504"
                raise NonFiniteError(f"{what} cannot be sent as fp16 (link.compression=bf16 keeps float32's range)")
            return {"fp16": h}
        if self.mode == "bf16":
            b = to_bf16_bits(a)
            if ((b & np.uint16(0x7F80)) == np.uint16(0x7F80)).any():  # all exponent bits set: inf or NaN
                raise NonFiniteError("non-finite values cannot be sent as bf16 (training has diverged?)")
            return {"bf16": b}
        q, scale = quantize_int8(a, self.int8_scale == "channel")
        return {"int8": q, "scale": scale}

    def encode(self, payload: Mapping[str, Any]) -> Mapping[str, Any]:
        """A packed payload (kind -> arrays) with its compressible kinds encoded; with mode none
        the very same object, so nothing changes."""
        if self.mode == "none" or not any(k in payload for k in COMPRESSIBLE):
            return payload
        return {k: self.encode_array(v) if k in COMPRESSIBLE else v for k, v in payload.items()}

    def nbytes(self, kind: str, value: Any) -> int:
        """Bytes `value` takes on the wire as payload kind `kind`."""
        return payload_nbytes(self.encode({kind: value})[kind])


def decode_array(v: Mapping[str, np.ndarray]) -> np.ndarray:
    """An encoded value (see Codec.encode_array) back to a float32 array."""
    if "fp16" in v:
        return v["fp16"].astype(np.float32)
    if "bf16" in v:
        return from_bf16_bits(v["bf16"])
    if "int8" in v:
        return v["int8"].astype(np.float32) * v["scale"]
    raise ValueError(f"not an encoded tensor: keys {sorted(v)}")


def decode(payload: Mapping[str, Any]) -> Mapping[str, Any]:
    """A received payload with every encoded value decoded to float32; the very same object if
    nothing in it was encoded (the receiver needs no configuration)."""
    if not any(isinstance(payload.get(k), Mapping) for k in COMPRESSIBLE):
        return payload
    return {k: decode_array(v) if k in COMPRESSIBLE and isinstance(v, Mapping) else v
            for k, v in payload.items()}
