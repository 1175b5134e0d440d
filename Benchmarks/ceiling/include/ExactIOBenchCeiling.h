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

#endif
