from threading import Event
from typing import Any, Optional

from netpoll._core.connection import Connection
from netpoll._core.poller import Operator, Poller

class ListenerOperator(Operator):
    closed: bool
    torn_down: Event
    def __init__(self, fd: int, poller: Poller, server: Any) -> None: ...
    def close(self, timeout: Optional[float] = ...) -> None: ...

def accept_connection(fd: int, poller: Poller, pool: Any, runner: Any, server: Any,
                      on_request: Any, on_prepare: Any, on_connect: Any, on_disconnect: Any,
                      read_timeout: Optional[float], write_timeout: Optional[float],
                      idle_timeout: Optional[float], input_limit: Optional[int],
                      output_limit: Optional[int], sslctx: Any = ...,
                      handshake_timeout: Optional[float] = ...) -> Optional[Connection]: ...
