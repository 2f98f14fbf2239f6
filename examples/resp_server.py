"""A small Redis-protocol (RESP2) server: an in-memory key-value store.

Commands: PING, ECHO, SET (EX/PX/NX/XX), GET, DEL, EXISTS, INCR, INCRBY, MGET,
MSET, EXPIRE, TTL, MULTI/EXEC/DISCARD (redis-py's default pipeline), and
CONFIG GET (which redis-benchmark sends at startup). Keys
expire lazily, when next touched. RESP2 only: redis-py >= 8 asks for RESP3 by
default, so connect with ``redis.Redis(port=6380, protocol=2)``. Inline commands
("PING\\r\\n", as typed into telnet or sent by redis-benchmark's PING_INLINE) work too.

Shows a per-connection parser as the loop's ctx, fed from the connection's
input view: hiredis' Reader keeps half a command until the rest arrives, so
the handler never waits and runs inline on the poller thread like Redis' own
event loop. Pipelined commands are answered in order with one ``flush()``.

Run:
    pip install hiredis          # or: pip install "netpoll[examples]"
    python examples/resp_server.py --port 6380
    redis-benchmark -p 6380 -t ping,set,get,incr -n 100000 -P 16 -q

TLS, as Redis' own ``tls-port`` (``--tls CERT KEY``: PEM files, the
certificate chain then its private key):
    python examples/resp_server.py --port 6380 --tls server.pem server.key
    redis-benchmark -p 6380 --tls --cacert ca.pem -t ping,set,get -q
    redis.Redis(port=6380, protocol=2, ssl=True, ssl_ca_certs="ca.pem")
"""
from __future__ import annotations

import argparse
import signal
import ssl
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import hiredis

import netpoll

# ------------------------------------------------------------------ replies

OK = b"+OK\r\n"
NIL = b"$-1\r\n"


def bulk(value: Optional[bytes]) -> bytes:
    return NIL if value is None else b"$%d\r\n%s\r\n" % (len(value), value)


def integer(n: int) -> bytes:
    return b":%d\r\n" % n


def array(items: List[Optional[bytes]]) -> bytes:
    return b"*%d\r\n" % len(items) + b"".join(bulk(i) for i in items)


def error(message: str) -> bytes:
    return b"-" + message.encode() + b"\r\n"


class CommandError(Exception):
    """Raised by a command to answer with an error reply."""


# -------------------------------------------------------------------- store

class Store:
    """Keys to values, with optional deadlines (time.monotonic() seconds)."""

    def __init__(self) -> None:
        self.data: Dict[bytes, bytes] = {}
        self.expires: Dict[bytes, float] = {}
        # With one poller and the inline runner commands never overlap, but
        # set_num_loops(n > 1) or the pool runner would run them concurrently.
        # Reentrant: EXEC holds it across the commands of a transaction.
        self.lock = threading.RLock()

    def get(self, key: bytes) -> Optional[bytes]:
        deadline = self.expires.get(key)
        if deadline is not None and deadline <= time.monotonic():
            self.delete(key)
            return None
        return self.data.get(key)

    def set(self, key: bytes, value: bytes, ttl: Optional[float] = None) -> None:
        self.data[key] = value
        if ttl is None:
            self.expires.pop(key, None)
        else:
            self.expires[key] = time.monotonic() + ttl

    def delete(self, key: bytes) -> bool:
        self.expires.pop(key, None)
        return self.data.pop(key, None) is not None


store = Store()
Command = Callable[[List[bytes]], bytes]
COMMANDS: Dict[bytes, Tuple[Command, int]] = {}


def command(name: str, arity: int) -> Callable[[Command], Command]:
    """Register a command; arity counts the name: n exactly, -n at least n (as Redis does)."""
    def register(fn: Command) -> Command:
        COMMANDS[name.encode()] = (fn, arity)
        return fn
    return register


def to_int(arg: bytes) -> int:
    try:
        return int(arg)
    except ValueError:
        raise CommandError("ERR value is not an integer or out of range") from None


