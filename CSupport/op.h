/* SPDX-License-Identifier: Apache-2.0 */
/* Private: one tagged, drained operation on a ring (op.c). */
#ifndef CSUPPORT_OP_H
#define CSUPPORT_OP_H

#include "internal.h"

struct csupport_op {
	uint64_t tag;
	int64_t deadline_ns; /* CLOCK_MONOTONIC; 0 = none */
	int res;             /* the main request's completion */
	int timeout_res;
	int wait_error;      /* the failed wait that made the operation cancel, if any */
	bool has_timeout, main_done, timeout_done, cancel_sent, cancel_done;
};

/* Starts an operation: a fresh tag, and the deadline its request must meet (0 = none). */
void csupport_op_begin(csupport_ring *ring, struct csupport_op *op, int64_t deadline_ns);

/* A free SQE for the operation's request, or NULL. */
struct io_uring_sqe *csupport_op_sqe(csupport_ring *ring);

/* Tags `sqe` (already prepared by the caller) as the operation's request, links a timeout
 * when the operation has a deadline, submits, and waits until the kernel is done with every
 * SQE of the operation. Returns the request's result (bytes or -errno; -ETIMEDOUT when the
 * deadline cancelled it), the -errno of a submission that did not happen (nothing in
 * flight), or -ENOTRECOVERABLE when the request could not be confirmed finished (the ring
 * is then broken). */
int csupport_op_run(csupport_ring *ring, struct csupport_op *op, struct io_uring_sqe *sqe);

/* CLOCK_MONOTONIC in nanoseconds. */
int64_t csupport_now_ns(void);

#endif /* CSUPPORT_OP_H */
