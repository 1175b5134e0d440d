/* SPDX-License-Identifier: Apache-2.0 */
/*
 * CExactIOLinux: the Linux system interfaces Swift's Glibc module does not expose, or that need
 * _GNU_SOURCE: epoll and eventfd (the loop's epoll backend and its wakeups), accept4, splice
 * and pipe sizing (`forward`), the SIGPIPE guard around writes, O_DIRECT flags and statx's
 * direct-I/O alignment. Declarations, plus prefixed wrappers where _GNU_SOURCE is needed.
 */
#ifndef CEXACTIO_LINUX_H
#define CEXACTIO_LINUX_H

/* Linux only: elsewhere the module is empty (and ExactIO imports it only under #if os(Linux)). */
#ifdef __linux__

#include <sys/epoll.h>
#include <sys/eventfd.h>

/* accept4(2) with no address: the new descriptor or -1 with errno set. */
int cexactio_accept4(int fd, int flags);

#include <signal.h>
#include <stddef.h>
#include <sys/types.h>

/* SIGPIPE blocked for the calling thread between cexactio_sigpipe_block and
 * cexactio_sigpipe_restore, so that writing to a peer that closed is EPIPE, never a signal that
 * kills the process. A SIGPIPE raised meanwhile is consumed by the restore; one that was
 * already pending stays. For every call that may write to a closed socket or pipe: write(2),
 * splice(2), and IORING_OP_SPLICE (which the kernel may run in this thread's context). */
struct cexactio_sigpipe_guard {
	sigset_t old;
	int was_pending;
};
void cexactio_sigpipe_block(struct cexactio_sigpipe_guard *g);
void cexactio_sigpipe_restore(const struct cexactio_sigpipe_guard *g);

/* A pipe for splice(2), both ends close-on-exec, grown to `size` bytes when the system allows
 * (F_SETPIPE_SZ; the default 64 KiB otherwise). 0 and the ends in fds, or -errno. *actual is
 * the pipe's capacity. */
int cexactio_splice_pipe(int fds[2], size_t size, size_t *actual);

/* splice(2) of up to `len` bytes from `in` to `out` at their current positions
 * (SPLICE_F_MOVE), and write(2): both inside the SIGPIPE guard above. Bytes moved, or
 * -errno. */
ssize_t cexactio_splice(int in, int out, size_t len);
ssize_t cexactio_write_nosigpipe(int fd, const void *buf, size_t len);

/* O_DIRECT: 1 when `fd` has it, 0 when not, -errno. */
int cexactio_has_direct(int fd);
/* Turns O_DIRECT on or off for `fd` (fcntl F_SETFL). 0 or -errno (-EINVAL: the filesystem
 * refuses O_DIRECT). */
int cexactio_set_direct(int fd, int on);
/* The alignment O_DIRECT needs for `fd`: statx(STATX_DIOALIGN) (6.1), else BLKSSZGET for a
 * block device. 0 with *offset_align = 0 when the file does not support direct I/O; 0 with
 * both set; -errno when the kernel cannot say (callers then assume 4096). */
int cexactio_dio_alignment(int fd, unsigned *mem_align, unsigned *offset_align);

#endif /* __linux__ */

#endif
