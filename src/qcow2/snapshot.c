// SPDX-License-Identifier: MIT
/*
 * Internal snapshots (docs/interop/qcow2.rst, "Snapshots"), with qemu-img's
 * semantics: the snapshot table parsed and validated in one place, listing,
 * create / apply / delete as offline metadata edits, and opening a snapshot
 * read-only in place of the active state.
 *
 * A snapshot owns a copy of the active L1 table; every L2 table and data
 * cluster counts one reference per L1 table that reaches it (so a shared L2
 * table's clusters count twice, as QEMU's check counts them), and COPIED
 * flags in the active tables mark exactly the refcount-1 clusters.
 *
 * Crash safety, unlike QEMU's in-place edits: each operation writes its new
 * state (active L1 table, copies of the L2 tables whose COPIED flags
 * change, snapshot table, every refcount block and the refcount table) to
 * clusters past the end of the file and switches to it with one header
 * write (shadow_commit). A crash leaves the old image or the new one, never
 * a mix; the price is a copy of the refcount metadata and of the changed
 * L2 tables per operation, whose old clusters become free space.
 *
 * Every operation first checks that all its refcount changes fit (no
 * overflow, no underflow) and only then changes anything, so a refusal
 * leaves the image as it was.
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "internal.h"

/* QEMU's limits. */
#define SN_HEADER_LEN		40u
#define SN_EXTRA_LEN		24u	/* vm_state_size_large, disk_size, icount */
#define SN_MAX			65536u
#define SN_MAX_TABLE_BYTES	(64u << 20)
#define SN_MAX_EXTRA		1024u
#define SN_MAX_NAME		255u	/* QEMUSnapshotInfo's name buffer, less the NUL */

#define IO_ALIGN		4096u

static uint64_t round_up(uint64_t v, uint64_t align)
{
	return (v + align - 1) / align * align;
}

static uint64_t clusters_of(const struct qcow2 *img, uint64_t bytes)
{
	return (bytes + img->cluster_size - 1) >> img->h.cluster_bits;
}

static void *alloc_io(size_t len)
{
	void *p;

	if (posix_memalign(&p, IO_ALIGN, len ? len : 1))
		return NULL;
	memset(p, 0, len);
	return p;
}

/* Read @len bytes at @off through an aligned bounce buffer (O_DIRECT safe). */
static int read_bytes(struct qcow2 *img, uint64_t off, void *buf, size_t len)
{
	uint64_t start = off & ~(uint64_t)(IO_ALIGN - 1);
	size_t span = round_up(off + len - start, IO_ALIGN);
	uint8_t *b = alloc_io(span);
	int ret;

	if (!b)
		return -ENOMEM;
	ret = qcow2_io_pread(img->io, img->fd, b, span, start);
	if (!ret)
		memcpy(buf, b + (off - start), len);
	free(b);
	if (ret < 0)
		return qcow2_error(img, ret, "cannot read at 0x%llx: %s", (unsigned long long)off,
				   strerror(-ret));
	return 0;
}

/* Write whole clusters from the aligned @buf, meant to update the metadata in @ign. */
static int write_clusters(struct qcow2 *img, unsigned int ign, uint64_t off, const void *buf,
			  size_t len)
{
	return qcow2_sync_pwrite_ol(img, ign, buf, len, off);
}

/* ---- The snapshot table ---------------------------------------------------- */

void qcow2_snap_table_free(struct qcow2_snap_table *t)
{
	uint32_t i;

	for (i = 0; i < t->nr; i++) {
		free(t->s[i].id);
		free(t->s[i].name);
		free(t->s[i].extra);
	}
	free(t->s);
	memset(t, 0, sizeof(*t));
}

static char *copy_str(const uint8_t *p, size_t len)
{
	char *s = malloc(len + 1);

	if (s) {
		memcpy(s, p, len);
		s[len] = '\0';
	}
	return s;
}

