/* SPDX-License-Identifier: Apache-2.0 */
/* The io_uring part: compiled only on Linux with the IOUring trait (Package.swift). */
#ifdef EXACTIO_URING
/*
 * The hot loop: read at least `min` bytes into one destination range, resubmitting after
 * short reads. One request is in flight at a time: on a stream, reads must land in order.
 */
#include "op.h"

/* Largest single request: the kernel caps one read at INT_MAX & PAGE_MASK anyway. */

/* Blocks until fd is readable (for non-blocking descriptors that returned -EAGAIN). */
static int wait_readable(csupport_ring *ring, int fd, int64_t deadline, struct csupport_read_res *res)
{
	struct csupport_op op;
	struct io_uring_sqe *sqe;
	int ret;

	csupport_op_begin(ring, &op, deadline);
	sqe = csupport_op_sqe(ring);
	if (!sqe)
		return -EBUSY;
	io_uring_prep_poll_add(sqe, fd, POLLIN);
	res->polls++;
	ret = csupport_op_run(ring, &op, sqe);
	return ret < 0 ? ret : 0;
}

int csupport_read(csupport_ring *ring, const struct csupport_read_req *req, struct csupport_read_res *res)
{
	unsigned char *base;
	int64_t deadline = 0;
	size_t got = 0;
	int ret;

	ret = csupport_call_begin(ring, req, res, sizeof(*res));
	if (ret < 0)
		return ret;
	if (req->min > req->cap || (req->cap && !req->dst) || req->fd < 0)
		return -EINVAL;
	base = req->dst;
	if (req->timeout_ns > 0)
		deadline = csupport_now_ns() + req->timeout_ns;

	while (got < req->min) {
		struct csupport_op op;
		struct io_uring_sqe *sqe;
		size_t want = req->cap - got;
		__u64 offset = req->offset < 0 ? (__u64)-1 : (__u64)req->offset + got;

		if (want > CSUPPORT_MAX_REQUEST)
			want = CSUPPORT_MAX_REQUEST;
		csupport_op_begin(ring, &op, deadline);
		sqe = csupport_op_sqe(ring);
		if (!sqe) {
			ret = -EBUSY;
			break;
		}
		if (req->slot >= 0) {
			io_uring_prep_read_fixed(sqe, req->fd, base + got, (unsigned)want, offset, req->slot);
			res->fixed_reads++;
		} else {
			io_uring_prep_read(sqe, req->fd, base + got, (unsigned)want, offset);
		}
		res->reads++;

		ret = csupport_op_run(ring, &op, sqe);
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
			ret = wait_readable(ring, req->fd, deadline, res);
			if (ret < 0)
				break;
			continue;
		}
		break;
	}
	res->done = got;
	return ret < 0 ? ret : 0;
}

#endif /* EXACTIO_URING */
