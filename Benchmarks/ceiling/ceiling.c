/* SPDX-License-Identifier: Apache-2.0 */
#include "ExactIOBenchCeiling.h"

#include <fcntl.h>
#include <signal.h>

#include <errno.h>
#include <liburing.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

enum { WINDOW = 256 << 10, PAGE = 4096 };

struct exio_ceiling {
	int fd;
	uint64_t frame_bytes;
	unsigned char *buf;
	size_t cap;
	int use_uring;
	struct io_uring ring;
};

exio_ceiling *exio_ceiling_create(int fd, uint64_t frame_bytes, int use_uring)
{
	exio_ceiling *c = calloc(1, sizeof *c);
	if (!c)
		return NULL;
	c->fd = fd;
	c->frame_bytes = frame_bytes;
	/* Two frames and a window: a frame is compacted to the front at most every other frame. */
	size_t two = 2 * ((size_t)frame_bytes + 4);
	c->cap = ((two > WINDOW ? two : WINDOW) + WINDOW + PAGE - 1) / PAGE * PAGE;
	c->buf = aligned_alloc(PAGE, c->cap);
	if (!c->buf) {
		free(c);
		return NULL;
	}
	memset(c->buf, 0, c->cap); /* pre-fault, as the floor's buffer is */
	c->use_uring = use_uring;
	if (use_uring) {
		int rc = io_uring_queue_init(8, &c->ring, 0);
		if (rc == 0) {
			struct iovec iov = { .iov_base = c->buf, .iov_len = c->cap };
			rc = io_uring_register_buffers(&c->ring, &iov, 1);
			if (rc < 0)
				io_uring_queue_exit(&c->ring);
		}
		if (rc < 0) {
			free(c->buf);
			free(c);
			errno = -rc;
			return NULL;
		}
	}
	return c;
}

void exio_ceiling_destroy(exio_ceiling *c)
{
	if (!c)
		return;
	if (c->use_uring)
		io_uring_queue_exit(&c->ring);
	free(c->buf);
	free(c);
}

int exio_ceiling_uring_available(void)
{
	struct io_uring ring;
	if (io_uring_queue_init(2, &ring, 0) < 0)
		return 0;
	io_uring_queue_exit(&ring);
	return 1;
}

/* One read of up to `len` bytes at `p`: bytes read, 0 at end of stream, or -errno. */
static int64_t read_some(exio_ceiling *c, unsigned char *p, size_t len)
{
	if (!c->use_uring) {
		for (;;) {
			ssize_t n = read(c->fd, p, len);
			if (n >= 0)
				return n;
			if (errno != EINTR)
				return -errno;
		}
	}
	for (;;) {
		struct io_uring_sqe *sqe = io_uring_get_sqe(&c->ring);
		/* Offset -1: the file position for files (IORING_FEAT_RW_CUR_POS), ignored for streams. */
		io_uring_prep_read_fixed(sqe, c->fd, p, (unsigned)len, (uint64_t)-1, 0);
		int rc = io_uring_submit_and_wait(&c->ring, 1);
		if (rc < 0 && rc != -EINTR)
			return rc;
		struct io_uring_cqe *cqe;
		while ((rc = io_uring_wait_cqe(&c->ring, &cqe)) == -EINTR) {
		}
		if (rc < 0)
			return rc;
		int res = cqe->res;
		io_uring_cqe_seen(&c->ring, cqe);
		if (res == -EINTR || res == -EAGAIN)
			continue;
		return res;
	}
}

int64_t exio_ceiling_run(exio_ceiling *c, int64_t frames)
{
	unsigned char *buf = c->buf;
	const size_t cap = c->cap;
	const uint64_t n = c->frame_bytes;
	size_t r = 0, w = 0; /* buffered bytes are [r, w) */
	int64_t done = 0;
	while (done < frames) {
		size_t need = 4;
		if (w - r >= 4) {
			const unsigned char *h = buf + r;
			uint64_t len = (uint64_t)h[0] << 24 | (uint64_t)h[1] << 16 | (uint64_t)h[2] << 8 | h[3];
			if (len != n)
				return -EPROTO;
			need = 4 + (size_t)len;
			if (w - r >= need) {
				const unsigned char *b = h + 4;
				if (n >= 1 && b[0] != 0x11)
					return -EPROTO;
				if (n >= 2 && b[n - 1] != 0x22)
					return -EPROTO;
				if (n >= 3 && b[n / 2] != 0x33)
					return -EPROTO;
				r += need;
				if (r == w)
					r = w = 0;
				done++;
				continue;
			}
		}
		size_t missing = need - (w - r);
		if (cap - w < missing || cap - w < WINDOW / 4) {
			memmove(buf, buf + r, w - r);
			w -= r;
			r = 0;
		}
		size_t want = missing > WINDOW ? missing : WINDOW;
		if (want > cap - w)
			want = cap - w;
		int64_t got = read_some(c, buf + w, want);
		if (got < 0)
			return got;
		if (got == 0)
			return done;
		w += (size_t)got;
	}
	return done;
}