/* Parse entry @i at table offset @pos; *@end gets the offset after it. */
static int parse_entry(struct qcow2 *img, uint32_t i, uint64_t pos, struct qcow2_snap *sn,
		       uint64_t *end, bool loose)
{
	uint64_t base = img->h.snapshots_offset, limit = img->file_end;
	uint8_t hdr[SN_HEADER_LEN], *var;
	uint32_t extra, id_len, name_len, var_len;
	int ret;

	if (pos + SN_HEADER_LEN > SN_MAX_TABLE_BYTES)
		return qcow2_error(img, -EFBIG, "snapshot table larger than %u bytes",
				   SN_MAX_TABLE_BYTES);
	if (base + pos + SN_HEADER_LEN > limit)
		return qcow2_error(img, -EINVAL, "snapshot table entry %u beyond the end of the file",
				   i);
	ret = read_bytes(img, base + pos, hdr, sizeof(hdr));
	if (ret < 0)
		return ret;
	sn->l1_off = get_be64(hdr);
	sn->l1_size = get_be32(hdr + 8);
	id_len = get_be16(hdr + 12);
	name_len = get_be16(hdr + 14);
	sn->date_sec = get_be32(hdr + 16);
	sn->date_nsec = get_be32(hdr + 20);
	sn->vm_clock_nsec = get_be64(hdr + 24);
	sn->vm_state_size = get_be32(hdr + 32);
	extra = get_be32(hdr + 36);
	if (extra > SN_MAX_EXTRA)
		return qcow2_error(img, -EFBIG, "snapshot table entry %u: too much extra data "
				   "(%u bytes, at most %u)", i, extra, SN_MAX_EXTRA);
	var_len = extra + id_len + name_len;
	*end = pos + SN_HEADER_LEN + var_len;
	if (*end > SN_MAX_TABLE_BYTES)
		return qcow2_error(img, -EFBIG, "snapshot table larger than %u bytes",
				   SN_MAX_TABLE_BYTES);
	if (base + *end > limit)
		return qcow2_error(img, -EINVAL, "snapshot table entry %u beyond the end of the file",
				   i);
	var = malloc(var_len ? var_len : 1);
	if (!var)
		return -ENOMEM;
	ret = read_bytes(img, base + pos + SN_HEADER_LEN, var, var_len);
	if (ret < 0)
		goto out;
	if (extra >= 8)
		sn->vm_state_size = get_be64(var);
	sn->disk_size = extra >= 16 ? get_be64(var + 8) : img->h.size;
	sn->icount = extra >= 24 ? get_be64(var + 16) : UINT64_MAX;
	ret = -ENOMEM;
	if (extra > SN_EXTRA_LEN) {
		sn->extra_len = extra - SN_EXTRA_LEN;
		sn->extra = malloc(sn->extra_len);
		if (sn->extra)
			memcpy(sn->extra, var + SN_EXTRA_LEN, sn->extra_len);
		if (!sn->extra)
			goto out;
	}
	sn->id = copy_str(var + extra, id_len);
	sn->name = copy_str(var + extra + id_len, name_len);
	if (!sn->id || !sn->name)
		goto out;
	ret = 0;
	/*
	 * QEMU opens an image whose snapshot L1 tables are broken and only
	 * refuses to use those snapshots (check reports them): so may we.
	 */
	if (loose)
		goto out;
	ret = -EINVAL;
	if ((uint64_t)sn->l1_size * 8 > QCOW2_MAX_L1_BYTES) {
		qcow2_error(img, -EFBIG, "snapshot %s: L1 table too large (%u entries)", sn->id,
			    sn->l1_size);
		ret = -EFBIG;
		goto out;
	}
	if (!qcow2_aligned(img, sn->l1_off) || (sn->l1_size && !sn->l1_off) ||
	    sn->l1_off + (uint64_t)sn->l1_size * 8 > limit) {
		qcow2_error(img, ret, "snapshot %s: L1 table offset 0x%llx invalid", sn->id,
			    (unsigned long long)sn->l1_off);
		goto out;
	}
	if (sn->disk_size > (uint64_t)sn->l1_size * qcow2_l2_span(img)) {
		qcow2_error(img, ret, "snapshot %s: L1 table too small for %llu bytes", sn->id,
			    (unsigned long long)sn->disk_size);
		goto out;
	}
	ret = 0;
out:
	free(var);
	return ret;
}

static int snap_table_read(struct qcow2 *img, struct qcow2_snap_table *t, bool loose)
{
	uint64_t pos = 0;
	uint32_t i, nr = img->h.nb_snapshots;
	int ret;

	memset(t, 0, sizeof(*t));
	if (!nr)
		return 0;
	if (nr > SN_MAX)
		return qcow2_error(img, -EFBIG, "too many snapshots (%u, at most %u)", nr, SN_MAX);
	/* QEMU reads a table at offset 0 (the header) as entries: only a use refuses it. */
	if (!qcow2_aligned(img, img->h.snapshots_offset) ||
	    (!img->h.snapshots_offset && !loose) || img->h.snapshots_offset >= img->file_end)
		return qcow2_error(img, -EINVAL, "snapshot table offset 0x%llx invalid",
				   (unsigned long long)img->h.snapshots_offset);
	t->s = calloc(nr, sizeof(*t->s));
	if (!t->s)
		return qcow2_error(img, -ENOMEM, "out of memory");
	for (i = 0; i < nr; i++) {
		t->nr = i + 1;
		ret = parse_entry(img, i, round_up(pos, 8), &t->s[i], &pos, loose);
		if (ret < 0) {
			if (ret == -ENOMEM)
				qcow2_error(img, ret, "out of memory");
			qcow2_snap_table_free(t);
			return ret;
		}
	}
	t->bytes = pos;
	return 0;
}

/* The table with every snapshot's L1 table checked: for the snapshots' use. */
int qcow2_snap_table_read(struct qcow2 *img, struct qcow2_snap_table *t)
{
	return snap_table_read(img, t, false);
}

/*
 * The table without the L1 tables checked, as QEMU reads it at open: for
 * the overlap checks and the list, which do not follow them.
 */
int qcow2_snap_table_read_loose(struct qcow2 *img, struct qcow2_snap_table *t)
{
	return snap_table_read(img, t, true);
}

static int find_id(const struct qcow2_snap_table *t, const char *id)
{
	uint32_t i;

	for (i = 0; i < t->nr; i++)
		if (!strcmp(t->s[i].id, id))
			return i;
	return -1;
}

static int find_name(const struct qcow2_snap_table *t, const char *name)
{
	uint32_t i;

	for (i = 0; i < t->nr; i++)
		if (!strcmp(t->s[i].name, name))
			return i;
	return -1;
}

static uint64_t table_bytes(const struct qcow2_snap_table *t)
{
	uint64_t pos = 0;
	uint32_t i;

	for (i = 0; i < t->nr; i++)
		pos = round_up(pos, 8) + SN_HEADER_LEN + SN_EXTRA_LEN + t->s[i].extra_len +
		      strlen(t->s[i].id) + strlen(t->s[i].name);
	return pos;
}

