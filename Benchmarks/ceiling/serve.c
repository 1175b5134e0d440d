/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The bench's C side of the serving cases (bench/Serve.swift): the reply client (the peer that
 * sends frames and reads acks, a bounded window of unacknowledged frames per connection), the
 * one-thread C reply server (the ceiling of the reply case), the read-then-write C relay (the ceiling of the relay case), and the SEND vs SEND_ZC measurement
 * behind AsyncExactWriter.automaticZeroCopyThreshold. See ExactIOBenchCeiling.h.
 */
#include "ExactIOBenchCeiling.h"

#include <errno.h>
#include <fcntl.h>
#ifdef EXACTIO_URING
#include <liburing.h>
#endif
#include <netinet/in.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { SERVE_EVENTS = 1024, RELAY_BUF = 256 << 10 };

static int nonblocking(int fd)
{
	int flags = fcntl(fd, F_GETFL);

	return flags < 0 ? -errno : fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0 ? -errno : 0;
}

/* ---- The reply client ---------------------------------------------------------------- */

struct reply_conn {
	int fd;
	int64_t sent;   /* frames fully written */
	int64_t acked;  /* acks fully read */
	size_t off;     /* bytes of the frame being written already written */
	unsigned char ack[8];
	size_t ack_have;
	uint32_t events;
};

int64_t exio_reply_client(const int *fds, int count, uint64_t frame_bytes, int64_t per_connection, int window,
			  exio_reply_stats *stats)
{
	struct reply_conn *c = calloc((size_t)count, sizeof(*c));
	struct epoll_event *ev = calloc(SERVE_EVENTS, sizeof(*ev));
	size_t flen = frame_bytes + 4;
	unsigned char *frame = malloc(flen);
	int ep = epoll_create1(EPOLL_CLOEXEC);
	int64_t total = 0, want = per_connection * count;
	int64_t ret = 0;

	memset(stats, 0, sizeof(*stats));
	if (!c || !ev || !frame || ep < 0) {
		ret = -ENOMEM;
		goto out;
	}
	frame[0] = (unsigned char)(frame_bytes >> 24);
	frame[1] = (unsigned char)(frame_bytes >> 16);
	frame[2] = (unsigned char)(frame_bytes >> 8);
	frame[3] = (unsigned char)frame_bytes;
	memset(frame + 4, 0x33, frame_bytes);
	if (frame_bytes >= 1)
		frame[4] = 0x11;
	if (frame_bytes >= 2)
		frame[4 + frame_bytes - 1] = 0x22;
	for (int i = 0; i < count; i++) {
		struct epoll_event e = { .events = EPOLLIN | EPOLLOUT, .data.u32 = (uint32_t)i };

		c[i].fd = fds[i];
		c[i].events = e.events;
		if (nonblocking(fds[i]) < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &e) < 0) {
			ret = -errno;
			goto out;
		}
	}
	while (total < want) {
		int n = epoll_wait(ep, ev, SERVE_EVENTS, 10000);

		stats->waits++;
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			ret = n == 0 ? -ETIMEDOUT : -errno;
			goto out;
		}
		for (int k = 0; k < n; k++) {
			struct reply_conn *r = &c[ev[k].data.u32];
			uint32_t want_events;

			if (ev[k].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
				/* Until the last ack: the server may close right after it (EOF is an error
				 * only while acks are missing). */
				while (r->acked < per_connection) {
					ssize_t got = read(r->fd, r->ack + r->ack_have, sizeof(r->ack) - r->ack_have);

					if (got < 0 && (errno == EAGAIN || errno == EINTR))
						break;
					if (got <= 0) {
						ret = got == 0 ? -EPIPE : -errno;
						goto out;
					}
					r->ack_have += (size_t)got;
					if (r->ack_have == sizeof(r->ack)) {
						uint64_t v = 0;

						memcpy(&v, r->ack, 8);
						r->ack_have = 0;
						r->acked++;
						total++;
						/* The server acks frame k with k (1-based, little-endian). */
						if (v != (uint64_t)r->acked) {
							ret = -EPROTO;
							goto out;
						}
					}
				}
			}
			while (r->sent < per_connection && r->sent - r->acked < window) {
				ssize_t w = write(r->fd, frame + r->off, flen - r->off);

				if (w < 0 && (errno == EAGAIN || errno == EINTR))
					break;
				if (w < 0) {
					ret = -errno;
					goto out;
				}
				stats->writes++;
				r->off += (size_t)w;
				if (r->off == flen) {
					r->off = 0;
					r->sent++;
				}
			}
			/* EPOLLOUT only while a frame may go out (else it would wake every turn). */
			want_events = EPOLLIN | (r->sent < per_connection && r->sent - r->acked < window ? EPOLLOUT : 0);
			if (r->acked == per_connection)
				want_events = 0;
			if (want_events != r->events) {
				struct epoll_event e = { .events = want_events, .data.u32 = ev[k].data.u32 };

				r->events = want_events;
				if (want_events == 0)
					epoll_ctl(ep, EPOLL_CTL_DEL, r->fd, NULL);
				else
					epoll_ctl(ep, EPOLL_CTL_MOD, r->fd, &e);
			}
		}
	}
	ret = total;
