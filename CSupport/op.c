/* SPDX-License-Identifier: Apache-2.0 */
/* The io_uring part: compiled only on Linux with the IOUring trait (Package.swift). */
#ifdef EXACTIO_URING
/*
 * One blocking operation on a ring: a request (with an optional linked timeout) is
 * submitted, and the call returns only once the kernel is done with it. Every SQE is tagged
 * (user_data), so a completion is only ever taken by the operation it belongs to; when the
 * wait fails, the request is cancelled (IORING_OP_ASYNC_CANCEL) and drained before the call
 * returns; if even that fails, the ring is marked broken and nothing is submitted again.
 */
#include "op.h"


static struct io_uring_sqe *get_sqe(struct io_uring *r)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(r);

	if (!sqe) {
		/* Full: flush what is queued (only ignorable NOPs can be queued here). */
		io_uring_submit(r);
		sqe = io_uring_get_sqe(r);
	}
	return sqe;
}

/* Turns SQEs that were queued but not consumed by the kernel into tagged NOPs, so that
 * whenever they are submitted they complete harmlessly and are ignored. */
static void neutralize_pending(struct io_uring *r)
{
	struct io_uring_sq *sq = &r->sq;
	unsigned head = io_uring_smp_load_acquire(sq->khead);
	unsigned tail = sq->sqe_tail;
	unsigned i;

	for (i = head; i != tail; i++) {
		struct io_uring_sqe *sqe = &sq->sqes[i & *sq->kring_mask];

		io_uring_prep_nop(sqe);
		sqe->user_data = CSUPPORT_TAG_IGNORE;
	}
}

void csupport_op_begin(csupport_ring *ring, struct csupport_op *op, int64_t deadline_ns)
{
	memset(op, 0, sizeof(*op));
	op->tag = ring->next_tag++ & CSUPPORT_TAG_NUMBER;
	op->deadline_ns = deadline_ns;
}

int64_t csupport_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

struct io_uring_sqe *csupport_op_sqe(csupport_ring *ring)
{
	return get_sqe(&ring->ring);
}

/* Records one completion for `op`; completions of other (earlier, cancelled) operations and
 * ignorable NOPs are dropped. */
static void dispatch(struct csupport_op *op, struct io_uring_cqe *cqe)
{
	uint64_t tag = cqe->user_data;

	if (tag == op->tag) {
		op->main_done = true;
		op->res = cqe->res;
	} else if (tag == (op->tag | CSUPPORT_TAG_TIMEOUT)) {
		op->timeout_done = true;
		op->timeout_res = cqe->res;
	} else if (tag == (op->tag | CSUPPORT_TAG_CANCEL)) {
		op->cancel_done = true;
	}
}

static bool op_finished(const struct csupport_op *op)
{
	return op->main_done && (!op->has_timeout || op->timeout_done) &&
	       (!op->cancel_sent || op->cancel_done);
}

static int wait_one(csupport_ring *ring, struct csupport_op *op)
{
	struct io_uring *r = &ring->ring;
	struct io_uring_cqe *cqe;
	int ret = csupport_injected_wait_failure(ring);

	if (ret == 0)
		ret = io_uring_wait_cqe(r, &cqe);
	if (ret < 0)
		return ret;
	dispatch(op, cqe);
	io_uring_cqe_seen(r, cqe);
	return 0;
}

/* The request may be in flight and the wait failed: cancel it and wait until the kernel has
 * let go of it. Returns 0 when drained, -ENOTRECOVERABLE (ring marked broken) otherwise. */
static int cancel_and_drain(csupport_ring *ring, struct csupport_op *op)
{
	struct io_uring *r = &ring->ring;
	int failures = 0;

	if (!op->main_done) {
		struct io_uring_sqe *sqe = get_sqe(r);

		if (sqe) {
			io_uring_prep_cancel64(sqe, op->tag, 0);
			sqe->user_data = op->tag | CSUPPORT_TAG_CANCEL;
			op->cancel_sent = true;
		}
	}
	while (!op_finished(op)) {
		int ret = io_uring_submit(r);

		if (ret >= 0 || ret == -EINTR || ret == -EAGAIN || ret == -EBUSY)
			ret = wait_one(ring, op);
		if (ret == 0 || ret == -EINTR)
			continue;
		if (++failures >= CSUPPORT_WAIT_ATTEMPTS) {
			csupport_ring_mark_broken(ring);
			return -ENOTRECOVERABLE;
		}
	}
	return 0;
}

static int op_result(const struct csupport_op *op)
{
	if (op->res == -ECANCELED) {
		if (op->has_timeout && op->timeout_res == -ETIME)
			return -ETIMEDOUT;
		if (op->wait_error)
			return op->wait_error;
	}
	/* A request that completed despite a failed wait keeps its result: its bytes are real. */
	return op->res;
}

int csupport_op_run(csupport_ring *ring, struct csupport_op *op, struct io_uring_sqe *sqe)
{
	struct io_uring *r = &ring->ring;
	struct __kernel_timespec ts;
	int ret;

	sqe->user_data = op->tag;
	if (op->deadline_ns > 0) {
		int64_t left = op->deadline_ns - csupport_now_ns();
		struct io_uring_sqe *tsqe;

		if (left <= 0) {
			/* Nothing was submitted: take the prepared SQE back as an ignorable NOP. */
			neutralize_pending(r);
			return -ETIMEDOUT;
		}
		tsqe = get_sqe(r);
		if (!tsqe) {
			neutralize_pending(r);
			return -EBUSY;
		}
		ts.tv_sec = left / 1000000000;
		ts.tv_nsec = left % 1000000000;
		sqe->flags |= IOSQE_IO_LINK;
		io_uring_prep_link_timeout(tsqe, &ts, 0);
		tsqe->user_data = op->tag | CSUPPORT_TAG_TIMEOUT;
		op->has_timeout = true;
	}

	for (;;) {
		int injected = csupport_injected_wait_failure(ring);

		if (injected < 0) {
			/* Test seam: the request reaches the kernel, then the wait "fails". */
			io_uring_submit(r);
			op->wait_error = injected;
			ret = cancel_and_drain(ring, op);
			return ret < 0 ? ret : op_result(op);
		}
		ret = io_uring_submit_and_wait(r, 1);
		if (ret >= 0)
			break;
		if (ret == -EINTR || ret == -EAGAIN || ret == -EBUSY) {
			/* Interrupted: submit again only what the kernel did not take. */
			if (io_uring_sq_ready(r) == 0)
				break;
			continue;
		}
		if (io_uring_sq_ready(r) > 0) {
			/* Not submitted at all: nothing is in flight. */
			neutralize_pending(r);
			return ret;
		}
		/* Submitted, then the wait failed: the request is in flight. */
		op->wait_error = ret;
		ret = cancel_and_drain(ring, op);
		return ret < 0 ? ret : op_result(op);
	}
	while (!op_finished(op)) {
		ret = wait_one(ring, op);
		if (ret == 0 || ret == -EINTR)
			continue;
		op->wait_error = ret;
		ret = cancel_and_drain(ring, op);
		return ret < 0 ? ret : op_result(op);
	}
	return op_result(op);
}

#endif /* EXACTIO_URING */
