/* SPDX-License-Identifier: Apache-2.0 */
/* The io_uring part: compiled only on Linux with the IOUring trait (Package.swift). */
#ifdef EXACTIO_URING
/*
 * The event loop's ring: requests are queued without waiting (receive, read, send, accept, poll,
 * cancel, each tagged by the caller's user_data), submitted and reaped in batches with one
 * io_uring_enter per loop turn, and received data lands in provided buffers (a buffer ring
 * the kernel picks from when data arrives, so idle connections hold no memory).
 *
 * No policy here: which connection a tag belongs to, when to re-arm, which buffers to give
 * back, is the Swift loop's business. One thread (the loop's) calls everything in this file
 * for a given ring.
 */
#include <sys/mman.h>

#include "internal.h"

/* IOU_PBUF_RING_INC (6.12): a provided buffer may be consumed a part at a time. liburing 2.3
 * predates it; the register argument's `pad` field is the kernel's `flags`. */
#define CSUPPORT_PBUF_RING_INC 2u
/* IORING_CQE_F_BUF_MORE (6.12): the buffer is not used up; more completions will use it. */
#define CSUPPORT_IORING_CQE_F_BUF_MORE (1u << 4)

struct csupport_bufring {
	struct io_uring_buf_ring *br;
	size_t size;
	unsigned entries;
	unsigned group;
	unsigned flags;
	unsigned pending; /* buffers added since the last publish */
};

int csupport_bufring_create(csupport_ring *ring, unsigned entries, unsigned group, unsigned flags,
			    csupport_bufring **out)
{
	struct io_uring_buf_reg reg;
	csupport_bufring *b;
	void *mem;
	int ret = csupport_ring_check(ring);

	if (ret < 0)
		return ret;
	if (!out || entries == 0 || entries > 32768 || (entries & (entries - 1)))
		return -EINVAL;
	*out = NULL;
	b = calloc(1, sizeof(*b));
	if (!b)
		return -ENOMEM;
	b->size = entries * sizeof(struct io_uring_buf);
	mem = mmap(NULL, b->size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED) {
		free(b);
		return -ENOMEM;
	}
	b->br = mem;
	b->entries = entries;
	b->group = group;
	io_uring_buf_ring_init(b->br);

	memset(&reg, 0, sizeof(reg));
	reg.ring_addr = (unsigned long)(uintptr_t)mem;
	reg.ring_entries = entries;
	reg.bgid = (__u16)group;
	if (flags & CSUPPORT_BUFRING_INCREMENTAL) {
		reg.pad = CSUPPORT_PBUF_RING_INC;
		ret = io_uring_register_buf_ring(&ring->ring, &reg, 0);
		if (ret == -EINVAL) {
			/* Older kernel: whole buffers per completion. */
			reg.pad = 0;
			ret = io_uring_register_buf_ring(&ring->ring, &reg, 0);
		} else if (ret == 0) {
			b->flags |= CSUPPORT_BUFRING_INCREMENTAL;
		}
	} else {
		ret = io_uring_register_buf_ring(&ring->ring, &reg, 0);
	}
	if (ret < 0) {
		munmap(mem, b->size);
		free(b);
		return ret;
	}
	*out = b;
	return 0;
}

unsigned csupport_bufring_flags(const csupport_bufring *b)
{
	return b ? b->flags : 0;
}

void csupport_bufring_add(csupport_bufring *b, void *addr, unsigned len, unsigned short bid)
{
	io_uring_buf_ring_add(b->br, addr, len, bid, io_uring_buf_ring_mask(b->entries), (int)b->pending);
	b->pending++;
}

void csupport_bufring_publish(csupport_bufring *b)
{
	if (b->pending) {
		io_uring_buf_ring_advance(b->br, (int)b->pending);
		b->pending = 0;
	}
}

void csupport_bufring_destroy(csupport_ring *ring, csupport_bufring *b)
{
	if (!b)
		return;
	if (ring && csupport_ring_check(ring) == 0)
		io_uring_unregister_buf_ring(&ring->ring, (int)b->group);
	munmap(b->br, b->size);
	free(b);
}

/* A free SQE, flushing the queue to the kernel first when it is full. */
static struct io_uring_sqe *loop_sqe(csupport_ring *ring, int *err)
{
	struct io_uring_sqe *sqe;

