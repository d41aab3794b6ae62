# C-level interface of voidbox._kvm: the KVM system, VM and vCPU file descriptors.

from libc.stdint cimport uint8_t

from voidbox.includes.kvm cimport pthread_t


cdef class Kvm:
    cdef int fd
    cdef readonly int api_version
    cdef int _mmap_size  # KVM_GET_VCPU_MMAP_SIZE, 0 until asked

    cdef int _require_open(self) except -1


cdef class VmFd:
    cdef int fd
    cdef readonly Kvm kvm
    cdef size_t run_size  # bytes of each vCPU's kvm_run mapping
    cdef dict _slots  # memory slot -> memoryview keeping its buffer mapped

    cdef int _require_open(self) except -1


cdef class Vcpu:
    cdef int fd
    cdef readonly int index
    cdef readonly VmFd vm
    cdef uint8_t *run_area  # the kvm_run mapping, NULL once closed
    cdef size_t run_size
    # The thread in run(); both fields change only with the GIL held (see kick()).
    cdef pthread_t thread
    cdef bint running
    cdef bint close_pending  # close() was called from another thread during run()

    cdef int _require_open(self) except -1
    cdef void _close(self) noexcept
