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
#   malloc() hands out writable memory; flush() and malloc_ack() take that
#   write access back (see LinkBuffer.malloc and _detach).
#
# Locking: every np_lb_* function takes the buffer's spinlock for pointer and
# counter updates and copies of at most LOCKED_BYTES_MAX bytes. Chunks and
# nodes are allocated before it is taken (_wreserve, np_lb_reserve) and freed
# after it is dropped (nodes unlinked under it are handed to _reap); larger
# copies run outside it on chunk references (_walk_next, _wreserve). See
# linkbuffer.pxd for the concurrency contract.

cimport cython
from cpython.buffer cimport (PyBUF_WRITABLE, PyBUF_SIMPLE, PyBuffer_FillInfo,
                             PyObject_GetBuffer, PyBuffer_Release)
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from cpython.mem cimport PyMem_RawMalloc, PyMem_RawCalloc, PyMem_RawFree
from cpython.unicode cimport PyUnicode_DecodeUTF8, PyUnicode_AsUTF8AndSize
from cpython.ref cimport PyObject
from libc.stdint cimport uint64_t
from libc.string cimport memcpy, memchr, memset

from netpoll._core.includes.system cimport (
    iovec, np_spin_t, np_spin_init, np_spin_lock, np_spin_unlock,
    np_atomic_dec_int, np_atomic_load_int, np_atomic_store_int, np_atomic_store_size,
    np_take_injected_failure,
)

cdef extern from "Python.h":
    # Py_REFCNT, not ob_refcnt: free-threaded builds split the count in two fields.
    Py_ssize_t _refcnt "Py_REFCNT"(PyObject *o)

cdef extern from "<sched.h>" nogil:
    int sched_yield()

cdef extern from *:
    """
    #ifdef Py_GIL_DISABLED
    #define NP_FREE_THREADED 1
    #else
    #define NP_FREE_THREADED 0
    #endif
    """
    const int NP_FREE_THREADED

cdef extern from "compat.h" nogil:
    size_t np_atomic_load_size_relaxed(size_t *p)
    void np_atomic_store_size_relaxed(size_t *p, size_t v)
    size_t np_atomic_add_size(size_t *p, size_t v)
    size_t np_atomic_sub_size(size_t *p, size_t v)

cdef extern from "<pthread.h>" nogil:
    ctypedef int pthread_key_t
    int pthread_key_create(pthread_key_t *key, void (*destructor)(void *) noexcept nogil)
    int pthread_setspecific(pthread_key_t key, const void *value)

cdef extern from *:
    """
    /* The calling thread's chunk cache (linkbuffer.pyx, "the pool"): a plain
     * thread-local pointer for the fast path; a pthread key's destructor
     * hands the cache back when the thread exits. With glibc, initial-exec:
     * one %fs-relative load instead of a __tls_get_addr() call per access
     * (glibc keeps static TLS room for dlopen()ed modules that need a little). */
    #if defined(__GLIBC__)
    #define NP_LB_TLS __thread __attribute__((tls_model("initial-exec")))
    #else
    #define NP_LB_TLS __thread
    #endif
    static NP_LB_TLS void *np_lb_tc = NULL;
    static NP_LB_TLS int np_lb_tc_gone = 0;
    static inline void *np_lb_tc_get(void) { return np_lb_tc; }
    static inline void np_lb_tc_set(void *p) { np_lb_tc = p; }
    static inline int np_lb_tc_exiting(void) { return np_lb_tc_gone; }
    static inline void np_lb_tc_mark_exiting(void) { np_lb_tc_gone = 1; }
    """
    void *np_lb_tc_get() nogil
    void np_lb_tc_set(void *p) nogil
    bint np_lb_tc_exiting() nogil
    void np_lb_tc_mark_exiting() nogil

cdef extern from "Python.h":
    object PyMemoryView_FromObject(object o)
    object PyMemoryView_FromMemory(char *mem, Py_ssize_t size, int flags)
    int PyBUF_READ

from netpoll._validate import size as _validate_size
from netpoll.errors import BufferClosedError, BufferUnderflowError

# The largest preferred chunk size (as configure(buffer_size=...) allows).
_MAX_SIZE_HINT = 64 << 20

# ------------------------------------------------------------------ the pool
#
# Size classes of 4 KiB .. 1 MiB; larger requests are direct allocations.
# Free chunks live in two tiers:
#   - a cache per thread and class (classes up to 64 KiB), touched only by its
#     thread, without any lock: the steady state (allocate, use, free on one
#     thread, or a thread that frees as much as it allocates) takes no shared
#     lock at all;
#   - the shared pool per class, a stack of batches under pool_lock: a thread
#     cache refills by taking one batch and spills half of itself as one
#     batch, so pool_lock is taken once per several chunks and held for O(1)
#     pointer updates. Classes without a thread cache use it chunk by chunk.
# When a thread exits, a pthread key destructor moves its cache back to the
# shared pool (up to its cap; the rest is freed), so nothing leaks.
# Accounting: each thread counts the chunks it took minus those it gave back
# (modulo 2**64: a chunk may be freed by another thread than allocated it);
# their sum, plus what threads without a cache and exited threads counted,
# is the number of chunks in use.

cdef enum:
    MIN_CLASS_SHIFT = 12            # smallest class: 4 KiB
    NUM_CLASSES = 9                 # 4 KiB .. 1 MiB; larger requests go direct
    CACHE_BYTES_PER_CLASS = 4 << 20 # shared pool: free chunks kept per class, beyond that freed
    TC_BYTES_PER_CLASS = 128 << 10  # thread cache: free bytes kept per class and thread
    TC_MAX_CHUNKS = 32
    DEFAULT_CHUNK = 8192            # chunk size when the writer gives no hint
    COPY_NOGIL_MIN = 65536          # copies this large drop the GIL
    LOCKED_BYTES_MAX = 8192         # copies/scans up to this size run under the buffer lock
    ZERO_COPY_MIN = 1024            # our own views this large are appended by reference
    WALK_SEGS = 16                  # segments taken per lock round-trip by _walk_next

cdef struct pool_class_t:
    np_chunk_t *batches   # free chunks: a stack of batches (next_batch), each chained by next_free
    size_t cached         # chunks in `batches`
    size_t live           # taken minus returned by threads without a cache, and exited threads

cdef struct tcache_t:
    np_chunk_t *free[NUM_CLASSES]
    size_t cached[NUM_CLASSES]    # written by the owner only (relaxed), sampled by pool_stats
    size_t live[NUM_CLASSES]      # chunks this thread took minus chunks it gave back, mod 2**64
    tcache_t *prev
    tcache_t *next

cdef np_spin_t pool_lock           # guards pool_classes and next_buffer_id
cdef np_spin_t registry_lock       # guards the list of thread caches; taken before pool_lock
cdef pool_class_t pool_classes[NUM_CLASSES]
cdef size_t tc_max[NUM_CLASSES]    # thread cache capacity per class (0: no thread cache)
cdef tcache_t *tc_list = NULL
cdef size_t direct_in_use = 0      # atomic
cdef size_t direct_bytes = 0       # atomic
cdef uint64_t next_buffer_id = 1
cdef pthread_key_t tc_key
cdef bint tc_enabled = False


