# cython: language_level=3
"""libseccomp from Cython, loaded with dlopen: the seccomp-bpf filter of voidbox.sandbox.

The library is Debian's libseccomp2 (soname libseccomp.so.2), opened on first use rather
than linked, so building voidbox needs no libseccomp-dev and a host without the library
still runs voidbox: load() raises OSError naming what is missing, and the sandbox reports
seccomp as unavailable. The prototypes and constants are seccomp.h's (includes/seccomp.pxd).

There is no pure-Python twin: this is no hot path, only a binding; every call here runs
once, while a backend enters its sandbox.

Error contract: every libseccomp failure raises OSError with the library's (negative)
errno and the call that failed.
"""
from libc.stdint cimport uint32_t, uint64_t
from posix.dlfcn cimport RTLD_LOCAL, RTLD_NOW, dlerror, dlopen, dlsym

from voidbox.includes.seccomp cimport (
    SCMP_CMP_EQ,
    SCMP_CMP_GE,
    SCMP_CMP_GT,
    SCMP_CMP_LE,
    SCMP_CMP_LT,
    SCMP_CMP_MASKED_EQ,
    SCMP_CMP_NE,
    SCMP_FLTATR_ACT_BADARCH,
    SCMP_FLTATR_ACT_DEFAULT,
    SCMP_FLTATR_CTL_LOG,
    SCMP_FLTATR_CTL_NNP,
    SCMP_FLTATR_CTL_OPTIMIZE,
    SCMP_FLTATR_CTL_TSYNC,
    scmp_arg_cmp,
    scmp_filter_ctx,
    scmp_version,
    seccomp_api_get_t,
    seccomp_attr_set_t,
    seccomp_export_bpf_t,
    seccomp_init_t,
    seccomp_load_t,
    seccomp_release_t,
    seccomp_rule_add_array_t,
    seccomp_syscall_resolve_name_t,
    seccomp_version_t,
)

import os

LIBRARY = "libseccomp.so.2"

# Actions (seccomp.h's SCMP_ACT_*, the kernel's SECCOMP_RET_* values).
ACT_KILL_PROCESS = 0x80000000
ACT_KILL_THREAD = 0x00000000
ACT_TRAP = 0x00030000
ACT_LOG = 0x7FFC0000
ACT_ALLOW = 0x7FFF0000


def ACT_ERRNO(int err):
    """The action that fails the call with errno err instead of running it."""
    return 0x00050000 | (err & 0xFFFF)


# Argument comparisons: (arg, op, a, b) means arg <op> a, or (arg & a) == b for MASKED_EQ.
CMP_NE = SCMP_CMP_NE
CMP_LT = SCMP_CMP_LT
CMP_LE = SCMP_CMP_LE
CMP_EQ = SCMP_CMP_EQ
CMP_GE = SCMP_CMP_GE
CMP_GT = SCMP_CMP_GT
CMP_MASKED_EQ = SCMP_CMP_MASKED_EQ
ATTR_ACT_DEFAULT = SCMP_FLTATR_ACT_DEFAULT
ATTR_ACT_BADARCH = SCMP_FLTATR_ACT_BADARCH
ATTR_CTL_NNP = SCMP_FLTATR_CTL_NNP
ATTR_CTL_TSYNC = SCMP_FLTATR_CTL_TSYNC
ATTR_CTL_LOG = SCMP_FLTATR_CTL_LOG
ATTR_CTL_OPTIMIZE = SCMP_FLTATR_CTL_OPTIMIZE
cdef enum:
    SYSCALL_MAX_ARGS = 6  # a system call has at most six arguments
MAX_ARGS = SYSCALL_MAX_ARGS

cdef void *_lib = NULL
cdef seccomp_init_t _init = NULL
cdef seccomp_release_t _release = NULL
cdef seccomp_rule_add_array_t _rule_add_array = NULL
cdef seccomp_attr_set_t _attr_set = NULL
cdef seccomp_load_t _load = NULL
cdef seccomp_export_bpf_t _export_bpf = NULL
cdef seccomp_syscall_resolve_name_t _resolve_name = NULL
cdef seccomp_version_t _version = NULL
cdef seccomp_api_get_t _api_get = NULL


cdef void *_symbol(const char *name) except NULL:
    cdef void *sym = dlsym(_lib, name)
    if sym == NULL:
        raise OSError(f"{LIBRARY} has no {name.decode()}")
    return sym


