# Connection (Netpoll's connection_impl.go): blocking reads that wait for the
# poller, flushes that send directly from the calling thread, close callbacks,
# and process(): the rule for calling on_request.

import logging
import os
import socket as _socket

from libc.stdint cimport int64_t, uint64_t
from posix.unistd cimport dup

from netpoll._core.includes.system cimport (
    close, shutdown, SHUT_WR, ETIMEDOUT,
    pthread_mutex_lock, pthread_mutex_unlock, pthread_cond_broadcast,
    np_cond_wait_until, np_monotonic_ns, np_set_nodelay, np_is_inet,
)
from netpoll._core.linkbuffer cimport (
    LinkBuffer, LB_READ, LB_WRITE, np_lb_readable, np_lb_release, np_lb_clear,
)
from netpoll._core.poller cimport (
    Operator, Poller, np_conn_t, np_conn_new, np_conn_decref, np_poller_submit,
    np_on_poller_thread, np_update_mask_locked, np_relieve_limit_locked, np_send_locked, np_read_direct,
    np_flush_async, np_schedule_process, np_poller_kick,
    OP_CONN, RUN_POOL, RUN_INLINE, RUN_CUSTOM,
    TASK_TEARDOWN, TASK_ARM_IDLE, TASK_RESUME,
    CF_CLOSING, CF_USER_CLOSED, CF_PEER_EOF, CF_ERROR, CF_RUNNING, CF_SENDING,
    CF_WANT_WRITE, CF_PAUSED, CF_LIMITED, CF_FD_CLOSED, CF_SHUT_WR,
    CF_IDLE_FIRED, CF_HAS_HANDLER, CF_SHUT_WR_PENDING, CF_REGISTERED,
)
from netpoll._core.runner cimport WorkerPool

from netpoll.errors import (
    ConnectionClosedError, PeerClosedError, ReadTimeoutError, WriteTimeoutError,
)

log = logging.getLogger("netpoll")

cdef size_t _chunk_hint = 8192


def set_buffer_size(size_t n):
    """Preferred chunk size of the buffers of connections made from now on."""
    global _chunk_hint
    _chunk_hint = n if n > 0 else 8192


cdef enum:
    W_OK = 0
    W_PEER = 1
    W_CLOSED = 2
    W_TIMEOUT = 3
    W_ERROR = 4


cdef int64_t _timeout_ns(object seconds, str what) except -2:
    """None -> -1 (no limit); a non-negative number of seconds -> ns."""
    if seconds is None:
        return -1
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise TypeError(f"{what} must be a number of seconds or None, not {type(seconds).__name__}")
    if seconds != seconds or seconds < 0:
        raise ValueError(f"{what} must be >= 0 or None, got {seconds!r}")
    if seconds > 10 ** 9:
        return -1
    return <int64_t>(seconds * 1e9)


cdef inline int64_t _deadline(int64_t timeout_ns) noexcept nogil:
    return -1 if timeout_ns < 0 else np_monotonic_ns() + timeout_ns


cdef str _fmt_addr(object a):
    if a is None:
        return "?"
    if isinstance(a, tuple) and len(a) >= 2:
        return f"[{a[0]}]:{a[1]}" if ":" in str(a[0]) else f"{a[0]}:{a[1]}"
    if isinstance(a, bytes):
        a = a.decode("utf-8", "replace")
    return f"unix:{a}" if a else "unix:(unnamed)"


cdef str _describe(object conn):
    """The connection's repr for error and log messages."""
    if conn is None:
        return "<Connection (none)>"
    try:
        return repr(conn)
    except Exception:
        return "<Connection>"


cdef void _close_fd_unless(np_conn_t *c, unsigned int flags) noexcept nogil:
    """Close c's fd here (it is on no poller) unless already closed or any
    of `flags` is set."""
    cdef int fd = -1
    pthread_mutex_lock(&c.lock)
    if not (c.flags & (CF_FD_CLOSED | flags)) and c.fd >= 0:
        fd = c.fd
        c.fd = -1
        c.flags |= CF_FD_CLOSED
    pthread_mutex_unlock(&c.lock)
    if fd >= 0:
        close(fd)