cdef inline int _class_for(size_t size) noexcept nogil:
    cdef int cls = 0
    cdef size_t cap = <size_t>1 << MIN_CLASS_SHIFT
    while cap < size:
        cls += 1
        cap <<= 1
        if cls >= NUM_CLASSES:
            return -1
    return cls


cdef inline void _pool_push(int cls, np_chunk_t *head, size_t n) noexcept nogil:
    """Push a chain of n free chunks (via next_free) as one batch. Under pool_lock."""
    head.batch_len = n
    head.next_batch = pool_classes[cls].batches
    pool_classes[cls].batches = head
    pool_classes[cls].cached += n


cdef inline bint _pool_fits(int cls, size_t n) noexcept nogil:
    return (pool_classes[cls].cached + n) << (MIN_CLASS_SHIFT + cls) <= CACHE_BYTES_PER_CLASS


cdef inline np_chunk_t *_pool_pop_batch(int cls, size_t *n) noexcept nogil:
    """Pop one batch (a next_free chain of *n chunks), or NULL. Under pool_lock."""
    cdef np_chunk_t *c = pool_classes[cls].batches
    if c == NULL:
        n[0] = 0
        return NULL
    pool_classes[cls].batches = c.next_batch
    n[0] = c.batch_len
    pool_classes[cls].cached -= c.batch_len
    return c


cdef void _free_chain(np_chunk_t *c) noexcept nogil:
    cdef np_chunk_t *nxt
    while c != NULL:
        nxt = c.next_free
        PyMem_RawFree(c)
        c = nxt


cdef void _tcache_exit(void *arg) noexcept nogil:
    """pthread key destructor: the thread is exiting; give its cache back."""
    global tc_list
    cdef tcache_t *tc = <tcache_t *>arg
    cdef np_chunk_t *drop[NUM_CLASSES]
    cdef int i
    np_lb_tc_set(NULL)
    np_lb_tc_mark_exiting()      # a chunk freed later on this thread goes to the shared pool
    np_spin_lock(&registry_lock)
    if tc.prev != NULL:
        tc.prev.next = tc.next
    else:
        tc_list = tc.next
    if tc.next != NULL:
        tc.next.prev = tc.prev
    np_spin_lock(&pool_lock)
    for i in range(NUM_CLASSES):
        pool_classes[i].live += tc.live[i]
        drop[i] = NULL
        if tc.free[i] != NULL:
            if _pool_fits(i, tc.cached[i]):
                _pool_push(i, tc.free[i], tc.cached[i])
            else:
                drop[i] = tc.free[i]
    np_spin_unlock(&pool_lock)
    np_spin_unlock(&registry_lock)
    for i in range(NUM_CLASSES):
        _free_chain(drop[i])
    PyMem_RawFree(tc)


cdef tcache_t *_tcache_new() noexcept nogil:
    global tc_list
    cdef tcache_t *tc
    if not tc_enabled or np_lb_tc_exiting():
        return NULL
    tc = <tcache_t *>PyMem_RawCalloc(1, sizeof(tcache_t))
    if tc == NULL:
        return NULL
    if pthread_setspecific(tc_key, tc) != 0:
        PyMem_RawFree(tc)
        return NULL
    np_lb_tc_set(tc)
    np_spin_lock(&registry_lock)
    tc.next = tc_list
    if tc_list != NULL:
        tc_list.prev = tc
    tc_list = tc
    np_spin_unlock(&registry_lock)
    return tc


cdef inline tcache_t *_tcache() noexcept nogil:
    """The calling thread's cache, created on first use; NULL while the
    thread exits or if it cannot be created (then the shared pool serves)."""
    cdef tcache_t *tc = <tcache_t *>np_lb_tc_get()
    if tc != NULL:
        return tc
    return _tcache_new()


# Chunk allocations left to fail (np_chunk_fail_next_allocs, for the tests).
cdef int _fail_allocs = 0


cdef void np_chunk_fail_next_allocs(int n) noexcept nogil:
    np_atomic_store_int(&_fail_allocs, n if n > 0 else 0)


cdef np_chunk_t *np_chunk_alloc(size_t size) noexcept nogil:
    """A chunk of at least `size` bytes with refcnt 1, or NULL when memory is out."""
    cdef int cls = _class_for(size)
    cdef np_chunk_t *c = NULL
    cdef tcache_t *tc = NULL
    cdef size_t cap, n
    if np_take_injected_failure(&_fail_allocs):
        return NULL
    if cls >= 0:
        cap = <size_t>1 << (MIN_CLASS_SHIFT + cls)
        if tc_max[cls]:
            tc = _tcache()
        if tc != NULL:
            c = tc.free[cls]
            if c == NULL:
                # Refill: one batch from the shared pool, O(1) under its lock.
                np_spin_lock(&pool_lock)
                c = _pool_pop_batch(cls, &n)
                np_spin_unlock(&pool_lock)
                np_atomic_store_size_relaxed(&tc.cached[cls], n)
            if c != NULL:
                tc.free[cls] = c.next_free
                np_atomic_store_size_relaxed(&tc.cached[cls], tc.cached[cls] - 1)
            np_atomic_store_size_relaxed(&tc.live[cls], tc.live[cls] + 1)
        else:
            np_spin_lock(&pool_lock)
            c = _pool_pop_batch(cls, &n)
            if n > 1:
                _pool_push(cls, c.next_free, n - 1)
            pool_classes[cls].live += 1
            np_spin_unlock(&pool_lock)
        if c == NULL:
            c = <np_chunk_t *>PyMem_RawMalloc(sizeof(np_chunk_t) + cap)
            if c == NULL:
                if tc != NULL:
                    np_atomic_store_size_relaxed(&tc.live[cls], tc.live[cls] - 1)
                else:
                    np_spin_lock(&pool_lock)
                    pool_classes[cls].live -= 1
                    np_spin_unlock(&pool_lock)
                return NULL
    else:
        if size > (<size_t>-1) - sizeof(np_chunk_t):
            return NULL
        cap = size
        c = <np_chunk_t *>PyMem_RawMalloc(sizeof(np_chunk_t) + cap)
        if c == NULL:
            return NULL
        np_atomic_add_size(&direct_in_use, 1)
        np_atomic_add_size(&direct_bytes, cap)
    c.data = <char *>(c + 1)
    c.cap = cap
    c.used = 0
    c.refcnt = 1
    c.cls = cls
    c.owner = 0
    c.next_free = NULL
    c.next_batch = NULL
    c.batch_len = 0
    return c


