# C declarations for the frame and stream I/O of voidbox._slirp and voidbox._netrx: read,
# write, scatter-gather and recvmsg. Field layouts come from the system headers.

cdef extern from "<unistd.h>" nogil:
    ssize_t c_read "read"(int fd, void *buf, size_t count)
    ssize_t c_write "write"(int fd, const void *buf, size_t count)

cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len
    ssize_t writev(int fd, const iovec *iov, int iovcnt)

cdef extern from "<sys/socket.h>" nogil:
    struct msghdr:
        void *msg_name
        unsigned int msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    ssize_t recvmsg(int sockfd, msghdr *msg, int flags)
    enum:
        MSG_PEEK
        MSG_DONTWAIT
