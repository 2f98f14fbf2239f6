"""REUSEPORT echo server on several pollers (goev's REUSEPORT example).

    python examples/reactor_reuseport.py --port 8082 [--pollers 2]

One SO_REUSEPORT listening socket per poller, each bound to its own poller:
the kernel spreads incoming connections over the sockets and each
connection stays on the poller that accepted it. Every reply is prefixed
with the poller index ("<index>:" + data) so that a client can see the
spread.
"""
from __future__ import annotations

import argparse
import signal

import netpoll


class Echo(netpoll.EvHandler):
    def on_open(self) -> bool:
        self.prefix = b"%d:" % self.poller_index
        reactor = self.get_reactor()         # set while the handler is attached
        assert reactor is not None
        reactor.add_ev_handler(self, self.fd(), netpoll.EV_IN)
        return True

    def on_read(self) -> bool:
        data = self.read()
        if not data:
            return False
        self.write(self.prefix + bytes(data))
        return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8082)
    ap.add_argument("--pollers", type=int, default=2)
    args = ap.parse_args()
    reactor = netpoll.Reactor(poll_num=args.pollers)
    acceptor = netpoll.Acceptor(reactor, (args.host, args.port), Echo, reuse_port=True)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: reactor.stop())
    print(f"reuseport echo on {acceptor.addr} with {acceptor.num_listeners} listeners",
          flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
