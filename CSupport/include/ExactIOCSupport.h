/* SPDX-License-Identifier: Apache-2.0 */
/*
 * ExactIOCSupport: the thin C layer of ExactIO over liburing.
 *
 * It owns an io_uring ring and its registered ("fixed") buffer table, and runs the hot read
 * loop. It makes no policy or allocation decisions and knows no Swift type.
 *
 * This header is deliberately opaque: it must not include <liburing.h> or <linux/io_uring.h>.
 * swift-system ships its own copy of the io_uring UAPI header, and a Swift module that sees
 * both fails to build (duplicate definitions of the io_uring structures). Only the .c files include liburing.
 *
 * Error convention (liburing's): every function that can fail returns 0 or a positive count
 * on success and -errno on failure; errno itself is never the channel. Two codes are ours:
 *   -EBADFD          the ring was created by another process (inherited through fork()): a
 *                    child must not submit to or register on its parent's ring;
 *   -ENOTRECOVERABLE the ring is broken: a request could not be confirmed finished after a
 *                    failed wait (cancel and drain failed too), so nothing is submitted again
 *                    and the memory that request targeted must not be reused.
 *
 * Every request is tagged (user_data) and every call returns only when the kernel is done
 * with each request it submitted: no request outlives the call that made it.
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
	CSUPPORT_OP_READ = 1u << 0,             /* IORING_OP_READ (5.6) */
	CSUPPORT_OP_READ_FIXED = 1u << 1,       /* IORING_OP_READ_FIXED (5.1) */
	CSUPPORT_OP_RECV = 1u << 2,             /* IORING_OP_RECV (5.6) */
	CSUPPORT_OP_POLL_ADD = 1u << 3,         /* IORING_OP_POLL_ADD (5.1) */
	CSUPPORT_OP_LINK_TIMEOUT = 1u << 4,     /* IORING_OP_LINK_TIMEOUT (5.5) */
	CSUPPORT_OP_ASYNC_CANCEL = 1u << 5,     /* IORING_OP_ASYNC_CANCEL (5.5) */
	CSUPPORT_OP_SPLICE = 1u << 6,           /* IORING_OP_SPLICE (5.7) */
	CSUPPORT_OP_ACCEPT = 1u << 7,           /* IORING_OP_ACCEPT (5.5) */
	CSUPPORT_OP_PROVIDE_BUFFERS = 1u << 8,  /* IORING_OP_PROVIDE_BUFFERS (5.7) */
	CSUPPORT_OP_TIMEOUT = 1u << 9,          /* IORING_OP_TIMEOUT (5.4) */
	CSUPPORT_OP_SEND = 1u << 10,            /* IORING_OP_SEND (5.6) */
	CSUPPORT_OP_SENDMSG = 1u << 11,         /* IORING_OP_SENDMSG (5.3) */
	CSUPPORT_OP_SEND_ZC = 1u << 12,         /* IORING_OP_SEND_ZC (6.0) */
	CSUPPORT_OP_SENDMSG_ZC = 1u << 13,      /* IORING_OP_SENDMSG_ZC (6.1) */
};

/* Flags for csupport_ring_create, and what csupport_ring_setup_flags reports. */
enum {
	/* One thread submits and reaps (IORING_SETUP_SINGLE_ISSUER | DEFER_TASKRUN, 6.1):
	 * completions are processed only when that thread enters the kernel. */
	CSUPPORT_RING_SINGLE_ISSUER = 1u << 0,
	/* Reported only: IORING_SETUP_COOP_TASKRUN (5.19) is in use. */
	CSUPPORT_RING_COOP_TASKRUN = 1u << 1,
};

/*
 * Creates a ring with `entries` submission entries (a small power of two is plenty for a
 * blocking reader: one request is in flight). `flags`: CSUPPORT_RING_* wishes; setup flags
 * the kernel refuses are dropped (csupport_ring_setup_flags tells what was kept). Returns 0
 * and sets *out, or -errno: -ENOSYS when the kernel has no io_uring, -EPERM when seccomp or
 * kernel.io_uring_disabled forbids it, -ENOMEM when RLIMIT_MEMLOCK is exhausted (each ring
 * costs two pages of it on current kernels), -EMFILE on the descriptor limit.
 */
