/* SPDX-License-Identifier: Apache-2.0 */
/*
 * CSupport: the thin C layer of ExactIO over liburing.
 *
 * It owns an io_uring ring and its registered ("fixed") buffer table, and runs the hot read
 * loop. It makes no policy or allocation decisions and knows no Swift type.
 *
 * This header is deliberately opaque: it must not include <liburing.h> or <linux/io_uring.h>.
 * swift-system ships its own copy of the io_uring UAPI header, and a Swift module that sees
 * both fails to build (STYLE.md 2.3, trap 2). Only the .c files include liburing.
 *
 * Error convention (liburing's): every function that can fail returns 0 or a positive count
 * on success and -errno on failure; errno itself is never the channel.
 */
#ifndef CSUPPORT_H
#define CSUPPORT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* An io_uring instance plus its bookkeeping. Owned by one thread at a time for submissions;
 * csupport_register_slot may be called from any thread (it is a register syscall only). */
typedef struct csupport_ring csupport_ring;

/* Opcodes ExactIO uses, as a bit set returned by csupport_ring_probe. */
enum {
	CSUPPORT_OP_READ = 1u << 0,       /* IORING_OP_READ (5.6) */
	CSUPPORT_OP_READ_FIXED = 1u << 1, /* IORING_OP_READ_FIXED (5.1) */
	CSUPPORT_OP_RECV = 1u << 2,       /* IORING_OP_RECV (5.6) */
	CSUPPORT_OP_POLL_ADD = 1u << 3,   /* IORING_OP_POLL_ADD (5.1) */
};

/* Flags for csupport_read. */
enum {
	/* The fd is a socket and the destination is unregistered: use RECV with MSG_WAITALL
	 * for the bytes still required (one submission per body instead of one per chunk). */
	CSUPPORT_READ_RECV_WAITALL = 1u << 0,
};

/*
 * Creates a ring with `entries` submission entries (a small power of two is plenty: the
 * read loop has one request in flight). Returns 0 and sets *out, or -errno: -ENOSYS when the
 * kernel has no io_uring, -EPERM when seccomp or kernel.io_uring_disabled forbids it,
 * -ENOMEM / -EMFILE on resource limits.
 */
int csupport_ring_create(unsigned entries, csupport_ring **out);

/* Destroys the ring (and with it every registration). Accepts NULL. */
void csupport_ring_destroy(csupport_ring *ring);

/* Returns the CSUPPORT_OP_* bit set the kernel supports, or -errno if probing failed. */
int csupport_ring_probe(csupport_ring *ring);

/*
 * Registers an empty (sparse) buffer table of `nr` slots (kernel 5.19). Slots are then filled
 * and cleared one at a time with csupport_register_slot. Returns 0 or -errno.
 */
int csupport_register_sparse(csupport_ring *ring, unsigned nr);

/*
 * Registers the whole table at once from `nr` (base, len) pairs. Returns 0 or -errno
 * (-ENOMEM when RLIMIT_MEMLOCK is too small, -EFAULT for memory that cannot be pinned).
 */
int csupport_register_buffers(csupport_ring *ring, void *const *bases, const size_t *lens,
			      unsigned nr);

/*
 * Points slot `slot` of a registered table at [base, base + len), or clears it when len is 0.
 * Pages are pinned (and faulted in) by the kernel and charged to RLIMIT_MEMLOCK for non-root
 * users. Returns 0 or -errno (-ENOMEM: over the memlock budget; -EINVAL: bad slot).
 */
int csupport_register_slot(csupport_ring *ring, unsigned slot, void *base, size_t len);

/* Unregisters the whole buffer table. Returns 0 or -errno (-ENXIO: none registered). */
int csupport_unregister_buffers(csupport_ring *ring);

/*
 * Reads from `fd` into [dst, dst + cap) until at least `min` bytes arrived (min <= cap), the
 * stream ends, or an error occurs. Reads use the fd's current position (streams and files).
 *
 * - slot >= 0: the whole range lies inside registered slot `slot`; READ_FIXED is used.
 * - slot < 0: IORING_OP_READ, or RECV with MSG_WAITALL for flag CSUPPORT_READ_RECV_WAITALL.
 * Short reads are resubmitted; -EINTR is retried; -EAGAIN (a non-blocking fd) waits for
 * POLLIN with IORING_OP_POLL_ADD and retries. A request is capped at 1 GiB.
 *
 * *done receives the bytes read, also when an error is returned (they are valid data).
 * *submissions is incremented by the number of requests submitted (reads and polls).
 * Returns 0 when *done >= min, 0 with *done < min at end of stream, or -errno.
 */
int csupport_read(csupport_ring *ring, int fd, void *dst, size_t cap, size_t min, int slot,
		  unsigned flags, size_t *done, uint64_t *submissions);

#ifdef __cplusplus
}
#endif

#endif /* CSUPPORT_H */
