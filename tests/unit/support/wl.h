/* SPDX-License-Identifier: MIT */
/*
 * Random guest workloads through the async engine API (what the ublk queue
 * loop and the tools drive), and a model of what the disk may read back:
 * bytes that must hold one value, and bytes that may hold the old or the
 * new value of requests whose outcome is unknown (not yet flushed when a
 * crash came, or failed with an error).
 */
#ifndef UQ_TEST_WL_H
#define UQ_TEST_WL_H

#include <stdbool.h>
#include <stdint.h>

#include "qcow2.h"
#include "tio.h"

struct wl_cfg {
	uint64_t disk;		/* guest bytes the workload touches */
	uint32_t align;		/* discards: whole units of this (the cluster size) */
	uint32_t max_len;	/* longest request */
	unsigned int batch;	/* requests in flight together */
	bool discard;		/* discards (they read back as zeros) */
	unsigned int flush_pct;	/* chance that a batch slot is a FLUSH */
	uint64_t seed;
};

struct wl_op {
	enum qcow2_op op;
	uint64_t off, len;
	uint32_t seed;		/* WRITE: the data pattern */
	int res;
	bool done;
	uint32_t sub_ev, ack_ev;	/* positions in the tio event log */
};

struct wl {
	struct wl_cfg cfg;
	struct qcow2 *img;
	struct tio *t;
	struct wl_op *ops;
	uint32_t nr_ops, ops_alloc;
	struct qcow2_req **reqs;
	uint8_t **bufs;
	uint64_t rng;
};

int wl_init(struct wl *w, struct qcow2 *img, struct tio *t, const struct wl_cfg *cfg);
void wl_fini(struct wl *w);
/* Run cfg.batch random requests (byte ranges disjoint) to completion.
 * 0, or -errno if the engine could not be driven (a hang). */
int wl_batch(struct wl *w);
/* Run one FLUSH request. Its result, or -errno as above. */
int wl_flush(struct wl *w);

/* The byte a WRITE with @seed puts at guest @off. */
uint8_t wl_byte(uint32_t seed, uint64_t off);
/* The @len bytes it puts from guest @off on. */
void wl_fill(uint32_t seed, uint64_t off, uint8_t *buf, uint64_t len);

struct wl_model {
	uint64_t disk;
	uint8_t *m;		/* the value each byte must have if certain */
	uint32_t *last;		/* sequence number of the last certain op on each byte */
	uint32_t seq;
	uint8_t *ok;		/* scratch: bytes an op of unknown outcome explains */
	struct wl_unc { const struct wl_op *op; uint32_t seq; } *unc;
	uint32_t nr_unc, unc_alloc;
};

int wl_model_init(struct wl_model *md, const uint8_t *base, uint64_t disk);
void wl_model_reset(struct wl_model *md, const uint8_t *base);
void wl_model_free(struct wl_model *md);
/* Apply @op (in order) as certain, or as of unknown outcome. 0 or -ENOMEM. */
int wl_model_apply(struct wl_model *md, const struct wl_op *op, bool certain);
/* Forget the ops of unknown outcome. */
void wl_model_drop_unc(struct wl_model *md);
/* -1 if @data (the whole disk) is possible, else the first impossible offset. */
int64_t wl_model_check(const struct wl_model *md, const uint8_t *data);

#endif