cdef void _chunk_free(np_chunk_t *c) noexcept nogil:
    """The last reference is gone: back to the thread cache, the shared pool or the system."""
    cdef int cls = c.cls
    cdef tcache_t *tc = NULL
    cdef np_chunk_t *head
    cdef np_chunk_t *last
    cdef size_t half, i
    cdef bint keep = False
    if cls < 0:
        np_atomic_sub_size(&direct_in_use, 1)
        np_atomic_sub_size(&direct_bytes, c.cap)
        PyMem_RawFree(c)
        return
    if tc_max[cls]:
        tc = _tcache()
    if tc != NULL:
        np_atomic_store_size_relaxed(&tc.live[cls], tc.live[cls] - 1)
        if tc.cached[cls] >= tc_max[cls]:
            # Spill the older half as one batch (the chain is walked outside the lock).
            half = tc_max[cls] // 2
            head = tc.free[cls]
            last = head
            for i in range(half - 1):
                last = last.next_free
            tc.free[cls] = last.next_free
            last.next_free = NULL
            np_atomic_store_size_relaxed(&tc.cached[cls], tc.cached[cls] - half)
            np_spin_lock(&pool_lock)
            if _pool_fits(cls, half):
                _pool_push(cls, head, half)
                head = NULL
            np_spin_unlock(&pool_lock)
            _free_chain(head)
        c.next_free = tc.free[cls]
        tc.free[cls] = c
        np_atomic_store_size_relaxed(&tc.cached[cls], tc.cached[cls] + 1)
        return
    c.next_free = NULL
    np_spin_lock(&pool_lock)
    pool_classes[cls].live -= 1
    if _pool_fits(cls, 1):
        _pool_push(cls, c, 1)
        keep = True
    np_spin_unlock(&pool_lock)
    if not keep:
        PyMem_RawFree(c)


cdef void np_chunk_decref(np_chunk_t *c) noexcept nogil:
    if np_atomic_dec_int(&c.refcnt) == 0:
        _chunk_free(c)


cdef void _pool_init():
    global tc_enabled
    cdef int i
    cdef size_t size
    np_spin_init(&pool_lock)
    np_spin_init(&registry_lock)
    memset(pool_classes, 0, sizeof(pool_classes))
    for i in range(NUM_CLASSES):
        size = <size_t>1 << (MIN_CLASS_SHIFT + i)
        tc_max[i] = TC_BYTES_PER_CLASS // size
        if tc_max[i] > TC_MAX_CHUNKS:
            tc_max[i] = TC_MAX_CHUNKS
        if tc_max[i] < 2:
            tc_max[i] = 0      # big chunks: the shared pool only
    tc_enabled = pthread_key_create(&tc_key, _tcache_exit) == 0


_pool_init()


def pool_stats():
    """Snapshot of the chunk pool.

    - 'chunks_in_use', 'bytes_in_use': memory referenced by live buffers,
      views and slices (pooled classes plus direct allocations);
    - 'chunks_cached', 'bytes_cached': free chunks in the shared pool (what
      pool_trim() frees);
    - 'thread_chunks_cached', 'thread_bytes_cached': free chunks held in the
      per-thread caches (at most 128 KiB per class and thread, classes up to
      64 KiB), and 'thread_caches' the number of such caches;
    - 'direct_chunks_in_use', 'direct_bytes_in_use': allocations above 1 MiB;
    - 'classes': {chunk size: {'in_use', 'cached', 'thread_cached'}}.

    Exact when no other thread allocates or frees meanwhile; otherwise a
    sample (per-thread counters are read without stopping their threads)."""
    cdef size_t g_cached[NUM_CLASSES]
    cdef size_t t_cached[NUM_CLASSES]
    cdef size_t live[NUM_CLASSES]
    cdef size_t ncaches = 0, d_chunks, d_bytes
    cdef tcache_t *tc
    cdef int i
    # Counters only, into C locals: no Python object is created while a lock
    # is held (the GC could run a finalizer that frees a chunk, which takes
    # pool_lock: a self-deadlock on a spinlock).
    np_spin_lock(&registry_lock)
    np_spin_lock(&pool_lock)
    for i in range(NUM_CLASSES):
        g_cached[i] = pool_classes[i].cached
        live[i] = pool_classes[i].live
        t_cached[i] = 0
    np_spin_unlock(&pool_lock)
    tc = tc_list
    while tc != NULL:
        ncaches += 1
        for i in range(NUM_CLASSES):
            t_cached[i] += np_atomic_load_size_relaxed(&tc.cached[i])
            live[i] += np_atomic_load_size_relaxed(&tc.live[i])
        tc = tc.next
    np_spin_unlock(&registry_lock)
    d_chunks = np_atomic_load_size_relaxed(&direct_in_use)
    d_bytes = np_atomic_load_size_relaxed(&direct_bytes)

    classes = {}
    in_use = cached = tcached = bytes_in_use = bytes_cached = tbytes = 0
    for i in range(NUM_CLASSES):
        size = 1 << (MIN_CLASS_SHIFT + i)
        # A sample taken while chunks move between threads can be transiently
        # negative (modular counters): report 0.
        n_live = <Py_ssize_t>live[i] if <Py_ssize_t>live[i] > 0 else 0
        classes[size] = {"in_use": n_live, "cached": g_cached[i], "thread_cached": t_cached[i]}
        in_use += n_live
        cached += g_cached[i]
        tcached += t_cached[i]
        bytes_in_use += n_live * size
        bytes_cached += g_cached[i] * size
        tbytes += t_cached[i] * size
    return {
        "chunks_in_use": in_use + d_chunks,
        "bytes_in_use": bytes_in_use + d_bytes,
        "chunks_cached": cached,
        "bytes_cached": bytes_cached,
        "thread_chunks_cached": tcached,
        "thread_bytes_cached": tbytes,
        "thread_caches": ncaches,
        "direct_chunks_in_use": d_chunks,
        "direct_bytes_in_use": d_bytes,
        "classes": classes,
    }


def pool_trim():
    """Free every chunk of the shared pool and of the calling thread's cache
    (the pool refills on demand). Other threads' caches are theirs to touch:
    they go back to the shared pool when their thread exits."""
    cdef int i
    cdef np_chunk_t *b
    cdef np_chunk_t *nxt
    cdef tcache_t *tc = <tcache_t *>np_lb_tc_get()
    for i in range(NUM_CLASSES):
        np_spin_lock(&pool_lock)
        b = pool_classes[i].batches
        pool_classes[i].batches = NULL
        pool_classes[i].cached = 0
        np_spin_unlock(&pool_lock)
        while b != NULL:
            nxt = b.next_batch
            _free_chain(b)
            b = nxt
        if tc != NULL:
            b = tc.free[i]
            tc.free[i] = NULL
            np_atomic_store_size_relaxed(&tc.cached[i], 0)
            _free_chain(b)

# ------------------------------------------------- list primitives
#
# A new node is the buffer's spare (taken under the lock, _spare_take) or
# is malloc'd after the lock is dropped (_node_new); functions that unlink
# nodes under the lock return them as a chain for _unlock_reap, which keeps
# one as the spare, drops the lock, and only then drops their chunk
# references and frees the rest.

cdef inline np_node_t *_spare_take(np_lb_t *lb) noexcept nogil:
    """The spare node or NULL (under the lock)."""
    cdef np_node_t *node = lb.spare
    lb.spare = NULL
    return node


cdef inline np_node_t *_node_new(np_node_t *node) noexcept nogil:
    """`node`, or a new one if it is NULL (without the lock)."""
    if node == NULL:
        node = <np_node_t *>PyMem_RawMalloc(sizeof(np_node_t))
    return node


cdef inline void _node_link(np_lb_t *lb, np_node_t *node, np_chunk_t *c, size_t off,
                            size_t n) noexcept nogil:
    """Link `node` over c[off:off+n] at the tail (under the lock). Takes over one reference to c."""
    node.chunk = c
    node.off = off
    node.len = n
    node.next = NULL
    if lb.tail == NULL:
        lb.head = lb.tail = node
        np_atomic_store_int(&lb.tailless, 0)
    else:
        lb.tail.next = node
        lb.tail = node


