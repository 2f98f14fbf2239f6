# LinkBuffer: Netpoll's nocopy_linkbuffer.go for Python, memory-safe.
#
# Memory model
#   chunk  - a block of memory from the pool, reference counted (atomically):
#            every node over it, every exported memoryview and every slice
#            holds a reference, so memory is never returned to the pool while
#            anything can still see it.
#   node   - a (chunk, off, len) range in one buffer's linked list.
#   A chunk's `used` is a high-water mark that only moves forward while anyone
#   else may hold a reference: bytes once handed out are never overwritten by
#   later writes. Only the buffer whose id is in `chunk.owner` may append into
#   [used, cap), and only from the node that ends exactly at `used`.
#
# Every np_lb_* function takes the buffer's mutex; see linkbuffer.pxd for the
# concurrency contract.

cimport cython
from cpython.buffer cimport (PyBUF_WRITABLE, PyBUF_SIMPLE, PyBuffer_FillInfo,
                             PyObject_GetBuffer, PyBuffer_Release)
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from cpython.mem cimport PyMem_RawMalloc, PyMem_RawFree
from cpython.unicode cimport PyUnicode_DecodeUTF8, PyUnicode_AsUTF8AndSize
from libc.stdint cimport uint64_t
from libc.string cimport memcpy, memchr, memset

from netpoll._core.includes.system cimport (
    iovec, np_spin_t, np_spin_init, np_spin_lock, np_spin_unlock,
    np_atomic_inc_int, np_atomic_dec_int, np_atomic_load_size, np_atomic_store_size,
)

cdef extern from "Python.h":
    object PyMemoryView_FromObject(object o)
    object PyMemoryView_FromMemory(char *mem, Py_ssize_t size, int flags)
    int PyBUF_READ

from netpoll.errors import BufferClosedError, BufferUnderflowError

# ------------------------------------------------------------------ the pool

cdef enum:
    MIN_CLASS_SHIFT = 12            # smallest class: 4 KiB
    NUM_CLASSES = 9                 # 4 KiB .. 1 MiB; larger requests go direct
    CACHE_BYTES_PER_CLASS = 4 << 20 # free chunks kept per class, beyond that freed
    DEFAULT_CHUNK = 8192            # chunk size when the writer gives no hint
    COPY_NOGIL_MIN = 65536          # copies this large drop the GIL
    ZERO_COPY_MIN = 1024            # our own views this large are appended by reference

cdef struct pool_class_t:
    np_chunk_t *free
    size_t cached
    size_t in_use

cdef np_spin_t pool_lock
cdef pool_class_t pool_classes[NUM_CLASSES]
cdef size_t direct_in_use = 0
cdef size_t direct_bytes = 0
cdef uint64_t next_buffer_id = 1
np_spin_init(&pool_lock)
memset(pool_classes, 0, sizeof(pool_classes))


cdef inline int _class_for(size_t size) noexcept nogil:
    cdef int cls = 0
    cdef size_t cap = <size_t>1 << MIN_CLASS_SHIFT
    while cap < size:
        cls += 1
        cap <<= 1
        if cls >= NUM_CLASSES:
            return -1
    return cls


cdef np_chunk_t *np_chunk_alloc(size_t size) noexcept nogil:
    """A chunk of at least `size` bytes with refcnt 1, or NULL when memory is out."""
    global direct_in_use, direct_bytes
    cdef int cls = _class_for(size)
    cdef np_chunk_t *c = NULL
    cdef size_t cap
    if cls >= 0:
        cap = <size_t>1 << (MIN_CLASS_SHIFT + cls)
        np_spin_lock(&pool_lock)
        c = pool_classes[cls].free
        if c != NULL:
            pool_classes[cls].free = c.next_free
            pool_classes[cls].cached -= 1
        pool_classes[cls].in_use += 1
        np_spin_unlock(&pool_lock)
        if c == NULL:
            c = <np_chunk_t *>PyMem_RawMalloc(sizeof(np_chunk_t) + cap)
            if c == NULL:
                np_spin_lock(&pool_lock)
                pool_classes[cls].in_use -= 1
                np_spin_unlock(&pool_lock)
                return NULL
    else:
        if size > (<size_t>-1) - sizeof(np_chunk_t):
            return NULL
        cap = size
        c = <np_chunk_t *>PyMem_RawMalloc(sizeof(np_chunk_t) + cap)
        if c == NULL:
            return NULL
        np_spin_lock(&pool_lock)
        direct_in_use += 1
        direct_bytes += cap
        np_spin_unlock(&pool_lock)
    c.data = <char *>(c + 1)
    c.cap = cap
    c.used = 0
    c.refcnt = 1
    c.cls = cls
    c.owner = 0
    c.next_free = NULL
    return c


cdef void np_chunk_incref(np_chunk_t *c) noexcept nogil:
    np_atomic_inc_int(&c.refcnt)