/* Lay out @t as QEMU writes it: every entry with the 24 bytes of known extra data. */
static void table_serialize(const struct qcow2_snap_table *t, uint8_t *buf)
{
	uint64_t pos = 0;
	uint32_t i;

	for (i = 0; i < t->nr; i++) {
		const struct qcow2_snap *sn = &t->s[i];
		size_t id_len = strlen(sn->id), name_len = strlen(sn->name);
		uint8_t *p;

		pos = round_up(pos, 8);
		p = buf + pos;
		put_be64(p, sn->l1_off);
		put_be32(p + 8, sn->l1_size);
		put_be16(p + 12, id_len);
		put_be16(p + 14, name_len);
		put_be32(p + 16, sn->date_sec);
		put_be32(p + 20, sn->date_nsec);
		put_be64(p + 24, sn->vm_clock_nsec);
		/* Too large for 32 bits: older readers see a disk-only snapshot. */
		put_be32(p + 32, sn->vm_state_size <= UINT32_MAX ? sn->vm_state_size : 0);
		put_be32(p + 36, SN_EXTRA_LEN + sn->extra_len);
		p += SN_HEADER_LEN;
		put_be64(p, sn->vm_state_size);
		put_be64(p + 8, sn->disk_size);
		put_be64(p + 16, sn->icount);
		p += SN_EXTRA_LEN;
		if (sn->extra_len)
			memcpy(p, sn->extra, sn->extra_len);
		p += sn->extra_len;
		memcpy(p, sn->id, id_len);
		memcpy(p + id_len, sn->name, name_len);
		pos += SN_HEADER_LEN + SN_EXTRA_LEN + sn->extra_len + id_len + name_len;
	}
}

/* ---- Blocking engine calls --------------------------------------------------- */

struct snap_wait {
	struct qcow2_wait w;
	bool woken;
	int res;
};

static void snap_wake(struct qcow2_wait *w, int res)
{
	struct snap_wait *sw = (struct snap_wait *)w;

	sw->woken = true;
	sw->res = res;
}

static int snap_wait(struct qcow2 *img, struct snap_wait *sw)
{
	while (!sw->woken) {
		int ret = img->io->wait(img->io);

		if (ret < 0 && ret != -EAGAIN)
			return ret;
	}
	return sw->res;
}

/* Run @call, which parks &(sw).w when it returns -EAGAIN, until it is done. */
#define BLOCKING(img, ret, sw, call)				\
	do {							\
		for (;;) {					\
			(sw).woken = false;			\
			(ret) = (call);				\
			if ((ret) != -EAGAIN)			\
				break;				\
			(ret) = snap_wait((img), &(sw));	\
			if ((ret) < 0)				\
				break;				\
		}						\
	} while (0)

static int cache_get(struct qcow2 *img, uint64_t off, struct qcow2_slice **s)
{
	struct snap_wait sw = { .w.fn = snap_wake };
	int ret;

	BLOCKING(img, ret, sw, qcow2_cache_get(&img->l2_cache, off, QCOW2_CACHE_MODIFY, &sw.w, s));
	return ret;
}

static int rc_get(struct qcow2 *img, uint64_t cluster, uint64_t *v)
{
	struct snap_wait sw = { .w.fn = snap_wake };
	int ret;

	BLOCKING(img, ret, sw, qcow2_refcount_get(img, cluster, &sw.w, v));
	return ret;
}

/* Write back everything dirty (a flush applies queued frees at its end). */
static int flush_all(struct qcow2 *img)
{
	int i, ret;

	for (i = 0; i < 4; i++) {
		ret = qcow2_flush(img);
		if (ret < 0)
			return ret;
		if (!img->nr_frees && !img->rc_cache.nr_dirty && !img->l2_cache.nr_dirty &&
		    !img->l1_dirty && !img->reftable_dirty && !img->header_dirty)
			return 0;
	}
	return qcow2_error(img, -EBUSY, "metadata still dirty after flushing");
}

/* ---- Reference counting over whole L1 tables ------------------------------------ */

/* References to add or drop, per host cluster. */
struct refs {
	uint16_t *n;
	uint64_t nr;
};

static int refs_init(struct qcow2 *img, struct refs *r)
{
	r->nr = clusters_of(img, img->file_end);
	r->n = calloc(r->nr ? r->nr : 1, sizeof(*r->n));
	if (!r->n)
		return qcow2_error(img, -ENOMEM, "out of memory");
	return 0;
}

static int refs_add(struct qcow2 *img, struct refs *r, uint64_t off, uint64_t nr)
{
	uint64_t c = off >> img->h.cluster_bits, i;

	if (!c || c + nr > r->nr)
		return qcow2_error(img, -EIO, "reference to 0x%llx outside the image file "
				   "(run check)", (unsigned long long)off);
	for (i = c; i < c + nr; i++) {
		if (r->n[i] == UINT16_MAX)
			return qcow2_error(img, -ERANGE, "too many references to cluster %llu",
					   (unsigned long long)i);
		r->n[i]++;
	}
	return 0;
}

/* Entry @i of @l1, or of the active L1 table if @l1 is NULL. */
static uint64_t l1_entry(const struct qcow2 *img, const uint64_t *l1, uint64_t i)
{
	return l1 ? l1[i] : qcow2_table_get(&img->l1, i);
}