def load():
    """Open libseccomp and look up every function voidbox uses (once; later calls return).

    Call it before the process loses its file system (the sandbox's pivot_root): dlopen
    reads the library's file."""
    global _lib, _init, _release, _rule_add_array, _attr_set, _load, _export_bpf
    global _resolve_name, _version, _api_get
    if _lib != NULL:
        return
    cdef void *lib = dlopen(LIBRARY.encode(), RTLD_NOW | RTLD_LOCAL)
    cdef const char *err
    if lib == NULL:
        err = dlerror()
        raise OSError(f"cannot load {LIBRARY}: "
                      f"{err.decode(errors='replace') if err != NULL else 'unknown error'}")
    _lib = lib
    try:
        _init = <seccomp_init_t>_symbol(b"seccomp_init")
        _release = <seccomp_release_t>_symbol(b"seccomp_release")
        _rule_add_array = <seccomp_rule_add_array_t>_symbol(b"seccomp_rule_add_array")
        _attr_set = <seccomp_attr_set_t>_symbol(b"seccomp_attr_set")
        _load = <seccomp_load_t>_symbol(b"seccomp_load")
        _export_bpf = <seccomp_export_bpf_t>_symbol(b"seccomp_export_bpf")
        _resolve_name = <seccomp_syscall_resolve_name_t>_symbol(b"seccomp_syscall_resolve_name")
        _version = <seccomp_version_t>_symbol(b"seccomp_version")
        _api_get = <seccomp_api_get_t>_symbol(b"seccomp_api_get")
    except BaseException:
        _lib = NULL  # a library without these functions is no libseccomp 2.5 (the handle leaks)
        raise


def version():
    """libseccomp's version, (major, minor, micro)."""
    load()
    cdef const scmp_version *v = _version()
    return (v.major, v.minor, v.micro)


def api_level():
    """What the library and the kernel support together (seccomp_api_get(3)): 3 or more
    means SCMP_ACT_KILL_PROCESS and SCMP_ACT_LOG work, 2 or more TSYNC."""
    load()
    return _api_get()


def resolve(name):
    """The native system call number of name, or -1 if libseccomp does not know it."""
    load()
    return _resolve_name(name.encode())


def _check(int rc, what):
    if rc < 0:
        raise OSError(-rc, f"{what}: {os.strerror(-rc)}")


cdef class Filter:
    """One seccomp filter being built: rules, attributes, then load() into this process."""

    cdef scmp_filter_ctx ctx

    def __cinit__(self, uint32_t default_action):
        load()
        self.ctx = _init(default_action)
        if self.ctx == NULL:
            raise OSError(f"seccomp_init({default_action:#x}) failed")

    def set_attr(self, int attr, uint32_t value):
        self._live()
        _check(_attr_set(self.ctx, attr, value), f"seccomp_attr_set({attr}, {value:#x})")

    def add(self, uint32_t action, int syscall, conditions=()):
        """Add a rule: syscall gets action when every condition (arg, op, a, b) holds."""
        cdef scmp_arg_cmp cmps[SYSCALL_MAX_ARGS]
        cdef unsigned int n = len(conditions)
        self._live()
        if n > MAX_ARGS:
            raise ValueError(f"at most {MAX_ARGS} conditions per rule, not {n}")
        for i, (arg, op, a, b) in enumerate(conditions):
            cmps[i].arg = arg
            cmps[i].op = op
            cmps[i].datum_a = <uint64_t>a
            cmps[i].datum_b = <uint64_t>b
        _check(_rule_add_array(self.ctx, action, syscall, n, cmps),
               f"seccomp_rule_add(syscall {syscall}, {tuple(conditions)})")

    def load(self):
        """Install the filter (seccomp(2)); from here on it applies to this process for good."""
        self._live()
        _check(_load(self.ctx), "seccomp_load")

    def export_bpf(self, int fd):
        """Write the filter's BPF program (struct sock_filter records) to fd."""
        self._live()
        _check(_export_bpf(self.ctx, fd), "seccomp_export_bpf")

    def close(self):
        if self.ctx != NULL:
            _release(self.ctx)
            self.ctx = NULL

    def _live(self):
        if self.ctx == NULL:
            raise ValueError("the filter is closed")

    def __dealloc__(self):
        if self.ctx != NULL:
            _release(self.ctx)
