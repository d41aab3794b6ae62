# cython: language_level=3
"""The event loop, compiled: the same EventLoop and Timer as voidbox._loop_py (read its
docstring for the semantics; voidbox/eventloop.py picks one), with its dispatch in C.

One turn is one epoll_wait(2), without the GIL, into a C array on the stack; each ready
fd's callback is found in a C table indexed by fd. Each registration carries a
generation number in its epoll data, so an event read before its fd was unwatched (or
unwatched and watched again, perhaps as a new socket with the same number) is dropped,
as the pure twin drops events of fds unwatched since the batch was read.

Timers live in a hierarchical timing wheel (Varghese and Lauck, "Hashed and Hierarchical
Timing Wheels", SOSP 1987): WHEEL_LEVELS levels of WHEEL_SLOTS slots, level L's slot
covering 64**L ticks of TICK_S (1 ms) of the monotonic clock. A timer sits at the level
of the highest 6-bit digit in which its tick differs from the wheel's current tick, in
an intrusive doubly linked list: call_at and cancel are O(1). As the clock passes a
slot, its timers move down a level (each at most WHEEL_LEVELS - 1 times in its life)
or, when due, into a small binary heap ordered by (when, scheduling order), from which
they fire: the order and the rule are the pure twin's (a timer fires in the first turn
whose clock reading is at least its `when`; what a timer callback schedules for no later
than that reading fires in the same turn).

Resolution: 1 ms ticks, for placing timers. Due-ness is exact (`when` against the
clock). So is the wait before epoll_wait when the earliest timer is on level 0 (within
the current 64 ms): its slot holds a single tick, whose few timers are read for the
earliest `when`, and the wait is rounded up to the millisecond, as the pure twin's.
Further ahead, the wait is computed from per-level occupancy bitmaps (a few
count-trailing-zeros, whatever the number of timers) and ends at the start of the
earliest occupied slot, where its timers move down a level without firing: a far-off
timer wakes the loop at most WHEEL_LEVELS - 1 times before it is due, and a turn costs
the same with 10 or 10,000 timers pending.

Unchecked accesses: the fd table is indexed by an fd below _fd_cap (checked at each
event: a callback may have changed the table); wheel slots by level * 64 + digit with
level < WHEEL_LEVELS (ticks are clamped to TICK_MAX, 48 bits) and digit < 64; the due
heap below _due_len, with room reserved before timers move into it.

Thread-safety: as the pure twin, only call_soon_threadsafe and stop may be called from
another thread. They run with the GIL held from start to end (no Python code runs in
them), which is what makes the pending-wakeup flag safe without a lock.

Memory: a Timer is one small object (its wheel links embedded, a TimerNode); the wheel
holds one reference to each pending Timer, the fd table one to each callback; both are
shown to the garbage collector (EventLoop's tp_traverse is extended below), so a loop
dropped without close() is collected as the pure twin's would be.
"""

cimport cython
from cpython.exc cimport PyErr_CheckSignals, PyErr_SetFromErrno
from cpython.ref cimport Py_DECREF, Py_INCREF, PyObject
from libc.errno cimport EINTR, errno
from libc.math cimport ceil, floor
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, realloc
from libc.string cimport memset, strerror
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from posix.unistd cimport close as c_close
from posix.unistd cimport read as c_read
from posix.unistd cimport write as c_write

import collections

from ._lazylog import get_logger

log = get_logger("voidbox.eventloop")

cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void *ptr
        int fd
        uint32_t u32
        uint64_t u64
    struct epoll_event:
        uint32_t events
        epoll_data_t data
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)
    enum:
        EPOLL_CTL_ADD
        EPOLL_CTL_MOD
        EPOLL_CTL_DEL
        EPOLL_CLOEXEC
        EPOLLIN
        EPOLLERR

cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    enum:
        EFD_NONBLOCK
        EFD_CLOEXEC

cdef extern from "Python.h":
    ctypedef int (*visitproc)(PyObject *, void *) noexcept
    ctypedef int (*traverseproc)(PyObject *, visitproc, void *) noexcept
    ctypedef int (*inquiry)(PyObject *) noexcept
    # On the raw pointers the fd table holds.
    void decref_ptr "Py_DECREF"(PyObject *o)
    void xdecref_ptr "Py_XDECREF"(PyObject *o)
    # Only the two slots replaced below (EventLoop's garbage-collector hooks).
    ctypedef struct GcSlots "PyTypeObject":
        traverseproc tp_traverse
        inquiry tp_clear

# Cap on one epoll_wait's batch; more ready fds are picked up by the next iteration.
MAX_EVENTS = 256
# Reported with EPOLLERR to the callback of a deferred watch the kernel refused (see
# _loop_py.WATCH_FAILED): POLLNVAL's bit, which epoll never reports.
WATCH_FAILED = 0x20

