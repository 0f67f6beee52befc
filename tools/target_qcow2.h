/* SPDX-License-Identifier: MIT */
/*
 * The qcow2 target: the ublk target ops backed by the qcow2 engine. Only
 * target_qcow2.c sees both sides; this header shows the ublk side alone.
 */
#ifndef UQ_TARGET_QCOW2_H
#define UQ_TARGET_QCOW2_H

#include <stdint.h>

#include "ublk.h"

/* ublk_tgt.opts of the qcow2 target; NULL means all defaults. */
struct uq_qcow2_opts {
	uint64_t cache_bytes;		/* L2 cache size, 0: the engine's default */
	const char *snapshot;		/* internal snapshot to serve (read-only), or NULL */
	const struct qcow2_key *keys;	/* passphrases to try (qcow2_opts) */
	unsigned int nr_keys;
	/* Every write, discard and write-zeroes is followed by a flush before
	 * it completes: metadata the engine caches is lost with a killed
	 * daemon, and a recovered device must not lose what it acknowledged. */
	bool write_through;
	int max_backing;		/* qcow2_opts.max_backing (--no-backing) */
};

extern const struct ublk_tgt_ops uq_qcow2_ops;

#endif
