# C declarations for voidbox._kvm: the KVM userspace API (linux/kvm.h, asm/kvm.h) plus
# the few pthread/signal calls the vCPU kick needs. Only what _kvm uses is declared;
# field layouts come from the system headers, never from this file.

from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t, uint64_t


cdef extern from "<linux/kvm.h>" nogil:
    int KVM_API_VERSION

    # /dev/kvm ioctls
    unsigned long KVM_GET_API_VERSION
    unsigned long KVM_CREATE_VM
    unsigned long KVM_CHECK_EXTENSION
    unsigned long KVM_GET_VCPU_MMAP_SIZE
    unsigned long KVM_GET_SUPPORTED_CPUID
    # VM ioctls
    unsigned long KVM_SET_TSS_ADDR
    unsigned long KVM_SET_IDENTITY_MAP_ADDR
    unsigned long KVM_CREATE_IRQCHIP
    unsigned long KVM_CREATE_PIT2
    unsigned long KVM_SET_USER_MEMORY_REGION
    unsigned long KVM_IRQ_LINE
    unsigned long KVM_IOEVENTFD
    unsigned long KVM_IRQFD
    unsigned long KVM_CREATE_VCPU
    # vCPU ioctls
    unsigned long KVM_RUN
    unsigned long KVM_GET_REGS
    unsigned long KVM_SET_REGS
    unsigned long KVM_GET_SREGS
    unsigned long KVM_SET_SREGS
    unsigned long KVM_SET_CPUID2
    unsigned long KVM_SET_MSRS
    unsigned long KVM_GET_MSRS
    unsigned long KVM_SET_FPU
    unsigned long KVM_GET_LAPIC
    unsigned long KVM_SET_LAPIC

    int KVM_EXIT_UNKNOWN
    int KVM_EXIT_IO
    int KVM_EXIT_HLT
    int KVM_EXIT_MMIO
    int KVM_EXIT_SHUTDOWN
    int KVM_EXIT_FAIL_ENTRY
    int KVM_EXIT_INTR
    int KVM_EXIT_INTERNAL_ERROR
    int KVM_EXIT_SYSTEM_EVENT
    int KVM_EXIT_IO_IN
    int KVM_EXIT_IO_OUT

    int KVM_PIT_SPEAKER_DUMMY
    int KVM_MEM_LOG_DIRTY_PAGES
    int KVM_MEM_READONLY
    int KVM_IOEVENTFD_FLAG_DATAMATCH
    int KVM_IOEVENTFD_FLAG_PIO
    int KVM_IOEVENTFD_FLAG_DEASSIGN
    int KVM_IRQFD_FLAG_DEASSIGN

    struct kvm_userspace_memory_region:
        uint32_t slot
        uint32_t flags
        uint64_t guest_phys_addr
        uint64_t memory_size
        uint64_t userspace_addr

    struct kvm_pit_config:
        uint32_t flags

    struct kvm_irq_level:
        uint32_t irq  # a member of an anonymous union in the header
        uint32_t level

    struct kvm_ioeventfd:
        uint64_t datamatch
        uint64_t addr
        uint32_t len
        int32_t fd
        uint32_t flags

    struct kvm_irqfd:
        uint32_t fd
        uint32_t gsi
        uint32_t flags
        uint32_t resamplefd

    struct kvm_regs:
        uint64_t rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp
        uint64_t r8, r9, r10, r11, r12, r13, r14, r15
        uint64_t rip, rflags

    struct kvm_segment:
        uint64_t base
        uint32_t limit
        uint16_t selector
        uint8_t type, present, dpl, db, s, l, g, avl, unusable

    struct kvm_dtable:
        uint64_t base
        uint16_t limit

    struct kvm_sregs:
        kvm_segment cs, ds, es, fs, gs, ss, tr, ldt
        kvm_dtable gdt, idt
        uint64_t cr0, cr2, cr3, cr4, cr8, efer, apic_base
        uint64_t interrupt_bitmap[4]  # (KVM_NR_INTERRUPTS + 63) / 64

    struct kvm_cpuid_entry2:
        uint32_t function
        uint32_t index
        uint32_t flags
        uint32_t eax, ebx, ecx, edx

    struct kvm_cpuid2:
        uint32_t nent
        kvm_cpuid_entry2 entries[1]  # flexible array member; sized by the allocation

    struct kvm_msr_entry:
        uint32_t index
        uint64_t data

    struct kvm_msrs:
        uint32_t nmsrs
        kvm_msr_entry entries[1]  # flexible array member; sized by the allocation

    struct kvm_fpu:
        uint16_t fcw
        uint32_t mxcsr

    int KVM_APIC_REG_SIZE

    struct kvm_lapic_state:
        char regs[1024]  # KVM_APIC_REG_SIZE

    struct kvm_run:
        uint8_t immediate_exit
        uint32_t exit_reason


cdef extern from "<pthread.h>" nogil:
    ctypedef unsigned long pthread_t
    pthread_t pthread_self()
    int pthread_kill(pthread_t thread, int sig)


cdef extern from "<signal.h>" nogil:
    int SIGRTMIN  # a glibc macro that calls __libc_current_sigrtmin()


cdef extern from "<sys/ioctl.h>" nogil:
    # glibc's prototype: the request is unsigned long (KVM's _IOWR numbers exceed INT_MAX).
    int ioctl(int fd, unsigned long request, ...)