/* Count one reference to every L2 table and cluster that @l1 (NULL: the active one) reaches. */
static int refs_collect(struct qcow2 *img, struct refs *r, const uint64_t *l1, uint32_t l1_size)
{
	uint32_t slice = img->l2_cache.slice_bytes, per_slice = slice / img->l2_entry_bytes, i, j;
	uint64_t so;
	int ret;

	for (i = 0; i < l1_size; i++) {
		uint64_t l2 = l1_entry(img, l1, i) & L1E_OFFSET_MASK;

		if (!l2)
			continue;
		if (!qcow2_aligned(img, l2))
			return qcow2_error(img, -EIO, "L2 table offset 0x%llx not aligned (run check)",
					   (unsigned long long)l2);
		ret = refs_add(img, r, l2, 1);
		if (ret < 0)
			return ret;
		for (so = 0; so < img->cluster_size; so += slice) {
			struct qcow2_slice *s;

			ret = cache_get(img, l2 + so, &s);
			if (ret < 0)
				return ret;
			for (j = 0; j < per_slice && !ret; j++) {
				uint64_t e = qcow2_l2_get(s, j), host, coff;
				enum l2_type type;
				uint32_t clen;

				ret = qcow2_l2_classify(img, e, &type, &host);
				if (ret < 0)
					break;
				if (type == L2_NORMAL || type == L2_ZERO_ALLOC) {
					ret = refs_add(img, r, host, 1);
				} else if (type == L2_COMPRESSED) {
					ret = qcow2_compressed_locate(img, e, &coff, &clen);
					if (ret < 0)
						break;
					/* One reference per host cluster the bytes touch. */
					host = qcow2_cluster_off(img, coff);
					ret = refs_add(img, r, host,
						       clusters_of(img, coff + clen - host));
				}
			}
			qcow2_cache_put(s);
			if (ret < 0)
				return ret;
		}
	}
	return 0;
}

/* Would adding (@sign 1) or dropping (-1) @r keep every refcount in range? */
static int refs_check(struct qcow2 *img, const struct refs *r, int sign)
{
	uint64_t c, v;
	int ret;

	for (c = 0; c < r->nr; c++) {
		if (!r->n[c])
			continue;
		ret = rc_get(img, c, &v);
		if (ret < 0)
			return ret;
		if (!v)
			return qcow2_error(img, -EIO, "cluster %llu is in use but has refcount 0 "
					   "(run check)", (unsigned long long)c);
		if (sign > 0 && r->n[c] > img->refcount_max - v)
			return qcow2_error(img, -ERANGE, "cluster %llu would need refcount %llu, "
					   "more than refcount_bits=%u can hold",
					   (unsigned long long)c, (unsigned long long)(v + r->n[c]),
					   img->refcount_bits);
		if (sign < 0 && r->n[c] > v)
			return qcow2_error(img, -EIO, "refcount of cluster %llu too low (run check)",
					   (unsigned long long)c);
	}
	return 0;
}

/* ---- Committing a new state in one header write ---------------------------------- */

/*
 * Why not edit in place: qemu-img check counts an active L1 or L2 entry
 * whose COPIED flag disagrees with "refcount == 1" as corruption, either
 * way round, and every snapshot operation flips both for the clusters it
 * shares or unshares (create: refcount 1 -> 2 and COPIED off; delete and
 * apply also the other way). A refcount block and an L2 table are two
 * writes, so some crash point between them is always corrupt, in any
 * order. Instead the new state goes to clusters past the end of the file,
 * which nothing references and whose refcount is 0: copies of the active
 * L2 tables whose flags change, a new active L1 table, the snapshot table
 * and a complete new set of refcount blocks and refcount table. After a
 * sync, one header write switches L1 table, refcount table and snapshot
 * table at once. A crash before it leaves the old image (plus unreferenced
 * clusters, not even leaks), after it the new one, in which the old
 * structures' clusters have refcount 0: free, not leaked.
 */
struct shadow {
	struct refs add, drop;	/* references gained and lost, per cluster of the file */
	uint64_t end;		/* the next cluster past the file to hand out */
	uint8_t *rb;		/* refcount blocks covering [0, add.nr), old then new counts */
	uint64_t nr_rb;
};

static int shadow_init(struct qcow2 *img, struct shadow *sh)
{
	int ret;

	memset(sh, 0, sizeof(*sh));
	ret = refs_init(img, &sh->add);
	if (!ret)
		ret = refs_init(img, &sh->drop);
	sh->end = sh->add.nr;
	return ret;
}

static void shadow_free(struct shadow *sh)
{
	free(sh->add.n);
	free(sh->drop.n);
	free(sh->rb);
}

/* @nr clusters past the end of the file, for the new state. */
static uint64_t shadow_alloc(struct qcow2 *img, struct shadow *sh, uint64_t nr)
{
	uint64_t off = sh->end << img->h.cluster_bits;

	sh->end += nr;
	return off;
}

static uint64_t shadow_rc(const struct qcow2 *img, const struct shadow *sh, uint64_t c)
{
	uint64_t per_rb = (img->cluster_size * 8) >> img->h.refcount_order;

	return qcow2_rc_read(sh->rb + (c / per_rb) * img->cluster_size, c % per_rb,
			     img->h.refcount_order);
}

static void shadow_rc_set(const struct qcow2 *img, struct shadow *sh, uint64_t c, uint64_t v)
{
	uint64_t per_rb = (img->cluster_size * 8) >> img->h.refcount_order;

	qcow2_rc_write(sh->rb + (c / per_rb) * img->cluster_size, c % per_rb,
		       img->h.refcount_order, v);
}

/*
 * Read the refcount blocks covering the file and apply the references
 * gained and lost: sh->rb holds every refcount of the new state but those
 * of clusters past the file (1) and of active L2 tables replaced by copies.
 */