int csupport_ring_create(unsigned entries, unsigned flags, csupport_ring **out);

/* The CSUPPORT_RING_* flags in effect for `ring`. */
unsigned csupport_ring_setup_flags(const csupport_ring *ring);

/* Destroys the ring (and with it every registration). Accepts NULL. In a child process that
 * inherited the ring, only the child's mappings and descriptor go; the parent's ring stays. */
void csupport_ring_destroy(csupport_ring *ring);

/* 0 when this process may use the ring; -EBADFD (inherited through fork()),
 * -ENOTRECOVERABLE (broken) or -EINVAL (NULL) otherwise. */
int csupport_ring_usable(const csupport_ring *ring);

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
 * users (per user, across processes). Returns 0 or -errno (-ENOMEM: over the memlock limit;
 * -EINVAL: bad slot).
 */
int csupport_register_slot(csupport_ring *ring, unsigned slot, void *base, size_t len);

/* Unregisters the whole buffer table. Returns 0 or -errno (-ENXIO: none registered). */
int csupport_unregister_buffers(csupport_ring *ring);

/* What csupport_read should do. */
struct csupport_read_req {
	int fd;
	/* Registered slot holding all of [dst, dst + cap) (READ_FIXED), or -1 (READ). */
	int slot;
	void *dst;
	size_t cap;
	/* Keep reading until at least this many bytes arrived (min <= cap). */
	size_t min;
	/* File offset of dst[0], or -1 to read at (and advance) the current position. */
	int64_t offset;
	/* Longest the whole call may take, in nanoseconds (each request gets a linked timeout
	 * with what is left); 0 or less: no limit. */
	int64_t timeout_ns;
};

/* What csupport_read did. */
struct csupport_read_res {
	/* Bytes read, also when an error is returned (they are valid data). */
	size_t done;
	/* Read requests submitted, those among them that were READ_FIXED, and readiness polls. */
	uint32_t reads, fixed_reads, polls;
};

/*
 * Reads from req->fd into [dst, dst + cap) until at least `min` bytes arrived, the stream
 * ends, or an error occurs. Short reads are resubmitted; -EINTR is retried; -EAGAIN (a
 * non-blocking fd) waits for POLLIN with IORING_OP_POLL_ADD and retries. A request is capped
 * at 1 GiB. Returns 0 when done >= min, 0 with done < min at end of stream, or -errno
 * (-ETIMEDOUT when the timeout passed).
 */
int csupport_read(csupport_ring *ring, const struct csupport_read_req *req, struct csupport_read_res *res);

/* What csupport_read_multi should do: `len` bytes of a regular file at `offset` into
 * [dst, dst + len), in chunks of `chunk` bytes with up to `depth` requests in flight (at most
 * the ring's submission entries). */
struct csupport_multi_req {
	int fd;
	/* Registered slot holding all of [dst, dst + len) (READ_FIXED), or -1 (READ). */
	int slot;
	void *dst;
	size_t len;
	int64_t offset;
	size_t chunk;
	unsigned depth;
};

/*
 * Reads in flight (read_multi.c): every chunk is a request at its own offset; completions may
 * come in any order, short reads are resubmitted, and the call returns when every request has
 * completed. res->done is the count of bytes contiguous from dst (less than len only at end
 * of file or on an error). Returns 0 when done == len or the file ended, else -errno.
 */
int csupport_read_multi(csupport_ring *ring, const struct csupport_multi_req *req, struct csupport_read_res *res);

/* Test seam: csupport_read_multi waits for all its requests, then handles their completions in
 * reverse order. */
void csupport_debug_shuffle_completions(csupport_ring *ring, int on);

/* What csupport_splice should do: move `len` bytes from `in` to `out` (both at their current
 * positions) through the pipe (pipe_r, pipe_w), at most `chunk` bytes (the pipe's capacity)
 * per pair of splices. The pipe must be empty. */
