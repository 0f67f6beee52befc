// SPDX-License-Identifier: MIT
/*
 * The null target (-t null): every request succeeds at once, reads return
 * whatever the buffer holds. A baseline for measuring the ublk path alone.
 */
#include <stdio.h>

#include "internal.h"

#define NULL_DEF_SIZE	(250ULL << 30)

/* opts: an optional const uint64_t * with the size in bytes. */
static int null_init(struct ublk_tgt *t, const struct ublk_dev_cfg *cfg)
{
	const uint64_t *size = t->opts;

	(void)cfg;
	t->dev_size = size && *size ? *size : NULL_DEF_SIZE;
	if (t->dev_size < 512) {
		snprintf(t->err, sizeof(t->err), "null: size must be at least 512 bytes");
		return -EINVAL;
	}
	t->dev_size &= ~511ULL;
	t->discard_granularity = 4096;
	return 0;
}

static void null_queue_io(struct ublk_queue *q, unsigned int tag)
{
	const struct ublksrv_io_desc *iod = ublk_queue_iod(q, tag);
	unsigned int op = ublksrv_get_op(iod);
	int res = 0;

	if (op == UBLK_IO_OP_READ || op == UBLK_IO_OP_WRITE)
		res = (int)(iod->nr_sectors << 9);
	ublk_queue_complete(q, tag, res);
}

static int null_deinit(struct ublk_tgt *t)
{
	(void)t;
	return 0;
}

const struct ublk_tgt_ops ublk_null_ops = {
	.name = "null",
	.init = null_init,
	.queue_io = null_queue_io,
	.deinit = null_deinit,
};
