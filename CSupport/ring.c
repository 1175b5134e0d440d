/* SPDX-License-Identifier: Apache-2.0 */
/* The io_uring part: compiled only on Linux with the IOUring trait (Package.swift). */
#ifdef EXACTIO_URING
/* Ring set-up, tear-down, the opcode probe, and fork detection. */
#include <pthread.h>

#include "internal.h"

/* Fork detection: a child created by fork() inherits the ring's file descriptor and its
 * mappings, so its submissions would land in the parent's ring and its READ_FIXED reads in
 * the parent's pinned pages. Every ring remembers the generation it was created in; the
 * child handler moves the process to a new generation. */
static atomic_uint fork_generation;
static pthread_once_t fork_handler_once = PTHREAD_ONCE_INIT;

static void on_fork_child(void)
{
	atomic_fetch_add_explicit(&fork_generation, 1, memory_order_relaxed);
}

static void install_fork_handler(void)
{
	pthread_atfork(NULL, NULL, on_fork_child);
}

unsigned csupport_fork_generation(void)
{
	return atomic_load_explicit(&fork_generation, memory_order_relaxed);
}

int csupport_ring_check(const csupport_ring *ring)
{
	if (!ring)
		return -EINVAL;
	if (ring->generation != csupport_fork_generation())
		return -EBADFD;
	if (csupport_ring_is_broken(ring))
		return -ENOTRECOVERABLE;
	return 0;
}

int csupport_ring_usable(const csupport_ring *ring)
{
	return csupport_ring_check(ring);
}

int csupport_ring_create(unsigned entries, unsigned flags, csupport_ring **out)
{
	struct io_uring_params params;
	unsigned setup = 0;
	csupport_ring *r;
	int ret;

	if (!out || entries == 0)
		return -EINVAL;
	*out = NULL;
	pthread_once(&fork_handler_once, install_fork_handler);
	r = calloc(1, sizeof(*r));
	if (!r)
		return -ENOMEM;

	/* COOP_TASKRUN (5.19) avoids an interrupt per completion; the ring's owner always waits
	 * in the kernel, where task work runs anyway. SINGLE_ISSUER + DEFER_TASKRUN (6.1) for a
	 * ring with one submitting thread. Older kernels reject the flags with -EINVAL: each is
	 * dropped in turn until the kernel accepts. */
	if (flags & CSUPPORT_RING_SINGLE_ISSUER)
		setup = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN;
	else
		setup = IORING_SETUP_COOP_TASKRUN;
	for (;;) {
		memset(&params, 0, sizeof(params));
		params.flags = setup;
		ret = io_uring_queue_init_params(entries, &r->ring, &params);
		if (ret != -EINVAL || setup == 0)
			break;
		if (setup & IORING_SETUP_DEFER_TASKRUN)
			setup = IORING_SETUP_COOP_TASKRUN;
		else
			setup = 0;
	}
	if (ret < 0) {
		free(r);
		return ret;
	}
	r->generation = csupport_fork_generation();
	r->next_tag = 1;
	*out = r;
	return 0;
}

unsigned csupport_ring_setup_flags(const csupport_ring *ring)
{
	unsigned out = 0;

	if (!ring)
		return 0;
	if (ring->ring.flags & IORING_SETUP_DEFER_TASKRUN)
		out |= CSUPPORT_RING_SINGLE_ISSUER;
	if (ring->ring.flags & IORING_SETUP_COOP_TASKRUN)
		out |= CSUPPORT_RING_COOP_TASKRUN;
	return out;
}

void csupport_ring_destroy(csupport_ring *ring)
{
	if (!ring)
		return;
	/* In a child, this unmaps the child's view of the queues and closes its copy of the
	 * descriptor: the parent's ring is untouched. */
	io_uring_queue_exit(&ring->ring);
	free(ring);
}

int csupport_ring_probe(csupport_ring *ring)
{
	struct io_uring_probe *probe;
	static const struct {
		int op;
		int bit;
	} wanted[] = {
		{ IORING_OP_READ, CSUPPORT_OP_READ },
		{ IORING_OP_READ_FIXED, CSUPPORT_OP_READ_FIXED },
		{ IORING_OP_RECV, CSUPPORT_OP_RECV },
		{ IORING_OP_POLL_ADD, CSUPPORT_OP_POLL_ADD },
		{ IORING_OP_LINK_TIMEOUT, CSUPPORT_OP_LINK_TIMEOUT },
		{ IORING_OP_ASYNC_CANCEL, CSUPPORT_OP_ASYNC_CANCEL },
		{ IORING_OP_SPLICE, CSUPPORT_OP_SPLICE },
		{ IORING_OP_ACCEPT, CSUPPORT_OP_ACCEPT },
		{ IORING_OP_PROVIDE_BUFFERS, CSUPPORT_OP_PROVIDE_BUFFERS },
		{ IORING_OP_TIMEOUT, CSUPPORT_OP_TIMEOUT },
		{ IORING_OP_SEND, CSUPPORT_OP_SEND },
		{ IORING_OP_SENDMSG, CSUPPORT_OP_SENDMSG },
		{ IORING_OP_SEND_ZC, CSUPPORT_OP_SEND_ZC },
		{ IORING_OP_SENDMSG_ZC, CSUPPORT_OP_SENDMSG_ZC },
	};
	unsigned i;
	int ops = 0;
	int ret = csupport_ring_check(ring);

	if (ret < 0)
		return ret;
	probe = io_uring_get_probe_ring(&ring->ring);
	if (!probe)
		return -ENOMEM;
	for (i = 0; i < sizeof(wanted) / sizeof(wanted[0]); i++)
		if (io_uring_opcode_supported(probe, wanted[i].op))
			ops |= wanted[i].bit;
	io_uring_free_probe(probe);
	return ops;
}

#endif /* EXACTIO_URING */
