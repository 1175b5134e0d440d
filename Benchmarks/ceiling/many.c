/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The bench's C ceilings for the many-connection cases (bench/Many.swift): one thread reads
 * every frame of every connection, frames parsed and checked in place. See
 * ExactIOBenchCeiling.h for the three modes and what each does per turn.
 */
#include "ExactIOBenchCeiling.h"

#include <errno.h>
#include <fcntl.h>
#ifdef EXACTIO_URING
#include <liburing.h>
#endif
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <unistd.h>

enum {
	RECV_WINDOW = 256 << 10, /* c-uring-recv, c-epoll: the most one receive takes */
	MSHOT_BUF = 64 << 10,    /* c-uring-mshot: bytes per provided buffer */
	MSHOT_MIN_BUFS = 64,     /* c-uring-mshot: buffers in the ring: 2 per connection, a power */
	MSHOT_MAX_BUFS = 1024,   /* of two from 64 to 1024 (4 to 64 MiB) */
	MSHOT_GROUP = 7,
	MANY_PAGE = 4096,
	MAX_EVENTS = 1024,
};

struct conn {
	int fd;
	int open; /* still being read: fewer than `per` frames and no end of stream */
	int64_t done;
	/* c-uring-recv, c-epoll: the connection's own buffer; buffered bytes are [r, w). */
	unsigned char *buf;
	size_t cap, r, w;
	/* c-uring-mshot: a frame that straddles provided buffers is reassembled here. */
	unsigned char *carry;
	size_t have;
};

static inline uint64_t be32(const unsigned char *h)
{
	return (uint64_t)h[0] << 24 | (uint64_t)h[1] << 16 | (uint64_t)h[2] << 8 | h[3];
}

/* The marks of bench's frames (bench/Cases.swift, Marks). */
static inline int body_ok(const unsigned char *b, uint64_t n)
{
	return !((n >= 1 && b[0] != 0x11) || (n >= 2 && b[n - 1] != 0x22) || (n >= 3 && b[n / 2] != 0x33));
}

#ifdef EXACTIO_URING /* the io_uring ceilings only */
static unsigned pow2_at_least(unsigned v, unsigned lo)
{
	unsigned p = lo;
	while (p < v)
		p <<= 1;
	return p;
}

/* A ring with SQ `entries` and CQ `cq` entries; the best task-run mode the kernel takes
 * (DEFER_TASKRUN + SINGLE_ISSUER since 6.1, COOP_TASKRUN since 5.19, else none). */
static int ring_init(struct io_uring *ring, unsigned entries, unsigned cq, int32_t *taskrun)
{
	const unsigned modes[] = {
		IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN,
		IORING_SETUP_COOP_TASKRUN,
		0,
	};
	int rc = -EINVAL;
	for (size_t i = 0; i < sizeof modes / sizeof modes[0]; i++) {
		struct io_uring_params p;
		memset(&p, 0, sizeof p);
		p.flags = modes[i] | IORING_SETUP_CQSIZE;
		p.cq_entries = cq;
		rc = io_uring_queue_init_params(entries, ring, &p);
		if (rc == 0) {
			*taskrun = (int32_t)(sizeof modes / sizeof modes[0] - 1 - i);
			return 0;
		}
		if (rc != -EINVAL)
			return rc;
	}
	return rc;
}
#endif

/* Counts and checks the whole frames buffered in [r, w). 0, or -EPROTO. */
static int parse_own(struct conn *c, uint64_t n, int64_t per)
{
	while (c->done < per && c->w - c->r >= 4) {
		const unsigned char *h = c->buf + c->r;
		uint64_t len = be32(h);
		if (len != n)
			return -EPROTO;
		if (c->w - c->r < 4 + len)
			break;
		if (!body_ok(h + 4, n))
			return -EPROTO;
		c->r += 4 + (size_t)len;
		c->done++;
	}
	if (c->r == c->w)
		c->r = c->w = 0;
	return 0;
}

/* Where the connection's next receive goes and how many bytes it may take: up to RECV_WINDOW,
 * but for a frame larger than the window only the rest of that frame (it then ends the buffer
 * and the next frame starts at the front: no compaction copy). A partial frame is moved to
 * the front when the space after it is short (frames up to the window: at most one frame). */
