/* SPDX-License-Identifier: Apache-2.0 */
#include "ExactIOBenchCeiling.h"

#include <fcntl.h>
#include <signal.h>

#include <errno.h>
#ifdef EXACTIO_URING
#include <liburing.h>
#endif
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
	/* The descriptor has O_DIRECT: frames are read as aligned block ranges at explicit
	 * offsets (one read(2) per frame, or 1 MiB READ_FIXED chunks with up to 64 in flight). */
	int direct;
	uint64_t pos;
#ifdef EXACTIO_URING
	struct io_uring ring;
#endif
};

enum { DIRECT_CHUNK = 1 << 20, DIRECT_DEPTH = 64 };

exio_ceiling *exio_ceiling_create(int fd, uint64_t frame_bytes, int use_uring)
{
	exio_ceiling *c = calloc(1, sizeof *c);
	if (!c)
		return NULL;
	c->fd = fd;
	c->frame_bytes = frame_bytes;
	int fl = fcntl(fd, F_GETFL);
	c->direct = fl >= 0 && (fl & O_DIRECT) != 0;
	/* Two frames and a window: a frame is compacted to the front at most every other frame. */
	size_t two = 2 * ((size_t)frame_bytes + 4);
	c->cap = ((two > WINDOW ? two : WINDOW) + WINDOW + PAGE - 1) / PAGE * PAGE;
	if (c->direct) /* one frame, its header and the blocks it straddles */
		c->cap = ((size_t)frame_bytes + 4 + 2 * PAGE + PAGE - 1) / PAGE * PAGE;
	c->buf = aligned_alloc(PAGE, c->cap);
	if (!c->buf) {
		free(c);
		return NULL;
	}
	memset(c->buf, 0, c->cap); /* pre-fault, as the floor's buffer is */
	c->use_uring = use_uring;
	if (use_uring) {
#ifndef EXACTIO_URING
		/* Built without the IOUring trait. */
		free(c->buf);
		free(c);
		errno = ENOSYS;
		return NULL;
#else
		int rc = io_uring_queue_init(c->direct ? DIRECT_DEPTH : 8, &c->ring, 0);
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
#endif
	}
	return c;
}

void exio_ceiling_destroy(exio_ceiling *c)
{
	if (!c)
		return;
#ifdef EXACTIO_URING
	if (c->use_uring)
		io_uring_queue_exit(&c->ring);
#endif
	free(c->buf);
	free(c);
}

int exio_ceiling_uring_available(void)
{
#ifndef EXACTIO_URING
	return 0;
#else
	struct io_uring ring;
	if (io_uring_queue_init(2, &ring, 0) < 0)
		return 0;
	io_uring_queue_exit(&ring);
	return 1;
#endif
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
#ifndef EXACTIO_URING
	return -ENOSYS;
#else
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
#endif
}

/* O_DIRECT: [off, off + len) into buf (all aligned); bytes read (short only at the end), or
 * -errno. read(2) mode: one pread per call (the kernel splits it for the device). io_uring:
 * 1 MiB READ_FIXED chunks, up to DIRECT_DEPTH in flight, at their own offsets. */