cdef void _reap(np_node_t *garbage) noexcept nogil:
    """Free a chain of unlinked nodes and their chunk references (without the lock)."""
    cdef np_node_t *nxt
    while garbage != NULL:
        nxt = garbage.next
        np_chunk_decref(garbage.chunk)
        PyMem_RawFree(garbage)
        garbage = nxt


cdef inline void _unlock_reap(np_lb_t *lb, np_node_t *garbage) noexcept nogil:
    """Drop the lock, then free `garbage` (a chain of unlinked nodes) and its
    chunk references; its first node becomes the spare if there is none."""
    cdef np_chunk_t *c = NULL
    if garbage != NULL and lb.spare == NULL:
        lb.spare = garbage
        c = garbage.chunk
        garbage = garbage.next
    np_spin_unlock(&lb.lock)
    if c != NULL:
        np_chunk_decref(c)
    if garbage != NULL:
        _reap(garbage)


cdef void _free_nodes(np_node_t *chain) noexcept nogil:
    """Free a chain of nodes that hold no chunk references (never linked)."""
    cdef np_node_t *nxt
    while chain != NULL:
        nxt = chain.next
        PyMem_RawFree(chain)
        chain = nxt


cdef np_node_t *_drop_all(np_lb_t *lb) noexcept nogil:
    """Unlink every node (under the lock); returns them for _reap."""
    cdef np_node_t *g = lb.head
    lb.head = lb.tail = NULL
    np_atomic_store_int(&lb.tailless, 1)
    lb.unflushed = 0
    lb.epoch += 1
    np_atomic_store_size(&lb.readable, 0)
    return g


cdef inline size_t _tail_room(np_lb_t *lb) noexcept nogil:
    """Bytes the tail node can grow by in place (under the lock): only when
    this buffer owns its chunk's frontier and the node ends there. An empty
    tail over a chunk nobody else references restarts at its beginning."""
    cdef np_node_t *t = lb.tail
    cdef np_chunk_t *c
    if t == NULL:
        return 0
    c = t.chunk
    if c.owner != lb.id or t.off + t.len != c.used:
        return 0
    if t.len == 0 and not lb.reserving and np_atomic_load_int(&c.refcnt) == 1:
        t.off = 0
        c.used = 0
    return c.cap - c.used


cdef inline char *_grow_tail(np_lb_t *lb, size_t n) noexcept nogil:
    """Append n unflushed bytes to the tail node (under the lock, after _tail_room)."""
    cdef np_node_t *t = lb.tail
    cdef char *p = t.chunk.data + t.chunk.used
    t.chunk.used += n
    t.len += n
    lb.unflushed += n
    return p


cdef char *_wreserve(np_lb_t *lb, size_t n, bint fresh, np_chunk_t **pc) noexcept nogil:
    """Append n (> 0) unflushed bytes at the tail and return where they go,
    with a reference to their chunk in *pc for the caller to drop once they
    are written (or to hand to a view). With `fresh` they never share a node
    with readable bytes, so _detach never re-points a node a reader may be
    sending from. A chunk is allocated before the lock is taken when the
    buffer has no tail (the usual case after a release), else after a first
    look; a node is the spare or malloc'd with the lock dropped. NULL on
    ENOMEM or when the buffer is closed."""
    cdef np_node_t *node = NULL
    cdef np_chunk_t *c = NULL
    cdef np_chunk_t *tc
    cdef np_node_t *t
    cdef char *p = NULL
    cdef bint need_chunk
    if np_atomic_load_int(&lb.tailless):
        c = np_chunk_alloc(n if n > lb.size_hint else lb.size_hint)
    while True:
        np_spin_lock(&lb.lock)
        if lb.closed:
            np_spin_unlock(&lb.lock)
            break
        t = lb.tail
        need_chunk = _tail_room(lb) < n
        if not need_chunk and (not fresh or t.len <= lb.unflushed):
            pc[0] = t.chunk
            np_chunk_incref(t.chunk)
            p = _grow_tail(lb, n)
            np_spin_unlock(&lb.lock)
            break
        if node == NULL:
            node = _spare_take(lb)
        if not need_chunk and node != NULL:
            # Room in the tail's chunk, but its node holds readable bytes: a node of our own.
            tc = t.chunk
            np_chunk_incref(tc)      # the node's
            np_chunk_incref(tc)      # the caller's
            p = tc.data + tc.used
            _node_link(lb, node, tc, tc.used, n)
            node = NULL
            tc.used += n
            lb.unflushed += n
            pc[0] = tc
            np_spin_unlock(&lb.lock)
            break
        if need_chunk and c != NULL and node != NULL:
            c.owner = lb.id
            c.used = n
            c.refcnt = 2             # the node's and the caller's (c is not shared yet)
            _node_link(lb, node, c, 0, n)
            node = NULL
            lb.unflushed += n
            pc[0] = c
            p = c.data
            c = NULL
            np_spin_unlock(&lb.lock)
            break
        np_spin_unlock(&lb.lock)
        node = _node_new(node)
        if node == NULL:
            break
        if need_chunk and c == NULL:
            c = np_chunk_alloc(n if n > lb.size_hint else lb.size_hint)
            if c == NULL:
                break
    if c != NULL:
        np_chunk_decref(c)
    PyMem_RawFree(node)      # unused (only if the buffer changed under us, or ENOMEM)
    return p


cdef int _write_fresh(np_lb_t *lb, const char *src, size_t n, np_node_t *node) noexcept nogil:
    """Append src[:n] in a new chunk, filled before it is linked (nobody can
    see it yet, so no reference is needed for the copy); `node` is the spare
    taken under the lock, or NULL. Called without the lock. -1 on ENOMEM or
    when the buffer is closed."""
    cdef np_chunk_t *c = np_chunk_alloc(n if n > lb.size_hint else lb.size_hint)
    if c == NULL:
        PyMem_RawFree(node)
        return -1
    memcpy(c.data, src, n)
    c.used = n
    c.owner = lb.id
    np_spin_lock(&lb.lock)
    if node == NULL:
        node = _spare_take(lb)
        if node == NULL:
            np_spin_unlock(&lb.lock)
            node = _node_new(NULL)
            np_spin_lock(&lb.lock)
    if lb.closed or node == NULL:
        np_spin_unlock(&lb.lock)
        np_chunk_decref(c)
        PyMem_RawFree(node)
        return -1
    _node_link(lb, node, c, 0, n)
    lb.unflushed += n
    np_spin_unlock(&lb.lock)
    return 0


cdef np_node_t *_consume(np_lb_t *lb, size_t n) noexcept nogil:
    """Drop n readable bytes from the front (under the lock); spent nodes
    other than the tail are unlinked and returned for _reap."""
    cdef np_node_t *h
    cdef np_node_t *g = NULL
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
            h.next = g
            g = h
    # Empty nodes can also sit at the head (after malloc_ack of a whole node).
    while lb.head != NULL and lb.head.len == 0 and lb.head != lb.tail:
        h = lb.head
        lb.head = h.next
        h.next = g
        g = h
    np_atomic_store_size(&lb.readable, lb.readable - n)
    lb.total_out += n
    return g