cdef void np_chunk_decref(np_chunk_t *c) noexcept nogil:
    global direct_in_use, direct_bytes
    if np_atomic_dec_int(&c.refcnt) != 0:
        return
    cdef int cls = c.cls
    cdef bint keep = False
    if cls >= 0:
        np_spin_lock(&pool_lock)
        pool_classes[cls].in_use -= 1
        if (pool_classes[cls].cached + 1) * c.cap <= CACHE_BYTES_PER_CLASS:
            c.next_free = pool_classes[cls].free
            pool_classes[cls].free = c
            pool_classes[cls].cached += 1
            keep = True
        np_spin_unlock(&pool_lock)
    else:
        np_spin_lock(&pool_lock)
        direct_in_use -= 1
        direct_bytes -= c.cap
        np_spin_unlock(&pool_lock)
    if not keep:
        PyMem_RawFree(c)


def pool_stats():
    """Snapshot of the chunk pool: memory referenced by live buffers and views
    ('bytes_in_use', 'chunks_in_use'), free chunks kept for reuse
    ('bytes_cached', 'chunks_cached'), and the same per size class."""
    cdef int i
    cdef size_t size, in_use = 0, cached = 0, bytes_in_use = 0, bytes_cached = 0
    classes = {}
    np_spin_lock(&pool_lock)
    try:
        for i in range(NUM_CLASSES):
            size = <size_t>1 << (MIN_CLASS_SHIFT + i)
            classes[size] = {"in_use": pool_classes[i].in_use, "cached": pool_classes[i].cached}
            in_use += pool_classes[i].in_use
            cached += pool_classes[i].cached
            bytes_in_use += pool_classes[i].in_use * size
            bytes_cached += pool_classes[i].cached * size
        result = {
            "chunks_in_use": in_use + direct_in_use,
            "bytes_in_use": bytes_in_use + direct_bytes,
            "chunks_cached": cached,
            "bytes_cached": bytes_cached,
            "direct_chunks_in_use": direct_in_use,
            "direct_bytes_in_use": direct_bytes,
            "classes": classes,
        }
    finally:
        np_spin_unlock(&pool_lock)
    return result


def pool_trim():
    """Free every cached chunk (the pool refills on demand)."""
    cdef int i
    cdef np_chunk_t *c
    cdef np_chunk_t *nxt
    for i in range(NUM_CLASSES):
        np_spin_lock(&pool_lock)
        c = pool_classes[i].free
        pool_classes[i].free = NULL
        pool_classes[i].cached = 0
        np_spin_unlock(&pool_lock)
        while c != NULL:
            nxt = c.next_free
            PyMem_RawFree(c)
            c = nxt

# ------------------------------------------------- list primitives (locked)

cdef inline np_node_t *_node_append(np_lb_t *lb, np_chunk_t *c, size_t off, size_t n) noexcept nogil:
    """Link a node over c[off:off+n] at the tail. Takes over one reference to c."""
    cdef np_node_t *node = lb.spare
    if node != NULL:
        lb.spare = NULL
    else:
        node = <np_node_t *>PyMem_RawMalloc(sizeof(np_node_t))
        if node == NULL:
            return NULL
    node.chunk = c
    node.off = off
    node.len = n
    node.next = NULL
    if lb.tail == NULL:
        lb.head = lb.tail = node
    else:
        lb.tail.next = node
        lb.tail = node
    return node


cdef inline void _node_free(np_lb_t *lb, np_node_t *node) noexcept nogil:
    np_chunk_decref(node.chunk)
    if lb.spare == NULL:
        lb.spare = node
    else:
        PyMem_RawFree(node)


cdef void _drop_all(np_lb_t *lb) noexcept nogil:
    cdef np_node_t *node = lb.head
    cdef np_node_t *nxt
    while node != NULL:
        nxt = node.next
        _node_free(lb, node)
        node = nxt
    lb.head = lb.tail = NULL
    lb.unflushed = 0
    np_atomic_store_size(&lb.readable, 0)


cdef char *_extend(np_lb_t *lb, size_t n) noexcept nogil:
    """Append n unflushed bytes at the tail and return where they go.

    Extends the tail node in place when this buffer owns the chunk's frontier;
    otherwise links a fresh chunk. The caller adds n to lb.unflushed."""
    cdef np_node_t *t = lb.tail
    cdef np_chunk_t *c
    cdef char *p
    cdef size_t size
    if t != NULL:
        c = t.chunk
        if c.owner == lb.id and t.off + t.len == c.used:
            if t.len == 0 and c.refcnt == 1 and not lb.reserving:
                # Exclusively ours and empty: nobody can see this memory, reuse it.
                t.off = 0
                c.used = 0
            if c.cap - c.used >= n:
                p = c.data + c.used
                c.used += n
                t.len += n
                return p
    size = n if n > lb.size_hint else lb.size_hint
    c = np_chunk_alloc(size)
    if c == NULL:
        return NULL
    c.owner = lb.id
    c.used = n
    if _node_append(lb, c, 0, n) == NULL:
        np_chunk_decref(c)
        return NULL
    return c.data


