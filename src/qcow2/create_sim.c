// SPDX-License-Identifier: MIT
/*
 * QEMU's cluster allocator replayed for create's LAYOUT_SIM: where
 * qemu-img create puts L2 tables, data and refcount blocks when it
 * allocates refcount blocks on the way (create.h says when).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "create.h"
#include "internal.h"


bool create_sim_used(const struct sim *s, uint64_t c)
{
	return c < s->nr_bits && (s->used[c / 64] >> (c % 64) & 1);
}

/* QEMU's get_refcount(): 0 without a refcount block. */
static bool sim_refcount(const struct sim *s, uint64_t c)
{
	uint64_t i = c / s->per_rb;

	return i < s->nr_rb && s->rb[i] && create_sim_used(s, c);
}

static int sim_set(struct sim *s, uint64_t c, bool v)
{
	if (c >= s->nr_bits) {
		uint64_t n = (c + 1) * 2, *p;

		if (n > SIM_MAX_CLUSTERS)
			return -ENOSPC;
		p = realloc(s->used, (n / 64 + 1) * 8);
		if (!p)
			return -ENOMEM;
		memset(p + s->nr_bits / 64 + 1, 0, (n / 64 - s->nr_bits / 64) * 8);
		s->used = p;
		s->nr_bits = n;
	}
	if (v)
		s->used[c / 64] |= 1ull << (c % 64);
	else
		s->used[c / 64] &= ~(1ull << (c % 64));
	return 0;
}

static uint64_t sim_alloc_noref(struct sim *s, uint64_t n)
{
	uint64_t i;

retry:
	for (i = 0; i < n; i++)
		if (sim_refcount(s, s->free_idx++))
			goto retry;
	return s->free_idx - n;
}

static int sim_alloc_rb(struct sim *s, uint64_t c);

static int sim_update(struct sim *s, uint64_t c0, uint64_t n, bool inc)
{
	uint64_t c, cur = UINT64_MAX;
	int ret = 0;

	for (c = c0; c < c0 + n; c++) {
		if (c / s->per_rb != cur) {
			cur = c / s->per_rb;
			ret = sim_alloc_rb(s, c);
			/* QEMU: the search starts again at the same clusters. */
			if (ret == -EAGAIN && s->free_idx > c0)
				s->free_idx = c0;
			if (ret < 0)
				break;
		}
		ret = sim_set(s, c, inc);
		if (ret < 0)
			break;
		if (!inc && c < s->free_idx)
			s->free_idx = c;
	}
	/* As QEMU: what was done is undone (which lowers the free index). */
	if (ret == -EAGAIN && c > c0)
		sim_update(s, c0, c - c0, !inc);
	return ret;
}

/*
 * QEMU's qcow2_refcount_area() as alloc_refcount_block() calls it when the
 * table is full: refcount blocks from cluster @start on, then a larger
 * table, refcount block @nb hooked at @idx, the old table freed.
 */
static int sim_area(struct sim *s, uint64_t start, uint64_t idx, uint64_t nb)
{
	uint64_t cs_entries = s->per_rt, total, size, clusters, add = 0, end, blk, i, j;
	uint64_t first = start / s->per_rb, *rt;
	struct sim_table *old;
	int ret;

	total = create_refblocks_for(start, cs_entries * 8, s->per_rb, true);
	size = total + div_round_up(total, 2);
	size = div_round_up(size, cs_entries) * cs_entries;
	clusters = size / cs_entries;
	if (size * 8 > QCOW2_MAX_REFTABLE_BYTES)
		return -ENOSPC;
	rt = calloc(size, 8);
	old = realloc(s->old, (s->nr_old + 1) * sizeof(*old));
	if (!rt || !old) {
		free(rt);
		return -ENOMEM;
	}
	s->old = old;
	memcpy(rt, s->rb, (s->nr_rb < size ? s->nr_rb : size) * 8);
	rt[idx] = nb;
	for (i = first; i < total; i++)
		add += !rt[i];
	end = start + add + clusters;
	for (i = first, blk = start; i < total; i++) {
		if (!rt[i])
			rt[i] = blk++;
		for (j = i * s->per_rb > start ? i * s->per_rb : start;
		     j < end && j < (i + 1) * s->per_rb; j++) {
			ret = sim_set(s, j, true);
			if (ret < 0) {
				free(rt);
				return ret;
			}
		}
	}
	s->old[s->nr_old++] = (struct sim_table){ s->rt_at, s->rt_clusters, s->rb, s->nr_rb };
	s->rb = rt;
	s->nr_rb = size;
	s->rt_at = start + add;
	old = &s->old[s->nr_old - 1];
	s->rt_clusters = clusters;
	return sim_update(s, old->at, old->clusters, false);
}

static int sim_alloc_rb(struct sim *s, uint64_t c)
{
	uint64_t i = c / s->per_rb, nb, used;
	int ret;

	if (i < s->nr_rb && s->rb[i])
		return 0;
	nb = sim_alloc_noref(s, 1);
	if (nb / s->per_rb == i)
		ret = sim_set(s, nb, true);	/* it describes itself */
	else
		ret = sim_update(s, nb, 1, true);
	if (ret < 0)
		return ret;
	if (i < s->nr_rb) {
		s->rb[i] = nb;
		return -EAGAIN;		/* the caller searches again */
	}
	/* The table is full: QEMU's new structures go past both clusters. */
	used = (c > nb ? c : nb) + 1;
	ret = sim_area(s, div_round_up(used, s->per_rb) * s->per_rb, i, nb);
	return ret < 0 ? ret : -EAGAIN;
}