struct csupport_splice_req {
	int in, out, pipe_r, pipe_w;
	size_t len;
	size_t chunk;
};

struct csupport_splice_res {
	/* Bytes that reached `out`. */
	size_t moved;
	/* Bytes taken from `in` that are still in the pipe (after an error on the `out` side). */
	size_t in_pipe;
	uint32_t submissions;
};

/*
 * Forwarding with IORING_OP_SPLICE (splice.c): per chunk, source -> pipe and pipe ->
 * destination linked in one submission. Returns 0 when all `len` bytes were moved, 0 with
 * moved < len at end of stream, or -errno (res->in_pipe then says how many bytes the pipe
 * still holds; the caller reads them back or writes them on). -EAGAIN: a descriptor would
 * block (O_NONBLOCK, or a socket timeout); it is never retried here (a splice in io_uring's
 * worker does not wait on such a descriptor, so retrying would spin): the caller waits for
 * readiness (poll) and goes on, the pipe's bytes first. The kernel may run a splice in the calling
 * thread's context: a destination that closed then raises SIGPIPE there, so the caller blocks
 * SIGPIPE around the call.
 */
int csupport_splice(csupport_ring *ring, const struct csupport_splice_req *req, struct csupport_splice_res *res);

/*
 * The event loop (loop.c): requests queued without waiting, tagged with the caller's
 * user_data, submitted and reaped in batches. One thread calls these for a given ring.
 */

/* A provided-buffer ring: buffers the kernel picks from when data arrives (5.19). */
typedef struct csupport_bufring csupport_bufring;

enum {
	/* Buffers may be consumed a part at a time (IOU_PBUF_RING_INC, 6.12): a completion uses
	 * only the bytes it received. Dropped (csupport_bufring_flags says) where the kernel
	 * refuses it. */
	CSUPPORT_BUFRING_INCREMENTAL = 1u << 0,
};

/* Registers a ring of `entries` (a power of two) provided buffers as group `group`. Returns 0
 * or -errno (-EINVAL before 5.19). Buffers are added with csupport_bufring_add. */
int csupport_bufring_create(csupport_ring *ring, unsigned entries, unsigned group, unsigned flags,
			    csupport_bufring **out);
/* The CSUPPORT_BUFRING_* flags in effect. */
unsigned csupport_bufring_flags(const csupport_bufring *b);
/* Queues buffer `bid` = [addr, addr + len) for the kernel; visible after publish. */
void csupport_bufring_add(csupport_bufring *b, void *addr, unsigned len, unsigned short bid);
/* Makes every buffer added since the last publish visible to the kernel. */
void csupport_bufring_publish(csupport_bufring *b);
/* Unregisters (when the ring is still this process's) and frees the buffer ring. */
void csupport_bufring_destroy(csupport_ring *ring, csupport_bufring *b);

/* Queue one request each (submitted by the next csupport_enter). 0 or -errno (-EBUSY: the
 * submission queue is full even after a flush). */
/* Multishot RECV into provided buffers of `group`. With `limit` > 0, the request ends (its
 * last completion without CSUPPORT_CQE_MORE) once it received that many bytes (kernel 6.16;
 * older kernels fail the request with -EINVAL: arm again with 0). */
int csupport_queue_recv_multishot(csupport_ring *ring, int fd, unsigned group, unsigned limit,
				   uint64_t user_data);
int csupport_queue_read(csupport_ring *ring, int fd, void *dst, unsigned len, int slot, uint64_t user_data);
/* A single RECV of up to `len` bytes into `dst` with `flags` (MSG_WAITALL: the kernel goes on
 * until all `len` arrived, the stream ended or an error; a partial result, also after a
 * cancellation, is the count received). */
int csupport_queue_recv(csupport_ring *ring, int fd, void *dst, unsigned len, int flags, uint64_t user_data);
/* A single READ of up to `len` bytes into a provided buffer of `group` (pipes and other
 * non-sockets, where multishot RECV does not apply). */