out:
	if (ep >= 0)
		close(ep);
	free(frame);
	free(ev);
	free(c);
	return ret;
}

/* ---- The C reply server (the reply case's ceiling) ------------------------------------- */

struct reply_srv {
	int fd;
	unsigned char *buf;
	size_t have;           /* bytes buffered (a partial frame at the front) */
	int64_t frames;        /* frames answered */
	unsigned char out[4096];
	size_t out_have, out_off;
	uint32_t events;
};

int64_t exio_reply_server(const int *fds, int count, uint64_t frame_bytes, int64_t per_connection,
			  exio_reply_stats *stats)
{
	struct reply_srv *c = calloc((size_t)count, sizeof(*c));
	struct epoll_event *ev = calloc(SERVE_EVENTS, sizeof(*ev));
	size_t flen = frame_bytes + 4, cap = flen + RELAY_BUF;
	int ep = epoll_create1(EPOLL_CLOEXEC);
	int open = count;
	int64_t total = 0, ret = 0;

	memset(stats, 0, sizeof(*stats));
	if (!c || !ev || ep < 0) {
		ret = -ENOMEM;
		goto out;
	}
	for (int i = 0; i < count; i++) {
		struct epoll_event e = { .events = EPOLLIN, .data.u32 = (uint32_t)i };

		c[i].fd = fds[i];
		c[i].events = EPOLLIN;
		c[i].buf = malloc(cap);
		if (!c[i].buf || nonblocking(fds[i]) < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &e) < 0) {
			ret = c[i].buf ? -errno : -ENOMEM;
			goto out;
		}
	}
	while (open > 0) {
		int n = epoll_wait(ep, ev, SERVE_EVENTS, 10000);

		stats->waits++;
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			ret = n == 0 ? -ETIMEDOUT : -errno;
			goto out;
		}
		for (int k = 0; k < n; k++) {
			struct reply_srv *r = &c[ev[k].data.u32];
			size_t at = 0;
			uint32_t want;

			if (r->fd < 0)
				continue;
			/* Acks not yet taken go out first; nothing is read meanwhile. */
			if (r->out_have == r->out_off) {
				ssize_t got = read(r->fd, r->buf + r->have, cap - r->have);

				stats->reads++;
				if (got < 0 && errno != EAGAIN && errno != EINTR) {
					ret = -errno;
					goto out;
				}
				if (got == 0) {
					ret = -EPIPE; /* the client closes only after its last ack */
					goto out;
				}
				if (got > 0)
					r->have += (size_t)got;
				/* Every whole frame: checked in place, answered with its number. */
				r->out_have = r->out_off = 0;
				while (r->have - at >= 4) {
					const unsigned char *f = r->buf + at;
					uint64_t len = (uint64_t)f[0] << 24 | (uint64_t)f[1] << 16 | (uint64_t)f[2] << 8 | f[3];
					uint64_t v;

					if (len != frame_bytes) {
						ret = -EPROTO;
						goto out;
					}
					if (r->have - at < flen)
						break;
					if ((frame_bytes >= 1 && f[4] != 0x11) || (frame_bytes >= 2 && f[4 + frame_bytes - 1] != 0x22)) {
						ret = -EPROTO;
						goto out;
					}
					at += flen;
					r->frames++;
					total++;
					v = (uint64_t)r->frames; /* little-endian hosts only, as the client */
					if (r->out_have + 8 > sizeof(r->out)) {
						ret = -ENOBUFS;
						goto out;
					}
					memcpy(r->out + r->out_have, &v, 8);
					r->out_have += 8;
				}
				if (at > 0) {
					memmove(r->buf, r->buf + at, r->have - at);
					r->have -= at;
				}
			}
			while (r->out_off < r->out_have) {
				ssize_t w = write(r->fd, r->out + r->out_off, r->out_have - r->out_off);

				if (w < 0 && (errno == EAGAIN || errno == EINTR))
					break;
				if (w < 0) {
					ret = -errno;
					goto out;
				}
				stats->writes++;
				r->out_off += (size_t)w;
			}
			if (r->frames == per_connection && r->out_off == r->out_have) {
				epoll_ctl(ep, EPOLL_CTL_DEL, r->fd, NULL);
				r->fd = -1;
				open--;
				continue;
			}
			want = r->out_off < r->out_have ? EPOLLOUT : EPOLLIN;
			if (want != r->events) {
				struct epoll_event e = { .events = want, .data.u32 = ev[k].data.u32 };

				r->events = want;
				epoll_ctl(ep, EPOLL_CTL_MOD, r->fd, &e);
			}
		}
	}
	ret = total;