static size_t next_recv(struct conn *c, unsigned char **at, int64_t *copied)
{
	size_t have = c->w - c->r;
	size_t want = RECV_WINDOW;
	if (have >= 4) {
		size_t need = 4 + (size_t)be32(c->buf + c->r);
		if (need > RECV_WINDOW && need - have < want)
			want = need - have;
	}
	if (c->cap - c->w < want && c->r > 0) {
		memmove(c->buf, c->buf + c->r, have);
		*copied += (int64_t)have;
		c->r = 0;
		c->w = have;
	}
	if (want > c->cap - c->w)
		want = c->cap - c->w;
	*at = c->buf + c->w;
	return want;
}

#ifdef EXACTIO_URING
/* c-uring-mshot: the bytes of one provided buffer. Whole frames are checked in place; a frame
 * that straddles buffers is copied into the connection's carry buffer until complete. */
static int consume(struct conn *c, const unsigned char *p, size_t len, uint64_t n, int64_t per, int64_t *copied)
{
	while (len > 0 && c->done < per) {
		if (c->have == 0 && len >= 4) {
			uint64_t flen = be32(p);
			if (flen != n)
				return -EPROTO;
			if (len >= 4 + flen) {
				if (!body_ok(p + 4, n))
					return -EPROTO;
				p += 4 + flen;
				len -= 4 + (size_t)flen;
				c->done++;
				continue;
			}
		}
		if (!c->carry && !(c->carry = malloc(4 + (size_t)n)))
			return -ENOMEM;
		size_t need = c->have < 4 ? 4 : 4 + (size_t)be32(c->carry);
		if (c->have >= 4 && need != 4 + n)
			return -EPROTO;
		size_t take = need - c->have < len ? need - c->have : len;
		memcpy(c->carry + c->have, p, take);
		*copied += (int64_t)take;
		c->have += take;
		p += take;
		len -= take;
		if (c->have == 4 && be32(c->carry) != n)
			return -EPROTO;
		if (c->have == 4 + n) {
			if (!body_ok(c->carry + 4, n))
				return -EPROTO;
			c->have = 0;
			c->done++;
		}
	}
	return 0;
}

static int arm_recv(struct io_uring *ring, struct conn *c, unsigned i, int64_t *copied)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
	if (!sqe)
		return -EBUSY; /* cannot happen: one receive per connection, SQ >= connections */
	unsigned char *at;
	size_t want = next_recv(c, &at, copied);
	io_uring_prep_recv(sqe, c->fd, at, want, 0);
	sqe->user_data = i;
	return 0;
}

static int arm_mshot(struct io_uring *ring, struct conn *c, unsigned i)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
	if (!sqe)
		return -EBUSY;
	io_uring_prep_recv_multishot(sqe, c->fd, NULL, 0, 0);
	sqe->flags |= IOSQE_BUFFER_SELECT;
	sqe->buf_group = MSHOT_GROUP;
	sqe->user_data = i;
	return 0;
}

static int64_t run_uring_recv(struct conn *cs, unsigned count, uint64_t n, int64_t per, exio_many_stats *st)
{
	struct io_uring ring;
	unsigned entries = pow2_at_least(count, 16);
	int rc = ring_init(&ring, entries, 2 * entries, &st->taskrun);
	if (rc < 0)
		return rc;
	unsigned open = 0;
	for (unsigned i = 0; i < count; i++) {
		if (!cs[i].open)
			continue;
		if ((rc = arm_recv(&ring, &cs[i], i, &st->bytes_copied)) < 0)
			goto out;
		open++;
	}
	while (open > 0) {
		int s = io_uring_submit_and_wait(&ring, 1);
		st->syscalls++;
		if (s < 0 && s != -EINTR && s != -EAGAIN && s != -EBUSY) {
			rc = s;
			goto out;
		}
		struct io_uring_cqe *cqe;
		unsigned head, seen = 0;
		io_uring_for_each_cqe(&ring, head, cqe)
		{
			seen++;
			unsigned i = (unsigned)cqe->user_data;
			struct conn *c = &cs[i];
			int res = cqe->res;
			st->completions++;
			if (res == -EINTR || res == -EAGAIN) {
				rc = arm_recv(&ring, c, i, &st->bytes_copied);
			} else if (res < 0) {
				rc = res;
			} else if (res == 0) {
				c->open = 0;
				open--;
			} else {
				st->receives++;
				c->w += (size_t)res;
				rc = parse_own(c, n, per);
				if (rc == 0 && c->done == per) {
					c->open = 0;
					open--;
				} else if (rc == 0) {
					rc = arm_recv(&ring, c, i, &st->bytes_copied);
				}
			}
			if (rc < 0)
				break;
		}
		io_uring_cq_advance(&ring, seen);
		if (rc < 0)
			goto out;
	}
	rc = 0;
out:
	io_uring_queue_exit(&ring);
	return rc;
}
#endif