int csupport_queue_read_select(csupport_ring *ring, int fd, unsigned group, unsigned len, uint64_t user_data);
/* One ACCEPT: the accepted descriptor is close-on-exec, and non-blocking with `nonblocking`.
 * (Single-shot on purpose: a multishot accept takes the whole backlog in one go, and the
 * loop bounds how many accepted descriptors may wait for their consumer.) */
int csupport_queue_accept(csupport_ring *ring, int fd, int nonblocking, uint64_t user_data);
int csupport_queue_poll(csupport_ring *ring, int fd, unsigned events, int multishot, uint64_t user_data);
/* One send of [buf, buf + len) on socket `fd`, always with MSG_NOSIGNAL (a closed peer is
 * -EPIPE, never SIGPIPE). The completion's res is the number of bytes the kernel took (a stream
 * socket may take fewer than `len`: the caller sends the rest) or -errno. With `zerocopy`:
 * IORING_OP_SEND_ZC (6.0): the kernel sends from the pages of `buf` instead of copying them, and
 * when the completion carries CSUPPORT_CQE_MORE a second completion with the same user_data and
 * CSUPPORT_CQE_NOTIF follows once the kernel no longer references the memory; until then the
 * memory must not change. A socket that cannot send zero-copy (AF_UNIX) fails it with
 * -EOPNOTSUPP, having sent nothing. */
int csupport_queue_send(csupport_ring *ring, int fd, const void *buf, unsigned len, int zerocopy,
			uint64_t user_data);
/* The same for a gathered send: `msg` points to a struct msghdr (its iovecs: the bytes, in order),
 * which with the iovecs stays valid until the completion (IORING_OP_SENDMSG, or
 * IORING_OP_SENDMSG_ZC (6.1) with `zerocopy`). MSG_NOSIGNAL is added to the flags. */
int csupport_queue_sendmsg(csupport_ring *ring, int fd, const void *msg, int zerocopy, uint64_t user_data);
/* Cancels the request tagged `target` (with `all`: every request so tagged, 5.19). */
int csupport_queue_cancel(csupport_ring *ring, uint64_t target, int all, uint64_t user_data);
/* Cancels every request in flight on the ring (IORING_ASYNC_CANCEL_ANY, 5.19); its own
 * completion's res is the number cancelled or -errno. */
int csupport_queue_cancel_all(csupport_ring *ring, uint64_t user_data);

/* Submits everything queued and waits for at least `wait_nr` completions, at most
 * `timeout_ns` (0: no limit). One io_uring_enter. Returns the number submitted, or 0 when the
 * wait ended early for a passing reason (the timeout, a signal: -EINTR, a full completion
 * queue: -EBUSY, -EAGAIN): the caller reaps and enters again. Any other -errno is the ring's
 * failure (csupport_debug_fail_waits injects one). */
int csupport_enter(csupport_ring *ring, unsigned wait_nr, int64_t timeout_ns);

/* One completion, as the loop sees it. */
struct csupport_cqe {
	uint64_t user_data;
	int32_t res;
	uint16_t flags;  /* CSUPPORT_CQE_* */
	uint16_t buffer; /* the provided buffer's id, with CSUPPORT_CQE_BUFFER */
};

enum {
	CSUPPORT_CQE_BUFFER = 1u << 0,      /* `buffer` holds the data (IORING_CQE_F_BUFFER) */
	CSUPPORT_CQE_MORE = 1u << 1,        /* the multishot request goes on (IORING_CQE_F_MORE) */
	CSUPPORT_CQE_BUFFER_MORE = 1u << 2, /* the buffer is not used up (IORING_CQE_F_BUF_MORE) */
	CSUPPORT_CQE_NOTIF = 1u << 3,       /* a zero-copy send's notification (IORING_CQE_F_NOTIF): the
					     * kernel let go of the send's memory */
};

/* Copies up to `max` available completions to `out` and consumes them; returns how many. */
unsigned csupport_reap(csupport_ring *ring, struct csupport_cqe *out, unsigned max);

/* Test seam: the next `count` waits for a completion on `ring` fail with -err (0: stop). */
void csupport_debug_fail_waits(csupport_ring *ring, int count, int err);

#ifdef __cplusplus
}
#endif

#endif /* CSUPPORT_H */