static int sim_alloc(struct sim *s, uint64_t n, uint64_t *c)
{
	int ret;

	do {
		*c = sim_alloc_noref(s, n);
		ret = sim_update(s, *c, n, true);
	} while (ret == -EAGAIN);
	return ret;
}

static int sim_alloc_at(struct sim *s, uint64_t c, uint64_t n, uint64_t *got)
{
	int ret;

	do {
		for (*got = 0; *got < n && !sim_refcount(s, c + *got); (*got)++)
			;
		ret = sim_update(s, c, *got, true);
	} while (ret == -EAGAIN);
	return ret;
}

static int sim_add_run(struct sim *s, uint64_t guest, uint64_t host, uint64_t nr)
{
	if (s->nr_runs == s->runs_alloc) {
		size_t n = s->runs_alloc ? 2 * s->runs_alloc : 64;
		struct sim_run *p = realloc(s->runs, n * sizeof(*p));

		if (!p)
			return -ENOMEM;
		s->runs = p;
		s->runs_alloc = n;
	}
	s->runs[s->nr_runs++] = (struct sim_run){ guest, host, nr };
	return 0;
}

void create_sim_free(struct sim *s)
{
	if (!s)
		return;
	size_t i;

	for (i = 0; i < s->nr_old; i++)
		free(s->old[i].rb);
	free(s->old);
	free(s->used);
	free(s->rb);
	free(s->l2);
	free(s->runs);
	free(s);
}

/*
 * qemu-img create's steps for preallocation=metadata: header, table and
 * refcount block 0 (clusters 0-2), the L1 table, then preallocate_co()'s
 * qcow2_alloc_host_offset() calls (at most INT_MAX bytes each; within one
 * a new L2 table comes first and data runs stop at L2 slices and continue
 * in place while the next cluster is free), then the LUKS area.
 */
static int sim_run_meta(struct sim *s, const struct layout *l, uint64_t slice_entries)
{
	uint64_t chunk = (INT32_MAX >> l->cluster_bits), g = 0, k, h, n;
	int ret;

	s->rb[0] = 2;
	s->rt_at = 1;
	s->rt_clusters = 1;
	s->free_idx = 3;
	ret = sim_set(s, 0, true);
	if (!ret)
		ret = sim_set(s, 1, true);
	if (!ret)
		ret = sim_set(s, 2, true);
	if (!ret && l->l1_clusters)
		ret = sim_alloc(s, l->l1_clusters, &s->l1);
	while (!ret && g < l->nb_data) {
		uint64_t end = l->nb_data - g < chunk ? l->nb_data : g + chunk, host = UINT64_MAX;

		while (g < end) {
			k = g / l->l2_entries;
			if (!s->l2[k]) {
				ret = sim_alloc(s, 1, &s->l2[k]);
				if (ret < 0)
					return ret;
			}
			n = slice_entries - g % slice_entries;
			if (n > end - g)
				n = end - g;
			if (!l->data_in_file)
				h = g;		/* the data file maps one to one */
			else if (host == UINT64_MAX)
				ret = sim_alloc(s, n, &h);
			else
				ret = sim_alloc_at(s, (h = host), n, &n);
			if (ret < 0)
				return ret;
			if (!n)
				break;
			ret = sim_add_run(s, g, h, n);
			if (ret < 0)
				return ret;
			host = h + n;
			g += n;
		}
	}
	if (!ret && l->nb_crypt)
		ret = sim_alloc(s, l->nb_crypt, &s->crypt);
	return ret;
}

bool create_plan_sim(struct layout *l, const struct qcow2_create_opts *o, uint64_t rb_entries)
{
	uint64_t cs = 1ull << l->cluster_bits, end = 0, i;
	struct sim *s = calloc(1, sizeof(*s));
	uint64_t slice = (cs < 4096 ? cs : 4096) / (o->extended_l2 ? 16 : 8);

	if (!s)
		return false;
	s->per_rb = rb_entries;
	s->per_rt = cs / 8;
	s->nr_rb = cs / 8;
	/* A first guess at the clusters; sim_set() grows the bitmap. */
	s->nr_bits = 3 + l->l1_clusters + l->nb_l2 + (l->data_in_file ? l->nb_data : 0) +
		     l->nb_crypt + 64;
	if (s->nr_bits > SIM_MAX_CLUSTERS)
		goto fail;
	s->used = calloc(s->nr_bits / 64 + 1, 8);
	s->rb = calloc(s->nr_rb, 8);
	s->l2 = calloc(l->nb_l2 ? l->nb_l2 : 1, 8);
	if (!s->used || !s->rb || !s->l2 || sim_run_meta(s, l, slice) < 0)
		goto fail;
	/* The file ends after the last cluster written (data clusters are not). */
	end = s->rt_at + s->rt_clusters;
	for (i = 0; i < s->nr_rb; i++)
		if (s->rb[i] + 1 > end)
			end = s->rb[i] + 1;
	for (i = 0; i < l->nb_l2; i++)
		if (s->l2[i] + 1 > end)
			end = s->l2[i] + 1;
	if (l->nb_crypt && s->crypt + l->nb_crypt > end)
		end = s->crypt + l->nb_crypt;
	l->kind = LAYOUT_SIM;
	l->sim = s;
	l->reftable_off = s->rt_at * cs;
	l->reftable_clusters = s->rt_clusters;
	l->l1_off = s->l1 * cs;
	l->crypt_off = s->crypt * cs;
	l->nb_clusters = end;
	return true;
fail:
	create_sim_free(s);
	return false;
}