	*err = csupport_ring_check(ring);
	if (*err < 0)
		return NULL;
	sqe = io_uring_get_sqe(&ring->ring);
	if (!sqe) {
		int ret = io_uring_submit(&ring->ring);

		if (ret < 0 && ret != -EBUSY && ret != -EAGAIN) {
			*err = ret;
			return NULL;
		}
		sqe = io_uring_get_sqe(&ring->ring);
		if (!sqe)
			*err = -EBUSY;
	}
	return sqe;
}

int csupport_queue_recv_multishot(csupport_ring *ring, int fd, unsigned group, unsigned limit,
				   uint64_t user_data)
{
	int err;
	struct io_uring_sqe *sqe = loop_sqe(ring, &err);

	if (!sqe)
		return err;
	/* Each completion at most `limit` too (sqe->len caps a buffer's use): the kernel checks
	 * the total only after a completion, which otherwise fills a whole provided buffer (a
	 * 4 KiB limit received 64 KiB, the start of the next frame's body, to be copied). */
	io_uring_prep_recv_multishot(sqe, fd, NULL, limit, 0);
	/* The total the request may receive before it ends (sqe->optlen, 6.16; liburing 2.3
	 * names the field file_index). Older kernels refuse it with -EINVAL. */
	sqe->file_index = limit;
	sqe->flags |= IOSQE_BUFFER_SELECT;
	sqe->buf_group = (__u16)group;
	sqe->user_data = user_data;
	return 0;
}

int csupport_queue_recv(csupport_ring *ring, int fd, void *dst, unsigned len, int flags, uint64_t user_data)
{
	int err;
	struct io_uring_sqe *sqe = loop_sqe(ring, &err);

	if (!sqe)
		return err;
	io_uring_prep_recv(sqe, fd, dst, len, flags);
	sqe->user_data = user_data;
	return 0;
}

int csupport_queue_read_select(csupport_ring *ring, int fd, unsigned group, unsigned len, uint64_t user_data)
{
	int err;
	struct io_uring_sqe *sqe = loop_sqe(ring, &err);

	if (!sqe)
		return err;
	io_uring_prep_read(sqe, fd, NULL, len, (__u64)-1);
	sqe->flags |= IOSQE_BUFFER_SELECT;
	sqe->buf_group = (__u16)group;
	sqe->user_data = user_data;
	return 0;
}

int csupport_queue_read(csupport_ring *ring, int fd, void *dst, unsigned len, int slot, uint64_t user_data)
{
	int err;
	struct io_uring_sqe *sqe = loop_sqe(ring, &err);

	if (!sqe)
		return err;
	if (slot >= 0)
		io_uring_prep_read_fixed(sqe, fd, dst, len, (__u64)-1, slot);
	else
		io_uring_prep_read(sqe, fd, dst, len, (__u64)-1);
	sqe->user_data = user_data;
	return 0;
}

int csupport_queue_accept(csupport_ring *ring, int fd, int nonblocking, uint64_t user_data)
{
	int err;
	struct io_uring_sqe *sqe = loop_sqe(ring, &err);

	if (!sqe)
		return err;
	io_uring_prep_accept(sqe, fd, NULL, NULL, SOCK_CLOEXEC | (nonblocking ? SOCK_NONBLOCK : 0));
	sqe->user_data = user_data;
	return 0;
}

int csupport_queue_poll(csupport_ring *ring, int fd, unsigned events, int multishot, uint64_t user_data)
{
	int err;
	struct io_uring_sqe *sqe = loop_sqe(ring, &err);

	if (!sqe)
		return err;
	if (multishot)
		io_uring_prep_poll_multishot(sqe, fd, events);
	else
		io_uring_prep_poll_add(sqe, fd, events);
	sqe->user_data = user_data;
	return 0;
}

int csupport_queue_send(csupport_ring *ring, int fd, const void *buf, unsigned len, int zerocopy,
			uint64_t user_data)
{
	int err;
	struct io_uring_sqe *sqe = loop_sqe(ring, &err);

	if (!sqe)
		return err;
	if (zerocopy)
		io_uring_prep_send_zc(sqe, fd, buf, len, MSG_NOSIGNAL, 0);
	else
		io_uring_prep_send(sqe, fd, buf, len, MSG_NOSIGNAL);
	sqe->user_data = user_data;
	return 0;
}

