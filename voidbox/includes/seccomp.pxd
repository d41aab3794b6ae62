# libseccomp's ABI (seccomp.h of libseccomp 2.5, the library Debian ships as libseccomp2),
# declared here because voidbox._seccomp loads the library with dlopen: building voidbox
# needs no libseccomp-dev, and a host without libseccomp2 still runs voidbox (its sandbox
# then reports seccomp unavailable). The values below are the header's; they are part of
# the library's stable ABI (soname libseccomp.so.2).

from libc.stdint cimport uint32_t, uint64_t

ctypedef void *scmp_filter_ctx

# enum scmp_compare: an int-sized enum in the x86-64 SysV ABI.
cdef enum:
    SCMP_CMP_NE = 1
    SCMP_CMP_LT = 2
    SCMP_CMP_LE = 3
    SCMP_CMP_EQ = 4
    SCMP_CMP_GE = 5
    SCMP_CMP_GT = 6
    SCMP_CMP_MASKED_EQ = 7

# enum scmp_filter_attr
cdef enum:
    SCMP_FLTATR_ACT_DEFAULT = 1
    SCMP_FLTATR_ACT_BADARCH = 2
    SCMP_FLTATR_CTL_NNP = 3
    SCMP_FLTATR_CTL_TSYNC = 4
    SCMP_FLTATR_CTL_LOG = 6
    SCMP_FLTATR_CTL_OPTIMIZE = 8  # libseccomp 2.5+: 2 builds a binary tree

cdef struct scmp_arg_cmp:
    unsigned int arg  # argument number, from 0
    int op  # enum scmp_compare
    uint64_t datum_a
    uint64_t datum_b

cdef struct scmp_version:
    unsigned int major
    unsigned int minor
    unsigned int micro

# The functions voidbox calls, as pointer types for dlsym. Each returns 0 or a negative
# errno (seccomp_init: NULL on failure; seccomp_syscall_resolve_name: __NR_SCMP_ERROR).
ctypedef scmp_filter_ctx (*seccomp_init_t)(uint32_t def_action) noexcept nogil
ctypedef void (*seccomp_release_t)(scmp_filter_ctx ctx) noexcept nogil
ctypedef int (*seccomp_rule_add_array_t)(scmp_filter_ctx ctx, uint32_t action, int syscall,
                                         unsigned int arg_cnt,
                                         const scmp_arg_cmp *arg_array) noexcept nogil
ctypedef int (*seccomp_attr_set_t)(scmp_filter_ctx ctx, int attr, uint32_t value) noexcept nogil
ctypedef int (*seccomp_load_t)(scmp_filter_ctx ctx) noexcept nogil
ctypedef int (*seccomp_export_bpf_t)(scmp_filter_ctx ctx, int fd) noexcept nogil
ctypedef int (*seccomp_syscall_resolve_name_t)(const char *name) noexcept nogil
ctypedef const scmp_version *(*seccomp_version_t)() noexcept nogil
ctypedef unsigned int (*seccomp_api_get_t)() noexcept nogil
