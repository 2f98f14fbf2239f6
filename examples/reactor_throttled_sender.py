"""Timer-driven throttled sender (goev's download example).

    python examples/reactor_throttled_sender.py --port 8081 [--rate 65536] [--size 1048576]

Every connection is sent `--size` bytes at about `--rate` bytes per second:
an interval timer on the handler writes one slice per tick and stops when
everything is sent. Write back-pressure: when the peer reads slower than we
send, pending output passes the high watermark and the sender skips ticks
until it drains below the low one. The payload is a repeating pattern so a
client can check it: byte i is i % 251.
"""
from __future__ import annotations

import argparse
import signal

import netpoll

TICK = 0.01


def pattern(offset: int, n: int) -> bytes:
    base = bytes(range(251)) * (n // 251 + 2)
    k = offset % 251
    return base[k:k + n]


class Sender(netpoll.EvHandler):
    size = 1 << 20
    rate = 1 << 16

    def on_open(self) -> bool:
        self.sent = 0
        self.paused = False
        self.slice = max(1, int(self.rate * TICK))
        reactor = self.get_reactor()         # set while the handler is attached
        assert reactor is not None
        reactor.add_ev_handler(self, self.fd(), netpoll.EV_IN)
        self.set_watermarks(4 * self.slice + 65536, self.slice)
        self.tid = self.schedule_timer(0, TICK)
        return True

    def on_high_watermark(self, pending: int) -> None:
        self.paused = True

    def on_low_watermark(self, pending: int) -> None:
        self.paused = False

    def on_timeout(self, timer_id: int, now: float) -> bool:
        if self.paused:
            return True
        n = min(self.slice, self.size - self.sent)
        self.write(pattern(self.sent, n))
        self.sent += n
        if self.sent >= self.size:
            # Everything is queued: close once it is flushed.
            self.async_write(b"", lambda err: self.destroy())
            return False
        return True

    def on_read(self) -> bool:
        return len(self.read()) > 0     # the client only reads; EOF ends it


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8081)
    ap.add_argument("--rate", type=int, default=1 << 16, help="bytes per second")
    ap.add_argument("--size", type=int, default=1 << 20, help="bytes per connection")
    args = ap.parse_args()
    Sender.size, Sender.rate = args.size, args.rate
    reactor = netpoll.Reactor(poll_num=1)
    acceptor = netpoll.Acceptor(reactor, (args.host, args.port), Sender)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: reactor.stop())
    print(f"throttled sender on {acceptor.addr}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