static int64_t run_epoll(struct conn *cs, unsigned count, uint64_t n, int64_t per, exio_many_stats *st)
{
	int efd = epoll_create1(EPOLL_CLOEXEC);
	if (efd < 0)
		return -errno;
	int64_t rc = 0;
	unsigned open = 0;
	for (unsigned i = 0; i < count; i++) {
		if (!cs[i].open)
			continue;
		int fl = fcntl(cs[i].fd, F_GETFL);
		struct epoll_event ev = { .events = EPOLLIN, .data.u32 = i };
		if (fl < 0 || fcntl(cs[i].fd, F_SETFL, fl | O_NONBLOCK) < 0 || epoll_ctl(efd, EPOLL_CTL_ADD, cs[i].fd, &ev) < 0) {
			rc = -errno;
			goto out;
		}
		open++;
	}
	struct epoll_event events[MAX_EVENTS];
	int maxev = count < MAX_EVENTS ? (int)count : MAX_EVENTS;
	while (open > 0) {
		int k = epoll_wait(efd, events, maxev, -1);
		st->syscalls++;
		if (k < 0) {
			if (errno == EINTR)
				continue;
			rc = -errno;
			goto out;
		}
		st->completions += k;
		for (int j = 0; j < k; j++) {
			struct conn *c = &cs[events[j].data.u32];
			if (!c->open)
				continue;
			unsigned char *at;
			size_t want = next_recv(c, &at, &st->bytes_copied);
			ssize_t got = read(c->fd, at, want);
			st->syscalls++;
			if (got < 0 && (errno == EAGAIN || errno == EINTR))
				continue;
			if (got < 0) {
				rc = -errno;
				goto out;
			}
			if (got > 0) {
				st->receives++;
				c->w += (size_t)got;
				if ((rc = parse_own(c, n, per)) < 0)
					goto out;
			}
			if (got == 0 || c->done == per) {
				c->open = 0;
				open--;
				epoll_ctl(efd, EPOLL_CTL_DEL, c->fd, NULL);
				st->syscalls++;
			}
		}
	}
out:
	close(efd);
	return rc;
}

