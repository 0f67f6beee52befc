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
 * Crash safety, in QEMU's order: references are added (refcounts raised and
 * durable) before anything points at them, and dropped only after whatever
 * pointed at them is durably gone. The cache flush writes refcounts before
 * L2 tables before the L1 table, so COPIED flags never reach the disk ahead
 * of the refcounts they describe. A crash leaks clusters at worst.
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
	int ret = qcow2_overlap_check(img, ign, off, len);

	if (ret < 0)
		return ret;
	ret = qcow2_io_pwrite(img->io, img->fd, buf, len, off);
	if (ret < 0)
		return qcow2_error(img, ret, "cannot write at 0x%llx: %s", (unsigned long long)off,
				   strerror(-ret));
	return 0;
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
		       uint64_t *end)
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
	ret = -EINVAL;
	if (memchr(var + extra, 0, id_len + name_len)) {
		qcow2_error(img, ret, "snapshot table entry %u: NUL byte in its id or name", i);
		goto out;
	}
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

int qcow2_snap_table_read(struct qcow2 *img, struct qcow2_snap_table *t)
{
	uint64_t pos = 0;
	uint32_t i, nr = img->h.nb_snapshots;
	int ret;

	memset(t, 0, sizeof(*t));
	if (!nr)
		return 0;
	if (nr > SN_MAX)
		return qcow2_error(img, -EFBIG, "too many snapshots (%u, at most %u)", nr, SN_MAX);
	if (!qcow2_aligned(img, img->h.snapshots_offset) || !img->h.snapshots_offset ||
	    img->h.snapshots_offset >= img->file_end)
		return qcow2_error(img, -EINVAL, "snapshot table offset 0x%llx invalid",
				   (unsigned long long)img->h.snapshots_offset);
	t->s = calloc(nr, sizeof(*t->s));
	if (!t->s)
		return qcow2_error(img, -ENOMEM, "out of memory");
	for (i = 0; i < nr; i++) {
		t->nr = i + 1;
		ret = parse_entry(img, i, round_up(pos, 8), &t->s[i], &pos);
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

static int rc_add(struct qcow2 *img, uint64_t cluster, int64_t delta)
{
	struct snap_wait sw = { .w.fn = snap_wake };
	int ret;

	BLOCKING(img, ret, sw, qcow2_refcount_add(img, cluster, delta, &sw.w));
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

struct run {
	uint64_t off, nr;
};

/*
 * Allocate @n contiguous clusters (refcount 1 in the cache). The allocator
 * hands out the first free run; runs too short are given back afterwards.
 */
static int alloc_contig(struct qcow2 *img, uint64_t n, uint64_t *off)
{
	struct snap_wait sw = { .w.fn = snap_wake };
	struct run cur = { 0, 0 }, *spare = NULL;
	size_t nr_spare = 0, i;
	int ret = 0;

	while (cur.nr < n) {
		uint64_t host, got;
		struct run *p;

		BLOCKING(img, ret, sw, qcow2_alloc_clusters(img, n - cur.nr, &sw.w, &host, &got));
		if (ret < 0)
			break;
		if (cur.nr && host == cur.off + (cur.nr << img->h.cluster_bits)) {
			cur.nr += got;
			continue;
		}
		if (cur.nr) {
			p = realloc(spare, (nr_spare + 1) * sizeof(*spare));
			if (!p) {
				ret = -ENOMEM;
				break;
			}
			spare = p;
			spare[nr_spare++] = cur;
		}
		cur = (struct run){ host, got };
	}
	/* Nothing points at the spare runs (nor at @cur on failure): free them now. */
	for (i = 0; i < nr_spare; i++) {
		uint64_t k;

		for (k = 0; k < spare[i].nr; k++) {
			int r = rc_add(img, (spare[i].off >> img->h.cluster_bits) + k, -1);

			if (r < 0 && !ret)
				ret = r;
		}
	}
	free(spare);
	if (ret < 0)
		return ret == -ENOMEM ? qcow2_error(img, ret, "out of memory") : ret;
	*off = cur.off;
	return 0;
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

/* Count one reference to every L2 table and cluster that @l1 reaches. */
static int refs_collect(struct qcow2 *img, struct refs *r, const uint64_t *l1, uint32_t l1_size)
{
	uint32_t slice = img->l2_cache.slice_bytes, per_slice = slice / 8, i, j;
	uint64_t so;
	int ret;

	for (i = 0; i < l1_size; i++) {
		uint64_t l2 = l1[i] & L1E_OFFSET_MASK;

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

static int refs_apply(struct qcow2 *img, const struct refs *r, int sign)
{
	uint64_t c;
	int ret;

	for (c = 0; c < r->nr; c++) {
		if (!r->n[c])
			continue;
		ret = rc_add(img, c, sign * (int64_t)r->n[c]);
		if (ret < 0)
			return ret;
	}
	return 0;
}

/* Set COPIED in the active tables exactly where the refcount is 1, as QEMU does. */
static int fix_copied(struct qcow2 *img)
{
	uint32_t slice = img->l2_cache.slice_bytes, per_slice = slice / 8, i, j;
	uint8_t *ent = malloc(slice);
	uint64_t so, v;
	int ret = 0;

	if (!ent)
		return qcow2_error(img, -ENOMEM, "out of memory");
	for (i = 0; i < img->h.l1_size && !ret; i++) {
		uint64_t l2 = img->l1[i] & L1E_OFFSET_MASK, want;

		if (!l2)
			continue;
		for (so = 0; so < img->cluster_size && !ret; so += slice) {
			struct qcow2_slice *s;
			bool changed = false;

			/* Work on a copy: refcount lookups may wait, never holding a slice. */
			ret = cache_get(img, l2 + so, &s);
			if (ret < 0)
				break;
			memcpy(ent, s->data, slice);
			qcow2_cache_put(s);
			for (j = 0; j < per_slice; j++) {
				uint64_t e = get_be64(ent + 8 * j), host;
				enum l2_type type;

				ret = qcow2_l2_classify(img, e, &type, &host);
				if (ret < 0)
					break;
				want = e & ~QCOW2_OFLAG_COPIED;
				if (type == L2_NORMAL || type == L2_ZERO_ALLOC) {
					ret = rc_get(img, host >> img->h.cluster_bits, &v);
					if (ret < 0)
						break;
					if (v == 1)
						want |= QCOW2_OFLAG_COPIED;
				} else if (type == L2_COMPRESSED) {
					want = e;	/* bit 63 is no flag in a descriptor */
				}
				if (want != e) {
					put_be64(ent + 8 * j, want);
					changed = true;
				}
			}
			if (ret < 0 || !changed)
				continue;
			ret = cache_get(img, l2 + so, &s);
			if (ret < 0)
				break;
			memcpy(s->data, ent, slice);
			qcow2_cache_mark_dirty(s);
			qcow2_cache_put(s);
		}
		if (ret < 0)
			break;
		ret = rc_get(img, l2 >> img->h.cluster_bits, &v);
		if (ret < 0)
			break;
		want = l2 | (v == 1 ? QCOW2_OFLAG_COPIED : 0);
		if (want != img->l1[i]) {
			img->l1[i] = want;
			qcow2_l1_note(img, i);
			img->l1_dirty = true;
		}
	}
	free(ent);
	return ret;
}

/* ---- Writing the table ------------------------------------------------------- */

/*
 * Write @t to new clusters (none if it is empty), make them and every
 * refcount durable, then point the header at them. The old table is the
 * caller's to free. 0 or -errno with the header unchanged.
 */
static int table_replace(struct qcow2 *img, const struct qcow2_snap_table *t)
{
	uint64_t bytes = table_bytes(t), off = 0, old_off = img->h.snapshots_offset;
	uint32_t old_nr = img->h.nb_snapshots;
	uint8_t *buf = NULL;
	int ret;

	if (bytes > SN_MAX_TABLE_BYTES)
		return qcow2_error(img, -EFBIG, "snapshot table would exceed %u bytes",
				   SN_MAX_TABLE_BYTES);
	if (t->nr) {
		uint64_t len = clusters_of(img, bytes) << img->h.cluster_bits;

		buf = alloc_io(len);
		if (!buf)
			return qcow2_error(img, -ENOMEM, "out of memory");
		table_serialize(t, buf);
		ret = alloc_contig(img, len >> img->h.cluster_bits, &off);
		if (!ret)
			ret = write_clusters(img, 0, off, buf, len);
		free(buf);
		if (ret < 0)
			return ret;
	}
	/* The table and the refcounts that own it are durable before the header names it. */
	ret = flush_all(img);
	if (ret < 0)
		return ret;
	img->h.nb_snapshots = t->nr;
	img->h.snapshots_offset = off;
	ret = qcow2_header_write(img);
	if (ret < 0) {
		img->h.nb_snapshots = old_nr;
		img->h.snapshots_offset = old_off;
		return ret;
	}
	return qcow2_overlap_set_snapshots(img, t);
}

/* Drop one reference to each of @nr clusters at @off (nothing points at them now). */
static int release(struct qcow2 *img, uint64_t off, uint64_t nr)
{
	uint64_t i;
	int ret;

	for (i = 0; i < nr; i++) {
		ret = rc_add(img, (off >> img->h.cluster_bits) + i, -1);
		if (ret < 0)
			return ret;
	}
	return 0;
}

/* ---- Operations -------------------------------------------------------------- */

/* Common start: writable, consistent, everything on disk, the table read. */
static int op_begin(struct qcow2 *img, struct qcow2_snap_table *t, struct refs *r)
{
	int ret;

	memset(t, 0, sizeof(*t));
	r->n = NULL;
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
	return refs_init(img, r);
}

static int op_end(struct qcow2_snap_table *t, struct refs *r, int ret)
{
	qcow2_snap_table_free(t);
	free(r->n);
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
	uint64_t l1_bytes, old_off, old_clusters, id = 0, *l1 = NULL;
	struct timespec now;
	struct refs r;
	char idbuf[24];
	uint32_t i;
	int ret;

	if (img->data_fd >= 0)
		return qcow2_error(img, -ENOTSUP,
				   "internal snapshots are not supported with an external data file");

	if (!*name || strlen(name) > SN_MAX_NAME)
		return qcow2_error(img, -EINVAL, "snapshot name must be 1 to %u bytes", SN_MAX_NAME);
	ret = op_begin(img, &t, &r);
	if (ret < 0)
		return op_end(&t, &r, ret);
	if (find_name(&t, name) >= 0)
		return op_end(&t, &r, qcow2_error(img, -EEXIST, "snapshot '%s' already exists",
						  name));
	if (t.nr >= SN_MAX)
		return op_end(&t, &r, qcow2_error(img, -EFBIG, "too many snapshots (at most %u)",
						  SN_MAX));
	ret = refs_collect(img, &r, img->l1, img->h.l1_size);
	if (!ret)
		ret = refs_check(img, &r, 1);
	if (ret < 0)
		return op_end(&t, &r, ret);

	ns = realloc(t.s, (t.nr + 1) * sizeof(*t.s));
	if (!ns)
		return op_end(&t, &r, qcow2_error(img, -ENOMEM, "out of memory"));
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
		return op_end(&t, &r, qcow2_error(img, -ENOMEM, "out of memory"));

	/* 1. The snapshot's own copy of the L1 table. */
	l1_bytes = clusters_of(img, (uint64_t)img->h.l1_size * 8) << img->h.cluster_bits;
	if (l1_bytes) {
		l1 = alloc_io(l1_bytes);
		if (!l1)
			return op_end(&t, &r, qcow2_error(img, -ENOMEM, "out of memory"));
		for (i = 0; i < img->h.l1_size; i++)
			l1[i] = htobe64(img->l1[i] & ~QCOW2_OFLAG_COPIED);
		ret = alloc_contig(img, l1_bytes >> img->h.cluster_bits, &sn->l1_off);
		if (!ret)
			ret = write_clusters(img, 0, sn->l1_off, l1, l1_bytes);
		free(l1);
		if (ret < 0)
			return op_end(&t, &r, ret);
	}
	/* 2. One more reference to everything the active tables reach; they are shared now. */
	ret = refs_apply(img, &r, 1);
	if (!ret)
		ret = fix_copied(img);
	if (ret < 0)
		return op_end(&t, &r, ret);
	/* 3. The new table, durable with all of the above before the header names it. */
	old_off = img->h.snapshots_offset;
	old_clusters = img->h.nb_snapshots ? clusters_of(img, t.bytes) : 0;
	ret = table_replace(img, &t);
	/* 4. Nothing names the old table any more. */
	if (!ret)
		ret = release(img, old_off, old_clusters);
	if (!ret)
		ret = flush_all(img);
	return op_end(&t, &r, ret);
}

int qcow2_snapshot_apply(struct qcow2 *img, const char *id_or_name)
{
	uint64_t l1_bytes, *l1 = NULL;
	struct qcow2_snap_table t;
	struct qcow2_snap *sn;
	struct refs r, old;
	uint32_t i;
	int k, ret;

	old.n = NULL;
	ret = op_begin(img, &t, &r);
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
		/* As qemu-img: a snapshot of another size cannot be loaded. */
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
	ret = refs_init(img, &old);
	if (!ret)
		ret = refs_collect(img, &r, l1, sn->l1_size < img->h.l1_size ? sn->l1_size :
					       img->h.l1_size);
	if (!ret)
		ret = refs_collect(img, &old, img->l1, img->h.l1_size);
	if (!ret)
		ret = refs_check(img, &r, 1);
	if (!ret)
		ret = refs_check(img, &old, -1);
	if (ret < 0)
		goto out;
	/* 1. The snapshot's clusters are referenced twice before the active L1 names them. */
	ret = refs_apply(img, &r, 1);
	if (!ret)
		ret = flush_all(img);
	if (ret < 0)
		goto out;
	/* 2. The active L1 table on disk becomes the snapshot's (no COPIED: all shared). */
	l1_bytes = clusters_of(img, (uint64_t)img->h.l1_size * 8) << img->h.cluster_bits;
	for (i = 0; i < img->h.l1_size; i++)
		l1[i] = htobe64(l1[i]);
	memset(l1 + img->h.l1_size, 0, l1_bytes - (uint64_t)img->h.l1_size * 8);
	ret = write_clusters(img, QCOW2_OL_ACTIVE_L1, img->h.l1_table_offset, l1, l1_bytes);
	if (!ret)
		ret = qcow2_io_fsync(img->io, img->fd);
	if (ret < 0) {
		ret = qcow2_error(img, ret, "cannot write the L1 table: %s", strerror(-ret));
		goto out;
	}
	for (i = 0; i < img->h.l1_size; i++)
		img->l1[i] = be64toh(l1[i]);
	qcow2_overlap_reset(img);
	/* 3. The old active state is unreferenced: drop it, then mark what is ours alone. */
	ret = refs_apply(img, &old, -1);
	if (!ret)
		ret = fix_copied(img);
	if (!ret)
		ret = flush_all(img);
out:
	free(l1);
	free(old.n);
	return op_end(&t, &r, ret);
}

int qcow2_snapshot_delete(struct qcow2 *img, const char *name_or_id)
{
	uint64_t *l1 = NULL, table_off, table_clusters;
	struct qcow2_snap_table t;
	struct qcow2_snap sn;
	struct refs r;
	int k, ret;

	ret = op_begin(img, &t, &r);
	if (ret < 0)
		return op_end(&t, &r, ret);
	k = find_name(&t, name_or_id);
	if (k < 0)
		k = find_id(&t, name_or_id);
	if (k < 0)
		return op_end(&t, &r, qcow2_error(img, -ENOENT, "snapshot '%s' not found",
						  name_or_id));
	/* Its L1 table, what it reaches, and the table that lists it lose a reference. */
	ret = load_l1(img, &t.s[k], t.s[k].l1_size, &l1);
	if (!ret)
		ret = refs_collect(img, &r, l1, t.s[k].l1_size);
	free(l1);
	if (!ret && t.s[k].l1_size)
		ret = refs_add(img, &r, t.s[k].l1_off,
			       clusters_of(img, (uint64_t)t.s[k].l1_size * 8));
	table_off = img->h.snapshots_offset;
	table_clusters = clusters_of(img, t.bytes);
	if (!ret)
		ret = refs_add(img, &r, table_off, table_clusters);
	if (!ret)
		ret = refs_check(img, &r, -1);
	if (ret < 0)
		return op_end(&t, &r, ret);
	/* 1. A table without it, named by the header. */
	sn = t.s[k];
	memmove(&t.s[k], &t.s[k + 1], (t.nr - k - 1) * sizeof(*t.s));
	t.nr--;
	ret = table_replace(img, &t);
	t.s[t.nr] = sn;		/* freed with the table */
	t.nr++;
	if (ret < 0)
		return op_end(&t, &r, ret);
	/* 2. Nothing reaches it any more: drop its references, mark what is ours alone. */
	ret = refs_apply(img, &r, -1);
	if (!ret)
		ret = fix_copied(img);
	if (!ret)
		ret = flush_all(img);
	return op_end(&t, &r, ret);
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
	ret = qcow2_snap_table_read(img, &t);
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