cdef class ConnReader(LinkBuffer):
    """The connection's input: LinkBuffer's reader methods, blocking until the
    bytes arrive (bounded by the read timeout). Writer methods raise TypeError."""

    cdef int _check(self, int need) except -1:
        cdef np_conn_t *c
        if self.conn is None or self.conn.op == NULL:
            raise ConnectionClosedError(f"read on {_describe(self.conn)}: connection is not open")
        c = self.conn.op
        if c.flags & CF_USER_CLOSED:
            raise ConnectionClosedError(f"read on {_describe(self.conn)}: connection closed")
        if not (self.mode & need):
            raise TypeError(f"write on the reader of {_describe(self.conn)}: "
                            "a connection's reader cannot be written to")
        return 0

    cdef int _need(self, size_t n) except -1:
        cdef np_conn_t *c = self.conn.op
        cdef int rc = W_OK
        cdef int r
        cdef int64_t deadline
        if np_lb_readable(c.inbuf) >= n:
            return 0
        deadline = _deadline(c.read_timeout_ns)
        if np_on_poller_thread(c.poller):
            # Inline handler: nobody else will read this socket, so read it here.
            with nogil:
                pthread_mutex_lock(&c.lock)
                c.want = n
                pthread_mutex_unlock(&c.lock)
                rc = np_read_direct(c, deadline)
                pthread_mutex_lock(&c.lock)
                c.want = 0
                pthread_mutex_unlock(&c.lock)
        else:
            with nogil:
                pthread_mutex_lock(&c.lock)
                c.want = n
                np_relieve_limit_locked(c)   # it may need more than the limit
                while np_lb_readable(c.inbuf) < n:
                    if c.flags & CF_USER_CLOSED:
                        rc = W_CLOSED
                        break
                    if c.flags & (CF_PEER_EOF | CF_ERROR | CF_FD_CLOSED):
                        rc = W_PEER
                        break
                    c.waiters += 1
                    r = np_cond_wait_until(&c.cond, &c.lock, deadline)
                    c.waiters -= 1
                    if r == ETIMEDOUT and np_lb_readable(c.inbuf) < n:
                        rc = W_TIMEOUT
                        break
                c.want = 0
                pthread_mutex_unlock(&c.lock)
        if rc == W_OK or np_lb_readable(c.inbuf) >= n:
            return 0
        if rc == W_CLOSED:
            raise ConnectionClosedError(f"read on {_describe(self.conn)}: connection closed")
        if rc == W_TIMEOUT:
            raise ReadTimeoutError(
                f"read on {_describe(self.conn)}: no {n} bytes within the read timeout "
                f"({np_lb_readable(c.inbuf)} buffered)")
        raise PeerClosedError(
            f"read on {_describe(self.conn)}: peer closed with {np_lb_readable(c.inbuf)} "
            f"of {n} bytes buffered")

    def release(self):
        """Free the memory of bytes already read (views stay valid)."""
        cdef np_conn_t *c
        self._check(LB_READ)
        c = self.conn.op
        np_lb_release(c.inbuf)
        if c.flags & CF_LIMITED:
            pthread_mutex_lock(&c.lock)
            np_relieve_limit_locked(c)
            pthread_mutex_unlock(&c.lock)

    def __repr__(self):
        return f"<ConnReader of {self.conn!r} buffered={len(self)}>"