int csupport_queue_sendmsg(csupport_ring *ring, int fd, const void *msg, int zerocopy, uint64_t user_data)
{
	int err;
	struct io_uring_sqe *sqe = loop_sqe(ring, &err);

	if (!sqe)
		return err;
	if (zerocopy)
		io_uring_prep_sendmsg_zc(sqe, fd, (const struct msghdr *)msg, MSG_NOSIGNAL);
	else
		io_uring_prep_sendmsg(sqe, fd, (const struct msghdr *)msg, MSG_NOSIGNAL);
	sqe->user_data = user_data;
	return 0;
}

int csupport_queue_cancel(csupport_ring *ring, uint64_t target, int all, uint64_t user_data)
{
	int err;
	struct io_uring_sqe *sqe = loop_sqe(ring, &err);

	if (!sqe)
		return err;
	io_uring_prep_cancel64(sqe, target, all ? IORING_ASYNC_CANCEL_ALL : 0);
	sqe->user_data = user_data;
	return 0;
}

int csupport_queue_cancel_all(csupport_ring *ring, uint64_t user_data)
{
	int err;
	struct io_uring_sqe *sqe = loop_sqe(ring, &err);

	if (!sqe)
		return err;
	io_uring_prep_cancel64(sqe, 0, IORING_ASYNC_CANCEL_ANY | IORING_ASYNC_CANCEL_ALL);
	sqe->user_data = user_data;
	return 0;
}

int csupport_enter(csupport_ring *ring, unsigned wait_nr, int64_t timeout_ns)
{
	struct io_uring_cqe *cqe;
	int ret = csupport_ring_check(ring);

	if (ret < 0)
		return ret;
	ret = csupport_injected_wait_failure(ring);
	if (ret < 0)
		return ret;
	if (timeout_ns > 0 && wait_nr > 0) {
		struct __kernel_timespec ts = {
			.tv_sec = timeout_ns / 1000000000,
			.tv_nsec = timeout_ns % 1000000000,
		};

		ret = io_uring_submit_and_wait_timeout(&ring->ring, &cqe, wait_nr, &ts, NULL);
	} else if (wait_nr == 0) {
		/* Submit and run pending task work (with DEFER_TASKRUN, completions are posted only
		 * when this thread asks for events), without waiting. */
		ret = io_uring_submit_and_get_events(&ring->ring);
	} else {
		ret = io_uring_submit_and_wait(&ring->ring, wait_nr);
	}
	/* A wait that ended early is not a failure: a timeout passed (-ETIME), a signal arrived
	 * (-EINTR: a handler ran, or a tracer attached), or the completion queue is full (-EBUSY)
	 * or the kernel is short of memory (-EAGAIN) until the caller reaps. The caller reaps what
	 * is there and comes back. */
	if (ret == -ETIME || ret == -EINTR || ret == -EBUSY || ret == -EAGAIN)
		ret = 0;
	return ret;
}

unsigned csupport_reap(csupport_ring *ring, struct csupport_cqe *out, unsigned max)
{
	struct io_uring_cqe *cqe;
	unsigned head, n = 0;

	if (!ring || !out)
		return 0;
	io_uring_for_each_cqe(&ring->ring, head, cqe) {
		if (n == max)
			break;
		out[n].user_data = cqe->user_data;
		out[n].res = cqe->res;
		out[n].flags = 0;
		if (cqe->flags & IORING_CQE_F_BUFFER) {
			out[n].flags |= CSUPPORT_CQE_BUFFER;
			out[n].buffer = (uint16_t)(cqe->flags >> IORING_CQE_BUFFER_SHIFT);
		} else {
			out[n].buffer = 0;
		}
		if (cqe->flags & IORING_CQE_F_MORE)
			out[n].flags |= CSUPPORT_CQE_MORE;
		if (cqe->flags & CSUPPORT_IORING_CQE_F_BUF_MORE)
			out[n].flags |= CSUPPORT_CQE_BUFFER_MORE;
		if (cqe->flags & IORING_CQE_F_NOTIF)
			out[n].flags |= CSUPPORT_CQE_NOTIF;
		n++;
	}
	io_uring_cq_advance(&ring->ring, n);
	return n;
}

#endif /* EXACTIO_URING */