cdef void _consume(np_lb_t *lb, size_t n) noexcept nogil:
    """Drop n readable bytes from the front; spent nodes other than the tail go."""
    cdef np_node_t *h
    cdef size_t k
    cdef size_t left = n
    while left > 0:
        h = lb.head
        k = h.len if h.len < left else left
        h.off += k
        h.len -= k
        left -= k
        if h.len == 0 and h != lb.tail:
            lb.head = h.next
            _node_free(lb, h)
    # Empty nodes can also sit at the head (after malloc_ack of a whole node).
    while lb.head != NULL and lb.head.len == 0 and lb.head != lb.tail:
        h = lb.head
        lb.head = h.next
        _node_free(lb, h)
    np_atomic_store_size(&lb.readable, lb.readable - n)
    lb.total_out += n


cdef void _copy_out(np_lb_t *lb, char *dst, size_t n) noexcept nogil:
    cdef np_node_t *node = lb.head
    cdef size_t k
    while n > 0:
        k = node.len if node.len < n else n
        memcpy(dst, node.chunk.data + node.off, k)
        dst += k
        n -= k
        node = node.next


cdef bint _copy_locked(np_lb_t *lb, char *dst, size_t n, bint consume) noexcept nogil:
    """Copy (and with `consume`, drop) the next n readable bytes under the
    lock; False, with nothing changed, if they are not there."""
    cdef bint ok = False
    np_spin_lock(&lb.lock)
    if not lb.closed and lb.readable >= n:
        _copy_out(lb, dst, n)
        if consume:
            _consume(lb, n)
        ok = True
    np_spin_unlock(&lb.lock)
    return ok


cdef np_node_t *_first_data_node(np_lb_t *lb) noexcept nogil:
    cdef np_node_t *node = lb.head
    while node != NULL and node.len == 0:
        node = node.next
    return node


cdef inline void _publish(np_lb_t *lb, size_t n) noexcept nogil:
    lb.total_in += n
    np_atomic_store_size(&lb.readable, lb.readable + n)

# ---------------------------------------------------------- C-level API

cdef np_lb_t *np_lb_new(size_t size_hint) noexcept nogil:
    global next_buffer_id
    cdef np_lb_t *lb = <np_lb_t *>PyMem_RawMalloc(sizeof(np_lb_t))
    if lb == NULL:
        return NULL
    memset(lb, 0, sizeof(np_lb_t))
    np_spin_init(&lb.lock)
    lb.size_hint = size_hint if size_hint > 0 else DEFAULT_CHUNK
    np_spin_lock(&pool_lock)
    lb.id = next_buffer_id
    next_buffer_id += 1
    np_spin_unlock(&pool_lock)
    return lb


cdef void np_lb_clear(np_lb_t *lb) noexcept nogil:
    np_spin_lock(&lb.lock)
    if not lb.reserving:
        _drop_all(lb)
    np_spin_unlock(&lb.lock)


cdef void np_lb_free(np_lb_t *lb) noexcept nogil:
    if lb == NULL:
        return
    _drop_all(lb)
    PyMem_RawFree(lb.spare)
    PyMem_RawFree(lb)


cdef size_t np_lb_readable(np_lb_t *lb) noexcept nogil:
    return np_atomic_load_size(&lb.readable)


cdef char *np_lb_reserve(np_lb_t *lb, size_t want, size_t chunk, size_t *cap) noexcept nogil:
    cdef np_node_t *t
    cdef np_chunk_t *c = NULL
    cdef char *p
    cap[0] = 0
    np_spin_lock(&lb.lock)
    if lb.closed or lb.reserving or lb.unflushed:
        # Input buffers have no writer-side data, and one reservation at a time.
        np_spin_unlock(&lb.lock)
        return NULL
    if want == 0:
        want = 1
    t = lb.tail
    if t != NULL and t.chunk.owner == lb.id and t.off + t.len == t.chunk.used:
        c = t.chunk
        if t.len == 0 and c.refcnt == 1:
            # Exclusively ours and empty: nobody can see this memory, reuse it.
            t.off = 0
            c.used = 0
        if c.cap - c.used < want:
            c = NULL
    if c == NULL:
        if chunk < lb.size_hint:
            chunk = lb.size_hint
        c = np_chunk_alloc(want if want > chunk else chunk)
        if c == NULL:
            np_spin_unlock(&lb.lock)
            return NULL
        c.owner = lb.id
        if _node_append(lb, c, 0, 0) == NULL:
            np_chunk_decref(c)
            np_spin_unlock(&lb.lock)
            return NULL
    lb.reserving = 1
    cap[0] = c.cap - c.used
    p = c.data + c.used
    np_spin_unlock(&lb.lock)
    return p