cdef class ConnWriter(LinkBuffer):
    """The connection's output: LinkBuffer's writer methods; flush() sends.

    From a worker or any other thread flush() writes directly and blocks until
    everything flushed is sent (or the write timeout passes). From an inline
    handler on the poller thread it queues the bytes and returns: the poller
    sends them right after the batch, bounded by the write timeout.
    Reader methods raise TypeError."""

    cdef int _check(self, int need) except -1:
        cdef np_conn_t *c
        if self.conn is None or self.conn.op == NULL:
            raise ConnectionClosedError(f"write on {_describe(self.conn)}: connection is not open")
        c = self.conn.op
        if c.flags & (CF_CLOSING | CF_FD_CLOSED):
            raise ConnectionClosedError(f"write on {_describe(self.conn)}: connection closed")
        if c.flags & CF_ERROR:
            raise ConnectionClosedError(
                f"write on {_describe(self.conn)}: {os.strerror(c.err) if c.err else 'socket error'}")
        if not (self.mode & need):
            raise TypeError(f"read on the writer of {_describe(self.conn)}: "
                            "a connection's writer cannot be read from")
        return 0

    cdef int _after_flush(self) except -1:
        cdef np_conn_t *c = self.conn.op
        cdef int rc = W_OK
        cdef int r
        cdef int64_t deadline
        cdef uint64_t target
        if np_lb_readable(c.outbuf) == 0:
            return 0
        if np_on_poller_thread(c.poller):
            np_flush_async(c)
            return 0
        deadline = _deadline(c.write_timeout_ns)
        # First attempt with the GIL held: the socket is non-blocking, so the
        # send cannot block, and keeping the GIL avoids handing it to another
        # thread and queueing to get it back for every reply.
        pthread_mutex_lock(&c.lock)
        target = c.outbuf.total_in
        if not (c.flags & (CF_SENDING | CF_WANT_WRITE | CF_USER_CLOSED | CF_FD_CLOSED
                           | CF_ERROR)):
            np_send_locked(c)
        if c.outbuf.total_out >= target:
            pthread_mutex_unlock(&c.lock)
            return 0
        pthread_mutex_unlock(&c.lock)
        with nogil:
            pthread_mutex_lock(&c.lock)
            while c.outbuf.total_out < target:
                if c.flags & (CF_USER_CLOSED | CF_FD_CLOSED):
                    rc = W_CLOSED
                    break
                if c.flags & CF_ERROR:
                    rc = W_ERROR
                    break
                if not (c.flags & (CF_SENDING | CF_WANT_WRITE)):
                    np_send_locked(c)
                    continue
                c.waiters += 1
                r = np_cond_wait_until(&c.cond, &c.lock, deadline)
                c.waiters -= 1
                if r == ETIMEDOUT and c.outbuf.total_out < target:
                    rc = W_TIMEOUT
                    break
            pthread_mutex_unlock(&c.lock)
        if rc == W_OK:
            return 0
        if rc == W_TIMEOUT:
            raise WriteTimeoutError(
                f"flush on {_describe(self.conn)}: not sent within the write timeout")
        if rc == W_ERROR:
            raise ConnectionClosedError(
                f"flush on {_describe(self.conn)}: {os.strerror(c.err) if c.err else 'socket error'}")
        raise ConnectionClosedError(f"flush on {_describe(self.conn)}: connection closed")

    def __repr__(self):
        return f"<ConnWriter of {self.conn!r} unflushed={self.lb.unflushed}>"


