// SPDX-License-Identifier: MIT
/*
 * Creating an image: option validation, the layout of a fresh image and its
 * preallocation. Knows only the on-disk format; writes through the I/O
 * backend's blocking helpers and never opens the image as a struct qcow2.
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "create.h"
#include "internal.h"

#define V3_HEADER_BYTES		112	/* 104 + compression type, padded (as QEMU) */
#define FEATURE_ENTRY_BYTES	48
#define MAX_BACKING_FMT		16	/* what header.c accepts */
#define CHUNK_BYTES		(1u << 20)

static const struct {
	uint8_t type;		/* 0 incompatible, 1 compatible, 2 autoclear */
	uint8_t bit;
	const char *name;
} feature_table[] = {
	{ 0, 0, "dirty bit" },
	{ 0, 1, "corrupt bit" },
	{ 0, 2, "external data file" },
	{ 0, 3, "compression type" },
	{ 0, 4, "extended L2 entries" },
	{ 1, 0, "lazy refcounts" },
	{ 2, 0, "bitmaps" },
	{ 2, 1, "raw external data" },
};

#define FEATURE_TABLE_BYTES	(sizeof(feature_table) / sizeof(feature_table[0]) * \
				 FEATURE_ENTRY_BYTES)


/*
 * One on-disk table written in a single sweep: entry i (of 2^@order bits,
 * every @stride-th slot: extended L2 entries leave their bitmap zero) is
 * @base + i * @step for i < @nr_set (entry 0: @first) and zero after that,
 * up to @bytes; entry @hole (0: none) stays zero.
 */
struct table {
	uint64_t off;
	uint64_t bytes;
	uint32_t order;
	uint64_t nr_set;
	uint64_t base;
	uint64_t step;
	uint32_t stride;
	uint64_t first;
	uint64_t hole;
};

struct creator {
	const char *path;
	struct qcow2_io *io;
	int fd;
	int data_fd;			/* the external data file, or -1 */
	uint8_t *hdr;			/* the header cluster, built before the file is opened */
	uint8_t *buf;			/* CHUNK_BYTES or one cluster, whichever is larger */
	size_t buf_bytes;
	char *err;
	size_t errlen;
};