static int64_t direct_read(exio_ceiling *c, unsigned char *buf, uint64_t off, size_t len)
{
	if (!c->use_uring) {
		size_t got = 0;
		while (got < len) {
			ssize_t n = pread(c->fd, buf + got, len - got, (off_t)(off + got));
			if (n < 0 && errno == EINTR)
				continue;
			if (n < 0)
				return -errno;
			if (n == 0)
				break;
			got += (size_t)n;
			if ((size_t)n % PAGE)
				break; /* the end of the file */
		}
		return (int64_t)got;
	}
#ifndef EXACTIO_URING
	return -ENOSYS;
#else
	size_t chunks = (len + DIRECT_CHUNK - 1) / DIRECT_CHUNK, next = 0, inflight = 0;
	size_t got_total = 0;
	int64_t short_at = -1;
	while (next < chunks || inflight > 0) {
		while (next < chunks && inflight < DIRECT_DEPTH) {
			struct io_uring_sqe *sqe = io_uring_get_sqe(&c->ring);
			if (!sqe)
				break;
			size_t at = next * DIRECT_CHUNK;
			size_t n = len - at < DIRECT_CHUNK ? len - at : DIRECT_CHUNK;
			io_uring_prep_read_fixed(sqe, c->fd, buf + at, (unsigned)n, off + at, 0);
			sqe->user_data = next;
			next++;
			inflight++;
		}
		int rc = io_uring_submit_and_wait(&c->ring, 1);
		if (rc < 0 && rc != -EINTR)
			return rc;
		struct io_uring_cqe *cqe;
		unsigned head, seen = 0;
		io_uring_for_each_cqe(&c->ring, head, cqe)
		{
			size_t i = (size_t)cqe->user_data;
			size_t n = len - i * DIRECT_CHUNK < DIRECT_CHUNK ? len - i * DIRECT_CHUNK : DIRECT_CHUNK;
			if (cqe->res < 0)
				return cqe->res;
			got_total += (size_t)cqe->res;
			if ((size_t)cqe->res < n && (short_at < 0 || (int64_t)i < short_at))
				short_at = (int64_t)i;
			seen++;
			inflight--;
		}
		io_uring_cq_advance(&c->ring, seen);
	}
	(void)short_at;
	return (int64_t)got_total;
#endif
}

static int64_t direct_run(exio_ceiling *c, int64_t frames)
{
	const uint64_t n = c->frame_bytes;
	int64_t done = 0;
	while (done < frames) {
		uint64_t start = c->pos / PAGE * PAGE;
		size_t head = (size_t)(c->pos - start);
		size_t len = (head + 4 + (size_t)n + PAGE - 1) / PAGE * PAGE;
		int64_t got = direct_read(c, c->buf, start, len);
		if (got < 0)
			return got;
		if ((size_t)got < head + 4 + n)
			return done;
		const unsigned char *h = c->buf + head;
		uint64_t flen = (uint64_t)h[0] << 24 | (uint64_t)h[1] << 16 | (uint64_t)h[2] << 8 | h[3];
		if (flen != n)
			return -EPROTO;
		const unsigned char *b = h + 4;
		if ((n >= 1 && b[0] != 0x11) || (n >= 2 && b[n - 1] != 0x22) || (n >= 3 && b[n / 2] != 0x33))
			return -EPROTO;
		c->pos += 4 + n;
		done++;
	}
	return done;
}

int64_t exio_ceiling_run(exio_ceiling *c, int64_t frames)
{
	if (c->direct)
		return direct_run(c, frames);
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

int exio_open_direct(const char *path)
{
	int fd = open(path, O_RDONLY | O_DIRECT | O_CLOEXEC);
	return fd < 0 ? -errno : fd;
}

uint64_t exio_splitmix(uint64_t *state)
{
	uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
	return z ^ (z >> 31);
}

int64_t exio_pread_run(int fd, uint64_t record, int64_t count, uint64_t span, uint64_t seed)
{
	unsigned char *buf = aligned_alloc(PAGE, (record + PAGE - 1) / PAGE * PAGE);
	if (!buf)
		return -ENOMEM;
	memset(buf, 0, record);
	uint64_t state = seed;
	int64_t done = 0;
	for (; done < count; done++) {
		uint64_t off = exio_splitmix(&state) % span;
		size_t got = 0;
		while (got < record) {
			ssize_t n = pread(fd, buf + got, record - got, (off_t)(off + got));
			if (n < 0 && errno == EINTR)
				continue;
			if (n <= 0) {
				free(buf);
				return n < 0 ? -errno : -EPROTO;
			}
			got += (size_t)n;
		}
	}
	free(buf);
	return done;
}
