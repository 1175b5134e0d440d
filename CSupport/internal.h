/* SPDX-License-Identifier: Apache-2.0 */
/* Private to ExactIOCSupport: the only place besides the .c files that sees liburing. */
#ifndef CSUPPORT_INTERNAL_H
#define CSUPPORT_INTERNAL_H

/* System headers before liburing.h: liburing 2.3 defines feature macros, which must not change what the
 * system headers declare. */
#include <errno.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#ifdef EXACTIO_URING /* only the io_uring part's .c files include this header, under the same guard */
#include <liburing.h>
#endif

#include "include/ExactIOCSupport.h"

/*
 * The user_data of the blocking calls' requests: the high bits say what a request is, the low
 * 40 bits number the operation (ring->next_tag), so a completion is only ever taken by the
 * operation it belongs to. (The event loop's requests carry the Swift loop's own tags and never
 * share a ring with these.)
 */
#define CSUPPORT_TAG_TIMEOUT (1ull << 62) /* a linked timeout (op.c) */
#define CSUPPORT_TAG_CANCEL (1ull << 61)  /* an ASYNC_CANCEL of a request in flight (op.c) */
#define CSUPPORT_TAG_IGNORE (1ull << 60)  /* a NOP whose completion nobody waits for */
#define CSUPPORT_TAG_MULTI (1ull << 59)   /* a chunk of csupport_read_multi */
#define CSUPPORT_TAG_SPLICE (1ull << 58)  /* a splice of csupport_splice */
#define CSUPPORT_TAG_NUMBER ((1ull << 40) - 1)

/* How many failed waits a call tolerates (EINTR excluded) before the ring is declared broken
 * (a request that cannot be confirmed finished must not have its memory reused). */
#define CSUPPORT_WAIT_ATTEMPTS 64

/* The largest single read request (the kernel caps a read at 2 GiB - 4 KiB). */
#define CSUPPORT_MAX_REQUEST (1u << 30)

struct csupport_ring {
	struct io_uring ring;
	/* The fork generation the ring was created in (see csupport_fork_generation). A ring
	 * inherited by a child process shares its queues and registered buffers with the parent:
	 * the child must not submit, register or unregister anything on it. */
	unsigned generation;
	/* Set when a request may still be in flight after the ring failed to confirm its end
	 * (a wait that kept failing): nothing may be submitted any more. Atomic: it is read by
	 * csupport_ring_check from any thread (a view released on another thread unregisters its
	 * buffer: register.c), while the ring's owner may set it. Set with
	 * csupport_ring_mark_broken, read with csupport_ring_is_broken. */
	atomic_bool broken;
	/* Tag of the next operation (user_data); operations are numbered so that a completion is
	 * only ever taken by the operation it belongs to. */
	uint64_t next_tag;
	/* Test seam (debug.c): waits still to fail, and with which errno. */
	atomic_int injected_waits;
	atomic_int injected_errno;
	/* Test seam (debug.c): csupport_read_multi handles completions in reverse order. */
	atomic_int shuffle_completions;
};

/* The ring's `broken` flag (see struct csupport_ring): set once, never cleared. Release/acquire,
 * so a thread that sees it set also sees what the ring's owner did before setting it. */
static inline void csupport_ring_mark_broken(csupport_ring *ring)
{
	atomic_store_explicit(&ring->broken, true, memory_order_release);
}

static inline bool csupport_ring_is_broken(const csupport_ring *ring)
{
	return atomic_load_explicit(&ring->broken, memory_order_acquire);
}

/* The current fork generation: incremented in every child created by fork(). */
unsigned csupport_fork_generation(void);

/* Checks the ring can be used by this process: -EINVAL (NULL), -EBADFD (inherited through
 * fork), -ENOTRECOVERABLE (broken), else 0. */
int csupport_ring_check(const csupport_ring *ring);

/* The opening of every blocking call: `req` and `res` present (-EINVAL otherwise), `res`
 * zeroed (`res_size` bytes), and the ring usable by this process (csupport_ring_check). */
static inline int csupport_call_begin(const csupport_ring *ring, const void *req, void *res, size_t res_size)
{
	if (!req || !res)
		return -EINVAL;
	memset(res, 0, res_size);
	return csupport_ring_check(ring);
}

/* Test seam (debug.c): consumes one injected wait failure, returning its -errno, or 0. */
int csupport_injected_wait_failure(csupport_ring *ring);

#endif /* CSUPPORT_INTERNAL_H */