#ifdef EXACTIO_URING
static int64_t run_uring_mshot(struct conn *cs, unsigned count, uint64_t n, int64_t per, exio_many_stats *st)
{
	struct io_uring ring;
	unsigned entries = pow2_at_least(count, 16);
	unsigned cq = pow2_at_least(4 * entries, 4096);
	int rc = ring_init(&ring, entries, cq, &st->taskrun);
	if (rc < 0)
		return rc;
	/* The ring is FIFO, so every buffer in it gets used (and faulted in): size it by connections. */
	unsigned nbufs = pow2_at_least(2 * count, MSHOT_MIN_BUFS);
	if (nbufs > MSHOT_MAX_BUFS)
		nbufs = MSHOT_MAX_BUFS;
	st->provided_buffers = (int32_t)nbufs;
	const size_t ring_bytes = (nbufs * sizeof(struct io_uring_buf) + MANY_PAGE - 1) / MANY_PAGE * MANY_PAGE;
	const size_t pool_bytes = (size_t)nbufs * MSHOT_BUF;
	struct io_uring_buf_ring *br = mmap(NULL, ring_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	unsigned char *pool = mmap(NULL, pool_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	int registered = 0;
	if (br == MAP_FAILED || pool == MAP_FAILED) {
		rc = -ENOMEM;
		goto out;
	}
	struct io_uring_buf_reg reg;
	memset(&reg, 0, sizeof reg);
	reg.ring_addr = (uint64_t)(uintptr_t)br;
	reg.ring_entries = nbufs;
	reg.bgid = MSHOT_GROUP;
	if ((rc = io_uring_register_buf_ring(&ring, &reg, 0)) < 0)
		goto out;
	registered = 1;
	const int mask = io_uring_buf_ring_mask(nbufs);
	io_uring_buf_ring_init(br);
	for (unsigned b = 0; b < nbufs; b++)
		io_uring_buf_ring_add(br, pool + (size_t)b * MSHOT_BUF, MSHOT_BUF, (unsigned short)b, mask, (int)b);
	io_uring_buf_ring_advance(br, (int)nbufs);

	unsigned open = 0;
	for (unsigned i = 0; i < count; i++) {
		if (!cs[i].open)
			continue;
		if ((rc = arm_mshot(&ring, &cs[i], i)) < 0)
			goto out;
		open++;
	}
	while (open > 0) {
		int s = io_uring_submit_and_wait(&ring, 1);
		st->syscalls++;
		if (s < 0 && s != -EINTR && s != -EAGAIN && s != -EBUSY) {
			rc = s;
			goto out;
		}
		struct io_uring_cqe *cqe;
		unsigned head, seen = 0;
		int returned = 0;
		io_uring_for_each_cqe(&ring, head, cqe)
		{
			seen++;
			unsigned i = (unsigned)cqe->user_data;
			struct conn *c = &cs[i];
			int res = cqe->res;
			unsigned flags = cqe->flags;
			st->completions++;
			if (flags & IORING_CQE_F_BUFFER) {
				unsigned short bid = (unsigned short)(flags >> IORING_CQE_BUFFER_SHIFT);
				unsigned char *data = pool + (size_t)bid * MSHOT_BUF;
				if (res > 0 && c->open) {
					st->receives++;
					rc = consume(c, data, (size_t)res, n, per, &st->bytes_copied);
				}
				io_uring_buf_ring_add(br, data, MSHOT_BUF, bid, mask, returned++);
			}
			if (rc < 0)
				break;
			if (res == -ENOBUFS)
				st->starvations++;
			else if (res < 0 && res != -EINTR && res != -EAGAIN) {
				rc = res;
				break;
			}
			if (c->open && (res == 0 || c->done == per)) {
				c->open = 0;
				open--;
			} else if (c->open && !(flags & IORING_CQE_F_MORE)) {
				/* The multishot receive ended (ENOBUFS, or the kernel stopped it): again. */
				st->rearms++;
				if ((rc = arm_mshot(&ring, c, i)) < 0)
					break;
			}
		}
		/* Buffers go back before the next submit, so a re-armed receive finds them. */
		io_uring_buf_ring_advance(br, returned);
		io_uring_cq_advance(&ring, seen);
		if (rc < 0)
			goto out;
	}
	rc = 0;
out:
	if (registered)
		io_uring_unregister_buf_ring(&ring, MSHOT_GROUP);
	io_uring_queue_exit(&ring);
	if (br != MAP_FAILED)
		munmap(br, ring_bytes);
	if (pool != MAP_FAILED)
		munmap(pool, pool_bytes);
	return rc;
}
#endif

int64_t exio_many_run(const int *fds, int count, uint64_t frame_bytes, int64_t per_connection, int mode,
		      exio_many_stats *stats)
{
	if (count <= 0 || per_connection < 0 || frame_bytes > UINT32_MAX || !stats)
		return -EINVAL;
	memset(stats, 0, sizeof *stats);
	struct conn *cs = calloc((size_t)count, sizeof *cs);
	if (!cs)
		return -ENOMEM;
	int64_t rc = 0;
	/* Own buffers (not for mshot): a frame and a window, so a partial frame plus a full
	 * receive always fit; not pre-faulted (pages arrive as receives first touch them). */
	size_t cap = ((size_t)frame_bytes + 4 + RECV_WINDOW + MANY_PAGE - 1) / MANY_PAGE * MANY_PAGE;
	for (int i = 0; i < count; i++) {
		cs[i].fd = fds[i];
		cs[i].open = per_connection > 0;
		if (mode != EXIO_MANY_URING_MSHOT) {
			cs[i].cap = cap;
			if (!(cs[i].buf = aligned_alloc(MANY_PAGE, cap))) {
				rc = -ENOMEM;
				goto out;
			}
		}
	}
	switch (mode) {
#ifdef EXACTIO_URING
	case EXIO_MANY_URING_RECV:
		rc = run_uring_recv(cs, (unsigned)count, frame_bytes, per_connection, stats);
		break;
	case EXIO_MANY_URING_MSHOT:
		rc = run_uring_mshot(cs, (unsigned)count, frame_bytes, per_connection, stats);
		break;
#else
	case EXIO_MANY_URING_RECV:
	case EXIO_MANY_URING_MSHOT:
		rc = -ENOSYS; /* built without the IOUring trait */
		break;
#endif
	case EXIO_MANY_EPOLL:
		rc = run_epoll(cs, (unsigned)count, frame_bytes, per_connection, stats);
		break;
	default:
		rc = -EINVAL;
	}
	if (rc == 0)
		for (int i = 0; i < count; i++)
			rc += cs[i].done;
out:
	for (int i = 0; i < count; i++) {
		free(cs[i].buf);
		free(cs[i].carry);
	}
	free(cs);
	return rc;
}
