/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The hot loop: read at least `min` bytes into one destination range, resubmitting after
 * short reads. One request is in flight at a time: on a stream, reads must land in order.
 */
#include "internal.h"

/* Largest single request: the kernel caps one read at INT_MAX & PAGE_MASK anyway. */
#define CSUPPORT_MAX_REQUEST (1u << 30)

/* Submits what is queued and waits for one completion; retries EINTR without losing the
 * request. Returns the completion's result (bytes or -errno), or -errno of the wait. */
static int submit_and_reap(struct io_uring *ring, uint64_t *submissions)
{
	struct io_uring_cqe *cqe;
	int ret;

	*submissions += 1;
	for (;;) {
		ret = io_uring_submit_and_wait(ring, 1);
		if (ret >= 0)
			break;
		if (ret != -EINTR && ret != -EAGAIN && ret != -EBUSY)
			return ret;
		/* Interrupted: resubmit only if the entry did not reach the kernel. */
		if (io_uring_sq_ready(ring) == 0)
			break;
	}
	for (;;) {
		ret = io_uring_wait_cqe(ring, &cqe);
		if (ret == 0)
			break;
		if (ret != -EINTR)
			return ret;
	}
	ret = cqe->res;
	io_uring_cqe_seen(ring, cqe);
	return ret;
}

/* Blocks until fd is readable (for non-blocking descriptors that returned -EAGAIN). */
static int wait_readable(struct io_uring *ring, int fd, uint64_t *submissions)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
	int ret;

	if (!sqe)
		return -EBUSY;
	io_uring_prep_poll_add(sqe, fd, POLLIN);
	ret = submit_and_reap(ring, submissions);
	return ret < 0 ? ret : 0;
}

int csupport_read(csupport_ring *ring, int fd, void *dst, size_t cap, size_t min, int slot,
		  unsigned flags, size_t *done, uint64_t *submissions)
{
	struct io_uring *r;
	unsigned char *base = dst;
	size_t got = 0;
	int ret = 0;

	if (!ring || !done || !submissions || min > cap || (cap && !dst) || fd < 0)
		return -EINVAL;
	r = &ring->ring;
	*done = 0;

	while (got < min) {
		struct io_uring_sqe *sqe = io_uring_get_sqe(r);
		size_t want;

		if (!sqe) {
			ret = -EBUSY;
			break;
		}
		if (slot < 0 && (flags & CSUPPORT_READ_RECV_WAITALL)) {
			/* WAITALL waits for every byte asked for: ask for the required ones only,
			 * or a peer waiting for our reply would deadlock us. */
			want = min - got;
			if (want > CSUPPORT_MAX_REQUEST)
				want = CSUPPORT_MAX_REQUEST;
			io_uring_prep_recv(sqe, fd, base + got, want, MSG_WAITALL);
		} else {
			want = cap - got;
			if (want > CSUPPORT_MAX_REQUEST)
				want = CSUPPORT_MAX_REQUEST;
			if (slot >= 0)
				io_uring_prep_read_fixed(sqe, fd, base + got, (unsigned)want,
							 (__u64)-1, slot);
			else
				io_uring_prep_read(sqe, fd, base + got, (unsigned)want, (__u64)-1);
		}

		ret = submit_and_reap(r, submissions);
		if (ret > 0) {
			got += (size_t)ret;
			ret = 0;
			continue;
		}
		if (ret == 0)
			break; /* end of stream */
		if (ret == -EINTR) {
			ret = 0;
			continue;
		}
		if (ret == -EAGAIN) {
			ret = wait_readable(r, fd, submissions);
			if (ret < 0)
				break;
			continue;
		}
		break;
	}
	*done = got;
	return ret < 0 ? ret : 0;
}