static int shadow_counts(struct qcow2 *img, struct shadow *sh)
{
	uint64_t per_rb = (img->cluster_size * 8) >> img->h.refcount_order, i, c;
	int ret;

	sh->nr_rb = (sh->add.nr + per_rb - 1) / per_rb;
	sh->rb = alloc_io((sh->nr_rb ? sh->nr_rb : 1) << img->h.cluster_bits);
	if (!sh->rb)
		return qcow2_error(img, -ENOMEM, "out of memory");
	for (i = 0; i < sh->nr_rb && i < img->reftable.nr; i++) {
		uint64_t off = qcow2_table_get(&img->reftable, i) & RTE_OFFSET_MASK;

		if (!off)
			continue;
		ret = read_bytes(img, off, sh->rb + (i << img->h.cluster_bits), img->cluster_size);
		if (ret < 0)
			return ret;
	}
	for (c = 0; c < sh->add.nr; c++) {
		uint64_t v = shadow_rc(img, sh, c);

		if (!sh->add.n[c] && !sh->drop.n[c])
			continue;
		if (!v || v + sh->add.n[c] < sh->drop.n[c] ||
		    v + sh->add.n[c] - sh->drop.n[c] > img->refcount_max)
			return qcow2_error(img, -EIO, "refcount of cluster %llu out of range "
					   "(run check)", (unsigned long long)c);
		shadow_rc_set(img, sh, c, v + sh->add.n[c] - sh->drop.n[c]);
	}
	return 0;
}

/*
 * The L2 table @l2 as the new active state needs it: COPIED exactly on the
 * entries whose cluster ends with refcount 1. Written to a copy past the
 * file when that changes anything (the table itself then loses the active
 * state's reference). 0 with the L1 entry in *@l1e, or -errno.
 */
static int shadow_l2(struct qcow2 *img, struct shadow *sh, uint64_t l2, uint8_t *buf,
		     uint64_t *l1e)
{
	uint64_t n = img->cluster_size / img->l2_entry_bytes, j, c = l2 >> img->h.cluster_bits;
	bool changed = false;
	int ret;

	if (!qcow2_aligned(img, l2) || c >= sh->add.nr)
		return qcow2_error(img, -EIO, "L2 table offset 0x%llx invalid (run check)",
				   (unsigned long long)l2);
	ret = read_bytes(img, l2, buf, img->cluster_size);
	if (ret < 0)
		return ret;
	for (j = 0; j < n; j++) {
		uint8_t *p = buf + j * img->l2_entry_bytes;
		uint64_t e = get_be64(p), want = e & ~QCOW2_OFLAG_COPIED, host;
		enum l2_type type;

		ret = qcow2_l2_classify(img, e, &type, &host);
		if (ret < 0)
			return ret;
		if (type == L2_COMPRESSED)
			want = e;	/* bit 63 is no flag in a descriptor */
		else if ((type == L2_NORMAL || type == L2_ZERO_ALLOC) &&
			 (host >> img->h.cluster_bits) < sh->add.nr &&
			 shadow_rc(img, sh, host >> img->h.cluster_bits) == 1)
			want |= QCOW2_OFLAG_COPIED;
		if (want != e) {
			put_be64(p, want);
			changed = true;
		}
	}
	if (!changed) {
		*l1e = l2 | (shadow_rc(img, sh, c) == 1 ? QCOW2_OFLAG_COPIED : 0);
		return 0;
	}
	shadow_rc_set(img, sh, c, shadow_rc(img, sh, c) - 1);
	l2 = shadow_alloc(img, sh, 1);
	*l1e = l2 | QCOW2_OFLAG_COPIED;
	return write_clusters(img, 0, l2, buf, img->cluster_size);
}

/*
 * Make @l1 (host order, flags ignored; h.l1_size entries; NULL: the active
 * one as it is) the active L1
 * table and @t the snapshot table, with sh->add and sh->drop applied to the
 * refcounts, in one header write (see above). The caller has flushed
 * everything and counted the references of the L1 tables; this adds the
 * structures it replaces. 0 or -errno; on error the image is unchanged on
 * disk (a failed header write aside).
 */