cdef class Connection(Operator):
    """A TCP or Unix stream connection served by a netpoll poller.

    Reads go through `reader` (blocking until the bytes arrive) and writes
    through `writer` (sent at flush()). `read()`/`write()` are socket-like
    shortcuts; `write()` is safe from several threads (whole writes never
    interleave). Created by EventLoop (server side) or dial_connection()."""

    def __init__(self, *args, **kwargs):
        raise TypeError("Connection objects are made by EventLoop and dial_connection()")

    def __cinit__(self):
        self.reader = None
        self.writer = None
        self._close_callbacks = []

    def __dealloc__(self):
        cdef np_conn_t *c = self.op
        if c == NULL:
            return
        self.op = NULL
        c.pyobj = NULL
        _close_fd_unless(c, CF_REGISTERED)    # never handed to a poller: ours to close
        np_conn_decref(c)

    cdef inline np_conn_t *_live(self) except NULL:
        if self.op == NULL or self.reader is None or self.writer is None:
            raise ConnectionClosedError("connection is not initialised")
        return self.op

    # ---------------------------------------------------------- dispatch

    cdef int _on_poller_event(self) except -1:
        if self._runner is not None and self.op.run_mode == RUN_CUSTOM:
            self._runner(self._run_task)
        else:
            self._process()
        return 0

    def _run_task(self):
        self._process()

    cdef int _call_handler(self) except -1:
        try:
            self._on_request(self._ctx, self)
        except (ConnectionClosedError, ReadTimeoutError, WriteTimeoutError) as e:
            log.debug("netpoll: handler for %s ended: %s", _describe(self), e)
            if isinstance(e, PeerClosedError):
                self._peer_gone()
            else:
                self._close(False)
            return 1
        except BaseException:
            log.exception("netpoll: on_request raised for %s; closing it", _describe(self))
            self._close(False)
            return 1
        return 0

    cdef int _process(self) except -1:
        """Run on_connect once, then on_request while it makes progress.

        Called with CF_RUNNING set (so never twice at once for one connection).
        After a call returns with unread input, on_request is called again at
        once if it consumed something or new bytes arrived meanwhile; otherwise
        the poller calls it when new bytes arrive. It never spins."""
        cdef np_conn_t *c = self.op
        cdef uint64_t rx0 = 0, out0 = 0
        cdef bint ran
        cdef unsigned int f
        if c == NULL:
            return 0
        while True:
            if c.flags & CF_CLOSING:
                return 0
            if not self._connected:
                self._connected = True
                if self._on_connect is not None:
                    try:
                        self._ctx = self._on_connect(self._ctx, self)
                    except BaseException:
                        log.exception("netpoll: on_connect raised for %s; closing it",
                                      _describe(self))
                        self._close(False)
                        return 0
            ran = False
            if (self._on_request is not None and np_lb_readable(c.inbuf) > 0
                    and not (c.flags & (CF_CLOSING | CF_IDLE_FIRED))):
                ran = True
                rx0 = c.rx_seq
                out0 = c.inbuf.total_out
                if self._call_handler():
                    return 0
                np_lb_release(c.inbuf)
            pthread_mutex_lock(&c.lock)
            np_relieve_limit_locked(c)
            f = c.flags
            if f & CF_CLOSING:
                pthread_mutex_unlock(&c.lock)
                return 0
            if (f & CF_IDLE_FIRED) or self._close_when_idle:
                pthread_mutex_unlock(&c.lock)
                self._close(False)
                return 0
            if self._on_request is not None and np_lb_readable(c.inbuf) > 0:
                if not ran or c.inbuf.total_out != out0 or c.rx_seq != rx0:
                    pthread_mutex_unlock(&c.lock)
                    continue
            if f & (CF_PEER_EOF | CF_ERROR):
                pthread_mutex_unlock(&c.lock)
                self._peer_gone()
                return 0
            c.flags &= ~CF_RUNNING
            pthread_mutex_unlock(&c.lock)
            return 0

    cdef int _peer_gone(self) except -1:
        """The peer closed (or reset): on_disconnect once, then close."""
        if self._connected and not self._disconnected:
            self._disconnected = True
            if self._on_disconnect is not None:
                try:
                    self._on_disconnect(self._ctx, self)
                except BaseException:
                    log.exception("netpoll: on_disconnect raised for %s", _describe(self))
        self._close(False)
        return 0

    cdef int _schedule_from_python(self) except -1:
        """Start a process() if one is due and none is running (any thread)."""
        cdef np_conn_t *c = self.op
        cdef bint go = False
        pthread_mutex_lock(&c.lock)
        if not (c.flags & (CF_RUNNING | CF_CLOSING | CF_FD_CLOSED)) and (
                (c.flags & (CF_PEER_EOF | CF_ERROR)) or
                (self._on_request is not None and np_lb_readable(c.inbuf) > 0)):
            c.flags |= CF_RUNNING
            go = True
        pthread_mutex_unlock(&c.lock)
        if go:
            np_schedule_process(c)
        return 0

    cdef int _on_teardown(self) except -1:
        cdef np_conn_t *c = self.op
        # The fd is closed. Give buffer memory back now rather than when the
        # cyclic GC collects this object (it and its reader/writer refer to
        # each other). Unread input stays for a handler-less client that the
        # peer closed: it may still read what arrived.
        np_lb_clear(c.outbuf)
        if (c.flags & CF_USER_CLOSED) or self._on_request is not None:
            np_lb_clear(c.inbuf)
        if self._poller is not None:
            self._poller.unregister(self)
        return 0

    # ---------------------------------------------------------- closing

    cdef int _close(self, bint user) except -1:
        cdef np_conn_t *c = self.op
        if c == NULL:
            return 0
        pthread_mutex_lock(&c.lock)
        if c.flags & CF_CLOSING:
            if user and not (c.flags & CF_USER_CLOSED):
                c.flags |= CF_USER_CLOSED
                pthread_cond_broadcast(&c.cond)
                pthread_mutex_unlock(&c.lock)
                np_poller_kick(c.poller)
                return 0
            pthread_mutex_unlock(&c.lock)
            return 0
        c.flags |= CF_CLOSING
        if user:
            c.flags |= CF_USER_CLOSED
        np_update_mask_locked(c)
        if c.waiters:
            pthread_cond_broadcast(&c.cond)
        pthread_mutex_unlock(&c.lock)
        np_poller_kick(c.poller)     # an inline handler may be blocked reading
        callbacks = self._close_callbacks
        self._close_callbacks = []
        for cb in reversed(callbacks):
            try:
                cb(self)
            except BaseException:
                log.exception("netpoll: close callback %r raised for %s", cb, _describe(self))
        owner = self._owner
        if owner is not None:
            try:
                owner._connection_closed(self)
            except BaseException:
                log.exception("netpoll: error while forgetting %s", _describe(self))
        if c.poller != NULL:
            np_poller_submit(c.poller, TASK_TEARDOWN, c, NULL)
        else:
            _close_fd_unless(c, 0)
        return 0

    def _close_when_done(self):
        """Graceful shutdown: close now if no handler runs, else when it returns."""
        cdef np_conn_t *c = self.op
        cdef bint idle
        if c == NULL:
            return
        self._close_when_idle = True
        pthread_mutex_lock(&c.lock)
        idle = not (c.flags & CF_RUNNING)
        if idle:
            c.flags |= CF_RUNNING
        pthread_mutex_unlock(&c.lock)
        if idle:
            self._close(False)

    def close(self):
        """Close the connection. Idempotent.

        Blocked reads and flushes wake with ConnectionClosedError; close
        callbacks run once, newest first, in this call; the fd is closed after
        them, once output already flushed has been sent (bounded by the write
        timeout, 5 s without one)."""
        if self._remote_addr is None and self.op != NULL and not (self.op.flags & CF_FD_CLOSED):
            self.local_addr, self.remote_addr   # remembered for repr() and messages after close
        self._close(True)

    def is_active(self):
        """False once the connection is closed or the peer has gone."""
        cdef np_conn_t *c = self.op
        if c == NULL:
            return False
        return not (c.flags & (CF_CLOSING | CF_FD_CLOSED | CF_PEER_EOF | CF_ERROR))

    def add_close_callback(self, callback):
        """Call `callback(conn)` once when the connection closes (newest first).
        On an already closed connection it is called at once."""
        if not callable(callback):
            raise TypeError("close callback must be callable")
        if self.op == NULL or self.op.flags & CF_CLOSING:
            callback(self)
            return
        self._close_callbacks.append(callback)

    def set_on_request(self, handler):
        """Set the on_request(ctx, conn) handler (None removes it)."""
        if handler is not None and not callable(handler):
            raise TypeError("on_request must be callable or None")
        cdef np_conn_t *c = self._live()
        self._on_request = handler
        pthread_mutex_lock(&c.lock)
        if handler is None:
            c.flags &= ~CF_HAS_HANDLER
        else:
            c.flags |= CF_HAS_HANDLER
        pthread_mutex_unlock(&c.lock)
        if handler is not None:
            self._schedule_from_python()

    def set_read_timeout(self, seconds):
        """Limit blocking reads to `seconds` (None: no limit)."""
        self._live().read_timeout_ns = _timeout_ns(seconds, "read timeout")

    def set_write_timeout(self, seconds):
        """Limit flushes to `seconds` (None: no limit)."""
        self._live().write_timeout_ns = _timeout_ns(seconds, "write timeout")

    def set_idle_timeout(self, seconds):
        """Close the connection after `seconds` without traffic in either
        direction while no handler runs (None: never)."""
        cdef np_conn_t *c = self._live()
        c.idle_timeout_ns = _timeout_ns(seconds, "idle timeout")
        if c.poller != NULL:
            np_poller_submit(c.poller, TASK_ARM_IDLE, c, NULL)

    def set_input_limit(self, nbytes):
        """Stop reading the socket while `nbytes` or more are buffered (None or
        0: no limit). TCP then pushes back on the peer."""
        cdef np_conn_t *c = self._live()
        if nbytes is None:
            nbytes = 0
        if isinstance(nbytes, bool) or not isinstance(nbytes, int):
            raise TypeError("input limit must be an int or None")
        if nbytes < 0:
            raise ValueError(f"input limit must be >= 0, got {nbytes}")
        pthread_mutex_lock(&c.lock)
        c.input_limit = <size_t>nbytes
        np_relieve_limit_locked(c)
        pthread_mutex_unlock(&c.lock)

    def pause_read(self):
        """Stop reading from the socket until resume_read(); buffered input
        stays readable."""
        cdef np_conn_t *c = self._live()
        pthread_mutex_lock(&c.lock)
        c.flags |= CF_PAUSED
        np_update_mask_locked(c)
        pthread_mutex_unlock(&c.lock)

    def resume_read(self):
        """Undo pause_read()."""
        cdef np_conn_t *c = self._live()
        pthread_mutex_lock(&c.lock)
        c.flags &= ~CF_PAUSED
        pthread_mutex_unlock(&c.lock)
        if c.poller != NULL:
            np_poller_submit(c.poller, TASK_RESUME, c, NULL)

    def shutdown_write(self):
        """Send our FIN after the output already flushed; keep reading."""
        cdef np_conn_t *c = self._live()
        self.writer._check(LB_WRITE)
        pthread_mutex_lock(&c.lock)
        if not (c.flags & (CF_SHUT_WR | CF_SHUT_WR_PENDING)):
            if np_lb_readable(c.outbuf) == 0 and not (c.flags & (CF_SENDING | CF_WANT_WRITE)):
                c.flags |= CF_SHUT_WR
                shutdown(c.fd, SHUT_WR)
            else:
                c.flags |= CF_SHUT_WR_PENDING
        pthread_mutex_unlock(&c.lock)

    # ---------------------------------------------------------- socket-like

    def read(self, n=65536):
        """Up to n (>= 1) bytes, waiting for at least one; b"" at EOF."""
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError("n must be an int")
        self._live()
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        try:
            self.reader._need(1)
        except PeerClosedError:
            return b""
        self.reader._check(LB_READ)
        k = len(self.reader)
        return self.reader.read_binary(k if k < n else n)

    def write(self, data):
        """Send all of `data` (bytes-like) and return len(data). Thread-safe:
        concurrent writes are sent whole, one after another.

        No lock is needed for that: write_binary appends the whole object in
        one critical section of the output buffer, and flush() sends
        everything appended so far. (A lock here would also deadlock an inline
        handler against a thread waiting for that poller to drain.)"""
        if isinstance(data, str):
            raise TypeError("write takes bytes-like data, not str")
        self._live()
        n = self.writer.write_binary(data)
        self.writer.flush()
        return n

    def fileno(self):
        """The socket's fd, or -1 once closed."""
        if self.op == NULL or self.op.flags & CF_FD_CLOSED:
            return -1
        return self.op.fd

    cdef object _addr(self, bint peer):
        cdef np_conn_t *c = self.op
        cdef int fd = -1
        if c == NULL:
            return None
        # dup under the lock the fd is closed under: never another socket's fd.
        pthread_mutex_lock(&c.lock)
        if not (c.flags & CF_FD_CLOSED) and c.fd >= 0:
            fd = dup(c.fd)
        pthread_mutex_unlock(&c.lock)
        if fd < 0:
            return None
        s = _socket.socket(fileno=fd)
        try:
            return s.getpeername() if peer else s.getsockname()
        except OSError:
            return None
        finally:
            s.close()

    @property
    def local_addr(self):
        """The local address (host, port) or Unix path."""
        if self._local_addr is None:
            self._local_addr = self._addr(False)
        return self._local_addr

    @property
    def remote_addr(self):
        """The peer's address (host, port) or Unix path ('' for an unnamed peer)."""
        if self._remote_addr is None:
            self._remote_addr = self._addr(True)
        return self._remote_addr

    def __repr__(self):
        """<Connection fd=N LOCAL->REMOTE STATE> (addresses are remembered
        from the first repr or close(); '?' when the fd closed before)."""
        cdef np_conn_t *c = self.op
        if c == NULL:
            return "<Connection (uninitialised)>"
        state = ("closed" if c.flags & CF_FD_CLOSED else "closing" if c.flags & CF_CLOSING
                 else "peer-closed" if c.flags & (CF_PEER_EOF | CF_ERROR) else "open")
        return (f"<Connection fd={c.fd} {_fmt_addr(self.local_addr)}->"
                f"{_fmt_addr(self.remote_addr)} {state}>")


