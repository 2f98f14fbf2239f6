"""Echo server on netpoll's Reactor (goev's simple service example).

    python examples/reactor_echo.py --port 8080 [--host 127.0.0.1] [--pollers 2]

Each connection is an EvHandler: on_open registers it for EV_IN, on_read
echoes what read() returned (a zero-copy view of the poller's read buffer),
returning False at EOF closes it. SIGINT/SIGTERM stop the reactor cleanly.
"""
from __future__ import annotations

import argparse
import signal

import netpoll


class Echo(netpoll.EvHandler):
    def on_open(self) -> bool:
        reactor = self.get_reactor()         # set while the handler is attached
        assert reactor is not None
        reactor.add_ev_handler(self, self.fd(), netpoll.EV_IN)
        return True

    def on_read(self) -> bool:
        data = self.read()
        if not data:
            return False
        self.write(data)
        return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--pollers", type=int, default=1)
    args = ap.parse_args()
    reactor = netpoll.Reactor(poll_num=args.pollers)
    acceptor = netpoll.Acceptor(reactor, (args.host, args.port), Echo)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: reactor.stop())
    print(f"echo server on {acceptor.addr}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
