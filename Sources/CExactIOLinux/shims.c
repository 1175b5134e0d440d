/* SPDX-License-Identifier: Apache-2.0 */
/* Linux only: an empty translation unit elsewhere. */
#ifdef __linux__
/* _GNU_SOURCE here only (not in the header), as swift-system's CSystem does: defined in a
 * header it clashes with the modules Swift imports. */
#define _GNU_SOURCE
#include <errno.h>
#include <string.h>
#include <fcntl.h>
#include <signal.h>
#include <stddef.h>
#include <sys/socket.h>
#include <linux/fs.h>
#include <linux/stat.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "include/CExactIOLinux.h"

int cexactio_accept4(int fd, int flags)
{
	return accept4(fd, NULL, NULL, flags);
}

int cexactio_splice_pipe(int fds[2], size_t size, size_t *actual)
{
	if (pipe2(fds, O_CLOEXEC) != 0)
		return -errno;
	if (size > 0)
		(void)fcntl(fds[1], F_SETPIPE_SZ, (int)(size > (1u << 30) ? (1u << 30) : size));
	int got = fcntl(fds[1], F_GETPIPE_SZ);
	*actual = got > 0 ? (size_t)got : 65536;
	return 0;
}

void cexactio_sigpipe_block(struct cexactio_sigpipe_guard *g)
{
	sigset_t pipe_only, pending;
	sigemptyset(&pipe_only);
	sigaddset(&pipe_only, SIGPIPE);
	sigpending(&pending);
	g->was_pending = sigismember(&pending, SIGPIPE);
	pthread_sigmask(SIG_BLOCK, &pipe_only, &g->old);
}

void cexactio_sigpipe_restore(const struct cexactio_sigpipe_guard *g)
{
	/* Whatever the call returned: a peer that went away mid-call can make the kernel raise
	 * SIGPIPE and still return a short count (seen under ThreadSanitizer's timing). */
	sigset_t pipe_only, pending;
	sigemptyset(&pipe_only);
	sigaddset(&pipe_only, SIGPIPE);
	sigpending(&pending);
	if (!g->was_pending && sigismember(&pending, SIGPIPE)) {
		const struct timespec zero = { 0, 0 };
		while (sigtimedwait(&pipe_only, NULL, &zero) == -1 && errno == EINTR) {
		}
	}
	pthread_sigmask(SIG_SETMASK, &g->old, NULL);
}

ssize_t cexactio_splice(int in, int out, size_t len)
{
	struct cexactio_sigpipe_guard g;
	cexactio_sigpipe_block(&g);
	ssize_t n = splice(in, NULL, out, NULL, len, SPLICE_F_MOVE);
	int e = n < 0 ? errno : 0;
	cexactio_sigpipe_restore(&g);
	return n < 0 ? -e : n;
}

ssize_t cexactio_write_nosigpipe(int fd, const void *buf, size_t len)
{
	struct cexactio_sigpipe_guard g;
	cexactio_sigpipe_block(&g);
	ssize_t n = write(fd, buf, len);
	int e = n < 0 ? errno : 0;
	cexactio_sigpipe_restore(&g);
	return n < 0 ? -e : n;
}

int cexactio_has_direct(int fd)
{
	int fl = fcntl(fd, F_GETFL);
	if (fl < 0)
		return -errno;
	return (fl & O_DIRECT) != 0;
}

int cexactio_set_direct(int fd, int on)
{
	int fl = fcntl(fd, F_GETFL);
	if (fl < 0)
		return -errno;
	fl = on ? (fl | O_DIRECT) : (fl & ~O_DIRECT);
	return fcntl(fd, F_SETFL, fl) == 0 ? 0 : -errno;
}

int cexactio_dio_alignment(int fd, unsigned *mem_align, unsigned *offset_align)
{
	struct statx stx;
	memset(&stx, 0, sizeof(stx));
	if (syscall(SYS_statx, fd, "", AT_EMPTY_PATH, STATX_DIOALIGN | STATX_TYPE, &stx) == 0) {
		if (S_ISBLK(stx.stx_mode)) {
			int size = 0;
			if (ioctl(fd, BLKSSZGET, &size) == 0 && size > 0) {
				*mem_align = (unsigned)size;
				*offset_align = (unsigned)size;
				return 0;
			}
		}
		if (stx.stx_mask & STATX_DIOALIGN) {
			*mem_align = stx.stx_dio_mem_align;
			*offset_align = stx.stx_dio_offset_align;
			return 0;
		}
		return -EOPNOTSUPP;
	}
	return -errno;
}

#endif /* __linux__ */