cdef Connection new_connection(int fd, Poller poller, WorkerPool pool, object runner,
                               object owner):
    """Wrap a connected non-blocking socket fd; not yet registered."""
    cdef Connection conn = Connection.__new__(Connection)
    cdef np_conn_t *c = np_conn_new(fd, OP_CONN)
    if c == NULL:
        close(fd)
        raise MemoryError()
    conn.op = c
    c.pyobj = <void *>conn
    c.inbuf.size_hint = _chunk_hint
    c.outbuf.size_hint = _chunk_hint
    conn._poller = poller
    conn._pool = pool
    conn._owner = owner
    c.poller = poller.p if poller is not None else NULL
    if runner == "inline":
        c.run_mode = RUN_INLINE
    elif runner == "pool" or runner is None:
        c.run_mode = RUN_POOL
        c.pool = pool.q if pool is not None else NULL
        if c.pool == NULL:
            c.run_mode = RUN_INLINE
    else:
        c.run_mode = RUN_CUSTOM
        conn._runner = runner
    cdef ConnReader r = ConnReader.__new__(ConnReader)
    r.lb = c.inbuf
    r.owns = False
    r.mode = LB_READ
    r.conn = conn
    cdef ConnWriter w = ConnWriter.__new__(ConnWriter)
    w.lb = c.outbuf
    w.owns = False
    w.mode = LB_WRITE
    w.conn = conn
    conn.reader = r
    conn.writer = w
    if np_is_inet(fd):
        np_set_nodelay(fd)
    return conn


