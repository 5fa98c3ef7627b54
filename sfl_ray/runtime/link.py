"""The link: the one way payloads cross the device/server boundary, and the record of their bytes.

Algorithms never count bytes. The runtime records the download a client receives, the
upload it returns, and every request/reply it exchanges with its server block here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol

from sfl_ray.metrics.device_cost import off_device
from sfl_ray.runtime.codec import Codec, decode
from sfl_ray.runtime.wire import pack, payload_nbytes, to_tensor

UP, DOWN = "up", "down"


@dataclass
class Ledger:
    """Bytes moved by one client in one program run, by (direction, kind), and message counts."""

    bytes: dict[tuple[str, str], int] = field(default_factory=dict)
    messages: dict[str, int] = field(default_factory=lambda: {UP: 0, DOWN: 0})
    count_labels: bool = True  # False: the FSL-SAGE reference's accounting (labels move, uncounted)

    def record(self, direction: str, payload: Mapping[str, Any]) -> None:
        """Record one message carrying `payload` (kind -> arrays) in `direction`."""
        if not payload:
            return
        for kind, value in payload.items():
            if kind == "labels" and not self.count_labels:
                continue
            key = (direction, kind)
            self.bytes[key] = self.bytes.get(key, 0) + payload_nbytes(value)
        self.messages[direction] += 1

    def total(self, direction: str) -> int:
        return sum(v for (d, _), v in self.bytes.items() if d == direction)


class ServerEndpoint(Protocol):
    """Where a client's requests go: a server block in this process or a Ray actor."""

    def call(self, method: str, client: int, arrays: dict, info: dict) -> tuple[dict, dict]: ...


class Link:
    """A client's side of the link to its server block: sends, receives, and accounts."""

    def __init__(self, endpoint: ServerEndpoint | None, client: int, ledger: Ledger, codec: Codec = Codec()):
        self._endpoint, self.client, self.ledger, self.codec = endpoint, client, ledger, codec

    def call(self, method: str, arrays: Mapping[str, Any], info: Mapping[str, Any] | None = None) -> tuple[dict, dict]:
        """Send `arrays` (kind -> tensor/array) to the server's `method`; return its reply as tensors.

        `info` carries scalar telemetry (e.g. the server's loss for the progress display):
        simulation bookkeeping that a real deployment would not need, so it is not counted.
        Activations go in the codec's compressed form, and the bytes counted are that form's;
        a compressed reply (gradients) is decoded after it is counted.
        """
        if self._endpoint is None:
            raise RuntimeError("this algorithm declared no server block, yet a client called one")
        wire = self.codec.encode(pack(arrays))
        self.ledger.record(UP, wire)
        with off_device():
            reply, reply_info = self._endpoint.call(method, self.client, wire, dict(info or {}))
        self.ledger.record(DOWN, reply)
        return {k: _received(v) for k, v in decode(reply).items()}, reply_info


def _received(value: Any) -> Any:
    """A reply value as the device uses it: arrays as tensors, state dicts (kind -> {name:
    array}) as numpy arrays, ready for load_weights."""
    if isinstance(value, Mapping):
        return dict(value)
    return to_tensor(value)