@command("PING", -1)
def ping(args: List[bytes]) -> bytes:
    return bulk(args[0]) if args else b"+PONG\r\n"


@command("ECHO", 2)
def echo(args: List[bytes]) -> bytes:
    return bulk(args[0])


@command("SET", -3)
def set_(args: List[bytes]) -> bytes:
    key, value, options = args[0], args[1], [a.upper() for a in args[2:]]
    ttl: Optional[float] = None
    only: Optional[bytes] = None              # NX: only if absent, XX: only if present
    i = 0
    while i < len(options):
        opt = options[i]
        if opt in (b"NX", b"XX") and only in (None, opt):
            only = opt
        elif opt in (b"EX", b"PX") and ttl is None and i + 1 < len(options):
            i += 1
            n = to_int(options[i])
            if n <= 0:
                raise CommandError("ERR invalid expire time in 'set' command")
            ttl = n if opt == b"EX" else n / 1000
        else:
            raise CommandError("ERR syntax error")
        i += 1
    exists = store.get(key) is not None
    if (only == b"NX" and exists) or (only == b"XX" and not exists):
        return NIL
    store.set(key, value, ttl)
    return OK


@command("GET", 2)
def get(args: List[bytes]) -> bytes:
    return bulk(store.get(args[0]))


@command("DEL", -2)
def delete(args: List[bytes]) -> bytes:
    removed = 0
    for key in args:
        if store.get(key) is not None:        # get() first: an expired key does not count
            removed += store.delete(key)
    return integer(removed)


@command("EXISTS", -2)
def exists(args: List[bytes]) -> bytes:
    return integer(sum(store.get(k) is not None for k in args))


@command("INCRBY", 3)
def incrby(args: List[bytes]) -> bytes:
    key = args[0]
    n = to_int(store.get(key) or b"0") + to_int(args[1])
    store.data[key] = b"%d" % n               # not set(): INCR keeps the key's TTL
    return integer(n)


@command("INCR", 2)
def incr(args: List[bytes]) -> bytes:
    return incrby([args[0], b"1"])


@command("MGET", -2)
def mget(args: List[bytes]) -> bytes:
    return array([store.get(k) for k in args])


@command("MSET", -3)
def mset(args: List[bytes]) -> bytes:
    if len(args) % 2:
        raise CommandError("ERR wrong number of arguments for 'mset' command")
    for i in range(0, len(args), 2):
        store.set(args[i], args[i + 1])
    return OK


@command("EXPIRE", 3)
def expire(args: List[bytes]) -> bytes:
    key, seconds = args[0], to_int(args[1])
    if store.get(key) is None:
        return integer(0)
    if seconds <= 0:
        store.delete(key)
    else:
        store.expires[key] = time.monotonic() + seconds
    return integer(1)


@command("TTL", 2)
def ttl(args: List[bytes]) -> bytes:
    key = args[0]
    if store.get(key) is None:
        return integer(-2)
    deadline = store.expires.get(key)
    return integer(-1 if deadline is None else round(deadline - time.monotonic()))


@command("HELLO", -1)
def hello(args: List[bytes]) -> bytes:
    # RESP3 would change how replies are encoded (nulls, maps); this server
    # speaks RESP2 only, so a client asking for 3 gets Redis' own refusal.
    if args and args[0] != b"2":
        raise CommandError("NOPROTO this server speaks RESP2 only (redis-py: protocol=2)")
    return array([b"server", b"netpoll-resp", b"proto", b"2"])


CONFIG = {b"save": b"", b"appendonly": b"no"}


@command("CONFIG", -2)
def config(args: List[bytes]) -> bytes:
    # redis-benchmark asks for "save" and "appendonly" before it starts.
    if args[0].upper() != b"GET" or len(args) != 2:
        raise CommandError("ERR only CONFIG GET <parameter> is supported")
    name = args[1].lower()
    return array([name, CONFIG[name]] if name in CONFIG else [])