cdef int setup_connection(Connection conn, object on_request, object read_timeout,
                          object write_timeout, object idle_timeout,
                          size_t input_limit) except -1:
    """Handler, timeouts and input limit of a connection not yet registered:
    plain field stores (the register task arms the idle timer), so the
    accept path queues no extra task per connection."""
    cdef np_conn_t *c = conn.op
    c.read_timeout_ns = _timeout_ns(read_timeout, "read timeout")
    c.write_timeout_ns = _timeout_ns(write_timeout, "write timeout")
    c.idle_timeout_ns = _timeout_ns(idle_timeout, "idle timeout")
    c.input_limit = input_limit
    conn._on_request = on_request
    if on_request is not None:
        c.flags |= CF_HAS_HANDLER
    return 0


cdef int register_connection(Connection conn) except -1:
    conn._poller._register(conn)
    return 0


def wrap_socket_fd(int fd, Poller poller, WorkerPool pool=None, runner="pool", owner=None,
                   on_request=None, read_timeout=None, write_timeout=None, idle_timeout=None):
    """Wrap a connected, non-blocking socket fd (ownership passes to the
    connection) and register it with `poller`. Used by the Dialer."""
    cdef Connection conn = new_connection(fd, poller, pool, runner, owner)
    setup_connection(conn, on_request, read_timeout, write_timeout, idle_timeout, 0)
    conn._connected = True
    register_connection(conn)
    return conn
