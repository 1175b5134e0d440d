/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The bench's C ceiling: the fastest plain reader of length-prefixed frames we know how to
 * write, to say how close ExactIO comes to the limit of the machine at every frame size.
 *
 * c-readahead: read(2) up to 256 KiB at a time (or the rest of a frame larger than that) into
 * one page-aligned buffer, frames parsed and checked in place, no allocation while it runs.
 * c-readahead-uring: the same reads as io_uring READ_FIXED into the buffer, registered.
 *
 * Frames are the bench's: a 4-byte big-endian length, then a body whose first byte is 0x11,
 * last byte 0x22 and middle byte 0x33 (bench/Cases.swift, Marks). Opaque header: no liburing
 * types here.
 */
#ifndef EXACTIO_BENCH_CEILING_H
#define EXACTIO_BENCH_CEILING_H

#include <stdint.h>

typedef struct exio_ceiling exio_ceiling;

/* Allocates (and pre-faults; with use_uring, registers) the buffer for frames of frame_bytes.
 * Returns NULL with errno set on failure (io_uring unavailable: the errno of its setup). */
exio_ceiling *exio_ceiling_create(int fd, uint64_t frame_bytes, int use_uring);

/* Reads and checks up to `frames` frames. Returns the count read (fewer at end of stream),
 * -EPROTO for a frame whose length or marks are wrong, or -errno of a failed read. */
int64_t exio_ceiling_run(exio_ceiling *c, int64_t frames);

void exio_ceiling_destroy(exio_ceiling *c);

/* 1 when an io_uring ring can be created here, else 0. */
int exio_ceiling_uring_available(void);

/* open(2) read-only with O_DIRECT: the descriptor or -errno. */
int exio_open_direct(const char *path);

/* splitmix64: the random offsets of the positional-read cases (the same sequence in C and Swift). */
uint64_t exio_splitmix(uint64_t *state);
/* `count` pread(2)s of `record` bytes at offsets splitmix(seed) % span into one buffer: the C
 * baseline of the positional-read cases. Records read, or -errno. */
int64_t exio_pread_run(int fd, uint64_t record, int64_t count, uint64_t span, uint64_t seed);

/* The many-connection ceilings (bench/Many.swift, `c-uring-recv`, `c-epoll`, `c-uring-mshot`):
 * one thread reads `per_connection` frames of `frame_bytes` from each of the `count` connected
 * stream sockets in `fds` (the reader child's accepted connections, from the bench's writer
 * process), every frame's length and marks checked in place.
 *
 * EXIO_MANY_URING_RECV: one IORING_OP_RECV in flight per connection, of up to 256 KiB into that
 *   connection's own buffer (a frame plus 256 KiB, page-aligned; for a frame larger than 256 KiB
 *   only the rest of that frame), re-armed as each completion is parsed; one
 *   io_uring_submit_and_wait(1) per turn submits the re-arms and reaps the whole batch of
 *   completions. Ring: DEFER_TASKRUN + SINGLE_ISSUER where the kernel takes it.
 * EXIO_MANY_EPOLL: level-triggered epoll; per epoll_wait, one read(2) of up to 256 KiB (same
 *   buffers and sizing) per ready connection. The descriptors are made non-blocking.
 * EXIO_MANY_URING_MSHOT: one multishot IORING_OP_RECV per connection with IOSQE_BUFFER_SELECT from
 *   a provided-buffer ring of 64 KiB buffers (2 per connection, a power of two from 64 to 1024:
 *   the ring is FIFO, every buffer in it gets used); each buffer is parsed in place and returned
 *   within the turn; a frame that straddles buffers is copied into the connection's own carry
 *   buffer (frame size) until whole. Re-armed when a completion comes without F_MORE (ENOBUFS).
 *
 * Returns the frames read in all (fewer than count × per_connection when a connection ended
 * early), -EPROTO for a frame whose length or marks are wrong, or -errno. `stats` is filled. */
enum { EXIO_MANY_URING_RECV = 0, EXIO_MANY_EPOLL = 1, EXIO_MANY_URING_MSHOT = 2 };

