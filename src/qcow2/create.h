/* SPDX-License-Identifier: MIT */
/*
 * What create.c and create_sim.c share: the layout of a fresh image, and
 * the replay of QEMU's allocator that places it where qemu-img would.
 */
#ifndef QCOW2_CREATE_H
#define QCOW2_CREATE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "qcow2.h"

/*
 * Where everything goes. The layouts are those qemu-img leaves behind: it
 * writes header, refcount table and refcount block 0 (clusters 0, 1, 2),
 * then grows the L1 table (from cluster 3) and preallocates through its
 * allocator, and sets up LUKS last, in the first free clusters:
 *  - LAYOUT_META (preallocation=off or metadata, and every mode with an
 *    external data file): each L2 table followed by its data clusters (data in the
 *    data file: the L2 tables back to back). The last cluster's tail past
 *    the image size is copied on write: zeros written up to the (sub)cluster
 *    end.
 *  - LAYOUT_AREA (falloc, full): new refcount structures at the end of the
 *    file (QEMU's qcow2_refcount_area(): refcount blocks 1.., then a new
 *    table; the first table at cluster 1 is freed), the data clusters after
 *    them, then the L2 tables: the first one in the freed cluster 1, the
 *    others after the data.
 *  - LAYOUT_SIM: LAYOUT_META (or no preallocation) where QEMU allocates
 *    refcount blocks on the way (small clusters, narrow refcounts, large
 *    images): its allocator replayed (struct sim), holes included.
 *  - LAYOUT_PACKED: everything back to back. Not qemu-img's layout: only
 *    where the others do not apply (falloc/full with an L1 table past what
 *    refcount block 0 covers; a replay past SIM_MAX_CLUSTERS or an 8 MiB
 *    refcount table).
 */
enum layout_kind { LAYOUT_PACKED, LAYOUT_META, LAYOUT_AREA, LAYOUT_SIM };

struct sim;

struct layout {
	enum layout_kind kind;
	uint32_t cluster_bits;
	uint32_t refcount_order;
	uint64_t l1_size;		/* entries */
	uint64_t l2_entries;		/* per L2 table */
	uint64_t reftable_clusters;
	uint64_t nb_refblocks;
	uint64_t l1_clusters;
	uint64_t nb_l2;
	uint64_t nb_data;
	uint64_t nb_clusters;		/* the file's clusters: all refcount 1 but @free */
	uint64_t free;			/* a cluster with refcount 0 (0: none) */
	uint64_t crypt_bytes;		/* LUKS header area (encrypted images) */
	uint64_t nb_crypt;
	uint64_t reftable_off, rb0_off, rb1_off, l1_off, crypt_off;
	uint64_t l2_first, l2_base, l2_step;	/* L2 table k: k ? base + k * step : first */
	uint64_t data_off;		/* guest cluster 0's data (LAYOUT_PACKED, _AREA) */
	bool data_in_file;		/* no external data file */
	struct sim *sim;		/* LAYOUT_SIM */
};

/*
 * QEMU's cluster allocator (qcow2-refcount.c: alloc_clusters_noref,
 * update_refcount, alloc_refcount_block, qcow2_alloc_clusters(_at)),
 * replayed for a metadata preallocation whose refcount blocks QEMU
 * allocates on the way: the first free cluster for each new refcount
 * block, -EAGAIN and a fresh search after it, partial refcount updates
 * undone (which can leave holes), the refcount table moved when it is full
 * (qcow2_refcount_area(): new blocks and table past everything; the old
 * table freed, its bytes left behind). Refcounts are 0 or 1 here.
 */
struct sim_run {
	uint64_t guest, host, nr;	/* clusters */
};

#define SIM_MAX_CLUSTERS	(1ull << 32)	/* 512 MiB of bitmap at most */

/* A refcount table QEMU moved away from: its bytes stay where no metadata overwrites them. */
struct sim_table {
	uint64_t at, clusters;		/* clusters */
	uint64_t *rb;
	uint64_t nr;
};

struct sim {
	uint64_t *used;			/* bitmap: refcount 1 */
	uint64_t nr_bits;
	uint64_t *rb;			/* refcount block of reftable entry i (cluster), 0: none */
	uint64_t nr_rb;			/* reftable entries */
	uint64_t rt_at, rt_clusters;	/* the refcount table */
	struct sim_table *old;
	size_t nr_old;
	uint64_t per_rb;
	uint64_t per_rt;		/* reftable entries per cluster */
	uint64_t free_idx;		/* QEMU's free_cluster_index */
	uint64_t l1;			/* clusters */
	uint64_t *l2;			/* per L2 table */
	uint64_t crypt;
	struct sim_run *runs;		/* guest order */
	size_t nr_runs, runs_alloc;
};

static inline uint64_t div_round_up(uint64_t a, uint64_t b)
{
	return a / b + (a % b != 0);
}

/* QEMU's qcow2_refcount_metadata_size() (create.c). */
uint64_t create_refblocks_for(uint64_t clusters, uint64_t cs, uint64_t rb_entries, bool generous);

/* LAYOUT_SIM, or false where the replay gives up or would not fit in memory. */
bool create_plan_sim(struct layout *l, const struct qcow2_create_opts *o, uint64_t rb_entries);
bool create_sim_used(const struct sim *s, uint64_t c);
void create_sim_free(struct sim *s);

#endif