# Reading many bytes without holding the lock: _walk_next hands out up to
# WALK_SEGS (pointer, length) segments of the readable bytes per lock
# round-trip, each with a chunk reference, and remembers where it stopped.
# The remembered node stays valid as long as nothing was consumed or dropped
# (total_out and epoch unchanged): only the reader and clear/close free nodes
# holding readable bytes.

cdef struct walk_t:
    np_node_t *node
    size_t skip          # bytes of `node` already walked
    uint64_t total_out
    uint64_t epoch

cdef struct seg_t:
    np_chunk_t *chunk
    const char *p
    size_t n


cdef inline void _walk_begin(np_lb_t *lb, walk_t *w, np_node_t *node, size_t skip) noexcept nogil:
    """Start a walk at `node` (under the lock)."""
    w.node = node
    w.skip = skip
    w.total_out = lb.total_out
    w.epoch = lb.epoch


cdef inline bint _walk_valid(np_lb_t *lb, walk_t *w) noexcept nogil:
    return not lb.closed and lb.total_out == w.total_out and lb.epoch == w.epoch


cdef int _walk_next(np_lb_t *lb, walk_t *w, seg_t *segs, size_t left) noexcept nogil:
    """The next segments, `left` bytes at most; -1 if the buffer lost bytes
    since the walk began. Drop each segment's chunk with np_chunk_decref."""
    cdef int cnt = 0
    cdef np_node_t *node
    cdef size_t k
    np_spin_lock(&lb.lock)
    if not _walk_valid(lb, w):
        np_spin_unlock(&lb.lock)
        return -1
    node = w.node
    while left > 0 and cnt < WALK_SEGS and node != NULL:
        k = node.len - w.skip
        if k > left:
            k = left
        if k > 0:
            segs[cnt].chunk = node.chunk
            segs[cnt].p = node.chunk.data + node.off + w.skip
            segs[cnt].n = k
            np_chunk_incref(node.chunk)
            cnt += 1
            left -= k
        if w.skip + k < node.len:
            w.skip += k            # stopped inside this node (left is 0)
        else:
            node = node.next
            w.skip = 0
    w.node = node
    np_spin_unlock(&lb.lock)
    return cnt


cdef bint _copy_walk(np_lb_t *lb, char *dst, size_t n, bint consume) noexcept nogil:
    """_copy_locked for large n: the copying runs without the lock."""
    cdef walk_t w
    cdef seg_t segs[WALK_SEGS]
    cdef int cnt, i
    cdef size_t left = n
    cdef bint ok = True
    cdef np_node_t *g = NULL
    np_spin_lock(&lb.lock)
    if lb.closed or lb.readable < n:
        np_spin_unlock(&lb.lock)
        return False
    _walk_begin(lb, &w, lb.head, 0)
    np_spin_unlock(&lb.lock)
    while left > 0:
        cnt = _walk_next(lb, &w, segs, left)
        if cnt <= 0:
            return False
        for i in range(cnt):
            memcpy(dst, segs[i].p, segs[i].n)
            dst += segs[i].n
            left -= segs[i].n
            np_chunk_decref(segs[i].chunk)
    if consume:
        np_spin_lock(&lb.lock)
        ok = _walk_valid(lb, &w)
        if ok:
            g = _consume(lb, n)
        _unlock_reap(lb, g)
    return ok


cdef bint _copy_locked(np_lb_t *lb, char *dst, size_t n, bint consume) noexcept nogil:
    """Copy (and with `consume`, drop) the next n readable bytes; False, with
    nothing changed, if they are not there. Small copies run under the lock,
    larger ones through _copy_walk."""
    cdef bint ok = False
    cdef np_node_t *node
    cdef np_node_t *g = NULL
    cdef size_t k, left = n
    if n > LOCKED_BYTES_MAX:
        return _copy_walk(lb, dst, n, consume)
    np_spin_lock(&lb.lock)
    if not lb.closed and lb.readable >= n:
        node = lb.head
        while left > 0:
            k = node.len if node.len < left else left
            memcpy(dst, node.chunk.data + node.off, k)
            dst += k
            left -= k
            node = node.next
        if consume:
            g = _consume(lb, n)
        ok = True
    _unlock_reap(lb, g)
    return ok


cdef np_node_t *_first_data_node(np_lb_t *lb) noexcept nogil:
    cdef np_node_t *node = lb.head
    while node != NULL and node.len == 0:
        node = node.next
    return node


cdef inline void _publish(np_lb_t *lb, size_t n) noexcept nogil:
    lb.total_in += n
    np_atomic_store_size(&lb.readable, lb.readable + n)


cdef int _detach(np_lb_t *lb, np_chunk_t *c, char *p, size_t n) noexcept nogil:
    """Give the unflushed nodes over chunk c that overlap p[:n] a private copy
    of their bytes, so that whoever still writes through p[:n] changes nothing
    this buffer holds. Only unflushed nodes are re-pointed (a malloc region
    never shares a node with readable bytes, see _wreserve), so no reader or
    sender ever sees a node change under it. The caller holds a reference to
    c. Rare (a malloc view still exported at flush), so the node walk runs
    under the lock; the copy does not. -1 on ENOMEM."""
    cdef size_t rlo = <size_t>(p - c.data)
    cdef size_t rhi = rlo + n
    cdef size_t lo = <size_t>-1, hi = 0, acc, ready, moved = 0, i
    cdef np_node_t *node
    cdef np_chunk_t *nc
    np_spin_lock(&lb.lock)
    ready = lb.readable
    acc = 0
    node = lb.head
    while node != NULL:
        if node.chunk == c and acc >= ready and node.len > 0 \
                and node.off < rhi and rlo < node.off + node.len:
            if node.off < lo:
                lo = node.off
            if node.off + node.len > hi:
                hi = node.off + node.len
        acc += node.len
        node = node.next
    np_spin_unlock(&lb.lock)
    if hi == 0:
        return 0               # nothing of it is buffered any more (malloc_ack cut it)
    nc = np_chunk_alloc(hi - lo)
    if nc == NULL:
        return -1
    memcpy(nc.data, c.data + lo, hi - lo)   # c is alive: the caller holds a reference
    nc.used = hi - lo
    nc.owner = lb.id           # the tail may go on growing into it
    np_spin_lock(&lb.lock)
    ready = lb.readable
    acc = 0
    node = lb.head
    while node != NULL:
        if node.chunk == c and acc >= ready and node.len > 0 \
                and node.off >= lo and node.off + node.len <= hi \
                and node.off < rhi and rlo < node.off + node.len:
            node.chunk = nc
            node.off -= lo
            np_chunk_incref(nc)
            moved += 1
        acc += node.len
        node = node.next
    np_spin_unlock(&lb.lock)
    for i in range(moved):
        np_chunk_decref(c)
    np_chunk_decref(nc)
    return 0

# ---------------------------------------------------------- C-level API

cdef np_lb_t *np_lb_new(size_t size_hint) noexcept nogil:
    global next_buffer_id
    cdef np_lb_t *lb = <np_lb_t *>PyMem_RawMalloc(sizeof(np_lb_t))
    if lb == NULL:
        return NULL
    memset(lb, 0, sizeof(np_lb_t))
    np_spin_init(&lb.lock)
    lb.tailless = 1
    lb.size_hint = size_hint if size_hint > 0 else DEFAULT_CHUNK
    np_spin_lock(&pool_lock)
    lb.id = next_buffer_id
    next_buffer_id += 1
    np_spin_unlock(&pool_lock)
    return lb