cdef void np_lb_commit(np_lb_t *lb, size_t n) noexcept nogil:
    cdef np_node_t *t
    np_spin_lock(&lb.lock)
    if lb.reserving:
        lb.reserving = 0
        if n > 0 and not lb.closed:
            t = lb.tail
            t.chunk.used += n
            t.len += n
            _publish(lb, n)
    np_spin_unlock(&lb.lock)


cdef int np_lb_iovecs(np_lb_t *lb, iovec *iov, int maxiov, size_t *total) noexcept nogil:
    cdef np_node_t *node
    cdef size_t left, k, sum = 0
    cdef int cnt = 0
    np_spin_lock(&lb.lock)
    left = lb.readable
    node = lb.head
    while left > 0 and cnt < maxiov and node != NULL:
        if node.len > 0:
            k = node.len if node.len < left else left
            iov[cnt].iov_base = node.chunk.data + node.off
            iov[cnt].iov_len = k
            cnt += 1
            sum += k
            left -= k
        node = node.next
    np_spin_unlock(&lb.lock)
    total[0] = sum
    return cnt


cdef void np_lb_consume(np_lb_t *lb, size_t n, bint release) noexcept nogil:
    np_spin_lock(&lb.lock)
    if n > lb.readable:
        n = lb.readable
    if n > 0:
        _consume(lb, n)
    if release and lb.readable == 0 and lb.unflushed == 0 and not lb.reserving:
        _drop_all(lb)
    np_spin_unlock(&lb.lock)


cdef void np_lb_release(np_lb_t *lb) noexcept nogil:
    np_spin_lock(&lb.lock)
    if lb.readable == 0 and lb.unflushed == 0 and not lb.reserving:
        _drop_all(lb)
    np_spin_unlock(&lb.lock)

# ------------------------------------------------------------ Python views

@cython.final
@cython.freelist(64)
cdef class _ChunkView:
    """Exports chunk memory through the buffer protocol; holds a chunk reference
    so the memory outlives the buffer that produced it."""
    cdef np_chunk_t *chunk
    cdef char *ptr
    cdef Py_ssize_t size
    cdef bint readonly

    def __cinit__(self):
        self.chunk = NULL
        self.ptr = NULL
        self.size = 0
        self.readonly = True

    def __getbuffer__(self, Py_buffer *buf, int flags):
        if (flags & PyBUF_WRITABLE) and self.readonly:
            raise BufferError("netpoll: this view is read-only")
        PyBuffer_FillInfo(buf, self, self.ptr if self.ptr != NULL else <char *>"",
                          self.size, self.readonly, flags)

    def __releasebuffer__(self, Py_buffer *buf):
        pass

    def __dealloc__(self):
        if self.chunk != NULL:
            np_chunk_decref(self.chunk)
            self.chunk = NULL


cdef inline object _export(np_chunk_t *c, char *p, size_t n, bint readonly):
    """A memoryview over p[:n] inside chunk c; takes over one reference to c."""
    cdef _ChunkView v = _ChunkView.__new__(_ChunkView)
    v.chunk = c
    v.ptr = p
    v.size = <Py_ssize_t>n
    v.readonly = readonly
    return PyMemoryView_FromObject(v)


cdef Py_ssize_t _size_arg(object n, str what) except -1:
    if not isinstance(n, int):
        raise TypeError(f"{what} must be an int, not {type(n).__name__}")
    if n < 0:
        raise ValueError(f"{what} must be >= 0, got {n}")
    try:
        return <Py_ssize_t>n
    except OverflowError:
        raise ValueError(f"{what} is too large: {n}") from None