static int shadow_commit(struct qcow2 *img, struct shadow *sh, const uint64_t *l1,
			 const struct qcow2_snap_table *t)
{
	uint64_t cs = img->cluster_size, per_rb = (cs * 8) >> img->h.refcount_order;
	uint64_t l1_clusters = clusters_of(img, (uint64_t)img->h.l1_size * 8);
	uint64_t tb = table_bytes(t), l1_off = 0, t_off = 0, rb_off, rt_off, rb = 0, rt = 0;
	uint64_t first_new = sh->add.nr, c, i;
	struct qcow2_header old = img->h;
	struct qcow2_table nl1 = { 0 };
	uint64_t *new_l1 = NULL, *rtab = NULL;
	uint8_t *buf = NULL, *nrb = NULL;
	int ret;

	if (tb > SN_MAX_TABLE_BYTES)
		return qcow2_error(img, -EFBIG, "snapshot table would exceed %u bytes",
				   SN_MAX_TABLE_BYTES);
	/* What the new state replaces: the active L1, snapshot and refcount tables, refblocks. */
	ret = 0;
	if (img->h.l1_size)
		ret = refs_add(img, &sh->drop, img->h.l1_table_offset, l1_clusters);
	if (!ret && img->h.nb_snapshots)
		ret = refs_add(img, &sh->drop, img->h.snapshots_offset, clusters_of(img, t->bytes));
	if (!ret)
		ret = refs_add(img, &sh->drop, img->h.refcount_table_offset,
			       img->h.refcount_table_clusters);
	for (i = 0; !ret && i < img->reftable.nr; i++)
		if (qcow2_table_get(&img->reftable, i) & RTE_OFFSET_MASK)
			ret = refs_add(img, &sh->drop,
				       qcow2_table_get(&img->reftable, i) & RTE_OFFSET_MASK, 1);
	if (!ret)
		ret = shadow_counts(img, sh);
	if (ret < 0)
		return ret;

	buf = alloc_io(cs);
	new_l1 = alloc_io(l1_clusters << img->h.cluster_bits);
	if (!buf || !new_l1) {
		ret = qcow2_error(img, -ENOMEM, "out of memory");
		goto out;
	}
	for (i = 0; i < img->h.l1_size; i++) {
		uint64_t l2 = l1_entry(img, l1, i) & L1E_OFFSET_MASK, e = 0;

		ret = l2 ? shadow_l2(img, sh, l2, buf, &e) : 0;
		if (ret < 0)
			goto out;
		new_l1[i] = htobe64(e);
	}
	if (l1_clusters) {
		l1_off = shadow_alloc(img, sh, l1_clusters);
		ret = write_clusters(img, 0, l1_off, new_l1, l1_clusters << img->h.cluster_bits);
		if (ret < 0)
			goto out;
	}
	if (t->nr) {
		uint64_t len = clusters_of(img, tb) << img->h.cluster_bits;
		uint8_t *tbuf = alloc_io(len);

		if (!tbuf) {
			ret = qcow2_error(img, -ENOMEM, "out of memory");
			goto out;
		}
		table_serialize(t, tbuf);
		t_off = shadow_alloc(img, sh, len >> img->h.cluster_bits);
		ret = write_clusters(img, 0, t_off, tbuf, len);
		free(tbuf);
		if (ret < 0)
			goto out;
	}

	/* Refcount blocks for everything up to and including themselves and their table. */
	for (;;) {
		uint64_t nb = (sh->end + rb + rt + per_rb - 1) / per_rb, nt = clusters_of(img, nb * 8);

		if (nb == rb && nt == rt)
			break;
		rb = nb;
		rt = nt;
	}
	if (rt << img->h.cluster_bits > QCOW2_MAX_REFTABLE_BYTES) {
		ret = qcow2_error(img, -EFBIG, "refcount table would exceed %u bytes",
				  QCOW2_MAX_REFTABLE_BYTES);
		goto out;
	}
	rb_off = shadow_alloc(img, sh, rb);
	rt_off = shadow_alloc(img, sh, rt);
	nrb = alloc_io(rb << img->h.cluster_bits);
	rtab = alloc_io(rt << img->h.cluster_bits);
	if (!nrb || !rtab) {
		ret = qcow2_error(img, -ENOMEM, "out of memory");
		goto out;
	}
	memcpy(nrb, sh->rb, (sh->nr_rb < rb ? sh->nr_rb : rb) << img->h.cluster_bits);
	/* Counts past the old file: zero in the old blocks' tails; 1 for the new clusters. */
	for (c = first_new; c < sh->end; c++)
		qcow2_rc_write(nrb + (c / per_rb) * cs, c % per_rb, img->h.refcount_order, 1);
	for (i = 0; i < rb; i++)
		rtab[i] = htobe64(rb_off + (i << img->h.cluster_bits));
	ret = write_clusters(img, 0, rb_off, nrb, rb << img->h.cluster_bits);
	if (!ret)
		ret = write_clusters(img, 0, rt_off, rtab, rt << img->h.cluster_bits);
	if (!ret)
		ret = qcow2_io_fsync(img->io, img->fd);
	if (ret < 0) {
		ret = qcow2_error(img, ret, "cannot write the new metadata: %s", strerror(-ret));
		goto out;
	}
	/* The new L1 table in memory, ready before the switch (which cannot be undone). */
	ret = qcow2_table_init(&nl1, img->h.l1_size);
	if (!ret)
		ret = qcow2_table_load_be(&nl1, 0, new_l1, img->h.l1_size);
	if (ret < 0) {
		ret = qcow2_error(img, ret, "out of memory");
		goto out;
	}

	/* The switch: one header write. */
	img->h.l1_table_offset = l1_off;
	img->h.refcount_table_offset = rt_off;
	img->h.refcount_table_clusters = rt;
	img->h.nb_snapshots = t->nr;
	img->h.snapshots_offset = t_off;
	ret = qcow2_header_write(img);
	if (ret < 0) {
		img->h = old;
		goto out;
	}
	qcow2_table_swap(&img->l1, &nl1);
	qcow2_overlap_reset(img);
	img->l1_dirty = false;
	if (sh->end << img->h.cluster_bits > img->file_end)
		img->file_end = sh->end << img->h.cluster_bits;
	ret = qcow2_reload_refcounts(img);
	if (!ret)
		ret = qcow2_overlap_set_snapshots(img, t);
out:
	qcow2_table_free(&nl1);
	free(rtab);
	free(nrb);
	free(new_l1);
	free(buf);
	return ret;
}

/* ---- Operations -------------------------------------------------------------- */

/* Common start: writable, consistent, everything on disk, the table read. */
static int op_begin(struct qcow2 *img, struct qcow2_snap_table *t, struct shadow *sh)
{
	int ret;

	memset(t, 0, sizeof(*t));
	memset(sh, 0, sizeof(*sh));
	if (img->raw)
		return qcow2_error(img, -ENOTSUP, "raw images have no snapshots");
	if (img->read_only)
		return qcow2_error(img, -EROFS, "image opened read-only");
	if (img->corrupt)
		return qcow2_error(img, -EIO, "image is marked corrupt (run check -r all)");
	if (qcow2_busy(img))
		return qcow2_error(img, -EBUSY, "requests in flight");
	ret = flush_all(img);
	if (ret < 0)
		return ret;
	ret = qcow2_snap_table_read(img, t);
	if (ret < 0)
		return ret;
	return shadow_init(img, sh);
}