cdef void np_lb_clear(np_lb_t *lb) noexcept nogil:
    cdef np_node_t *g = NULL
    np_spin_lock(&lb.lock)
    if not lb.reserving:
        g = _drop_all(lb)
    _unlock_reap(lb, g)


cdef void np_lb_free(np_lb_t *lb) noexcept nogil:
    if lb == NULL:
        return
    _reap(_drop_all(lb))
    PyMem_RawFree(lb.spare)
    PyMem_RawFree(lb)


cdef char *np_lb_reserve(np_lb_t *lb, size_t want, size_t chunk, size_t *cap) noexcept nogil:
    cdef np_chunk_t *c = NULL
    cdef np_chunk_t *tc
    cdef np_node_t *node = NULL
    cdef char *p = NULL
    cap[0] = 0
    if want == 0:
        want = 1
    if chunk < lb.size_hint:
        chunk = lb.size_hint
    if chunk < want:
        chunk = want
    if np_atomic_load_int(&lb.tailless):
        c = np_chunk_alloc(chunk)     # no tail: a new chunk will be needed (allocated unlocked)
    while True:
        np_spin_lock(&lb.lock)
        if lb.closed or lb.reserving or lb.unflushed:
            # Input buffers have no writer-side data, and one reservation at a time.
            np_spin_unlock(&lb.lock)
            break
        if _tail_room(lb) >= want:
            tc = lb.tail.chunk
            lb.reserving = 1
            cap[0] = tc.cap - tc.used
            p = tc.data + tc.used
            np_spin_unlock(&lb.lock)
            break
        if node == NULL:
            node = _spare_take(lb)
        if c != NULL and node != NULL:
            c.owner = lb.id
            _node_link(lb, node, c, 0, 0)
            node = NULL
            lb.reserving = 1
            cap[0] = c.cap
            p = c.data
            c = NULL
            np_spin_unlock(&lb.lock)
            break
        np_spin_unlock(&lb.lock)
        # Allocate without the lock, then look again.
        node = _node_new(node)
        if node == NULL:
            break
        if c == NULL:
            c = np_chunk_alloc(chunk)
            if c == NULL:
                break
    if c != NULL:
        np_chunk_decref(c)
    PyMem_RawFree(node)      # unused (only if the buffer changed under us, or ENOMEM)
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
    cdef np_node_t *g = NULL
    cdef np_node_t *rest = NULL
    np_spin_lock(&lb.lock)
    if n > lb.readable:
        n = lb.readable
    if n > 0:
        g = _consume(lb, n)
    if release and lb.readable == 0 and lb.unflushed == 0 and not lb.reserving:
        rest = _drop_all(lb)
    _unlock_reap(lb, rest)
    if g != NULL:
        _reap(g)


cdef void np_lb_release(np_lb_t *lb) noexcept nogil:
    cdef np_node_t *g = NULL
    np_spin_lock(&lb.lock)
    if lb.readable == 0 and lb.unflushed == 0 and not lb.reserving:
        g = _drop_all(lb)
    _unlock_reap(lb, g)

# ------------------------------------------------------------ Python views

@cython.final
@cython.freelist(64)
cdef class _ChunkView:
    """Exports chunk memory through the buffer protocol; holds a chunk reference
    so the memory outlives the buffer that produced it."""
    cdef np_chunk_t *chunk
    cdef char *ptr
    cdef Py_ssize_t size
    cdef bint readonly     # what new exports get
    cdef bint mutable      # was ever exported writable (a malloc view): never shared by reference
    cdef int exports       # live buffer exports (memoryviews' managed buffers, numpy, ...)

    # No __cinit__: the only constructor is _exporter(), which sets every
    # field (the allocator and the freelist hand out zeroed objects).

    def __getbuffer__(self, Py_buffer *buf, int flags):
        if (flags & PyBUF_WRITABLE) and self.readonly:
            raise BufferError("netpoll: this view is read-only")
        PyBuffer_FillInfo(buf, self, self.ptr if self.ptr != NULL else <char *>"",
                          self.size, self.readonly, flags)
        self.exports += 1

    def __releasebuffer__(self, Py_buffer *buf):
        self.exports -= 1

    def __dealloc__(self):
        if self.chunk != NULL:
            np_chunk_decref(self.chunk)
            self.chunk = NULL


cdef inline _ChunkView _exporter(np_chunk_t *c, char *p, size_t n, bint readonly):
    cdef _ChunkView v = _ChunkView.__new__(_ChunkView)
    v.chunk = c
    v.ptr = p
    v.size = <Py_ssize_t>n
    v.readonly = readonly
    v.mutable = not readonly
    return v


cdef object np_export_chunk(np_chunk_t *c, char *p, size_t n, bint readonly):
    """A memoryview over p[:n] inside chunk c; takes over one reference to c."""
    return PyMemoryView_FromObject(_exporter(c, p, n, readonly))


cdef inline bint _retire(_ChunkView cv, bint detach):
    """Make new exports of a malloc() exporter read-only; True if, with
    `detach`, it is still exported (something may still write through it)."""
    cv.readonly = True
    return detach and cv.exports > 0


cdef inline void _release_view(object view):
    try:
        view.release()       # a no-op if the user released it already
    except BufferError:
        pass                 # exported itself (a ctypes/numpy object over it, a send in progress)


cdef unsigned char np_delim_byte(object delim) except? 0:
    """until()'s delimiter as a byte: an int in 0..255 or one byte (any
    bytes-like object of length 1). The one parser for every until()."""
    cdef Py_buffer pb
    cdef unsigned char d
    if isinstance(delim, int):
        if not 0 <= delim <= 255:
            raise ValueError(f"delimiter must be in 0..255, got {delim}")
        return <unsigned char>delim
    if isinstance(delim, str):
        raise TypeError("delimiter must be an int or one byte, not str")
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
    return d


cdef extern from "Python.h":
    Py_ssize_t _np_as_ssize "PyLong_AsSsize_t"(object n)
    bint _np_exact_int "PyLong_CheckExact"(object n)
    void *_np_err_occurred "PyErr_Occurred"()
    void _np_err_clear "PyErr_Clear"()
    PyObject *_np_memoryview_base "PyMemoryView_GET_BASE"(object mv)