cdef enum:
    C_MAX_EVENTS = 256
    WHEEL_BITS = 6
    WHEEL_SLOTS = 64  # 1 << WHEEL_BITS: one occupancy bit per slot in a uint64
    WHEEL_LEVELS = 8  # 8 * 6 = 48 bits of milliseconds: about 8900 years
    # A Timer's place: nowhere (fired or cancelled), in the wheel, in the due heap.
    T_DONE = 0
    T_WHEEL = 1
    T_DUE = 2
    # The longest single wait, in ms (epoll_wait's timeout is an int).
    MAX_WAIT_MS = 0x3FFFFFFF
    FD_TABLE_MIN = 64
    DUE_MIN = 16
    # _kreg flags: the kernel's interest list holds the fd; a deferred watch waits.
    REGISTERED = 1
    PENDING = 2

cdef double TICKS_PER_S = 1000.0  # TICK_S = 1 ms
cdef int64_t TICK_MAX = (<int64_t>1 << (WHEEL_BITS * WHEEL_LEVELS)) - 1
cdef uint64_t ALL_SLOTS = 0xFFFFFFFFFFFFFFFF
# The wakeup eventfd's epoll data: no registration's (fd | generation << 32) is this.
cdef uint64_t WAKE_TOKEN = 0xFFFFFFFFFFFFFFFF


cdef extern from *:
    """
    static inline int vb_ctz64(uint64_t x) { return __builtin_ctzll(x); }
    static inline int vb_fls64(uint64_t x) { return x ? 64 - __builtin_clzll(x) : 0; }
    """
    int vb_ctz64(uint64_t x) noexcept nogil  # x != 0
    int vb_fls64(uint64_t x) noexcept nogil  # index of the highest set bit + 1; 0 for 0


# ---------------------------------------------------------------- the timing wheel (C)

cdef struct TimerNode:
    TimerNode *prev
    TimerNode *next
    PyObject *timer  # the Timer that embeds this node
    double when
    uint64_t seq  # scheduling order: ties of `when` fire first come, first served
    int64_t tick  # floor(when / TICK_S), clamped to [0, TICK_MAX]
    int slot  # level * WHEEL_SLOTS + slot while state == T_WHEEL
    int state


cdef struct Wheel:
    TimerNode *slots[WHEEL_LEVELS * WHEEL_SLOTS]
    uint64_t occupied[WHEEL_LEVELS]  # bit s of level L: slots[L * 64 + s] is not empty
    int64_t cur  # the tick the wheel was last advanced to
    Py_ssize_t count


cdef inline int64_t tick_of(double t) noexcept nogil:
    """The tick holding time t, clamped to the wheel's range (NaN: the end, never due)."""
    cdef double ms = floor(t * TICKS_PER_S)
    if ms >= <double>TICK_MAX or ms != ms:
        return TICK_MAX
    if ms <= 0.0:
        return 0
    return <int64_t>ms


cdef inline uint64_t slot_range(int first, int last) noexcept nogil:
    """The bits of slots first..last, both included, wrapping past 63 (0 <= both < 64)."""
    if first <= last:
        return (ALL_SLOTS << first) & (ALL_SLOTS >> (WHEEL_SLOTS - 1 - last))
    return (ALL_SLOTS << first) | (ALL_SLOTS >> (WHEEL_SLOTS - 1 - last))


cdef void wheel_link(Wheel *w, TimerNode *n) noexcept nogil:
    """Put n at its level: that of the highest digit in which its tick differs from cur.
    A tick already passed goes in the current slot (due at the next check)."""
    cdef int64_t tick = n.tick if n.tick > w.cur else w.cur
    cdef int level = (vb_fls64(<uint64_t>(tick ^ w.cur)) - 1) // WHEEL_BITS
    if level < 0:
        level = 0
    cdef int digit = <int>((tick >> (WHEEL_BITS * level)) & (WHEEL_SLOTS - 1))
    cdef int slot = level * WHEEL_SLOTS + digit
    # level < WHEEL_LEVELS: both ticks are at most TICK_MAX, so they differ below bit 48.
    n.slot = slot
    n.state = T_WHEEL
    n.prev = NULL
    n.next = w.slots[slot]
    if n.next != NULL:
        n.next.prev = n
    w.slots[slot] = n
    w.occupied[level] |= (<uint64_t>1) << digit
    w.count += 1