static int op_end(struct qcow2_snap_table *t, struct shadow *sh, int ret)
{
	qcow2_snap_table_free(t);
	shadow_free(sh);
	return ret;
}

/* Read @sn's L1 table (host order, COPIED dropped) into whole clusters of @alloc entries. */
static int load_l1(struct qcow2 *img, const struct qcow2_snap *sn, uint32_t alloc, uint64_t **out)
{
	uint64_t *l1 = alloc_io(clusters_of(img, (uint64_t)alloc * 8) << img->h.cluster_bits);
	uint32_t i;
	int ret;

	if (!l1)
		return qcow2_error(img, -ENOMEM, "out of memory");
	ret = read_bytes(img, sn->l1_off, l1, (size_t)sn->l1_size * 8);
	if (ret < 0) {
		free(l1);
		return ret;
	}
	for (i = 0; i < sn->l1_size; i++)
		l1[i] = be64toh(l1[i]) & ~QCOW2_OFLAG_COPIED;
	*out = l1;
	return 0;
}

int qcow2_snapshot_create(struct qcow2 *img, const char *name)
{
	struct qcow2_snap_table t;
	struct qcow2_snap *sn, *ns;
	uint64_t l1_bytes, id = 0, *l1 = NULL;
	struct timespec now;
	struct shadow sh;
	char idbuf[24];
	uint32_t i;
	int ret;

	if (img->data_fd >= 0)
		return qcow2_error(img, -ENOTSUP,
				   "internal snapshots are not supported with an external data file");

	if (!*name || strlen(name) > SN_MAX_NAME)
		return qcow2_error(img, -EINVAL, "snapshot name must be 1 to %u bytes", SN_MAX_NAME);
	ret = op_begin(img, &t, &sh);
	if (ret < 0)
		return op_end(&t, &sh, ret);
	if (find_name(&t, name) >= 0)
		return op_end(&t, &sh, qcow2_error(img, -EEXIST, "snapshot '%s' already exists",
						   name));
	if (t.nr >= SN_MAX)
		return op_end(&t, &sh, qcow2_error(img, -EFBIG, "too many snapshots (at most %u)",
						   SN_MAX));
	/* The snapshot's L1 table reaches everything the active one does: one more reference. */
	ret = refs_collect(img, &sh.add, NULL, img->h.l1_size);
	if (!ret)
		ret = refs_check(img, &sh.add, 1);
	if (ret < 0)
		return op_end(&t, &sh, ret);

	ns = realloc(t.s, (t.nr + 1) * sizeof(*t.s));
	if (!ns)
		return op_end(&t, &sh, qcow2_error(img, -ENOMEM, "out of memory"));
	t.s = ns;
	for (i = 0; i < t.nr; i++) {
		unsigned long long v = strtoull(t.s[i].id, NULL, 10);

		if (v > id)
			id = v;
	}
	snprintf(idbuf, sizeof(idbuf), "%llu", (unsigned long long)id + 1);
	clock_gettime(CLOCK_REALTIME, &now);
	sn = &t.s[t.nr];
	*sn = (struct qcow2_snap){
		.l1_size = img->h.l1_size,
		.id = strdup(idbuf),
		.name = strdup(name),
		.date_sec = now.tv_sec,
		.date_nsec = now.tv_nsec / 1000 * 1000,	/* microseconds, as QEMU */
		.disk_size = img->h.size,
		.icount = 0,
	};
	t.nr++;
	if (!sn->id || !sn->name)
		return op_end(&t, &sh, qcow2_error(img, -ENOMEM, "out of memory"));

	/* The snapshot's own copy of the L1 table, past the file like the rest. */
	l1_bytes = clusters_of(img, (uint64_t)img->h.l1_size * 8) << img->h.cluster_bits;
	if (l1_bytes) {
		l1 = alloc_io(l1_bytes);
		if (!l1)
			return op_end(&t, &sh, qcow2_error(img, -ENOMEM, "out of memory"));
		for (i = 0; i < img->h.l1_size; i++)
			l1[i] = htobe64(qcow2_table_get(&img->l1, i) & ~QCOW2_OFLAG_COPIED);
		sn->l1_off = shadow_alloc(img, &sh, l1_bytes >> img->h.cluster_bits);
		ret = write_clusters(img, 0, sn->l1_off, l1, l1_bytes);
		free(l1);
		if (ret < 0)
			return op_end(&t, &sh, ret);
	}
	return op_end(&t, &sh, shadow_commit(img, &sh, NULL, &t));
}