out:
	if (ep >= 0)
		close(ep);
	if (c)
		for (int i = 0; i < count; i++)
			free(c[i].buf);
	free(c);
	free(ev);
	return ret;
}

/* ---- The read-then-write C relay -------------------------------------------------------- */

struct relay_conn {
	int src, dst;
	unsigned char *buf;
	size_t r, w; /* bytes of buf read, of them written */
	int eof;
	int done;
};

static int relay_interest(int ep, struct relay_conn *c, int i, int add)
{
	/* Read when the buffer is empty, write while it holds bytes. */
	struct epoll_event es = { .events = c->r == c->w && !c->eof ? EPOLLIN : 0, .data.u64 = (uint64_t)i << 1 };
	struct epoll_event ed = { .events = c->r > c->w ? EPOLLOUT : 0, .data.u64 = (uint64_t)i << 1 | 1 };

	if (epoll_ctl(ep, add ? EPOLL_CTL_ADD : EPOLL_CTL_MOD, c->src, &es) < 0)
		return -errno;
	if (epoll_ctl(ep, add ? EPOLL_CTL_ADD : EPOLL_CTL_MOD, c->dst, &ed) < 0)
		return -errno;
	return 0;
}

int64_t exio_relay_run(const int *src, const int *dst, int count, exio_relay_stats *stats)
{
	struct relay_conn *c = calloc((size_t)count, sizeof(*c));
	struct epoll_event *ev = calloc(SERVE_EVENTS, sizeof(*ev));
	int ep = epoll_create1(EPOLL_CLOEXEC);
	int open = count;
	int64_t moved = 0, ret = 0;

	memset(stats, 0, sizeof(*stats));
	if (!c || !ev || ep < 0) {
		ret = -ENOMEM;
		goto out;
	}
	for (int i = 0; i < count; i++) {
		c[i].src = src[i];
		c[i].dst = dst[i];
		c[i].buf = malloc(RELAY_BUF);
		if (!c[i].buf || nonblocking(src[i]) < 0 || nonblocking(dst[i]) < 0) {
			ret = -ENOMEM;
			goto out;
		}
		ret = relay_interest(ep, &c[i], i, 1);
		if (ret < 0)
			goto out;
	}
	while (open > 0) {
		int n = epoll_wait(ep, ev, SERVE_EVENTS, 10000);

		stats->waits++;
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			ret = n == 0 ? -ETIMEDOUT : -errno;
			goto out;
		}
		for (int k = 0; k < n; k++) {
			int i = (int)(ev[k].data.u64 >> 1);
			struct relay_conn *r = &c[i];

			if (r->done)
				continue;
			if (r->r == r->w && !r->eof) {
				ssize_t got = read(r->src, r->buf, RELAY_BUF);

				stats->syscalls++;
				if (got < 0 && errno != EAGAIN && errno != EINTR) {
					ret = -errno;
					goto out;
				}
				if (got == 0)
					r->eof = 1;
				if (got > 0) {
					r->r = (size_t)got;
					r->w = 0;
				}
			}
			while (r->r > r->w) {
				ssize_t put = send(r->dst, r->buf + r->w, r->r - r->w, MSG_NOSIGNAL);

				stats->syscalls++;
				if (put < 0 && (errno == EAGAIN || errno == EINTR))
					break;
				if (put < 0) {
					ret = -errno;
					goto out;
				}
				r->w += (size_t)put;
				moved += put;
			}
			if (r->r == r->w)
				r->r = r->w = 0;
			if (r->eof && r->r == 0) {
				r->done = 1;
				open--;
				epoll_ctl(ep, EPOLL_CTL_DEL, r->src, NULL);
				epoll_ctl(ep, EPOLL_CTL_DEL, r->dst, NULL);
				shutdown(r->dst, SHUT_WR);
				continue;
			}
			ret = relay_interest(ep, r, i, 0);
			if (ret < 0)
				goto out;
		}
	}
	ret = moved;