cdef class LinkBuffer:
    """A chain of pooled memory chunks with Netpoll's reader and writer API.

    Reads hand out zero-copy read-only memoryviews where the bytes are
    contiguous in one chunk, and one contiguous copy otherwise. Every view
    keeps its memory alive: after ``release()``, ``close()`` or later writes it
    still shows the bytes it showed. Written data becomes readable at
    ``flush()``. A read that cannot be satisfied raises
    :class:`~netpoll.BufferUnderflowError` and consumes nothing.

    One reader thread and one writer thread may use a buffer at the same time;
    every call is memory-safe under any interleaving.
    """

    def __cinit__(self):
        self.lb = NULL
        self.owns = False
        self.mode = LB_READ | LB_WRITE

    def __init__(self, size_hint=0):
        cdef Py_ssize_t hint = _size_arg(size_hint, "size_hint")
        if self.lb != NULL:
            if not self.owns:
                raise TypeError("a connection's buffer cannot be re-initialised")
            np_lb_clear(self.lb)
            self.lb.closed = 0
            if hint > 0:
                self.lb.size_hint = <size_t>hint
            return
        self.lb = np_lb_new(<size_t>hint)
        if self.lb == NULL:
            raise MemoryError()
        self.owns = True

    def __dealloc__(self):
        if self.owns and self.lb != NULL:
            np_lb_free(self.lb)
        self.lb = NULL

    # ------------------------------------------------------------ hooks

    cdef int _check(self, int need) except -1:
        if self.lb == NULL or self.lb.closed:
            raise BufferClosedError(f"{type(self).__name__} is closed")
        if not (self.mode & need):
            raise TypeError("this buffer is read-only" if need == LB_WRITE
                            else "this buffer is write-only")
        return 0

    cdef int _need(self, size_t n) except -1:
        cdef size_t have = np_lb_readable(self.lb)
        if have < n:
            raise BufferUnderflowError(f"read on {self!r}: need {n} bytes, {have} buffered")
        return 0

    cdef int _after_flush(self) except -1:
        return 0

    # ------------------------------------------------------------ reading

    cdef object _view(self, size_t n, bint consume):
        cdef np_lb_t *lb = self.lb
        cdef np_node_t *node
        cdef np_chunk_t *c = NULL
        cdef char *p = NULL
        self._need(n)
        if n == 0:
            # A fresh view each time: a shared one could be released by anyone.
            return PyMemoryView_FromObject(b"")
        np_spin_lock(&lb.lock)
        if lb.closed or lb.readable < n:
            np_spin_unlock(&lb.lock)
            self._check(LB_READ)
            raise BufferUnderflowError(f"read on {self!r}: need {n} bytes")
        node = _first_data_node(lb)
        if node.len >= n:
            c = node.chunk
            p = c.data + node.off
            np_chunk_incref(c)
            if consume:
                _consume(lb, n)
        np_spin_unlock(&lb.lock)
        if c != NULL:
            return _export(c, p, n, True)
        return self._gather(n, consume)

    cdef object _gather(self, size_t n, bint consume):
        """The next n bytes, which span chunks, copied into one fresh chunk
        and exported read-only: a view of our own memory, so write_binary can
        forward it to another buffer without a second copy."""
        cdef np_lb_t *lb = self.lb
        cdef np_chunk_t *c = np_chunk_alloc(n)
        cdef bint ok = True
        if c == NULL:
            raise MemoryError(f"cannot allocate {n} bytes")
        if n >= COPY_NOGIL_MIN:
            with nogil:
                ok = _copy_locked(lb, c.data, n, consume)
        else:
            ok = _copy_locked(lb, c.data, n, consume)
        if not ok:
            np_chunk_decref(c)
            self._check(LB_READ)
            raise BufferUnderflowError(f"read on {self!r}: need {n} bytes")
        c.used = n        # immutable from now on: nobody may extend it (owner 0)
        return _export(c, c.data, n, True)

    cdef object _copy(self, size_t n, bint consume):
        cdef np_lb_t *lb = self.lb
        self._need(n)
        cdef object out = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>n)
        cdef char *dst = PyBytes_AS_STRING(out)
        cdef bint ok = True
        if n >= COPY_NOGIL_MIN:
            with nogil:
                ok = _copy_locked(lb, dst, n, consume)
        else:
            ok = _copy_locked(lb, dst, n, consume)
        if not ok:
            self._check(LB_READ)
            raise BufferUnderflowError(f"read on {self!r}: need {n} bytes")
        return out

    cdef Py_ssize_t _find(self, unsigned char delim) except -2:
        """Offset of the first `delim` among the readable bytes, or -1."""
        cdef np_lb_t *lb = self.lb
        cdef np_node_t *node
        cdef size_t left, k, base = 0
        cdef const char *hit
        cdef Py_ssize_t found = -1
        np_spin_lock(&lb.lock)
        left = lb.readable
        node = lb.head
        while left > 0 and node != NULL:
            k = node.len if node.len < left else left
            if k > 0:
                hit = <const char *>memchr(node.chunk.data + node.off, delim, k)
                if hit != NULL:
                    found = <Py_ssize_t>(base + <size_t>(hit - (node.chunk.data + node.off)))
                    break
            base += k
            left -= k
            node = node.next
        np_spin_unlock(&lb.lock)
        return found

    def next(self, n):
        """Consume and return the next n bytes as a read-only memoryview."""
        self._check(LB_READ)
        return self._view(<size_t>_size_arg(n, "n"), True)

    def peek(self, n):
        """Return the next n bytes as a read-only memoryview without consuming them."""
        self._check(LB_READ)
        return self._view(<size_t>_size_arg(n, "n"), False)

    def skip(self, n):
        """Consume n bytes without looking at them."""
        self._check(LB_READ)
        cdef size_t k = <size_t>_size_arg(n, "n")
        self._need(k)
        if k:
            np_spin_lock(&self.lb.lock)
            if self.lb.readable >= k:
                _consume(self.lb, k)
            np_spin_unlock(&self.lb.lock)

    def until(self, delim):
        """Consume and return the bytes up to and including the first `delim`.

        `delim` is one byte: an int in 0..255 or a bytes-like object of length 1.
        """
        cdef Py_ssize_t idx
        cdef int d
        cdef Py_buffer pb
        self._check(LB_READ)
        if isinstance(delim, int):
            if not 0 <= delim <= 255:
                raise ValueError(f"delimiter must be in 0..255, got {delim}")
            d = delim
        elif isinstance(delim, str):
            raise TypeError("delimiter must be an int or one byte, not str")
        else:
            try:
                PyObject_GetBuffer(delim, &pb, PyBUF_SIMPLE)
            except TypeError:
                raise TypeError(f"delimiter must be an int or one byte, "
                                f"not {type(delim).__name__}") from None
            try:
                if pb.len != 1:
                    raise ValueError(f"delimiter must be exactly one byte, got {pb.len}")
                d = (<unsigned char *>pb.buf)[0]
            finally:
                PyBuffer_Release(&pb)
        while True:
            idx = self._find(<unsigned char>d)
            if idx >= 0:
                return self._view(<size_t>idx + 1, True)
            # Not buffered yet: connection readers wait for more, LinkBuffer raises.
            self._need(np_lb_readable(self.lb) + 1)
            self._check(LB_READ)

    def release(self):
        """Free the memory of bytes already read. Views handed out stay valid."""
        self._check(LB_READ)
        np_lb_release(self.lb)

    def read_string(self, n):
        """Consume n bytes and decode them as UTF-8 (nothing is consumed on a decode error)."""
        self._check(LB_READ)
        cdef size_t k = <size_t>_size_arg(n, "n")
        cdef object v = self._view(k, False)
        cdef Py_buffer pb
        PyObject_GetBuffer(v, &pb, PyBUF_SIMPLE)
        try:
            s = PyUnicode_DecodeUTF8(<char *>pb.buf, pb.len, NULL)
        finally:
            PyBuffer_Release(&pb)
        self.skip(k)
        return s

    def read_binary(self, n):
        """Consume n bytes and return them as a new bytes object."""
        self._check(LB_READ)
        return self._copy(<size_t>_size_arg(n, "n"), True)

    def read_byte(self):
        """Consume one byte and return it as an int."""
        cdef np_node_t *node
        cdef int b
        self._check(LB_READ)
        self._need(1)
        np_spin_lock(&self.lb.lock)
        if self.lb.readable < 1:
            np_spin_unlock(&self.lb.lock)
            raise BufferUnderflowError(f"read on {self!r}: need 1 byte")
        node = _first_data_node(self.lb)
        b = <unsigned char>node.chunk.data[node.off]
        _consume(self.lb, 1)
        np_spin_unlock(&self.lb.lock)
        return b

    def slice(self, n):
        """Consume n bytes and return them as an independent LinkBuffer that
        shares their memory (no copy). It stays valid after this buffer's
        release() or close()."""
        self._check(LB_READ)
        cdef size_t k = <size_t>_size_arg(n, "n")
        self._need(k)
        cdef LinkBuffer out = LinkBuffer()
        cdef np_lb_t *src = self.lb
        cdef np_lb_t *dst = out.lb
        cdef np_node_t *node
        cdef size_t left = k, take
        cdef bint oom = False
        np_spin_lock(&src.lock)
        if src.closed or src.readable < k:
            np_spin_unlock(&src.lock)
            self._check(LB_READ)
            raise BufferUnderflowError(f"read on {self!r}: need {k} bytes")
        node = src.head
        while left > 0:
            if node.len > 0:
                take = node.len if node.len < left else left
                np_chunk_incref(node.chunk)
                if _node_append(dst, node.chunk, node.off, take) == NULL:
                    np_chunk_decref(node.chunk)
                    oom = True
                    break
                left -= take
            node = node.next
        if not oom:
            _consume(src, k)
        np_spin_unlock(&src.lock)
        if oom:
            raise MemoryError()
        _publish(dst, k)
        return out

    def bytes(self):
        """All readable bytes as a new bytes object; nothing is consumed."""
        self._check(LB_READ)
        return self._copy(np_lb_readable(self.lb), False)

    def __len__(self):
        if self.lb == NULL or self.lb.closed:
            return 0
        return np_lb_readable(self.lb)

    def is_empty(self):
        """True when no readable bytes are buffered."""
        self._check(LB_READ)
        return np_lb_readable(self.lb) == 0

    # ------------------------------------------------------------ writing

    def malloc(self, n):
        """Reserve n bytes at the end of the buffer and return them as a writable
        memoryview. They become readable at flush()."""
        self._check(LB_WRITE)
        cdef size_t k = <size_t>_size_arg(n, "n")
        cdef np_lb_t *lb = self.lb
        cdef np_chunk_t *c
        cdef char *p
        if k == 0:
            return PyMemoryView_FromObject(bytearray())
        np_spin_lock(&lb.lock)
        p = _extend(lb, k)
        if p != NULL:
            lb.unflushed += k
            c = lb.tail.chunk
            np_chunk_incref(c)
        np_spin_unlock(&lb.lock)
        if p == NULL:
            raise MemoryError(f"cannot allocate {k} bytes")
        return _export(c, p, k, False)

    def malloc_len(self):
        """Bytes malloc'd or written since the last flush()."""
        self._check(LB_WRITE)
        return self.lb.unflushed

    def malloc_ack(self, n):
        """Keep only the first n unflushed bytes and discard the rest."""
        self._check(LB_WRITE)
        cdef size_t k = <size_t>_size_arg(n, "n")
        cdef np_lb_t *lb = self.lb
        cdef np_node_t *node
        cdef np_node_t *nxt
        cdef size_t keep, acc = 0
        np_spin_lock(&lb.lock)
        if k > lb.unflushed:
            np_spin_unlock(&lb.lock)
            raise ValueError(f"malloc_ack({k}) exceeds malloc_len() = {lb.unflushed}")
        keep = lb.readable + k
        node = lb.head
        while node != NULL:
            if acc + node.len >= keep:
                node.len = keep - acc
                # Everything after this node is discarded.
                nxt = node.next
                node.next = NULL
                lb.tail = node
                while nxt != NULL:
                    node = nxt.next
                    _node_free(lb, nxt)
                    nxt = node
                break
            acc += node.len
            node = node.next
        lb.unflushed = k
        np_spin_unlock(&lb.lock)

    cdef int _write(self, const char *src, size_t n) except -1:
        cdef np_lb_t *lb = self.lb
        cdef char *p
        if n == 0:
            return 0
        if n >= COPY_NOGIL_MIN:
            with nogil:
                np_spin_lock(&lb.lock)
                p = _extend(lb, n)
                if p != NULL:
                    memcpy(p, src, n)
                    lb.unflushed += n
                np_spin_unlock(&lb.lock)
        else:
            np_spin_lock(&lb.lock)
            p = _extend(lb, n)
            if p != NULL:
                memcpy(p, src, n)
                lb.unflushed += n
            np_spin_unlock(&lb.lock)
        if p == NULL:
            raise MemoryError(f"cannot allocate {n} bytes")
        return 0

    cdef bint _write_ref(self, object data, Py_buffer *pb) except -1:
        """Append a read-only view this module handed out by reference: its
        bytes are immutable (a chunk's bytes below `used` are never rewritten
        while referenced), so sharing the chunk is as good as a copy."""
        cdef _ChunkView cv
        cdef np_chunk_t *c
        cdef np_lb_t *lb = self.lb
        cdef char *p = <char *>pb.buf
        if pb.len < ZERO_COPY_MIN or type(data) is not memoryview:
            return False
        owner = (<object>data).obj
        if type(owner) is not _ChunkView:
            return False
        cv = <_ChunkView>owner
        c = cv.chunk
        if c == NULL or not cv.readonly or p < c.data or p + pb.len > c.data + c.used:
            return False
        np_chunk_incref(c)
        np_spin_lock(&lb.lock)
        if _node_append(lb, c, <size_t>(p - c.data), <size_t>pb.len) == NULL:
            np_spin_unlock(&lb.lock)
            np_chunk_decref(c)
            raise MemoryError()
        lb.unflushed += <size_t>pb.len
        np_spin_unlock(&lb.lock)
        return True

    def write_binary(self, data):
        """Append any bytes-like object; returns its length. Later changes to
        a mutable `data` do not affect what was written: it is copied, except
        a read-only view handed out by a netpoll buffer (immutable bytes),
        which is referenced without a copy."""
        self._check(LB_WRITE)
        cdef Py_buffer pb
        if isinstance(data, str):
            raise TypeError("write_binary takes bytes-like data, not str (use write_string)")
        PyObject_GetBuffer(data, &pb, PyBUF_SIMPLE)
        try:
            if not self._write_ref(data, &pb):
                self._write(<const char *>pb.buf, <size_t>pb.len)
            return pb.len
        finally:
            PyBuffer_Release(&pb)

    def write_string(self, s):
        """Append `s` encoded as UTF-8; returns the number of bytes written."""
        self._check(LB_WRITE)
        cdef Py_ssize_t size
        cdef const char *p
        if not isinstance(s, str):
            raise TypeError(f"write_string takes str, not {type(s).__name__}")
        p = PyUnicode_AsUTF8AndSize(s, &size)
        self._write(p, <size_t>size)
        return size

    def write_byte(self, b):
        """Append one byte given as an int in 0..255."""
        self._check(LB_WRITE)
        cdef char c
        if not isinstance(b, int):
            raise TypeError(f"write_byte takes an int, not {type(b).__name__}")
        if not 0 <= b <= 255:
            raise ValueError(f"byte must be in 0..255, got {b}")
        c = <char><unsigned char>b
        self._write(&c, 1)

    def write_direct(self, data, remain_cap):
        """Insert `data` into the unflushed bytes, `remain_cap` bytes before their
        end (Netpoll's WriteDirect): after ``m = malloc(a + b)``,
        ``write_direct(x, b)`` leaves ``m[:a] + x + m[a:]`` to be flushed.
        `data` is copied."""
        self._check(LB_WRITE)
        cdef Py_ssize_t remain = _size_arg(remain_cap, "remain_cap")
        cdef Py_buffer pb
        cdef np_lb_t *lb = self.lb
        cdef np_node_t *node
        cdef np_node_t *second
        cdef np_node_t *mid
        cdef np_node_t *after
        cdef np_chunk_t *c
        cdef size_t pos, acc = 0, k
        if isinstance(data, str):
            raise TypeError("write_direct takes bytes-like data, not str")
        PyObject_GetBuffer(data, &pb, PyBUF_SIMPLE)
        try:
            if <size_t>remain > lb.unflushed:
                raise ValueError(f"remain_cap {remain} exceeds malloc_len() = {lb.unflushed}")
            if remain == 0:
                self._write(<const char *>pb.buf, <size_t>pb.len)
                return
            if pb.len == 0:
                return
            c = np_chunk_alloc(<size_t>pb.len)
            if c == NULL:
                raise MemoryError()
            memcpy(c.data, pb.buf, <size_t>pb.len)
            c.used = <size_t>pb.len
            c.owner = 0   # nobody extends an inserted chunk
            mid = <np_node_t *>PyMem_RawMalloc(sizeof(np_node_t))
            second = <np_node_t *>PyMem_RawMalloc(sizeof(np_node_t))
            if mid == NULL or second == NULL:
                PyMem_RawFree(mid)
                PyMem_RawFree(second)
                np_chunk_decref(c)
                raise MemoryError()
            mid.chunk = c
            mid.off = 0
            mid.len = <size_t>pb.len
            np_spin_lock(&lb.lock)
            pos = lb.readable + lb.unflushed - <size_t>remain
            node = lb.head
            # 0 < remain <= unflushed, so pos is inside the data: the walk
            # stops on the node containing pos, which is split there.
            while acc + node.len < pos:
                acc += node.len
                node = node.next
            k = pos - acc
            after = node.next
            second.chunk = node.chunk
            second.off = node.off + k
            second.len = node.len - k
            second.next = after
            np_chunk_incref(node.chunk)
            node.len = k
            node.next = mid
            mid.next = second
            if lb.tail == node:
                lb.tail = second
            lb.unflushed += <size_t>pb.len
            np_spin_unlock(&lb.lock)
        finally:
            PyBuffer_Release(&pb)

    def append(self, LinkBuffer other not None):
        """Flush `other` and move all its data, without copying, to the end of
        this buffer's unflushed bytes; `other` is left empty and usable."""
        self._check(LB_WRITE)
        other._check(LB_READ | LB_WRITE)
        if other is self or other.lb == self.lb:
            raise ValueError("cannot append a buffer to itself")
        if other.mode != (LB_READ | LB_WRITE):
            raise TypeError("cannot append a connection's buffer")
        other.flush()
        cdef np_lb_t *src = other.lb
        cdef np_lb_t *dst = self.lb
        cdef np_lb_t *first = src if src.id < dst.id else dst
        cdef np_lb_t *second = dst if first == src else src
        cdef np_node_t *node
        cdef size_t moved = 0
        cdef bint oom = False
        np_spin_lock(&first.lock)
        np_spin_lock(&second.lock)
        node = src.head
        while node != NULL and moved < src.readable:
            if node.len > 0:
                np_chunk_incref(node.chunk)
                if _node_append(dst, node.chunk, node.off, node.len) == NULL:
                    np_chunk_decref(node.chunk)
                    oom = True
                    break
                moved += node.len
            node = node.next
        if not oom:
            dst.unflushed += moved
            src.total_out += moved
            _drop_all(src)
        np_spin_unlock(&second.lock)
        np_spin_unlock(&first.lock)
        if oom:
            raise MemoryError()

    def flush(self):
        """Make every written byte readable (for a connection: send it)."""
        self._check(LB_WRITE)
        cdef np_lb_t *lb = self.lb
        np_spin_lock(&lb.lock)
        if lb.unflushed:
            _publish(lb, lb.unflushed)
            lb.unflushed = 0
        np_spin_unlock(&lb.lock)
        self._after_flush()

    def close(self):
        """Free all buffered data. Idempotent; afterwards only close() may be
        called. Views and slices handed out earlier stay valid."""
        if self.lb == NULL or not self.owns:
            return
        np_spin_lock(&self.lb.lock)
        self.lb.closed = 1
        if not self.lb.reserving:
            _drop_all(self.lb)
        np_spin_unlock(&self.lb.lock)

    def __repr__(self):
        if self.lb == NULL or self.lb.closed:
            return f"<{type(self).__name__} closed>"
        return (f"<{type(self).__name__} readable={self.lb.readable} "
                f"unflushed={self.lb.unflushed}>")