static int create_error(struct creator *c, int ret, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static int create_error(struct creator *c, int ret, const char *fmt, ...)
{
	va_list ap;
	int n;

	n = snprintf(c->err, c->errlen, "%s: ", c->path);
	if (n < 0 || (size_t)n >= c->errlen)
		return ret;
	va_start(ap, fmt);
	vsnprintf(c->err + n, c->errlen - n, fmt, ap);
	va_end(ap);
	return ret;
}

static int validate(struct creator *c, const struct qcow2_create_opts *o,
		    uint32_t *cluster_bits, uint32_t *version, uint32_t *refcount_order)
{
	uint32_t rc_bits = o->refcount_bits ? o->refcount_bits : 16;

	*cluster_bits = o->cluster_bits ? o->cluster_bits : 16;
	*version = o->version ? o->version : 3;
	if (*cluster_bits < QCOW2_MIN_CLUSTER_BITS || *cluster_bits > QCOW2_MAX_CLUSTER_BITS)
		return create_error(c, -EINVAL,
				    "cluster size must be a power of two between 512 and 2M");
	if (rc_bits > 64 || (rc_bits & (rc_bits - 1)))
		return create_error(c, -EINVAL,
				    "refcount width must be a power of two and at most 64 bits");
	*refcount_order = __builtin_ctz(rc_bits);
	if (*version != 2 && *version != 3)
		return create_error(c, -EINVAL, "unsupported compat level (use 0.10 or 1.1)");
	if (*version == 2 && rc_bits != 16)
		return create_error(c, -EINVAL,
				    "refcount widths other than 16 bits need compat=1.1");
	if (*version == 2 && o->lazy_refcounts)
		return create_error(c, -EINVAL, "lazy refcounts need compat=1.1");
	if (o->compression_type < 0 || o->compression_type > 1)
		return create_error(c, -EINVAL, "unknown compression type");
	if (*version == 2 && o->compression_type)
		return create_error(c, -EINVAL,
				    "non-zlib compression type needs compat=1.1");
	if (o->extended_l2 && *cluster_bits < 14)
		return create_error(c, -EINVAL,
				    "extended L2 entries need a cluster size of at least 16k");
	if (o->extended_l2 && *version == 2)
		return create_error(c, -EINVAL, "extended L2 entries need compat=1.1");
	if (o->size % 512)
		return create_error(c, -EINVAL, "image size must be a multiple of 512 bytes");
	if (o->size > (1ull << 62))
		return create_error(c, -EFBIG, "image size is too large");
	if (o->backing_fmt && !o->backing_file)
		return create_error(c, -EINVAL, "backing format given without a backing file");
	if (o->backing_file && (!o->backing_file[0] ||
				strlen(o->backing_file) > QCOW2_MAX_BACKING_NAME))
		return create_error(c, -EINVAL, "backing file name must be 1 to %d bytes",
				    QCOW2_MAX_BACKING_NAME);
	if (o->backing_fmt && (!o->backing_fmt[0] || strlen(o->backing_fmt) > MAX_BACKING_FMT))
		return create_error(c, -EINVAL, "backing format name must be 1 to %d bytes",
				    MAX_BACKING_FMT);
	if (o->prealloc > QCOW2_PREALLOC_FULL)
		return create_error(c, -EINVAL, "invalid preallocation mode");
	if (o->data_file_raw && !o->data_file)
		return create_error(c, -EINVAL, "data_file_raw needs data_file");
	if (o->data_file && *version == 2)
		return create_error(c, -EINVAL, "external data files need compat=1.1");
	if (o->data_file && (!o->data_file[0] || strlen(o->data_file) > 1023))
		return create_error(c, -EINVAL, "data file name must be 1 to 1023 bytes");
	if (o->data_file_raw && o->backing_file)
		return create_error(c, -EINVAL,
				    "a backing file and data_file_raw cannot be used together");
	/* Allocated clusters would hide the backing file's data; subclusters do not. */
	if (o->backing_file && o->prealloc != QCOW2_PREALLOC_OFF && !o->extended_l2)
		return create_error(c, -EINVAL,
				    "a backing file and preallocation need extended_l2=on");
	return 0;
}

/*
 * QEMU's qcow2_refcount_metadata_size(): refcount blocks for @clusters and
 * themselves; @generous as when it grows a table on the fly (room for half
 * the table again).
 */
uint64_t create_refblocks_for(uint64_t clusters, uint64_t cs, uint64_t rb_entries, bool generous)
{
	uint64_t blocks = 0, table = 0, n = 0, last;

	do {
		last = n;
		blocks = div_round_up(clusters + table + blocks, rb_entries);
		table = div_round_up(blocks, cs / 8);
		n = clusters + blocks + table;
		if (n == last && generous) {
			clusters += div_round_up(table, 2);
			n = 0;
			generous = false;
		}
	} while (n != last);
	return blocks;
}

/*
 * falloc/full as QEMU's qcow2_co_truncate() lays them out, from cluster
 * @start (after the L1 table). False where refcount block 0 does not cover
 * the L1 table or the new refcount blocks do not cover everything.
 */
static bool plan_area(struct layout *l, uint64_t start, uint64_t rb_entries)
{
	uint64_t cs = 1ull << l->cluster_bits, rb, rt, end;

	if (start > rb_entries || !l->data_in_file)
		return false;
	/* QEMU's overestimate: one L2 table more for a head or tail. */
	rb = create_refblocks_for(start + l->nb_data + div_round_up(l->nb_data, l->l2_entries) + 1,
			   cs, rb_entries, false);
	rt = div_round_up(rb * 8, cs);
	l->kind = LAYOUT_AREA;
	l->nb_refblocks = rb;
	l->reftable_clusters = rt;
	l->rb1_off = start * cs;
	l->reftable_off = (start + rb - 1) * cs;
	l->data_off = (start + rb - 1 + rt) * cs;
	l->l2_first = cs;	/* the first refcount table's cluster, freed */
	l->l2_base = l->nb_data ? l->data_off + (l->nb_data - 1) * cs : 0;
	l->l2_step = cs;
	end = start + rb - 1 + rt + l->nb_data + (l->nb_l2 ? l->nb_l2 - 1 : 0);
	l->free = l->nb_l2 ? 0 : 1;
	if (l->nb_crypt == 1 && l->free) {
		l->crypt_off = cs;
		l->free = 0;
	} else {
		l->crypt_off = end * cs;
		end += l->nb_crypt;
	}
	l->nb_clusters = end;
	return end <= rb * rb_entries && rt * cs <= QCOW2_MAX_REFTABLE_BYTES;
}

static int plan_packed(struct creator *c, struct layout *l, uint64_t rb_entries)
{
	uint64_t cs = 1ull << l->cluster_bits;
	uint64_t fixed, rb = 0, rt = 0;

	/* The refcount blocks count themselves and the table: iterate to a fixed point. */
	fixed = 1 + l->l1_clusters + l->nb_crypt + l->nb_l2 + (l->data_in_file ? l->nb_data : 0);
	for (;;) {
		uint64_t nrb = div_round_up(fixed + rt + rb, rb_entries);
		uint64_t nrt = div_round_up(nrb * 8, cs);

		if (nrb == rb && nrt == rt)
			break;
		rb = nrb;
		rt = nrt;
	}
	if (rt * cs > QCOW2_MAX_REFTABLE_BYTES)
		return create_error(c, -EFBIG,
				    "refcount table too large for this preallocation (try a larger cluster size)");
	l->kind = LAYOUT_PACKED;
	l->nb_refblocks = rb;
	l->reftable_clusters = rt;
	l->nb_clusters = fixed + rt + rb;
	l->free = 0;
	l->reftable_off = cs;
	l->rb0_off = l->reftable_off + rt * cs;
	l->rb1_off = l->rb0_off + cs;
	l->l1_off = l->rb0_off + rb * cs;
	l->crypt_off = l->l1_off + l->l1_clusters * cs;
	l->l2_first = l->l2_base = l->crypt_off + l->nb_crypt * cs;
	l->l2_step = cs;
	l->data_off = l->data_in_file ? l->l2_base + l->nb_l2 * cs : 0;
	return 0;
}


static int plan_layout(struct creator *c, const struct qcow2_create_opts *o, struct layout *l)
{
	uint64_t cs = 1ull << l->cluster_bits;
	uint64_t rb_entries = (cs * 8) >> l->refcount_order;
	bool area = o->prealloc == QCOW2_PREALLOC_FALLOC || o->prealloc == QCOW2_PREALLOC_FULL;
	uint64_t start, end;
	int ret;

	l->l2_entries = cs / (o->extended_l2 ? 16 : 8);
	l->l1_size = div_round_up(o->size, cs * l->l2_entries);
	if (l->l1_size * 8 > QCOW2_MAX_L1_BYTES)
		return create_error(c, -EFBIG,
				    "image size is too large for qcow2 (try a larger cluster size)");
	l->l1_clusters = div_round_up(l->l1_size * 8, cs);
	if (o->prealloc != QCOW2_PREALLOC_OFF) {
		l->nb_data = div_round_up(o->size, cs);
		l->nb_l2 = div_round_up(l->nb_data, l->l2_entries);
	}
	/* Data in an external file: mapped one to one, not in this file. */
	l->data_in_file = !o->data_file;
	l->nb_crypt = div_round_up(l->crypt_bytes, cs);

	/* QEMU's first steps: header, table at 1, refcount block 0 at 2, L1 from 3. */
	start = 3 + l->l1_clusters;
	l->rb0_off = 2 * cs;
	l->l1_off = 3 * cs;
	if (area && plan_area(l, start, rb_entries))
		goto planned;
	end = start + l->nb_l2 + (l->data_in_file ? l->nb_data : 0);
	/* Everything in refcount block 0: QEMU allocated no refcount block on the way. */
	if (!(area && l->data_in_file) && end + l->nb_crypt <= rb_entries) {
		l->kind = LAYOUT_META;
		l->nb_refblocks = 1;
		l->reftable_clusters = 1;
		l->free = 0;
		l->reftable_off = cs;
		l->rb1_off = 3 * cs;
		l->l2_first = l->l2_base = start * cs;
		/* Each L2 table followed by its data clusters, in this file or not. */
		l->l2_step = (l->data_in_file ? 1 + l->l2_entries : 1) * cs;
		l->data_off = 0;
		l->crypt_off = end * cs;
		l->nb_clusters = end + l->nb_crypt;
		goto planned;
	}
	if (!(area && l->data_in_file) && create_plan_sim(l, o, rb_entries))
		goto planned;
	ret = plan_packed(c, l, rb_entries);
	if (ret < 0)
		return ret;
planned:
	if (l->nb_clusters > (L2E_OFFSET_MASK >> l->cluster_bits))
		return create_error(c, -EFBIG, "image size is too large for this preallocation");
	return 0;
}

/*
 * Lay out the header cluster into c->hdr. Like QEMU, the (advisory) feature
 * name table is written only with clusters larger than 4 KiB, where it
 * always fits; everything else must fit in the cluster.
 */
static int build_header(struct creator *c, const struct qcow2_create_opts *o,
			const struct layout *l, uint32_t version)
{
	uint32_t cs = 1u << l->cluster_bits;
	uint32_t hdr = version == 2 ? QCOW2_V2_HEADER_LEN : V3_HEADER_BYTES;
	size_t fmt_len = o->backing_fmt ? strlen(o->backing_fmt) : 0;
	size_t name_len = o->backing_file ? strlen(o->backing_file) : 0;
	size_t df_len = o->data_file ? strlen(o->data_file) : 0;
	size_t need = hdr + (fmt_len ? 8 + ((fmt_len + 7) & ~7ul) : 0) + 8 + name_len +
		      (l->nb_crypt ? 8 + 16 : 0) + (df_len ? 8 + ((df_len + 7) & ~7ul) : 0);
	bool ftable = version >= 3 && cs > 4096;
	uint8_t *b = c->hdr;
	uint32_t off;
	size_t i;

	if (need > cs)
		return create_error(c, -EINVAL,
				    "backing file name does not fit in a %u-byte header cluster", cs);
	put_be32(b + 0, QCOW2_MAGIC);
	put_be32(b + 4, version);
	put_be32(b + 20, l->cluster_bits);
	put_be64(b + 24, o->size);
	put_be32(b + 36, l->l1_size);
	put_be64(b + 40, l->l1_size ? l->l1_off : 0);
	put_be64(b + 48, l->reftable_off);
	put_be32(b + 56, l->reftable_clusters);
	if (version >= 3) {
		put_be64(b + 72, (o->compression_type ? QCOW2_INCOMPAT_COMPRESSION : 0) |
			      (o->extended_l2 ? QCOW2_INCOMPAT_EXTL2 : 0) |
			      (df_len ? QCOW2_INCOMPAT_DATA_FILE : 0));
		put_be64(b + 88, o->data_file_raw ? QCOW2_AUTOCLEAR_DATA_FILE_RAW : 0);
		put_be64(b + 80, o->lazy_refcounts ? QCOW2_COMPAT_LAZY_REFCOUNTS : 0);
		b[104] = o->compression_type;
		put_be32(b + 96, l->refcount_order);
		put_be32(b + 100, hdr);
	}
	off = hdr;
	if (fmt_len)
		off = qcow2_put_ext(b, off, QCOW2_EXT_BACKING_FMT, o->backing_fmt, fmt_len);
	if (l->nb_crypt) {
		uint8_t ext[16];

		put_be32(b + 32, 2);		/* crypt_method: LUKS */
		put_be64(ext, l->crypt_off);
		put_be64(ext + 8, l->crypt_bytes);
		off = qcow2_put_ext(b, off, QCOW2_EXT_CRYPTO, ext, sizeof(ext));
	}
	if (df_len)
		off = qcow2_put_ext(b, off, QCOW2_EXT_DATA_FILE, o->data_file, df_len);
	if (ftable) {
		put_be32(b + off, QCOW2_EXT_FEATURE_TABLE);
		put_be32(b + off + 4, FEATURE_TABLE_BYTES);
		off += 8;
		for (i = 0; i < sizeof(feature_table) / sizeof(feature_table[0]); i++) {
			b[off] = feature_table[i].type;
			b[off + 1] = feature_table[i].bit;
			memcpy(b + off + 2, feature_table[i].name, strlen(feature_table[i].name));
			off += FEATURE_ENTRY_BYTES;
		}
	}
	off += 8;		/* end of extensions: already zero */
	if (name_len) {
		put_be64(b + 8, off);
		put_be32(b + 16, name_len);
		memcpy(b + off, o->backing_file, name_len);
	}
	return 0;
}

static int write_buf(struct creator *c, const void *buf, size_t len, uint64_t off)
{
	int ret = qcow2_io_pwrite(c->io, c->fd, buf, len, off);

	if (ret < 0)
		return create_error(c, ret, "cannot write at offset %llu: %s",
				    (unsigned long long)off, strerror(-ret));
	return 0;
}

static int write_table(struct creator *c, const struct table *t)
{
	uint64_t done;

	for (done = 0; done < t->bytes; done += c->buf_bytes) {
		uint64_t len = t->bytes - done < c->buf_bytes ? t->bytes - done : c->buf_bytes;
		uint64_t stride = t->stride;
		uint64_t slot0 = (done * 8) >> t->order, first = slot0 / stride;
		uint64_t end = (((done + len) * 8) >> t->order) / stride;
		uint64_t i;
		int ret;

		if (end > t->nr_set)
			end = t->nr_set;
		memset(c->buf, 0, len);
		for (i = first; i < end; i++)
			qcow2_rc_write(c->buf, i * stride - slot0, t->order,
				       i ? t->base + i * t->step : t->first);
		if (t->hole && t->hole >= first && t->hole < end)
			qcow2_rc_write(c->buf, t->hole * stride - slot0, t->order, 0);
		ret = write_buf(c, c->buf, len, t->off + done);
		if (ret < 0)
			return ret;
	}
	return 0;
}

/* Host offset of L2 table @k. */
static uint64_t l2_table_off(const struct layout *l, uint64_t k)
{
	return k ? l->l2_base + k * l->l2_step : l->l2_first;
}

/* Host offset of the data of guest cluster @g (in this file or the data file). */
static uint64_t data_cluster_off(const struct layout *l, uint64_t g)
{
	uint64_t cs = 1ull << l->cluster_bits;
	size_t lo, hi;

	if (l->kind == LAYOUT_SIM) {
		/* The last run starting at or before @g. */
		for (lo = 0, hi = l->sim->nr_runs; hi - lo > 1;) {
			size_t mid = lo + (hi - lo) / 2;

			if (l->sim->runs[mid].guest <= g)
				lo = mid;
			else
				hi = mid;
		}
		return (l->sim->runs[lo].host + g - l->sim->runs[lo].guest) * cs;
	}
	if (l->kind == LAYOUT_META && l->data_in_file)
		return l2_table_off(l, g / l->l2_entries) + (1 + g % l->l2_entries) * cs;
	return l->data_off + g * cs;
}

/* A table of @nr cluster numbers (0: none) as byte offsets | @flag, up to @bytes. */
static int write_offsets(struct creator *c, uint64_t off, uint64_t bytes, const uint64_t *v,
			 uint64_t nr, uint32_t cluster_bits, uint64_t flag)
{
	uint64_t done, i;
	int ret = 0;

	for (done = 0; !ret && done < bytes; done += c->buf_bytes) {
		uint64_t len = bytes - done < c->buf_bytes ? bytes - done : c->buf_bytes;

		memset(c->buf, 0, len);
		for (i = 0; i < len / 8 && done / 8 + i < nr; i++)
			if (v[done / 8 + i])
				put_be64(c->buf + 8 * i, v[done / 8 + i] << cluster_bits | flag);
		ret = write_buf(c, c->buf, len, off + done);
	}
	return ret;
}

/* LAYOUT_SIM's tables, as the replay left them. */
static int write_sim(struct creator *c, const struct layout *l, bool extended_l2)
{
	const struct sim *s = l->sim;
	uint64_t cs = 1ull << l->cluster_bits, i, j, k = UINT64_MAX;
	size_t r;
	int ret = 0;

	/* Tables QEMU left behind first: metadata written later may cover them. */
	for (r = 0; !ret && r < s->nr_old; r++)
		ret = write_offsets(c, s->old[r].at * cs, s->old[r].clusters * cs, s->old[r].rb,
				    s->old[r].nr, l->cluster_bits, 0);
	if (!ret)
		ret = write_offsets(c, l->reftable_off, l->reftable_clusters * cs, s->rb, s->nr_rb,
				    l->cluster_bits, 0);
	for (i = 0; !ret && i < s->nr_rb; i++) {
		if (!s->rb[i])
			continue;
		memset(c->buf, 0, cs);
		for (j = 0; j < s->per_rb; j++)
			if (create_sim_used(s, i * s->per_rb + j))
				qcow2_rc_write(c->buf, j, l->refcount_order, 1);
		ret = write_buf(c, c->buf, cs, s->rb[i] * cs);
	}
	/* Only the entries of the L1 table, like QEMU; the rest is a hole. */
	if (!ret)
		ret = write_offsets(c, l->l1_off, l->l1_size * 8, s->l2, l->nb_l2, l->cluster_bits,
				    QCOW2_OFLAG_COPIED);
	/* The L2 tables, filled run by run in guest order; the bitmaps stay zero. */
	for (r = 0; !ret && r < s->nr_runs; r++) {
		const struct sim_run *run = &s->runs[r];

		for (i = 0; !ret && i < run->nr; i++) {
			uint64_t g = run->guest + i;

			if (g / l->l2_entries != k) {
				if (k != UINT64_MAX)
					ret = write_buf(c, c->buf, cs, s->l2[k] * cs);
				memset(c->buf, 0, cs);
				k = g / l->l2_entries;
			}
			put_be64(c->buf + (g % l->l2_entries) * (extended_l2 ? 16 : 8),
				 (l->data_in_file ? (run->host + i) * cs : g * cs) |
				 QCOW2_OFLAG_COPIED);
		}
	}
	if (!ret && k != UINT64_MAX)
		ret = write_buf(c, c->buf, cs, s->l2[k] * cs);
	return ret;
}

static int write_metadata(struct creator *c, const struct layout *l, bool extended_l2)
{
	uint64_t cs = 1ull << l->cluster_bits;
	uint64_t rb_entries = (cs * 8) >> l->refcount_order;
	uint64_t rest = l->nb_clusters > rb_entries ? l->nb_clusters - rb_entries : 0;
	const struct table tables[] = {
		{ l->reftable_off, l->reftable_clusters * cs, 6, l->nb_refblocks,
		  l->rb1_off - cs, cs, 1, l->rb0_off, 0 },
		{ l->rb0_off, cs, l->refcount_order, l->nb_clusters - rest, 1, 0, 1, 1, l->free },
		{ l->rb1_off, (l->nb_refblocks - 1) * cs, l->refcount_order, rest, 1, 0, 1, 1, 0 },
		/* Only the entries of the L1 table, like QEMU; the rest is a hole. */
		{ l->l1_off, l->l1_size * 8, 6, l->nb_l2, l->l2_base | QCOW2_OFLAG_COPIED,
		  l->l2_step, 1, l->l2_first | QCOW2_OFLAG_COPIED, 0 },
		/* The freed first refcount table keeps its one entry, as in QEMU's file. */
		{ cs, l->free ? cs : 0, 6, 1, l->rb0_off, 0, 1, l->rb0_off, 0 },
	};
	uint64_t k;
	size_t i;
	int ret;

	for (i = 0; i < sizeof(tables) / sizeof(tables[0]); i++) {
		ret = write_table(c, &tables[i]);
		if (ret < 0)
			return ret;
	}
	for (k = 0; k < l->nb_l2; k++) {
		uint64_t g = k * l->l2_entries, data = data_cluster_off(l, g) | QCOW2_OFLAG_COPIED;
		/*
		 * Extended L2: the bitmaps stay zero, as QEMU's preallocation
		 * leaves them (the clusters read as zeros until written).
		 */
		const struct table t = {
			l2_table_off(l, k), cs, 6,
			l->nb_data - g < l->l2_entries ? l->nb_data - g : l->l2_entries,
			data, cs, extended_l2 ? 2 : 1, data, 0
		};

		ret = write_table(c, &t);
		if (ret < 0)
			return ret;
	}
	return 0;
}

static int write_zeros(struct creator *c, int fd, uint64_t off, uint64_t len)
{
	int ret;

	memset(c->buf, 0, c->buf_bytes);
	while (len) {
		size_t n = len < c->buf_bytes ? len : c->buf_bytes;

		ret = qcow2_io_pwrite(c->io, fd, c->buf, n, off);
		if (ret < 0)
			return create_error(c, ret, "cannot write at offset %llu: %s",
					    (unsigned long long)off, strerror(-ret));
		off += n;
		len -= n;
	}
	return 0;
}

/* The data area [@off, @off + @len) of @fd, preallocated as @mode asks. */
static int preallocate(struct creator *c, int fd, uint64_t off, uint64_t len,
		       enum qcow2_prealloc mode)
{
	if (mode == QCOW2_PREALLOC_FULL)
		return write_zeros(c, fd, off, len);
	if (mode == QCOW2_PREALLOC_FALLOC && len) {
		if (fallocate(fd, 0, off, len) == 0)
			return 0;
		/* No fallocate on this file system: reserve by writing, as glibc does. */
		if (errno == EOPNOTSUPP)
			return write_zeros(c, fd, off, len);
		return create_error(c, -errno, "cannot allocate %llu bytes: %s",
				    (unsigned long long)len, strerror(errno));
	}
	if (ftruncate(fd, off + len) < 0)
		return create_error(c, -errno, "cannot resize to %llu bytes: %s",
				    (unsigned long long)(off + len), strerror(errno));
	return 0;
}

/*
 * The data clusters, preallocated as QEMU leaves them. Its metadata
 * preallocation (LAYOUT_META, and any mode with a data file) copies the
 * last cluster's tail past the image size on write, zeros up to the end of
 * the (sub)cluster, and only then extends the file to the last data byte
 * when it is still shorter: with such a tail, a data file is neither
 * extended nor allocated further.
 */
static int prealloc_data(struct creator *c, const struct qcow2_create_opts *o,
			 const struct layout *l)
{
	uint64_t cs = 1ull << l->cluster_bits;
	uint64_t unit = o->extended_l2 ? cs / 32 : cs, last, r;
	struct stat st;

	if (!l->data_in_file) {
		int ret;

		if (o->prealloc != QCOW2_PREALLOC_OFF && o->size % unit)
			return write_zeros(c, c->data_fd, o->size, unit - o->size % unit);
		ret = preallocate(c, c->data_fd, 0, o->size,
				  o->prealloc == QCOW2_PREALLOC_METADATA ? QCOW2_PREALLOC_OFF :
				  o->prealloc);
		/*
		 * QEMU's file driver writes the first block of a file it grows
		 * from empty by truncating or fallocating (to speed up its
		 * alignment probe later): 4 KiB, or 512 bytes of a smaller file.
		 */
		if (ret < 0 || !o->size || o->prealloc == QCOW2_PREALLOC_FULL)
			return ret;
		return write_zeros(c, c->data_fd, 0, o->size < 4096 ? 512 : 4096);
	}
	if (!l->nb_data)
		return 0;
	if (l->kind != LAYOUT_META && l->kind != LAYOUT_SIM)
		return preallocate(c, c->fd, l->data_off, l->nb_data << l->cluster_bits,
				   o->prealloc);
	last = data_cluster_off(l, l->nb_data - 1);
	r = o->size - ((l->nb_data - 1) << l->cluster_bits);
	if (r % unit)
		return write_zeros(c, c->fd, last + r, unit - r % unit);
	/* Extended only: a refcount block may lie past the data. */
	if (fstat(c->fd, &st) < 0)
		return create_error(c, -errno, "cannot stat: %s", strerror(errno));
	if ((uint64_t)st.st_size >= last + r)
		return 0;
	return preallocate(c, c->fd, last + r, 0, QCOW2_PREALLOC_OFF);
}

/*
 * Create (truncating, as qemu-img does) the external data file. Its name is
 * stored as given and, like qemu-img, taken relative to the current
 * directory.
 */
static int open_data_file(struct creator *c, const char *name, bool *created)
{
	c->data_fd = open(name, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
	*created = c->data_fd >= 0;
	if (c->data_fd < 0 && errno == EEXIST)
		c->data_fd = open(name, O_RDWR | O_TRUNC | O_CLOEXEC);
	if (c->data_fd < 0)
		return create_error(c, -errno, "cannot create data file %s: %s", name,
				    strerror(errno));
	return 0;
}

/*
 * The LUKS header area: built (PBKDF2 timing included) and written as
 * QEMU writes it: the clusters zeroed by allocation, then the header and
 * key material, which end where the area's last nonzero byte does.
 */
static int write_luks(struct creator *c, const struct qcow2_encrypt_opts *o,
		      const struct layout *l)
{
	uint64_t bytes = l->nb_crypt << l->cluster_bits, used;
	char why[160];
	uint8_t *area;
	int ret;

	if (posix_memalign((void **)&area, 4096, bytes))
		return create_error(c, -ENOMEM, "out of memory");
	memset(area, 0, bytes);
	ret = qcow2_luks_header_build(o, area, why, sizeof(why));
	if (ret < 0) {
		ret = create_error(c, ret, "%s", why);
		goto out;
	}
	ret = preallocate(c, c->fd, l->crypt_off, bytes, QCOW2_PREALLOC_FALLOC);
	if (ret < 0)
		goto out;
	for (used = bytes; used && !area[used - 1]; used--)
		;
	used = (used + 511) & ~511ull;
	ret = write_buf(c, area, used, l->crypt_off);
out:
	free(area);
	return ret;
}

/*
 * Open @path for writing, not yet truncated (the data file may still fail
 * to open); *created tells whether it is new.
 */
static int open_target(struct creator *c, bool *created)
{
	c->fd = open(c->path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
	*created = c->fd >= 0;
	if (c->fd < 0 && errno == EEXIST)
		c->fd = open(c->path, O_RDWR | O_CLOEXEC);
	if (c->fd < 0)
		return create_error(c, -errno, "cannot create: %s", strerror(errno));
	return 0;
}

/**
 * qcow2_create - write a new, empty image at @path
 *
 * Validates @opts (cluster size 512..2M, refcount width a power of two up
 * to 64, compat 0.10 only with 16-bit refcounts and no lazy refcounts, size
 * a multiple of 512) before touching the file, then creates or truncates
 * @path and writes the metadata (and preallocated data) through @io, the
 * header last, and syncs. A file this call created is removed on failure.
 *
 * Returns 0, or -errno with one line naming @path and the problem in @err.
 */
int qcow2_create(const char *path, const struct qcow2_create_opts *opts,
		 struct qcow2_io *io, char *err, size_t errlen)
{
	struct creator c = { .path = path, .io = io, .fd = -1, .data_fd = -1, .err = err,
			     .errlen = errlen };
	struct qcow2_create_opts o = *opts;
	struct layout l = { 0 };
	uint32_t version;
	bool created = false, data_created = false;
	int ret;

	if (errlen)
		err[0] = '\0';
	/* A raw data file must be mapped whole: metadata preallocation at least. */
	if (o.data_file_raw && o.prealloc == QCOW2_PREALLOC_OFF)
		o.prealloc = QCOW2_PREALLOC_METADATA;
	opts = &o;
	ret = validate(&c, opts, &l.cluster_bits, &version, &l.refcount_order);
	if (ret < 0)
		return ret;
	if (opts->encrypt) {
		char why[160];

		ret = qcow2_luks_header_size(opts->encrypt, &l.crypt_bytes, why, sizeof(why));
		if (ret < 0)
			return create_error(&c, ret, "%s", why);
	}
	ret = plan_layout(&c, opts, &l);
	if (ret < 0)
		return ret;
	c.buf_bytes = (1u << l.cluster_bits) > CHUNK_BYTES ? 1u << l.cluster_bits : CHUNK_BYTES;
	c.hdr = calloc(1, 1u << l.cluster_bits);
	if (!c.hdr || posix_memalign((void **)&c.buf, 4096, c.buf_bytes)) {
		ret = create_error(&c, -ENOMEM, "out of memory");
		goto out_free;
	}
	/* Before the file is touched: a name that does not fit fails here. */
	ret = build_header(&c, opts, &l, version);
	if (ret < 0)
		goto out_free;

	ret = open_target(&c, &created);
	if (ret < 0)
		goto out_free;
	if (opts->data_file) {
		struct stat a, b;

		/* Before the data file's O_TRUNC: the image itself would be truncated. */
		if (fstat(c.fd, &a) == 0 && stat(opts->data_file, &b) == 0 &&
		    a.st_dev == b.st_dev && a.st_ino == b.st_ino) {
			ret = create_error(&c, -EINVAL, "the data file %s is the image itself",
					   opts->data_file);
			goto out_close;
		}
		ret = open_data_file(&c, opts->data_file, &data_created);
		if (ret < 0)
			goto out_close;
	}
	if (!created && ftruncate(c.fd, 0) < 0) {
		ret = create_error(&c, -errno, "cannot truncate: %s", strerror(errno));
		goto out_close;
	}
	ret = l.kind == LAYOUT_SIM ? write_sim(&c, &l, opts->extended_l2) :
				     write_metadata(&c, &l, opts->extended_l2);
	if (ret < 0)
		goto out_close;
	/* QEMU sets up encryption after preallocating: the LUKS area comes last. */
	ret = prealloc_data(&c, opts, &l);
	if (ret < 0)
		goto out_close;
	if (l.nb_crypt) {
		ret = write_luks(&c, opts->encrypt, &l);
		if (ret < 0)
			goto out_close;
	}
	if (c.data_fd >= 0) {
		ret = qcow2_io_fsync(io, c.data_fd);
		if (ret < 0) {
			ret = create_error(&c, ret, "cannot sync the data file: %s", strerror(-ret));
			goto out_close;
		}
	}
	/* The header goes last, so a failure above never leaves a valid-looking image. */
	ret = write_buf(&c, c.hdr, 1u << l.cluster_bits, 0);
	if (ret < 0)
		goto out_close;
	ret = qcow2_io_fsync(io, c.fd);
	if (ret < 0)
		ret = create_error(&c, ret, "cannot sync: %s", strerror(-ret));

out_close:
	if (c.data_fd >= 0)
		close(c.data_fd);
	if (close(c.fd) < 0 && !ret)
		ret = create_error(&c, -errno, "cannot close: %s", strerror(errno));
	if (ret < 0 && created)
		unlink(path);
	if (ret < 0 && data_created)
		unlink(opts->data_file);
out_free:
	create_sim_free(l.sim);
	free(c.buf);
	free(c.hdr);
	return ret;
}