out:
	if (ep >= 0)
		close(ep);
	if (c)
		for (int i = 0; i < count; i++)
			free(c[i].buf);
	free(c);
	free(ev);
	return ret;
}

#ifdef EXACTIO_URING
/* ---- SEND vs SEND_ZC --------------------------------------------------------------------- */

static double zc_now(clockid_t clock)
{
	struct timespec t;

	clock_gettime(clock, &t);
	return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

struct zc_drain {
	int fd;
	int64_t total;
	double cpu;
};

static void *zc_drain(void *arg)
{
	struct zc_drain *d = arg;
	unsigned char *b = malloc(1 << 20);
	int64_t got = 0;
	double c0 = zc_now(CLOCK_THREAD_CPUTIME_ID);

	while (b && got < d->total) {
		ssize_t n = recv(d->fd, b, 1 << 20, 0);

		if (n <= 0)
			break;
		got += n;
	}
	d->cpu = zc_now(CLOCK_THREAD_CPUTIME_ID) - c0;
	free(b);
	return NULL;
}

int exio_zc_measure(uint64_t size, int64_t total, int mode, exio_zc_result *out)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t len = sizeof(a);
	int l = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), s = -1, r = -1, ret = 0;
	int nb = 8; /* buffers rotated (a zero-copy send's buffer is not reused at once) */
	unsigned char *buf = NULL;
	struct io_uring ring;
	int ring_up = 0;
	pthread_t t;
	struct zc_drain d;
	int64_t sent = 0, sends = 0, cqes = 0, notifs = 0;
	size_t off = 0;
	int k = 0;
	double t0, c0, t1, c1;

	memset(out, 0, sizeof(*out));
	if (l < 0 || bind(l, (struct sockaddr *)&a, len) < 0 || listen(l, 1) < 0 ||
	    getsockname(l, (struct sockaddr *)&a, &len) < 0) {
		ret = -errno;
		goto out;
	}
	s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (s < 0 || connect(s, (struct sockaddr *)&a, len) < 0 || (r = accept(l, NULL, NULL)) < 0) {
		ret = -errno;
		goto out;
	}
	buf = mmap(NULL, size * (size_t)nb, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (buf == MAP_FAILED) {
		buf = NULL;
		ret = -ENOMEM;
		goto out;
	}
	memset(buf, 0x33, size * (size_t)nb);
	ret = io_uring_queue_init(64, &ring, 0);
	if (ret < 0)
		goto out;
	ring_up = 1;
	if (mode == 2) {
		struct iovec v = { buf, size * (size_t)nb };

		ret = io_uring_register_buffers(&ring, &v, 1);
		if (ret < 0)
			goto out;
	}
	d.fd = r;
	d.total = total;
	d.cpu = 0;
	if (pthread_create(&t, NULL, zc_drain, &d) != 0) {
		ret = -EAGAIN;
		goto out;
	}
	t0 = zc_now(CLOCK_MONOTONIC);
	c0 = zc_now(CLOCK_THREAD_CPUTIME_ID);
	while (sent < total && ret == 0) {
		struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
		unsigned char *b = buf + (size_t)(k % nb) * size;
		size_t want = size - off;

		if ((int64_t)want > total - sent)
			want = (size_t)(total - sent);
		if (mode == 2)
			io_uring_prep_send_zc_fixed(sqe, s, b + off, want, MSG_NOSIGNAL, 0, 0);
		else if (mode == 1)
			io_uring_prep_send_zc(sqe, s, b + off, want, MSG_NOSIGNAL, 0);
		else
			io_uring_prep_send(sqe, s, b + off, want, MSG_NOSIGNAL);
		sqe->user_data = 1;
		io_uring_submit(&ring);
		sends++;
		for (;;) {
			struct io_uring_cqe *cqe;
			int res;
			unsigned flags;

			if (io_uring_wait_cqe(&ring, &cqe) < 0)
				continue;
			res = cqe->res;
			flags = cqe->flags;
			io_uring_cqe_seen(&ring, cqe);
			cqes++;
			if (flags & IORING_CQE_F_NOTIF) {
				notifs--;
				continue;
			}
			if (flags & IORING_CQE_F_MORE)
				notifs++;
			if (res < 0) {
				ret = res;
				break;
			}
			sent += res;
			off += (size_t)res;
			if (off == size) {
				off = 0;
				k++;
			}
			break;
		}
	}
	while (notifs > 0) {
		struct io_uring_cqe *cqe;

		if (io_uring_wait_cqe(&ring, &cqe) < 0)
			break;
		if (cqe->flags & IORING_CQE_F_NOTIF)
			notifs--;
		io_uring_cqe_seen(&ring, cqe);
		cqes++;
	}
	t1 = zc_now(CLOCK_MONOTONIC);
	c1 = zc_now(CLOCK_THREAD_CPUTIME_ID);
	shutdown(s, SHUT_WR);
	pthread_join(t, NULL);
	out->seconds = t1 - t0;
	out->sender_cpu = c1 - c0;
	out->receiver_cpu = d.cpu;
	out->bytes = sent;
	out->sends = sends;
	out->completions = cqes;
out:
	if (ring_up)
		io_uring_queue_exit(&ring);
	if (buf)
		munmap(buf, size * (size_t)nb);
	if (r >= 0)
		close(r);
	if (s >= 0)
		close(s);
	if (l >= 0)
		close(l);
	return ret;
}
#else
/* Built without the io_uring part (the IOUring trait off): nothing to measure. */
int exio_zc_measure(uint64_t size, int64_t total, int mode, exio_zc_result *out)
{
	(void)size;
	(void)total;
	(void)mode;
	memset(out, 0, sizeof(*out));
	return -ENOSYS;
}
#endif
