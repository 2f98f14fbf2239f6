# LinkBuffer: a linked list of nodes over reference-counted chunks from a
# size-classed pool. The C-level half (np_lb_*) is used by the poller without
# the GIL; the Python half (LinkBuffer) hands out memory-safe views.
#
# Concurrency contract. Every np_lb_* call takes the buffer's lock (a
# spinlock), so no call can corrupt the structure whatever the interleaving.
# The lock covers pointer and counter updates, walks along the node list and
# copies or scans of at most 8 KiB: chunks and nodes are allocated before it
# is taken and freed after it is dropped, larger copies and scans run outside
# it on chunk references, and it is never held across malloc/free, a
# syscall, Python code or the GIL. The contract says which interleavings give
# meaningful data:
#   - one "reader" thread (next/peek/skip/until/release/read_*/slice/bytes,
#     np_lb_iovecs/np_lb_consume) and one "writer" thread (malloc/malloc_ack/
#     write_*/append/flush, np_lb_reserve/np_lb_commit) may run at the same time;
#   - the bytes between np_lb_reserve and np_lb_commit are written without the
#     lock (that is the recv()); while a reservation is open the reader never
#     frees or resets the tail chunk;
#   - large writes (write_binary & co. above 8 KiB) copy into unflushed bytes
#     without the lock, holding a reference to their chunk: no reader sees
#     unflushed bytes, and only the writer flushes them;
#   - the bytes np_lb_iovecs points at stay valid until the same thread
#     consumes them, unless np_lb_clear or close runs meanwhile (they free
#     them: the caller must not clear a buffer it is sending from);
#   - np_lb_readable() is a lock-free atomic load, safe from any thread.
#   - close() must not race with other calls on the same buffer (it is still
#     memory-safe if it does: views and in-flight copies hold chunk references).

from libc.stdint cimport uint64_t
from netpoll._core.includes.system cimport (
    iovec, np_spin_t, np_atomic_load_size, np_atomic_inc_int,
)

cdef struct np_chunk_t:
    char *data
    size_t cap
    size_t used          # high-water mark: [0, used) may be referenced; new data only at >= used
    int refcnt           # atomic: nodes + exported views + open reservations + in-flight copies
    int cls              # pool size class, -1 for a direct allocation
    uint64_t owner       # id of the only buffer allowed to extend into [used, cap)
    np_chunk_t *next_free    # free chunks only: the next one in the same batch
    np_chunk_t *next_batch   # free chunks only (batch head): the next batch in the shared pool
    size_t batch_len         # free chunks only (batch head): chunks in this batch

cdef struct np_node_t:
    np_chunk_t *chunk
    size_t off
    size_t len
    np_node_t *next

cdef struct np_lb_t:
    np_spin_t lock
    np_node_t *head
    np_node_t *tail
    size_t readable      # flushed, unconsumed bytes (atomic store on publish)
    size_t unflushed     # written or malloc'd at the tail, not yet flushed
    size_t size_hint     # preferred chunk size for new chunks
    uint64_t id
    uint64_t total_in    # bytes ever made readable (flush/commit)
    uint64_t total_out   # bytes ever consumed
    uint64_t epoch       # bumped when nodes are dropped unconsumed (clear/close/release/append)
    np_node_t *spare     # one freed node kept for the next append (no malloc per message)
    # tail == NULL (atomic store under the lock): a writer's hint to allocate
    # a chunk before taking the lock
    int tailless
    int reserving
    int closed
    # write_*() copies into reserved unflushed bytes outside the lock (atomic):
    # flush() waits for them, or another thread's flush would send bytes not
    # yet written (without the GIL, writes below COPY_NOGIL_MIN run in parallel too)
    int copying

# --- chunk pool (no GIL needed) ---
# A chunk of at least `size` bytes with refcnt 1, or NULL when memory is out.
cdef np_chunk_t *np_chunk_alloc(size_t size) noexcept nogil
# Fault injection for the tests (netpoll._core.testing.fail_chunk_allocs): the
# next n chunk allocations fail as when memory is out. 0 turns it off.
cdef void np_chunk_fail_next_allocs(int n) noexcept nogil
cdef void np_chunk_decref(np_chunk_t *c) noexcept nogil

cdef inline void np_chunk_incref(np_chunk_t *c) noexcept nogil:
    np_atomic_inc_int(&c.refcnt)

# A memoryview over p[:n] inside chunk c (read-only unless `readonly` is
# false); takes over one reference to c, which the view drops when the last
# export of it goes. The one exporter of chunk memory (needs the GIL).
cdef object np_export_chunk(np_chunk_t *c, char *p, size_t n, bint readonly)
# until()'s delimiter (an int in 0..255 or one byte) as a byte.
cdef unsigned char np_delim_byte(object delim) except? 0

# --- buffer lifecycle ---
cdef np_lb_t *np_lb_new(size_t size_hint) noexcept nogil
cdef void np_lb_clear(np_lb_t *lb) noexcept nogil     # drop all data, keep the buffer usable
cdef void np_lb_free(np_lb_t *lb) noexcept nogil

# --- poller interface (no GIL) ---
# Inline so that the poller and the other modules that cimport it pay one load.
cdef inline size_t np_lb_readable(np_lb_t *lb) noexcept nogil:
    return np_atomic_load_size(&lb.readable)

# Writable space at the tail for a recv(): at least `want` bytes (the tail's
# room if it has that much, else a new chunk of max(want, chunk) bytes).
# NULL on ENOMEM.
cdef char *np_lb_reserve(np_lb_t *lb, size_t want, size_t chunk, size_t *cap) noexcept nogil
# n bytes of the reservation were filled: they become readable at once.
cdef void np_lb_commit(np_lb_t *lb, size_t n) noexcept nogil
# Up to `maxiov` iovecs over the readable bytes; returns the count, *total the byte sum.
cdef int np_lb_iovecs(np_lb_t *lb, iovec *iov, int maxiov, size_t *total) noexcept nogil
# Drop n readable bytes from the front (n <= readable), freeing spent nodes;
# with release, also what np_lb_release frees (one lock round-trip for both).
cdef void np_lb_consume(np_lb_t *lb, size_t n, bint release) noexcept nogil
# Free consumed memory; when nothing is buffered and no reservation is open,
# also return the tail chunk so that an idle buffer holds no memory.
cdef void np_lb_release(np_lb_t *lb) noexcept nogil


cdef enum:
    LB_READ = 1
    LB_WRITE = 2


cdef class LinkBuffer:
    cdef np_lb_t *lb
    cdef object __weakref__
    cdef bint owns             # False when the np_lb_t belongs to a connection
    cdef int mode              # LB_READ | LB_WRITE: which half of the API is allowed
    # malloc() views since the last flush/malloc_ack and their exporters, cut
    # off by _settle (see malloc), forgotten at close(): the first in _mview
    # and _mexp (None if there is none), the others in _mmore (view, exporter, ...).
    cdef object _mview
    cdef object _mexp
    cdef list _mmore

    cdef int _check(self, int need) except -1
    # Hooks for connection buffers: block until n bytes are readable (or raise),
    # and push flushed bytes out.
    cdef int _need(self, size_t n) except -1
    cdef int _after_flush(self) except -1
    cdef int _settle(self, bint detach) except -1
    cdef object _view(self, size_t n, bint consume)
    cdef object _copy(self, size_t n, bint consume)
    cdef object _gather(self, size_t n, bint consume)
    cdef Py_ssize_t _find(self, unsigned char delim) except -2
    cdef int _write(self, const char *src, size_t n) except -1
    cdef bint _write_ref(self, object data, Py_buffer *pb) except -1
