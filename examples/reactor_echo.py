"""Echo server on netpoll's Reactor (goev's simple service example).

    python examples/reactor_echo.py --port 8080 [--host 127.0.0.1] [--pollers 2]
                                    [--tls CERT KEY]

Each connection is an EvHandler: on_open registers it for EV_IN, on_read
echoes what read() returned (a zero-copy view of the poller's read buffer),
returning False at EOF closes it. SIGINT/SIGTERM stop the reactor cleanly.

With ``--tls CERT KEY`` (PEM files) the Acceptor speaks TLS: the handshake
runs on the pollers before on_open, and the handler's code is unchanged
(read() gives plaintext, write() takes plaintext). Try it with
``openssl s_client -connect 127.0.0.1:8080``.
"""
from __future__ import annotations

import argparse
import signal
import ssl

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
    ap.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"),
                    help="serve TLS with this certificate chain and key (PEM)")
    args = ap.parse_args()
    ctx = None
    if args.tls:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(args.tls[0], args.tls[1])
    reactor = netpoll.Reactor(poll_num=args.pollers)
    acceptor = netpoll.Acceptor(reactor, (args.host, args.port), Echo, ssl=ctx)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: reactor.stop())
    print(f"echo server on {acceptor.addr}{' (TLS)' if ctx else ''}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