def execute(cmd: List[bytes]) -> bytes:
    entry = COMMANDS.get(cmd[0].upper())
    if entry is None:
        return error(f"ERR unknown command '{cmd[0].decode(errors='replace')}'")
    fn, arity = entry
    if (len(cmd) != arity) if arity > 0 else (len(cmd) < -arity):
        name = cmd[0].decode(errors="replace").lower()
        return error(f"ERR wrong number of arguments for '{name}' command")
    try:
        with store.lock:
            return fn(cmd[1:])
    except CommandError as e:
        return error(str(e))


class Session:
    """One connection's state: its RESP parser and a MULTI transaction, if open."""

    def __init__(self) -> None:
        self.parser = hiredis.Reader()
        self.queued: Optional[List[List[bytes]]] = None

    def run(self, cmd: List[bytes]) -> bytes:
        name = cmd[0].upper()
        if name == b"MULTI":
            if self.queued is not None:
                return error("ERR MULTI calls can not be nested")
            self.queued = []
            return OK
        if name in (b"EXEC", b"DISCARD"):
            if self.queued is None:
                return error(f"ERR {name.decode()} without MULTI")
            queued, self.queued = self.queued, None
            if name == b"DISCARD":
                return OK
            with store.lock:                  # no other client's command in between
                replies = [execute(c) for c in queued]
            return b"*%d\r\n" % len(replies) + b"".join(replies)
        if self.queued is not None:
            self.queued.append(cmd)
            return b"+QUEUED\r\n"
        return execute(cmd)


# ------------------------------------------------------------------ network

def read_inline(reader: netpoll.ConnReader) -> Optional[List[bytes]]:
    """One inline command ("SET k v\\r\\n") if a whole line is buffered, else None."""
    buffered = reader.peek(len(reader)).tobytes()
    end = buffered.find(b"\n")
    if end < 0:
        return None
    reader.skip(end + 1)
    return buffered[:end].split()


def on_prepare(conn: netpoll.Connection) -> Session:
    return Session()             # the ctx of every on_request on this connection


def on_request(session: Session, conn: netpoll.Connection) -> None:
    reader, writer, parser = conn.reader, conn.writer, session.parser
    close = False
    while True:
        if not parser.has_data() and len(reader) and reader.peek(1)[0] != ord("*"):
            # Between commands and the next byte is not an array: an inline
            # command. (Clients do not mix the two forms on one connection.)
            cmd = read_inline(reader)
            if cmd is None:
                break            # half a line: called again when more arrives
        else:
            if len(reader):
                # hiredis copies the bytes into its own buffer and keeps a
                # partial command there until the rest is fed.
                parser.feed(reader.next(len(reader)))  # type: ignore[arg-type]  # any buffer
            try:
                cmd = parser.gets()
            except hiredis.ProtocolError as e:
                writer.write_binary(error(f"ERR Protocol error: {e}"))
                close = True
                break
            if cmd is False:
                break            # no complete command buffered
            if not isinstance(cmd, list) or not all(isinstance(a, bytes) for a in cmd):
                writer.write_binary(error("ERR Protocol error: expected an array of bulk strings"))
                close = True
                break
        if cmd:                  # an empty line or "*0" is ignored, as Redis does
            writer.write_binary(session.run(cmd))
    writer.flush()               # every pipelined reply in one send
    if close:
        conn.close()             # the flushed error reply is still delivered


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=6380, help="0 lets the OS choose")
    ap.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"),
                    help="serve TLS with this certificate chain and private key (PEM)")
    args = ap.parse_args()

    ssl_ctx: Optional[ssl.SSLContext] = None
    if args.tls:
        ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_ctx.load_cert_chain(*args.tls)
    listener = netpoll.create_listener("tcp", (args.host, args.port), ssl=ssl_ctx)
    loop = netpoll.EventLoop(on_request, on_prepare=on_prepare, runner="inline")

    def stop(signum: int, frame: Any) -> None:
        threading.Thread(target=loop.shutdown, daemon=True).start()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    assert isinstance(listener.addr, tuple)     # TCP: (host, port)
    host, port = listener.addr
    print(f"listening on {host}:{port}", flush=True)
    loop.serve(listener)
    print("stopped", flush=True)


if __name__ == "__main__":
    main()
