"""The local backend: the same pool, server and coordinator classes in one process, serial.

For debugging with pdb and as the reference the Ray backend must match to the last bit.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

from sfl_ray.data.partition import Partition
from sfl_ray.runtime.pool import ClientPool
from sfl_ray.runtime.protocol import ClientReply
from sfl_ray.runtime.server import ServerBlock
from sfl_ray.runtime.wire import owned


class LocalEndpoint:
    """A client's way to a server block living in the same process."""

    def __init__(self, server: ServerBlock):
        self.server = server

    def call(self, method: str, client: int, arrays: dict, info: dict) -> tuple[dict, dict]:
        # Copy both ways, as serialisation does on the Ray backend: the server must never hold
        # the device's own storage (that would change what the device's memory tracker sees).
        reply, reply_info = self.server.call(method, client, owned(arrays), info)
        return owned(reply), reply_info


class LocalExecutor:
    """One pool with every client, the server blocks, all called directly."""

    def __init__(self, algorithm_cls, blueprint, train_x, train_y, shards, num_servers: int):
        self.servers = ([ServerBlock(algorithm_cls, blueprint, i) for i in range(num_servers)]
                        if algorithm_cls.wants_server_blocks(blueprint.algorithm) else [])
        self.num_servers = len(self.servers)
        self.pool = ClientPool(algorithm_cls, blueprint, train_x, train_y,
                               Partition.from_lists(shards).hosted(0, 1), [LocalEndpoint(s) for s in self.servers])

    def run_clients(self, program: str, clients: Sequence[int], rnd: int, down: dict, parallel: bool,
                    on_done: Callable[[ClientReply], None],
                    per_client: Optional[Mapping[int, dict]] = None,
                    measure: Optional[Callable[[int], str]] = None) -> list[ClientReply]:
        replies = []
        for c in clients:
            r = self.pool.run(program, c, rnd, {**down, **per_client.get(c, {})} if per_client else down,
                              measure(c) if measure else "exact")
            # As serialisation does on Ray: the reply must not keep the device's tensors alive (an
            # upload shares its storage), or the device's memory tracker sees them live too long.
            r.up = owned(r.up)
            on_done(r)
            replies.append(r)
            if r.error and not parallel:
                break  # a sequential schedule cannot go on past a failed client
        return replies

    def client_states(self, clients: Optional[Sequence[int]] = None) -> dict:
        return self.pool.get_state(clients)

    def load_client_states(self, states: dict) -> None:
        self.pool.set_state(states)

    def server_control(self, index: int, method: str, *args: Any) -> Any:
        return self.servers[index].control(method, *args)

    def pop_server_flops(self) -> int:
        return sum(s.pop_flops() for s in self.servers)

    def keep_bulk(self, value: Any) -> Any:
        return value  # a handle holds its object itself here: nothing to lose

    def fit_server(self, request: Any) -> list[dict]:
        raise RuntimeError("the server training service (Ray Train) needs cluster.backend=ray")
