/* SPDX-License-Identifier: Apache-2.0 */
/* The io_uring part: compiled only on Linux with the IOUring trait (Package.swift). */
#ifdef EXACTIO_URING
/*
 * Reads in flight for regular files: one large read at an explicit offset split into chunks,
 * up to `depth` of them submitted at once. Each chunk lands in its own part of the
 * destination, so completions may come in any order; the call returns only when every
 * request it made has completed, and reports the bytes that are contiguous from the start.
 */
#include "internal.h"


struct chunk_state {
	size_t got;
	bool queued;
	bool ended; /* a read of it returned 0: the file ends inside (or at the start of) it */
};

static size_t chunk_len(const struct csupport_multi_req *req, size_t i)
{
	size_t start = i * req->chunk;
	size_t left = req->len - start;
	return left < req->chunk ? left : req->chunk;
}

static bool queue_chunk(csupport_ring *ring, const struct csupport_multi_req *req, struct chunk_state *c, size_t i,
			uint64_t base, struct csupport_read_res *res)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(&ring->ring);
	size_t off = i * req->chunk + c[i].got;
	unsigned len = (unsigned)(chunk_len(req, i) - c[i].got);
	unsigned char *dst = (unsigned char *)req->dst + off;

	if (!sqe)
		return false;
	if (req->slot >= 0) {
		io_uring_prep_read_fixed(sqe, req->fd, dst, len, (__u64)req->offset + off, req->slot);
		res->fixed_reads++;
	} else {
		io_uring_prep_read(sqe, req->fd, dst, len, (__u64)req->offset + off);
	}
	sqe->user_data = CSUPPORT_TAG_MULTI | (base + i);
	c[i].queued = true;
	res->reads++;
	return true;
}

static bool needs_more(const struct csupport_multi_req *req, const struct chunk_state *c, size_t i)
{
	return !c[i].queued && !c[i].ended && c[i].got < chunk_len(req, i);
}

int csupport_read_multi(csupport_ring *ring, const struct csupport_multi_req *req, struct csupport_read_res *res)
{
	struct io_uring *r;
	struct chunk_state *c;
	size_t n, next = 0, limit, i;
	unsigned inflight = 0, depth;
	uint64_t base;
	int error = 0, failures = 0, ret;
	bool shuffle;

	ret = csupport_call_begin(ring, req, res, sizeof(*res));
	if (ret < 0)
		return ret;
	if (req->fd < 0 || req->offset < 0 || req->chunk == 0 || req->chunk > (1u << 30) || (req->len && !req->dst))
		return -EINVAL;
	if (req->len == 0)
		return 0;
	r = &ring->ring;
	n = (req->len + req->chunk - 1) / req->chunk;
	c = calloc(n, sizeof(*c));
	if (!c)
		return -ENOMEM;
	depth = req->depth == 0 ? 1 : req->depth;
	if (depth > r->sq.ring_entries)
		depth = r->sq.ring_entries;
	base = ring->next_tag & CSUPPORT_TAG_NUMBER;
	ring->next_tag += n;
	/* Chunks at or past `limit` are not (re)submitted: the file ended before them, or an
	 * error made their bytes useless. */
	limit = n;
	shuffle = atomic_load_explicit(&ring->shuffle_completions, memory_order_relaxed) != 0;

	for (;;) {
		/* The unfinished parts of chunks after short reads first, then new chunks, up to
		 * `depth` in flight. Nothing new once an error was seen: only draining. */
		if (error == 0) {
			for (i = 0; i < next && i < limit && inflight < depth; i++) {
				if (needs_more(req, c, i) && queue_chunk(ring, req, c, i, base, res))
					inflight++;
			}
			while (inflight < depth && next < limit && queue_chunk(ring, req, c, next, base, res)) {
				next++;
				inflight++;
			}
		}
		if (inflight == 0)
			break;
		/* Test seam (csupport_debug_shuffle_completions): wait for every request in flight,
		 * then handle the completions last to first, as if the kernel had finished them in
		 * reverse order. */
		ret = csupport_injected_wait_failure(ring);
		if (ret == 0)
			ret = io_uring_submit_and_wait(r, shuffle ? inflight : 1);
		if (ret < 0 && ret != -EINTR && ret != -EAGAIN && ret != -EBUSY) {
			/* The wait failed: submit nothing new, keep waiting until every request in
			 * flight completed (they write into the caller's memory). */
			if (error == 0)
				error = ret;
			if (++failures >= CSUPPORT_WAIT_ATTEMPTS) {
				csupport_ring_mark_broken(ring);
				free(c);
				return -ENOTRECOVERABLE;
			}
		}
		{
			struct io_uring_cqe *cqes[64];
			unsigned got = io_uring_peek_batch_cqe(r, cqes, 64);
			unsigned k;

			for (k = 0; k < got; k++) {
				struct io_uring_cqe *cqe = cqes[shuffle ? got - 1 - k : k];
				uint64_t tag = cqe->user_data;
				int cres = cqe->res;

				if ((tag & CSUPPORT_TAG_MULTI) == 0 || (tag & ~CSUPPORT_TAG_MULTI) < base || (tag & ~CSUPPORT_TAG_MULTI) >= base + n)
					continue; /* an ignorable NOP left by an earlier operation */
				i = (size_t)((tag & ~CSUPPORT_TAG_MULTI) - base);
				c[i].queued = false;
				inflight--;
				if (cres == -EINTR || cres == -EAGAIN)
					continue; /* resubmitted by the loop */
				if (cres < 0) {
					if (i < limit) {
						if (error == 0)
							error = cres;
						limit = i;
					}
					continue;
				}
				if (cres == 0) {
					c[i].ended = true;
					if (i + 1 < limit)
						limit = i + 1;
					continue;
				}
				c[i].got += (size_t)cres;
				if (c[i].got < chunk_len(req, i)) {
					/* A regular file reads short only at its end: asking again at an
					 * unaligned offset would fail under O_DIRECT. */
					c[i].ended = true;
					if (i + 1 < limit)
						limit = i + 1;
				}
			}
			io_uring_cq_advance(r, got);
		}
	}
	for (i = 0; i < n; i++) {
		res->done += c[i].got;
		if (c[i].got < chunk_len(req, i))
			break;
	}
	free(c);
	/* An error past the contiguous bytes' end that they do not need is still reported: the
	 * caller asked for more than `done`. */
	return res->done == req->len ? 0 : error;
}

#endif /* EXACTIO_URING */
