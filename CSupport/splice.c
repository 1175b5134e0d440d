/* SPDX-License-Identifier: Apache-2.0 */
/* The io_uring part: compiled only on Linux with the IOUring trait (Package.swift). */
#ifdef EXACTIO_URING
/*
 * Forwarding with IORING_OP_SPLICE: source -> pipe -> destination, the two splices of a chunk
 * linked in one submission (one io_uring_enter per chunk). A short first splice (the source had
 * fewer bytes, or ended) breaks the link: the second is cancelled and what the first moved is
 * drained from the pipe by a splice of its own. Every request completes before the call
 * returns. Nothing here waits for readiness: a descriptor that would block (EAGAIN) ends the
 * call, with the bytes still in the pipe counted in res->in_pipe, and the caller waits.
 */
#include <fcntl.h>

#include "internal.h"


/* Waits until the completions tagged `tag_a` (and `tag_b`, if non-zero) arrived; their results
 * in *a and *b. Foreign completions (ignorable NOPs of earlier operations) are dropped. */
static int reap(csupport_ring *ring, uint64_t tag_a, int *a, uint64_t tag_b, int *b)
{
	bool got_a = false, got_b = tag_b == 0;
	int failures = 0;

	while (!got_a || !got_b) {
		struct io_uring_cqe *cqe;
		int ret = io_uring_wait_cqe(&ring->ring, &cqe);

		if (ret == -EINTR)
			continue;
		if (ret < 0) {
			if (++failures >= CSUPPORT_WAIT_ATTEMPTS) {
				csupport_ring_mark_broken(ring);
				return -ENOTRECOVERABLE;
			}
			continue;
		}
		if (cqe->user_data == tag_a) {
			*a = cqe->res;
			got_a = true;
		} else if (tag_b && cqe->user_data == tag_b) {
			*b = cqe->res;
			got_b = true;
		}
		io_uring_cqe_seen(&ring->ring, cqe);
	}
	return 0;
}

static uint64_t next_tag(csupport_ring *ring)
{
	return CSUPPORT_TAG_SPLICE | (ring->next_tag++ & CSUPPORT_TAG_NUMBER);
}

int csupport_splice(csupport_ring *ring, const struct csupport_splice_req *req, struct csupport_splice_res *res)
{
	int ret = csupport_call_begin(ring, req, res, sizeof(*res));

	if (ret < 0)
		return ret;
	if (req->in < 0 || req->out < 0 || req->pipe_r < 0 || req->pipe_w < 0 || req->chunk == 0)
		return -EINVAL;

	while (res->moved < req->len) {
		size_t want = req->len - res->moved;
		unsigned len = (unsigned)(want < req->chunk ? want : req->chunk);
		uint64_t ta = next_tag(ring), tb = next_tag(ring);
		struct io_uring_sqe *a = io_uring_get_sqe(&ring->ring);
		struct io_uring_sqe *b = a ? io_uring_get_sqe(&ring->ring) : NULL;
		int ra = 0, rb = 0;
		size_t in_pipe;

		if (!a || !b) {
			if (a) {
				io_uring_prep_nop(a);
				a->user_data = CSUPPORT_TAG_IGNORE;
			}
			return -EBUSY;
		}
		io_uring_prep_splice(a, req->in, -1, req->pipe_w, -1, len, SPLICE_F_MOVE);
		a->flags |= IOSQE_IO_LINK;
		a->user_data = ta;
		io_uring_prep_splice(b, req->pipe_r, -1, req->out, -1, len, SPLICE_F_MOVE);
		b->user_data = tb;
		res->submissions += 2;
		do {
			ret = io_uring_submit(&ring->ring);
		} while (ret == -EINTR);
		if (ret < 0)
			return ret;
		ret = reap(ring, ta, &ra, tb, &rb);
		if (ret < 0)
			return ret;
		if (ra < 0)
			return ra; /* nothing moved by this chunk (b was cancelled) */
		if (ra == 0)
			return 0; /* end of stream: moved < len tells the caller */
		in_pipe = (size_t)ra;
		if (rb > 0) {
			res->moved += (size_t)rb;
			in_pipe -= (size_t)rb;
		} else if (rb < 0 && rb != -ECANCELED) {
			res->in_pipe = in_pipe;
			return rb;
		}
		/* What the first splice moved and the second did not: a splice of its own. */
		while (in_pipe > 0) {
			uint64_t tc = next_tag(ring);
			struct io_uring_sqe *c = io_uring_get_sqe(&ring->ring);
			int rc = 0;

			if (!c) {
				res->in_pipe = in_pipe;
				return -EBUSY;
			}
			io_uring_prep_splice(c, req->pipe_r, -1, req->out, -1, (unsigned)in_pipe, SPLICE_F_MOVE);
			c->user_data = tc;
			res->submissions++;
			do {
				ret = io_uring_submit(&ring->ring);
			} while (ret == -EINTR);
			if (ret < 0) {
				res->in_pipe = in_pipe;
				return ret;
			}
			ret = reap(ring, tc, &rc, 0, NULL);
			if (ret < 0) {
				res->in_pipe = in_pipe;
				return ret;
			}
			if (rc == -EINTR)
				continue;
			if (rc == -EAGAIN) {
				/* The destination would block (O_NONBLOCK, or a socket's send
				 * timeout): the caller waits for it with poll(2) and moves the
				 * pipe's bytes itself. Resubmitting here would spin, as a splice
				 * in io_uring's worker never waits on a non-blocking descriptor. */
				res->in_pipe = in_pipe;
				return rc;
			}
			if (rc <= 0) {
				res->in_pipe = in_pipe;
				return rc < 0 ? rc : -EPIPE;
			}
			res->moved += (size_t)rc;
			in_pipe -= (size_t)rc;
		}
	}
	return 0;
}

#endif /* EXACTIO_URING */