typedef struct exio_many_stats {
	int64_t syscalls;     /* io_uring_enter (submit-and-wait), or epoll_wait + read + epoll_ctl(DEL) */
	int64_t completions;  /* CQEs reaped, or readiness events returned */
	int64_t receives;     /* receives that delivered bytes */
	int64_t bytes_copied; /* user-space copies: partial frames moved to the front (own buffers),
	                       * straddling frames reassembled (mshot) */
	int64_t starvations;  /* mshot: completions with -ENOBUFS (the buffer ring was empty) */
	int64_t rearms;       /* mshot: multishot receives armed again */
	int32_t provided_buffers; /* mshot: buffers in the provided-buffer ring */
	int32_t taskrun;      /* the ring's task-run mode: 2 DEFER_TASKRUN + SINGLE_ISSUER, 1 COOP_TASKRUN, 0 neither */
} exio_many_stats;

int64_t exio_many_run(const int *fds, int count, uint64_t frame_bytes, int64_t per_connection, int mode,
		      exio_many_stats *stats);

/* ---- The serving cases (serve.c; bench/Serve.swift) ---- */

typedef struct exio_reply_stats {
	int64_t waits;  /* epoll_wait calls */
	int64_t writes; /* write(2) calls that wrote bytes */
	int64_t reads;  /* read(2) calls (the C reply server) */
} exio_reply_stats;

/* The reply case's client: on each of `count` connected sockets (made non-blocking), sends
 * `per_connection` frames of `frame_bytes` (the bench's marked frames, 4-byte big-endian prefix)
 * with at most `window` frames unacknowledged, and reads one 8-byte ack per frame (frame k of a
 * connection is acknowledged with k, 1-based, little-endian). One thread, level-triggered epoll.
 * Returns the acks read in all, -EPROTO for a wrong ack, -ETIMEDOUT after 10 s without progress,
 * or -errno. */
int64_t exio_reply_client(const int *fds, int count, uint64_t frame_bytes, int64_t per_connection, int window,
			  exio_reply_stats *stats);

/* The reply case's C ceiling: one thread, level-triggered epoll; per ready connection one
 * read(2) of up to 256 KiB into that connection's own buffer, every whole frame checked in place
 * and answered (its number, 8 bytes little-endian), the acks of one read sent in one write(2)
 * (no read on a connection while its acks wait for room). Serves `per_connection` frames on each
 * of the `count` connections (made non-blocking). Returns the frames answered, -EPROTO for a
 * wrong frame, -ETIMEDOUT after 10 s without progress, or -errno. `stats->writes`: ack writes. */
int64_t exio_reply_server(const int *fds, int count, uint64_t frame_bytes, int64_t per_connection,
			  exio_reply_stats *stats);

typedef struct exio_relay_stats {
	int64_t waits;    /* epoll_wait calls */
	int64_t syscalls; /* read(2) and send(2) calls */
} exio_relay_stats;

/* The relay case's C ceiling, read-then-write: one thread relays the bytes of src[i] to dst[i]
 * for each i (both made non-blocking) through a 256 KiB buffer per connection: read when the
 * buffer is empty, send(MSG_NOSIGNAL) until it is, level-triggered epoll on both. At the end of
 * src[i] (once its bytes are sent) dst[i] is half-closed. Returns the bytes relayed, or -errno. */
int64_t exio_relay_run(const int *src, const int *dst, int count, exio_relay_stats *stats);

typedef struct exio_zc_result {
	double seconds;      /* the sending, until every notification came */
	double sender_cpu;   /* the sending thread's CPU seconds */
	double receiver_cpu; /* the receiving thread's CPU seconds */
	int64_t bytes, sends, completions;
} exio_zc_result;

/* SEND vs SEND_ZC (bench --zero-copy): `total` bytes over one loopback TCP connection in sends
 * of `size` bytes, one in flight at a time (as AsyncExactWriter does), from 8 rotating buffers,
 * a thread receiving. `mode`: 0 IORING_OP_SEND, 1 IORING_OP_SEND_ZC, 2 SEND_ZC from registered
 * memory (IORING_RECVSEND_FIXED_BUF). Returns 0 or -errno (-EOPNOTSUPP, -EINVAL: refused). */
int exio_zc_measure(uint64_t size, int64_t total, int mode, exio_zc_result *out);

#endif