cdef Py_ssize_t _size_arg(object n, str what) except -1:
    cdef Py_ssize_t v
    if _np_exact_int(n):
        # The common case, on every read: no isinstance, no try/except.
        v = _np_as_ssize(n)
        if v >= 0:
            return v
        if v == -1 and _np_err_occurred() != NULL:
            _np_err_clear()                       # OverflowError: too large
            raise ValueError(f"{what} is too large: {n}")
        raise ValueError(f"{what} must be >= 0, got {n}")
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
        cdef Py_ssize_t hint = _validate_size(size_hint, "size_hint", maximum=_MAX_SIZE_HINT)
        if self.lb != NULL:
            if not self.owns:
                raise TypeError("a connection's buffer cannot be re-initialised")
            with cython.critical_section(self):    # see malloc()
                self._mview = self._mexp = self._mmore = None
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
        cdef np_node_t *g = NULL
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
                g = _consume(lb, n)
        _unlock_reap(lb, g)
        if c != NULL:
            return np_export_chunk(c, p, n, True)
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
        return np_export_chunk(c, c.data, n, True)

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
        """Offset of the first `delim` among the readable bytes, or -1. The
        first LOCKED_BYTES_MAX bytes are searched under the lock, the rest
        through _walk_next."""
        cdef np_lb_t *lb = self.lb
        cdef np_node_t *node
        cdef size_t left, k, base = 0
        cdef const char *hit = NULL
        cdef const char *start
        cdef walk_t w
        cdef seg_t segs[WALK_SEGS]
        cdef int cnt, i
        np_spin_lock(&lb.lock)
        left = lb.readable
        node = lb.head
        while left > 0 and node != NULL:
            k = node.len if node.len < left else left
            if base + k > LOCKED_BYTES_MAX:
                break
            if k > 0:
                start = node.chunk.data + node.off
                hit = <const char *>memchr(start, delim, k)
                if hit != NULL:
                    np_spin_unlock(&lb.lock)
                    return <Py_ssize_t>(base + <size_t>(hit - start))
            base += k
            left -= k
            node = node.next
        if left == 0 or node == NULL:
            np_spin_unlock(&lb.lock)
            return -1
        _walk_begin(lb, &w, node, 0)
        np_spin_unlock(&lb.lock)
        with nogil:
            while left > 0 and hit == NULL:
                cnt = _walk_next(lb, &w, segs, left)
                if cnt <= 0:
                    break
                for i in range(cnt):
                    if hit == NULL:
                        hit = <const char *>memchr(segs[i].p, delim, segs[i].n)
                        if hit != NULL:
                            base += <size_t>(hit - segs[i].p)
                        else:
                            base += segs[i].n
                            left -= segs[i].n
                    np_chunk_decref(segs[i].chunk)
        if hit != NULL:
            return <Py_ssize_t>base
        return -1

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
        cdef np_node_t *g = NULL
        if k:
            np_spin_lock(&self.lb.lock)
            if self.lb.readable >= k:
                g = _consume(self.lb, k)
            _unlock_reap(self.lb, g)

    def until(self, delim):
        """Consume and return the bytes up to and including the first `delim`.

        `delim` is one byte: an int in 0..255 or a bytes-like object of length 1.
        """
        cdef Py_ssize_t idx
        cdef unsigned char d
        self._check(LB_READ)
        d = np_delim_byte(delim)
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
        cdef np_node_t *g
        cdef int b
        self._check(LB_READ)
        self._need(1)
        np_spin_lock(&self.lb.lock)
        if self.lb.readable < 1:
            np_spin_unlock(&self.lb.lock)
            raise BufferUnderflowError(f"read on {self!r}: need 1 byte")
        node = _first_data_node(self.lb)
        b = <unsigned char>node.chunk.data[node.off]
        g = _consume(self.lb, 1)
        _unlock_reap(self.lb, g)
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
        cdef np_node_t *nn
        cdef np_node_t *chain = NULL      # nodes allocated for dst, outside the lock
        cdef np_node_t *g = NULL
        cdef size_t left, take, need, have = 0
        cdef bint done = False
        while not done:
            np_spin_lock(&src.lock)
            if src.closed or src.readable < k:
                np_spin_unlock(&src.lock)
                _free_nodes(chain)
                self._check(LB_READ)
                raise BufferUnderflowError(f"read on {self!r}: need {k} bytes")
            need = 0
            left = k
            node = src.head
            while left > 0:
                if node.len > 0:
                    need += 1
                    left -= node.len if node.len < left else left
                node = node.next
            if need <= have:
                left = k
                node = src.head
                while left > 0:
                    if node.len > 0:
                        take = node.len if node.len < left else left
                        nn = chain
                        chain = nn.next
                        have -= 1
                        np_chunk_incref(node.chunk)
                        _node_link(dst, nn, node.chunk, node.off, take)   # dst is not shared yet
                        left -= take
                    node = node.next
                g = _consume(src, k)
                done = True
                _unlock_reap(src, g)
            else:
                np_spin_unlock(&src.lock)
            while have < need:
                nn = <np_node_t *>PyMem_RawMalloc(sizeof(np_node_t))
                if nn == NULL:
                    _free_nodes(chain)
                    raise MemoryError()
                nn.next = chain
                chain = nn
                have += 1
        _free_nodes(chain)
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
        memoryview. They become readable at flush().

        The view is writable until the next flush() or malloc_ack() only:
        those release it (later use raises ValueError), and if something
        still holds its memory (a slice of the view, a numpy array over it)
        the buffer moves the bytes to fresh memory first, so that writing
        through it afterwards changes nothing that is queued or read."""
        self._check(LB_WRITE)
        cdef size_t k = <size_t>_size_arg(n, "n")
        cdef np_chunk_t *c = NULL
        cdef char *p
        cdef _ChunkView cv
        if k == 0:
            return PyMemoryView_FromObject(bytearray())
        p = _wreserve(self.lb, k, True, &c)
        if p == NULL:
            self._check(LB_WRITE)
            raise MemoryError(f"cannot allocate {k} bytes")
        cv = _exporter(c, p, k, False)
        view = PyMemoryView_FromObject(cv)
        # Free-threaded builds: _mview/_mexp/_mmore are replaced by flush() and
        # close() from other threads; unlocked, two writers DECREF one value twice.
        with cython.critical_section(self):
            if self._mexp is None:
                self._mview = view
                self._mexp = cv
            else:
                if self._mmore is None:
                    self._mmore = []
                self._mmore.append(view)
                self._mmore.append(cv)
        return view

    cdef int _settle(self, bint detach) except -1:
        """Take back the write access malloc() handed out: release every view;
        one still exported elsewhere cannot be released, so with `detach` the
        buffer moves the bytes it covers to fresh memory (_detach) and it
        keeps writing into memory nothing reads."""
        cdef list more = self._mmore
        cdef _ChunkView cv = <_ChunkView>self._mexp
        cdef list stuck = None
        cdef Py_ssize_t i
        # A view referenced elsewhere is released; one referenced only here
        # is released by dropping it (unless a slice keeps its buffer).
        if self._mview is not None and _refcnt(<PyObject *>self._mview) > 1:
            _release_view(self._mview)
        self._mview = self._mexp = self._mmore = None
        if _retire(cv, detach):
            stuck = [cv]
        if more is not None:
            for i in range(0, len(more), 2):
                if more[i] is not None and _refcnt(<PyObject *>more[i]) > 2:  # list + temp
                    _release_view(more[i])
                more[i] = None
                cv = <_ChunkView>more[i + 1]
                if _retire(cv, detach):
                    if stuck is None:
                        stuck = []
                    stuck.append(cv)
        if stuck is not None:
            for i in range(len(stuck)):
                cv = <_ChunkView>stuck[i]
                if _detach(self.lb, cv.chunk, cv.ptr, <size_t>cv.size) < 0:
                    # Retried at the next flush/malloc_ack.
                    self._mexp = cv
                    self._mmore = []
                    for cv in stuck[i + 1:]:
                        self._mmore.append(None)
                        self._mmore.append(cv)
                    raise MemoryError("cannot detach a malloc() view still in use")
        return 0

    def malloc_len(self):
        """Bytes malloc'd or written since the last flush()."""
        self._check(LB_WRITE)
        return self.lb.unflushed

    def malloc_ack(self, n):
        """Keep only the first n unflushed bytes and discard the rest. Views
        from malloc() stop being writable, as at flush()."""
        self._check(LB_WRITE)
        cdef size_t k = <size_t>_size_arg(n, "n")
        cdef np_lb_t *lb = self.lb
        cdef np_node_t *node
        cdef np_node_t *g = NULL
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
                g = node.next
                node.next = NULL
                lb.tail = node
                break
            acc += node.len
            node = node.next
        lb.unflushed = k
        _unlock_reap(lb, g)
        if self._mexp is not None:
            with cython.critical_section(self):    # see malloc(); re-checked under it
                if self._mexp is not None:
                    self._settle(True)

    cdef int _write(self, const char *src, size_t n) except -1:
        cdef np_lb_t *lb = self.lb
        cdef np_chunk_t *c = NULL
        cdef char *p = NULL
        if n == 0:
            return 0
        cdef np_node_t *node = NULL
        if n <= LOCKED_BYTES_MAX:
            if np_atomic_load_int(&lb.tailless):
                # No tail (the usual case after a release): a new chunk, filled
                # before the lock is taken.
                if _write_fresh(lb, src, n, NULL) == 0:
                    return 0
                self._check(LB_WRITE)
                raise MemoryError(f"cannot allocate {n} bytes")
            # A small copy into the tail's room, under the lock.
            np_spin_lock(&lb.lock)
            if not lb.closed and _tail_room(lb) >= n:
                p = _grow_tail(lb, n)
                memcpy(p, src, n)
            else:
                node = _spare_take(lb)
            np_spin_unlock(&lb.lock)
            if p != NULL or _write_fresh(lb, src, n, node) == 0:
                return 0
            self._check(LB_WRITE)
            raise MemoryError(f"cannot allocate {n} bytes")
        # Reserve (allocating without the lock), then copy without the lock:
        # the bytes are unflushed, so no reader looks at them yet, and the
        # chunk reference keeps them valid whatever happens to the buffer.
        # `copying` is raised before the reservation and lowered after the
        # copy: a flush() from another thread waits for it.
        if n >= COPY_NOGIL_MIN:
            np_atomic_inc_int(&lb.copying)
            with nogil:
                p = _wreserve(lb, n, False, &c)
                if p != NULL:
                    memcpy(p, src, n)
                    np_chunk_decref(c)
                np_atomic_dec_int(&lb.copying)
        else:
            # With a GIL, no flush() can run while this thread holds it: the
            # count is only needed on free-threaded builds (compiled out here).
            if NP_FREE_THREADED:
                np_atomic_inc_int(&lb.copying)
            p = _wreserve(lb, n, False, &c)
            if p != NULL:
                memcpy(p, src, n)
                np_chunk_decref(c)
            if NP_FREE_THREADED:
                np_atomic_dec_int(&lb.copying)
        if p == NULL:
            self._check(LB_WRITE)
            raise MemoryError(f"cannot allocate {n} bytes")
        return 0

    cdef bint _write_ref(self, object data, Py_buffer *pb) except -1:
        """Append a read-only view this module handed out by reference: its
        bytes are immutable (a chunk's bytes below `used` are never rewritten
        while referenced), so sharing the chunk is as good as a copy."""
        cdef _ChunkView cv
        cdef PyObject *owner
        cdef np_chunk_t *c
        cdef np_node_t *node
        cdef np_lb_t *lb = self.lb
        cdef char *p = <char *>pb.buf
        if pb.len < ZERO_COPY_MIN or not pb.readonly or type(data) is not memoryview:
            return False
        owner = <PyObject *>_np_memoryview_base(data)    # its .obj, without an attribute lookup
        if owner == NULL or (<object>owner).__class__ is not _ChunkView:
            return False
        cv = <_ChunkView>owner
        c = cv.chunk
        # Never a malloc view's memory: a slice of it may still be writable.
        if c == NULL or cv.mutable or p < c.data or p + pb.len > c.data + c.used:
            return False
        np_spin_lock(&lb.lock)
        node = _spare_take(lb)
        if node == NULL:
            np_spin_unlock(&lb.lock)
            node = _node_new(NULL)
            if node == NULL:
                raise MemoryError()
            np_spin_lock(&lb.lock)
        np_chunk_incref(c)
        _node_link(lb, node, c, <size_t>(p - c.data), <size_t>pb.len)
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
        cdef size_t moved
        # Move other's nodes themselves: nothing to allocate or copy. Chunks
        # keep other's id as owner, so neither buffer extends into them.
        np_spin_lock(&first.lock)
        np_spin_lock(&second.lock)
        if not src.reserving and not dst.closed and src.head != NULL:
            moved = src.readable + src.unflushed
            if dst.tail == NULL:
                dst.head = src.head
            else:
                dst.tail.next = src.head
            dst.tail = src.tail
            dst.unflushed += moved
            src.total_out += src.readable
            src.head = src.tail = NULL
            np_atomic_store_int(&src.tailless, 1)
            np_atomic_store_int(&dst.tailless, 0)
            src.unflushed = 0
            src.epoch += 1
            np_atomic_store_size(&src.readable, 0)
        np_spin_unlock(&second.lock)
        np_spin_unlock(&first.lock)

    def flush(self):
        """Make every written byte readable (for a connection: send it).
        Views from malloc() stop being writable (see malloc)."""
        self._check(LB_WRITE)
        cdef np_lb_t *lb = self.lb
        if self._mexp is not None:
            with cython.critical_section(self):    # see malloc(); re-checked under it
                if self._mexp is not None:
                    self._settle(True)
        np_spin_lock(&lb.lock)
        # Another thread's write may be copying into unflushed bytes (see
        # _write): publishing them now would send what is not written yet.
        # Seen as 0 under the lock, no copy into a reservation is in flight.
        while np_atomic_load_int(&lb.copying):
            np_spin_unlock(&lb.lock)
            with nogil:
                sched_yield()
            np_spin_lock(&lb.lock)
        if lb.unflushed:
            _publish(lb, lb.unflushed)
            lb.unflushed = 0
        np_spin_unlock(&lb.lock)
        self._after_flush()

    def close(self):
        """Free all buffered data. Idempotent; afterwards only close() may be
        called. Views and slices handed out earlier stay valid."""
        cdef np_node_t *g = NULL
        if self.lb == NULL or not self.owns:
            return
        # Views from malloc() stay writable (and safe: they hold their chunks),
        # but nothing reads their memory any more.
        with cython.critical_section(self):    # see malloc()
            self._mview = self._mexp = self._mmore = None
        np_spin_lock(&self.lb.lock)
        self.lb.closed = 1
        if not self.lb.reserving:
            g = _drop_all(self.lb)
        _unlock_reap(self.lb, g)

    def __repr__(self):
        if self.lb == NULL or self.lb.closed:
            return f"<{type(self).__name__} closed>"
        return (f"<{type(self).__name__} readable={self.lb.readable} "
                f"unflushed={self.lb.unflushed}>")