int qcow2_snapshot_apply(struct qcow2 *img, const char *id_or_name)
{
	struct qcow2_snap_table t;
	struct qcow2_snap *sn;
	uint64_t *l1 = NULL;
	struct shadow sh;
	uint32_t i;
	int k, ret;

	ret = op_begin(img, &t, &sh);
	if (ret < 0)
		goto out;
	k = find_id(&t, id_or_name);
	if (k < 0)
		k = find_name(&t, id_or_name);
	if (k < 0) {
		ret = qcow2_error(img, -ENOENT, "snapshot '%s' not found", id_or_name);
		goto out;
	}
	sn = &t.s[k];
	if (sn->disk_size != img->h.size) {
		/* The caller resizes the image first, as qemu-img does. */
		ret = qcow2_error(img, -ENOTSUP, "snapshot '%s' has a different disk size (%llu "
				  "bytes, image %llu): not supported", id_or_name,
				  (unsigned long long)sn->disk_size, (unsigned long long)img->h.size);
		goto out;
	}
	ret = load_l1(img, sn, sn->l1_size > img->h.l1_size ? sn->l1_size : img->h.l1_size, &l1);
	if (ret < 0)
		goto out;
	for (i = img->h.l1_size; i < sn->l1_size; i++) {
		if (l1[i]) {
			ret = qcow2_error(img, -ENOTSUP, "snapshot '%s' maps beyond the active L1 "
					  "table: not supported", id_or_name);
			goto out;
		}
	}
	/* Everything the snapshot reaches gains a reference, the active state loses one. */
	ret = refs_collect(img, &sh.add, l1, sn->l1_size < img->h.l1_size ? sn->l1_size :
					     img->h.l1_size);
	if (!ret)
		ret = refs_collect(img, &sh.drop, NULL, img->h.l1_size);
	if (!ret)
		ret = refs_check(img, &sh.add, 1);
	if (!ret)
		ret = refs_check(img, &sh.drop, -1);
	if (!ret)
		ret = shadow_commit(img, &sh, l1, &t);
out:
	free(l1);
	return op_end(&t, &sh, ret);
}

int qcow2_snapshot_check(struct qcow2 *img, const char *id_or_name)
{
	struct qcow2_snap_table t;
	int ret = qcow2_snap_table_read(img, &t);

	if (ret < 0)
		return ret;
	if (find_id(&t, id_or_name) < 0 && find_name(&t, id_or_name) < 0)
		ret = qcow2_error(img, -ENOENT, "snapshot '%s' not found", id_or_name);
	qcow2_snap_table_free(&t);
	return ret;
}

int qcow2_snapshot_delete(struct qcow2 *img, const char *name_or_id)
{
	struct qcow2_snap_table t;
	struct qcow2_snap sn;
	struct shadow sh;
	uint64_t *l1 = NULL;
	int k, ret;

	ret = op_begin(img, &t, &sh);
	if (ret < 0)
		return op_end(&t, &sh, ret);
	k = find_name(&t, name_or_id);
	if (k < 0)
		k = find_id(&t, name_or_id);
	if (k < 0)
		return op_end(&t, &sh, qcow2_error(img, -ENOENT, "snapshot '%s' not found",
						   name_or_id));
	/* Its L1 table and what it reaches lose a reference. */
	ret = load_l1(img, &t.s[k], t.s[k].l1_size, &l1);
	if (!ret)
		ret = refs_collect(img, &sh.drop, l1, t.s[k].l1_size);
	free(l1);
	if (!ret && t.s[k].l1_size)
		ret = refs_add(img, &sh.drop, t.s[k].l1_off,
			       clusters_of(img, (uint64_t)t.s[k].l1_size * 8));
	if (!ret)
		ret = refs_check(img, &sh.drop, -1);
	if (ret < 0)
		return op_end(&t, &sh, ret);
	sn = t.s[k];
	memmove(&t.s[k], &t.s[k + 1], (t.nr - k - 1) * sizeof(*t.s));
	t.nr--;
	ret = shadow_commit(img, &sh, NULL, &t);
	t.s[t.nr] = sn;		/* freed with the table */
	t.nr++;
	return op_end(&t, &sh, ret);
}

int qcow2_snapshot_list(struct qcow2 *img, struct qcow2_snapshot_info **out, uint32_t *nr)
{
	struct qcow2_snapshot_info *list;
	struct qcow2_snap_table t;
	uint32_t i;
	int ret;

	*out = NULL;
	*nr = 0;
	if (img->raw)
		return 0;
	ret = qcow2_snap_table_read_loose(img, &t);
	if (ret < 0)
		return ret;
	list = calloc(t.nr ? t.nr : 1, sizeof(*list));
	if (!list) {
		qcow2_snap_table_free(&t);
		return qcow2_error(img, -ENOMEM, "out of memory");
	}
	for (i = 0; i < t.nr; i++) {
		struct qcow2_snap *sn = &t.s[i];

		list[i] = (struct qcow2_snapshot_info){
			.id = sn->id,
			.name = sn->name,
			.vm_state_size = sn->vm_state_size,
			.date_sec = sn->date_sec,
			.date_nsec = sn->date_nsec,
			.vm_clock_nsec = sn->vm_clock_nsec,
			.icount = sn->icount,
			.disk_size = sn->disk_size,
		};
		sn->id = sn->name = NULL;	/* now the list's */
	}
	*out = list;
	*nr = t.nr;
	qcow2_snap_table_free(&t);
	return 0;
}

void qcow2_snapshot_list_free(struct qcow2_snapshot_info *list, uint32_t nr)
{
	uint32_t i;

	for (i = 0; i < nr; i++) {
		free(list[i].id);
		free(list[i].name);
	}
	free(list);
}

int qcow2_snapshot_select(struct qcow2 *img, const char *id_or_name)
{
	struct qcow2_snap_table t;
	int k, ret = qcow2_snap_table_read(img, &t);

	if (ret < 0)
		return ret;
	/* As QEMU's snapshot.id / snapshot.name lookup: an id first, then a name. */
	k = find_id(&t, id_or_name);
	if (k < 0)
		k = find_name(&t, id_or_name);
	if (k < 0) {
		ret = qcow2_error(img, -ENOENT, "snapshot '%s' not found", id_or_name);
	} else {
		img->h.l1_table_offset = t.s[k].l1_off;
		img->h.l1_size = t.s[k].l1_size;
		img->h.size = t.s[k].disk_size;
	}
	qcow2_snap_table_free(&t);
	return ret;
}
