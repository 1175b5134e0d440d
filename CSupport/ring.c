/* SPDX-License-Identifier: Apache-2.0 */
/* Ring set-up, tear-down and the opcode probe. */
#include "internal.h"

int csupport_ring_create(unsigned entries, csupport_ring **out)
{
	struct io_uring_params params;
	csupport_ring *r;
	int ret;

	if (!out || entries == 0)
		return -EINVAL;
	*out = NULL;
	r = calloc(1, sizeof(*r));
	if (!r)
		return -ENOMEM;

	/* COOP_TASKRUN (5.19) avoids an interrupt per completion; we always wait in the kernel,
	 * where deferred task work runs anyway. Older kernels reject the flag: retry without. */
	memset(&params, 0, sizeof(params));
	params.flags = IORING_SETUP_COOP_TASKRUN;
	ret = io_uring_queue_init_params(entries, &r->ring, &params);
	if (ret == -EINVAL) {
		memset(&params, 0, sizeof(params));
		ret = io_uring_queue_init_params(entries, &r->ring, &params);
	}
	if (ret < 0) {
		free(r);
		return ret;
	}
	*out = r;
	return 0;
}

void csupport_ring_destroy(csupport_ring *ring)
{
	if (!ring)
		return;
	io_uring_queue_exit(&ring->ring);
	free(ring);
}

int csupport_ring_probe(csupport_ring *ring)
{
	struct io_uring_probe *probe;
	int ops = 0;

	if (!ring)
		return -EINVAL;
	probe = io_uring_get_probe_ring(&ring->ring);
	if (!probe)
		return -ENOMEM;
	if (io_uring_opcode_supported(probe, IORING_OP_READ))
		ops |= CSUPPORT_OP_READ;
	if (io_uring_opcode_supported(probe, IORING_OP_READ_FIXED))
		ops |= CSUPPORT_OP_READ_FIXED;
	if (io_uring_opcode_supported(probe, IORING_OP_RECV))
		ops |= CSUPPORT_OP_RECV;
	if (io_uring_opcode_supported(probe, IORING_OP_POLL_ADD))
		ops |= CSUPPORT_OP_POLL_ADD;
	io_uring_free_probe(probe);
	return ops;
}