cdef void wheel_unlink(Wheel *w, TimerNode *n) noexcept nogil:
    cdef int slot = n.slot
    if n.prev != NULL:
        n.prev.next = n.next
    else:
        w.slots[slot] = n.next
        if n.next == NULL:
            w.occupied[slot // WHEEL_SLOTS] &= ~((<uint64_t>1) << (slot % WHEEL_SLOTS))
    if n.next != NULL:
        n.next.prev = n.prev
    n.prev = n.next = NULL
    w.count -= 1


cdef TimerNode *wheel_take_slots(Wheel *w, int level, uint64_t bits,
                                 TimerNode *out) noexcept nogil:
    """Detach every timer of the slots `bits` of `level`; returns them prepended to out,
    a list chained through next."""
    cdef int digit, slot
    cdef TimerNode *n
    cdef TimerNode *nxt
    bits &= w.occupied[level]
    w.occupied[level] &= ~bits
    while bits:
        digit = vb_ctz64(bits)
        bits &= bits - 1
        slot = level * WHEEL_SLOTS + digit
        n = w.slots[slot]
        w.slots[slot] = NULL
        while n != NULL:
            nxt = n.next
            n.next = out
            out = n
            w.count -= 1
            n = nxt
    return out


cdef TimerNode *wheel_advance(Wheel *w, int64_t new) noexcept nogil:
    """Move cur to tick `new` (>= cur) and detach every timer that may have become due
    or must move down a level: those of the slots cur..new passed over at each level.
    Returns them as a list chained through next, to be linked again (or fired)."""
    cdef int64_t old = w.cur
    cdef int level, shift
    cdef int64_t od, nd
    cdef uint64_t bits
    cdef TimerNode *out = NULL
    if new <= old:
        # Still the same tick: only the current slot can hold timers due since.
        return wheel_take_slots(w, 0, (<uint64_t>1) << (old & (WHEEL_SLOTS - 1)), NULL)
    w.cur = new
    for level in range(WHEEL_LEVELS):
        shift = WHEEL_BITS * level
        od = old >> shift
        nd = new >> shift
        if od == nd:
            break  # this digit and every higher one are unchanged: nothing passed there
        if nd - od >= WHEEL_SLOTS - 1:
            bits = ALL_SLOTS
        else:
            # Level L >= 1 holds digits after cur's own; level 0 also cur's own tick.
            bits = slot_range(<int>((od + (level > 0)) & (WHEEL_SLOTS - 1)),
                              <int>(nd & (WHEEL_SLOTS - 1)))
        if w.occupied[level] & bits:
            out = wheel_take_slots(w, level, bits, out)
    return out


cdef int64_t wheel_next_wake(const Wheel *w, int *slot0) noexcept nogil:
    """The tick at which the earliest timer may be due. Every timer on level L is later
    than every timer below it, and a level's slots before cur's digit are empty (the
    clock moved their timers down when it passed them), so the first occupied slot of
    the lowest occupied level holds the earliest. On level 0 that slot holds one tick
    (or overdue timers, in cur's slot): *slot0 is set to it, for the caller to read
    their exact `when`; otherwise -1, and the tick is the slot's start, where its
    timers move down. TICK_MAX + 1 for an empty wheel."""
    cdef int level, shift, digit, first
    cdef uint64_t bits
    slot0[0] = -1
    for level in range(WHEEL_LEVELS):
        shift = WHEEL_BITS * level
        digit = <int>((w.cur >> shift) & (WHEEL_SLOTS - 1))
        first = digit + (level > 0)  # cur's own digit holds timers on level 0 only
        if first >= WHEEL_SLOTS:
            continue
        bits = w.occupied[level] & (ALL_SLOTS << first)
        if bits:
            if level == 0:
                slot0[0] = vb_ctz64(bits)
            return (((w.cur >> (shift + WHEEL_BITS)) << (shift + WHEEL_BITS))
                    | (<int64_t>vb_ctz64(bits) << shift))
    return TICK_MAX + 1


cdef double slot_min_when(const Wheel *w, int slot) noexcept nogil:
    """The earliest `when` in a non-empty slot."""
    cdef const TimerNode *n = w.slots[slot]
    cdef double first = n.when
    n = n.next
    while n != NULL:
        if n.when < first:
            first = n.when
        n = n.next
    return first


# ---------------------------------------------------------------- the due heap (C)

cdef inline bint node_before(const TimerNode *a, const TimerNode *b) noexcept nogil:
    return a.when < b.when or (a.when == b.when and a.seq < b.seq)


cdef void due_sift_up(TimerNode **heap, Py_ssize_t i) noexcept nogil:
    cdef TimerNode *n = heap[i]
    cdef Py_ssize_t parent
    while i > 0:
        parent = (i - 1) >> 1
        if not node_before(n, heap[parent]):
            break
        heap[i] = heap[parent]
        i = parent
    heap[i] = n


cdef TimerNode *due_pop(TimerNode **heap, Py_ssize_t *length) noexcept nogil:
    """The earliest node of a non-empty heap, removed."""
    cdef TimerNode *top = heap[0]
    cdef Py_ssize_t n = length[0] - 1
    cdef TimerNode *last = heap[n]
    cdef Py_ssize_t i = 0
    cdef Py_ssize_t child
    length[0] = n
    if n == 0:
        return top
    while True:
        child = 2 * i + 1
        if child >= n:
            break
        if child + 1 < n and node_before(heap[child + 1], heap[child]):
            child += 1
        if not node_before(heap[child], last):
            break
        heap[i] = heap[child]
        i = child
    heap[i] = last
    return top


cdef void *grow_zeroed(void *table, Py_ssize_t old_n, Py_ssize_t new_n,
                       size_t size) except NULL:
    """table reallocated from old_n to new_n entries of size bytes, the new ones zeroed."""
    cdef char *grown = <char *>realloc(table, new_n * size)
    if grown == NULL:
        raise MemoryError()
    memset(grown + old_n * size, 0, (new_n - old_n) * size)
    return grown


# ---------------------------------------------------------------- Python objects

@cython.freelist(256)
@cython.final
cdef class Timer:
    """A pending call_at callback; cancel() makes it a no-op. `cancelled` is also true
    once it has fired."""

    cdef TimerNode node
    cdef readonly object callback
    cdef object _loop_ref  # the EventLoop (None once close() settled the timer)

    @property
    def when(self) -> float:
        return self.node.when

    @property
    def cancelled(self) -> bool:
        return self.node.state == T_DONE

    def cancel(self) -> None:
        cdef int state = self.node.state
        if state == T_DONE:
            return
        cdef EventLoop loop = <EventLoop>self._loop_ref
        self.node.state = T_DONE
        loop._live -= 1
        if state == T_WHEEL:
            wheel_unlink(&loop._wheel, &self.node)
            Py_DECREF(self)  # the wheel's reference (the caller holds another)
        # T_DUE: the heap keeps its reference until the node comes up and is skipped.

    def __repr__(self) -> str:
        state = ("cancelled or fired", "pending", "due")[self.node.state]
        return f"<Timer when={self.node.when!r} {state} {self.callback!r}>"


cdef class EventLoop:
    """A single-threaded epoll loop.

    With debug=True an exception from a callback propagates out of run(); otherwise it is
    logged, counted in .errors, and the loop goes on (one bad flow must not take the
    network down). clock (tests): a function returning seconds, in place of
    time.monotonic.
    """

    cdef public bint debug
    cdef public Py_ssize_t errors
    cdef object _clock
    cdef object _ready
    cdef int _epfd
    cdef int _wake_fd
    cdef bint _wake_pending
    cdef bint _stopping
    cdef bint _closed
    # The fd table: callback (a reference), interest and registration generation by fd.
    cdef PyObject **_cbs
    cdef uint32_t *_interest
    cdef uint32_t *_gen
    # What the kernel's interest list holds for an fd (a deferred watch may not be
    # there yet), and the fds whose registration waits for the end of the turn.
    cdef uint32_t *_kint
    cdef uint8_t *_kreg
    cdef int *_pending
    cdef int _npending
    cdef list _failed_watches  # (fd, gen) whose deferred registration failed: to be told
    cdef int _fd_cap
    cdef Py_ssize_t _nwatched
    cdef uint32_t _next_gen
    # Timers: pending ones are in the wheel or the due heap (a reference each).
    cdef Wheel _wheel
    cdef TimerNode **_due
    cdef Py_ssize_t _due_len
    cdef Py_ssize_t _due_cap
    cdef Py_ssize_t _live
    cdef uint64_t _seq
    cdef int _firing
    cdef double _fire_now
    cdef dict __dict__  # tests replace methods on an instance (monkeypatch.setattr)
    cdef object __weakref__

    def __cinit__(self):
        self._epfd = -1
        self._wake_fd = -1
        self._cbs = NULL
        self._interest = NULL
        self._gen = NULL
        self._kint = NULL
        self._kreg = NULL
        self._pending = NULL
        self._due = NULL
        memset(&self._wheel, 0, sizeof(Wheel))

    def __init__(self, debug: bool = False, clock=None):
        cdef epoll_event ev
        self.debug = debug
        self.errors = 0
        self._clock = clock
        self._ready = collections.deque()
        self._failed_watches = []
        self._next_gen = 1
        self._epfd = epoll_create1(EPOLL_CLOEXEC)
        if self._epfd < 0:
            PyErr_SetFromErrno(OSError)
        self._wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self._wake_fd < 0:
            PyErr_SetFromErrno(OSError)
        ev.events = EPOLLIN
        ev.data.u64 = WAKE_TOKEN
        if epoll_ctl(self._epfd, EPOLL_CTL_ADD, self._wake_fd, &ev) < 0:
            PyErr_SetFromErrno(OSError)
        self._wheel.cur = tick_of(self._now())

    def __dealloc__(self):
        self._release()
        if self._epfd >= 0:
            c_close(self._epfd)
        if self._wake_fd >= 0:
            c_close(self._wake_fd)
        free(self._cbs)
        free(self._interest)
        free(self._gen)
        free(self._kint)
        free(self._kreg)
        free(self._pending)
        free(self._due)

    # ------------------------------------------------------------ fds

    def watch(self, int fd, unsigned int events, callback, bint defer=False) -> None:
        """Call callback(events) while fd is ready for events; calling again modifies.

        defer: the kernel learns of it just before the loop next waits, so an fd watched
        and unwatched within one turn costs no system call; a registration that then
        fails is logged, counted in .errors and reported as callback(EPOLLERR | WATCH_FAILED).
        """
        cdef PyObject *old
        cdef uint32_t gen
        if self._closed:
            raise ValueError("I/O operation on closed epoll object")
        if fd < 0:
            raise ValueError(f"file descriptor cannot be a negative integer ({fd})")
        if fd >= self._fd_cap:
            self._grow_fd_table(fd)
        old = self._cbs[fd]
        if old != NULL:
            gen = self._gen[fd]
        else:
            gen = self._next_gen
            self._next_gen = gen + 1 if gen != 0xFFFFFFFF else 1
        if defer:
            if not self._kreg[fd] & REGISTERED or self._kint[fd] != events:
                self._defer(fd)
        else:
            self._register(fd, events, gen)
        if old == NULL:
            self._gen[fd] = gen
            self._nwatched += 1
        Py_INCREF(callback)
        self._cbs[fd] = <PyObject *>callback
        self._interest[fd] = events
        xdecref_ptr(old)  # last: its destructor may call back into the loop

    cdef int _register(self, int fd, uint32_t events, uint32_t gen) except -1:
        """Make the kernel's interest list hold fd with events (ADD or MOD)."""
        cdef epoll_event ev
        cdef bint known = self._kreg[fd] & REGISTERED
        if known and self._kint[fd] == events:
            return 0
        ev.events = events
        ev.data.u64 = <uint64_t>fd | (<uint64_t>gen << 32)
        if epoll_ctl(self._epfd, EPOLL_CTL_MOD if known else EPOLL_CTL_ADD, fd, &ev) < 0:
            PyErr_SetFromErrno(OSError)
        self._kreg[fd] |= REGISTERED
        self._kint[fd] = events
        return 0

    cdef int _defer(self, int fd) except -1:
        # The PENDING flag keeps an fd in the list once, so it never outgrows _fd_cap.
        if self._kreg[fd] & PENDING:
            return 0
        self._pending[self._npending] = fd
        self._npending += 1
        self._kreg[fd] |= PENDING
        return 0

    cdef int _sync(self) except -1:
        """Apply the deferred registrations, before the loop waits."""
        cdef int i, fd
        cdef int n = self._npending
        self._npending = 0
        for i in range(n):
            fd = self._pending[i]
            self._kreg[fd] &= ~PENDING
            if self._cbs[fd] == NULL:
                continue  # unwatched since: nothing to tell the kernel
            try:
                self._register(fd, self._interest[fd], self._gen[fd])
            except OSError as e:
                self.errors += 1
                log.warning("cannot watch fd %d: %s", fd, e.strerror)
                self._failed_watches.append((fd, self._gen[fd]))
        return 0

    def unwatch(self, int fd) -> None:
        cdef PyObject *old
        if fd < 0 or fd >= self._fd_cap or self._cbs[fd] == NULL:
            return
        old = self._cbs[fd]
        self._cbs[fd] = NULL
        self._gen[fd] = 0  # events already read for this registration are dropped
        self._interest[fd] = 0
        self._nwatched -= 1
        if self._kreg[fd] & REGISTERED:
            self._kreg[fd] &= ~REGISTERED
            if not self._closed:
                # Fails when the fd is already closed: the kernel dropped it from the set.
                epoll_ctl(self._epfd, EPOLL_CTL_DEL, fd, NULL)
        decref_ptr(old)

    def _epoll_fd(self) -> int:
        """The epoll fd (tests read the kernel's interest list in its fdinfo)."""
        return self._epfd

    def watched_count(self) -> int:
        """Fds watched for callers (the loop's own wakeup eventfd is not counted)."""
        return self._nwatched

    @property
    def _watchers(self) -> dict:
        """{fd: callback} (tests; the pure twin's attribute, as a snapshot)."""
        return {fd: <object>self._cbs[fd] for fd in range(self._fd_cap)
                if self._cbs[fd] != NULL}

    cdef int _grow_fd_table(self, int fd) except -1:
        cdef int cap = self._fd_cap * 2
        cdef int old = self._fd_cap
        if cap < FD_TABLE_MIN:
            cap = FD_TABLE_MIN
        if cap <= fd:
            cap = fd + 1
        # One failure leaves the tables grown so far larger than _fd_cap: harmless.
        self._cbs = <PyObject **>grow_zeroed(self._cbs, old, cap, sizeof(PyObject *))
        self._interest = <uint32_t *>grow_zeroed(self._interest, old, cap, sizeof(uint32_t))
        self._gen = <uint32_t *>grow_zeroed(self._gen, old, cap, sizeof(uint32_t))
        self._kint = <uint32_t *>grow_zeroed(self._kint, old, cap, sizeof(uint32_t))
        self._kreg = <uint8_t *>grow_zeroed(self._kreg, old, cap, sizeof(uint8_t))
        self._pending = <int *>grow_zeroed(self._pending, old, cap, sizeof(int))
        self._fd_cap = cap
        return 0

    # ------------------------------------------------------------ time and callbacks

    cdef double _now(self) except? -1.0:
        cdef timespec ts
        if self._clock is not None:
            return self._clock()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        # As time.monotonic computes it: nanoseconds, then one division.
        return <double>(<int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec) / 1e9

    def time(self) -> float:
        return self._now()

    def call_at(self, double when, callback) -> Timer:
        cdef Timer timer = Timer.__new__(Timer)
        cdef TimerNode *n = &timer.node
        timer.callback = callback
        timer._loop_ref = self
        n.timer = <PyObject *>timer
        n.when = when
        n.seq = self._seq
        self._seq += 1
        if self._firing and when <= self._fire_now:
            # Scheduled by a timer callback for no later than the reading being fired:
            # it fires in this turn, in order, as in the pure twin's heap.
            self._due_push(n)
        else:
            n.tick = tick_of(when)
            wheel_link(&self._wheel, n)
        Py_INCREF(timer)  # the wheel's or the heap's
        self._live += 1
        return timer

    def call_later(self, double delay, callback) -> Timer:
        return self.call_at(self.time() + delay, callback)

    def call_soon(self, callback) -> None:
        self._ready.append(callback)

    def call_soon_threadsafe(self, callback) -> None:
        # Nothing in here releases the GIL: the append, the flag and the write are one
        # step for every other thread, the loop's _drain_wakeup included.
        self._ready.append(callback)
        if self._wake_pending or self._closed:
            return
        self._wake_pending = True
        self._signal_wakeup()

    def timer_count(self) -> int:
        return self._live

    def _timer_entries(self) -> int:
        """Entries the timer structure holds, cancelled ones included (tests): the wheel
        drops a timer when it is cancelled; the due heap when it comes up."""
        return self._wheel.count + self._due_len

    cdef int _due_push(self, TimerNode *n) except -1:
        cdef Py_ssize_t cap
        cdef TimerNode **heap
        if self._due_len == self._due_cap:
            cap = self._due_cap * 2 if self._due_cap else DUE_MIN
            heap = <TimerNode **>realloc(self._due, cap * sizeof(TimerNode *))
            if heap == NULL:
                raise MemoryError()
            self._due = heap
            self._due_cap = cap
        n.state = T_DUE
        self._due[self._due_len] = n
        self._due_len += 1
        due_sift_up(self._due, self._due_len - 1)
        return 0

    cdef int _reserve_due(self, Py_ssize_t extra) except -1:
        """Room for `extra` more due timers, so moving them cannot fail half-way."""
        cdef Py_ssize_t cap = self._due_cap if self._due_cap else DUE_MIN
        cdef TimerNode **heap
        while cap < self._due_len + extra:
            cap *= 2
        if cap != self._due_cap:
            heap = <TimerNode **>realloc(self._due, cap * sizeof(TimerNode *))
            if heap == NULL:
                raise MemoryError()
            self._due = heap
            self._due_cap = cap
        return 0

    # ------------------------------------------------------------ running

    def stop(self) -> None:
        """Make run() return after the current iteration (safe from any thread)."""
        self._stopping = True
        if not self._closed:  # the eventfd's number may belong to another file by now
            self._signal_wakeup()

    cdef void _signal_wakeup(self) noexcept:
        cdef uint64_t one = 1
        # EAGAIN (the counter is full) still leaves the loop woken.
        c_write(self._wake_fd, &one, sizeof(one))

    cdef void _drain_wakeup(self) noexcept:
        cdef uint64_t count
        self._wake_pending = False
        c_read(self._wake_fd, &count, sizeof(count))

    def run(self) -> None:
        """Run until stop(). A stop() made before run() is kept: a signal handler that
        stops the loop while its owner is still starting must not be lost."""
        try:
            while not self._stopping:
                self._turn(-1.0, False)
        finally:
            self._stopping = False

    def run_once(self, timeout=None) -> None:
        """One iteration: wait for fds or the next timer, then run what is due."""
        if timeout is None:
            self._turn(-1.0, False)
        else:
            self._turn(timeout, True)

    cdef int _turn(self, double timeout, bint bounded) except -1:
        cdef epoll_event events[C_MAX_EVENTS]
        cdef int wait_ms, n, i, fd, err, slot0
        cdef int64_t tick
        cdef double wait
        cdef uint64_t data
        cdef PyObject *cbp
        cdef bint debug = self.debug
        if self._closed:
            raise ValueError("I/O operation on closed epoll object")
        if self._npending:
            self._sync()
        if self._ready or self._due_len or self._failed_watches:
            wait_ms = 0
        elif self._wheel.count:
            tick = wheel_next_wake(&self._wheel, &slot0)
            if slot0 >= 0:
                wait = (slot_min_when(&self._wheel, slot0) - self._now()) * TICKS_PER_S
            else:
                wait = <double>tick - self._now() * TICKS_PER_S
            wait_ms = 0 if wait <= 0.0 else (
                MAX_WAIT_MS if wait >= MAX_WAIT_MS else <int>ceil(wait))
        else:
            wait_ms = -1
        if bounded:
            # As select.epoll.poll: seconds rounded up to the millisecond; negative: none.
            if timeout < 0.0:
                wait_ms = -1
            else:
                wait = ceil(timeout * 1e3)
                i = MAX_WAIT_MS if wait >= MAX_WAIT_MS else <int>wait
                if wait_ms < 0 or i < wait_ms:
                    wait_ms = i
        with nogil:
            n = epoll_wait(self._epfd, events, C_MAX_EVENTS, wait_ms)
            err = errno
        if n < 0:
            if err != EINTR:
                raise OSError(err, strerror(err))
            # A signal: its Python handler runs now (and may raise); the turn goes on.
            PyErr_CheckSignals()
            n = 0
        for i in range(n):
            data = events[i].data.u64
            if data == WAKE_TOKEN:
                self._drain_wakeup()
                continue
            fd = <int>(data & 0xFFFFFFFF)
            # Re-read the table for every event: a callback may have changed it (or
            # closed the loop, which empties it).
            if fd >= self._fd_cap or self._gen[fd] != <uint32_t>(data >> 32):
                continue  # unwatched, or watched again, since this batch was read
            cbp = self._cbs[fd]
            if cbp == NULL:
                continue
            cb = <object>cbp  # a reference: the callback may unwatch its own fd
            if debug:
                cb(events[i].events)
            else:
                try:
                    cb(events[i].events)
                except Exception:
                    self._callback_failed(cb)
        if self._failed_watches:
            self._report_failed_watches()
        if self._wheel.count or self._due_len:
            self._run_timers()
        # Only what was ready before this point runs now: callbacks queued by callbacks
        # wait for the next iteration, so fd events are never starved.
        ready = self._ready
        n = len(ready)
        if n:
            popleft = ready.popleft
            for _ in range(n):
                if not ready:
                    break  # a callback closed the loop
                cb = popleft()
                if debug:
                    cb()
                else:
                    try:
                        cb()
                    except Exception:
                        self._callback_failed(cb)
        return 0

    cdef int _run_timers(self) except -1:
        """Move what the clock passed in the wheel, then fire what is due, in order."""
        cdef double now = self._now()
        cdef TimerNode *moved
        cdef TimerNode *n
        cdef int firing
        cdef double fire_now
        if self._wheel.count:
            self._reserve_due(self._wheel.count)
            moved = wheel_advance(&self._wheel, tick_of(now))
            while moved != NULL:
                n = moved
                moved = n.next
                if n.when <= now:
                    self._due_push(n)  # cannot fail: room reserved
                else:
                    wheel_link(&self._wheel, n)
        if not self._due_len:
            return 0
        firing, fire_now = self._firing, self._fire_now
        self._firing, self._fire_now = True, now
        try:
            while self._due_len:
                n = due_pop(self._due, &self._due_len)
                # Take over the heap's reference (an exception below must not leak it).
                timer = <Timer>n.timer
                Py_DECREF(timer)
                if n.state != T_DUE:
                    continue  # cancelled while due
                n.state = T_DONE
                self._live -= 1
                cb = timer.callback
                if self.debug:
                    cb()
                else:
                    try:
                        cb()
                    except Exception:
                        self._callback_failed(cb)
        finally:
            self._firing, self._fire_now = firing, fire_now
        return 0

    cdef int _report_failed_watches(self) except -1:
        """EPOLLERR | WATCH_FAILED to each callback whose deferred registration failed (if
        its fd is still watched by that registration)."""
        cdef int fd
        failed, self._failed_watches = self._failed_watches, []
        for fd, gen in failed:
            if fd >= self._fd_cap or self._gen[fd] != <uint32_t>gen or self._cbs[fd] == NULL:
                continue
            cb = <object>self._cbs[fd]
            if self.debug:
                cb(EPOLLERR | WATCH_FAILED)
            else:
                try:
                    cb(EPOLLERR | WATCH_FAILED)
                except Exception:
                    self._callback_failed(cb)
        return 0

    cdef void _callback_failed(self, cb) noexcept:
        """Count and log the exception being handled (production loops go on)."""
        self.errors += 1
        try:
            log.exception("event loop callback %r failed", cb)
        except Exception:
            pass  # logging itself failed: the count stays

    cdef int _release(self) except -1:
        """Drop every reference the C structures hold: callbacks, pending timers.
        Decrefs run last, once the structures are consistent: they may run code that
        calls back into the loop."""
        cdef int fd, slot
        cdef Py_ssize_t i
        cdef PyObject *cbp
        cdef TimerNode *n
        cdef TimerNode *nxt
        doomed = []
        for fd in range(self._fd_cap):
            cbp = self._cbs[fd]
            if cbp != NULL:
                self._cbs[fd] = NULL
                self._gen[fd] = 0
                self._interest[fd] = 0
                self._kreg[fd] = 0
                doomed.append(<object>cbp)
                decref_ptr(cbp)  # doomed holds it now
        self._nwatched = 0
        for i in range(self._npending):
            self._kreg[self._pending[i]] = 0  # unwatched while pending: the flag alone is left
        self._npending = 0
        self._failed_watches = []
        for slot in range(WHEEL_LEVELS * WHEEL_SLOTS):
            n = self._wheel.slots[slot]
            self._wheel.slots[slot] = NULL
            while n != NULL:
                nxt = n.next
                n.prev = n.next = NULL
                self._settle(n, doomed)
                n = nxt
        memset(self._wheel.occupied, 0, sizeof(self._wheel.occupied))
        self._wheel.count = 0
        while self._due_len:
            self._due_len -= 1
            self._settle(self._due[self._due_len], doomed)
        self._live = 0
        del doomed
        return 0

    cdef void _settle(self, TimerNode *n, list doomed) noexcept:
        """A pending timer's end without firing (close, collection): its reference
        moves to doomed."""
        timer = <Timer>n.timer
        n.state = T_DONE
        timer._loop_ref = None
        doomed.append(timer)
        Py_DECREF(timer)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        c_close(self._epfd)
        c_close(self._wake_fd)
        self._epfd = self._wake_fd = -1
        self._ready.clear()
        self._release()


# The garbage collector must see what the C structures hold, as it sees the pure twin's
# dicts and heap: a callback or a timer's callback often refers back to the loop.
cdef traverseproc _base_traverse = (<GcSlots *><PyObject *>EventLoop).tp_traverse
cdef inquiry _base_clear = (<GcSlots *><PyObject *>EventLoop).tp_clear


cdef int _loop_traverse(PyObject *o, visitproc visit, void *arg) noexcept:
    cdef EventLoop loop = <EventLoop>o
    cdef int fd, slot, r
    cdef Py_ssize_t i
    cdef TimerNode *n
    r = _base_traverse(o, visit, arg)
    if r:
        return r
    for fd in range(loop._fd_cap):
        if loop._cbs[fd] != NULL:
            r = visit(loop._cbs[fd], arg)
            if r:
                return r
    for slot in range(WHEEL_LEVELS * WHEEL_SLOTS):
        n = loop._wheel.slots[slot]
        while n != NULL:
            r = visit(n.timer, arg)
            if r:
                return r
            n = n.next
    for i in range(loop._due_len):
        r = visit(loop._due[i].timer, arg)
        if r:
            return r
    return 0


cdef int _loop_clear(PyObject *o) noexcept:
    try:
        (<EventLoop>o)._release()
    except Exception:
        pass
    return _base_clear(o)


(<GcSlots *><PyObject *>EventLoop).tp_traverse = _loop_traverse
(<GcSlots *><PyObject *>EventLoop).tp_clear = _loop_clear
