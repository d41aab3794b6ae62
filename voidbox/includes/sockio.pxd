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
    ssize_t readv(int fd, const iovec *iov, int iovcnt)

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
    ssize_t c_recv "recv"(int sockfd, void *buf, size_t len, int flags)
    enum:
        MSG_PEEK
        MSG_DONTWAIT

from libc.errno cimport EINTR, errno
from libc.string cimport memset


cdef inline ssize_t peek_iov(int fd, iovec *iov, size_t niov, int *err) noexcept nogil:
    """recvmsg(MSG_PEEK | MSG_DONTWAIT) into iov[0:niov], retried on EINTR (socket(7): at
    the socket's SO_PEEK_OFF). The byte count, 0 at EOF, or -1 with *err the errno."""
    cdef msghdr msg
    cdef ssize_t got
    memset(&msg, 0, sizeof(msg))
    msg.msg_iov = iov
    msg.msg_iovlen = niov
    while True:
        got = recvmsg(fd, &msg, MSG_PEEK | MSG_DONTWAIT)
        if not (got < 0 and errno == EINTR):
            break
    err[0] = errno if got < 0 else 0
    return got
