// SPDX-License-Identifier: MIT
/*
 * info: what qemu-img info prints, in its human and JSON forms (JSON
 * members in the order QEMU's dictionaries come out), for one image or
 * its whole backing chain.
 */
#include <endian.h>
#include <errno.h>
#include <getopt.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cmds.h"
#include "util.h"

static void info_usage(void)
{
	printf(
		"usage: " UQ_PROG " info [-f FMT] [--output=human|json] [--backing-chain] IMAGE\n"
		"\n"
		"Show IMAGE's format, sizes and features (opened read-only).\n"
		"\n"
		"  -f FMT           image format: qcow2 or raw (default: detected)\n"
		"  --output=FMT     human (default) or json, as qemu-img info\n"
		"  --backing-chain  also show every image of the backing chain\n"
		UQ_KEY_HELP
		"  -h, --help       show this help\n");
}

/* One persistent dirty bitmap, as qemu-img info lists it. */
struct bitmap_info {
	char *name;
	uint32_t flags;			/* BME_FLAG_* */
	uint64_t granularity;
};

struct level_info {
	const char *filename;
	struct uq_image *img;
	struct qcow2_info q;		/* qcow2 only */
	struct qcow2_crypt_info ci;
	bool encrypted;
	uint64_t actual_size;
	char *full_backing;		/* NULL without a backing file */
	struct qcow2_snapshot_info *snaps;
	uint32_t nr_snaps;
	struct bitmap_info *bitmaps;
	uint32_t nr_bitmaps;
};

#define EXT_BITMAPS		0x23852875u	/* the bitmaps header extension */
#define AUTOCLEAR_BITMAPS	1ull		/* its autoclear bit */
#define MAX_BITMAPS		65535		/* QEMU's limits */
#define MAX_BITMAP_DIR		(64u << 20)
#define MAX_BITMAP_NAME		1023
#define BME_FLAG_IN_USE		1u
#define BME_FLAG_AUTO		2u

static uint32_t be32_at(const uint8_t *p)
{
	uint32_t v;

	memcpy(&v, p, 4);
	return be32toh(v);
}

static uint64_t be64_at(const uint8_t *p)
{
	uint64_t v;

	memcpy(&v, p, 8);
	return be64toh(v);
}

static int read_at(int fd, void *buf, size_t len, uint64_t off)
{
	ssize_t n = pread(fd, buf, len, off);

	if (n < 0)
		return -errno;
	return (size_t)n == len ? 0 : -EINVAL;
}

static void bitmaps_free(struct level_info *li)
{
	uint32_t i;

	for (i = 0; i < li->nr_bitmaps; i++)
		free(li->bitmaps[i].name);
	free(li->bitmaps);
	li->bitmaps = NULL;
	li->nr_bitmaps = 0;
}

/* The bitmap directory at @off, @size bytes, @nr entries; 0 or -errno. */
static int bitmap_dir_read(struct level_info *li, uint64_t off, uint64_t size, uint32_t nr)
{
	uint8_t *dir = malloc(size);
	uint64_t pos = 0;
	int ret;

	li->bitmaps = calloc(nr, sizeof(*li->bitmaps));
	if (!dir || !li->bitmaps) {
		free(dir);
		return -ENOMEM;
	}
	ret = read_at(li->img->fd, dir, size, off);
	for (; !ret && li->nr_bitmaps < nr; li->nr_bitmaps++) {
		struct bitmap_info *b = &li->bitmaps[li->nr_bitmaps];
		uint32_t extra, name_len, gbits;
		uint64_t len;

		if (size - pos < 24) {
			ret = -EINVAL;
			break;
		}
		b->flags = be32_at(dir + pos + 12);
		gbits = dir[pos + 17];
		name_len = dir[pos + 18] << 8 | dir[pos + 19];
		extra = be32_at(dir + pos + 20);
		len = (24ull + extra + name_len + 7) & ~7ull;
		if (len > size - pos || !name_len || name_len > MAX_BITMAP_NAME || gbits < 9 ||
		    gbits > 31 || dir[pos + 16] != 1) {
			ret = -EINVAL;
			break;
		}
		b->granularity = 1ull << gbits;
		b->name = strndup((const char *)dir + pos + 24 + extra, name_len);
		if (!b->name) {
			ret = -ENOMEM;
			break;
		}
		pos += len;
	}
	free(dir);
	return ret;
}

/*
 * The persistent dirty bitmaps qemu-img info lists: those of the bitmaps
 * extension, where its autoclear bit says a bitmap-aware program wrote
 * the image last (else QEMU ignores them).
 */
static int bitmaps_get(struct level_info *li)
{
	const struct qcow2_info *q = &li->q;
	uint32_t cs = 1u << q->cluster_bits, end, pos, hdr_len;
	uint8_t *hdr;
	int ret;

	if (q->version < 3 || !(q->autoclear & AUTOCLEAR_BITMAPS))
		return 0;
	hdr = calloc(1, cs);
	if (!hdr)
		return -ENOMEM;
	/* The engine validated the header cluster: lengths are within it. */
	ret = pread(li->img->fd, hdr, cs, 0) < 104 ? -EINVAL : 0;
	hdr_len = be32_at(hdr + 100);
	end = be64_at(hdr + 8) ? (uint32_t)be64_at(hdr + 8) : cs;
	for (pos = hdr_len; !ret && pos + 8 <= end && pos + 8 <= cs; ) {
		uint32_t type = be32_at(hdr + pos), len = be32_at(hdr + pos + 4);
		uint64_t off, size, nr;

		if (type == 0 || (uint64_t)len + 7 > cs - pos - 8)
			break;
		if (type != EXT_BITMAPS) {
			pos += 8 + ((len + 7) & ~7u);
			continue;
		}
		if (len < 24) {
			ret = -EINVAL;
			break;
		}
		nr = be32_at(hdr + pos + 8);
		size = be64_at(hdr + pos + 16);
		off = be64_at(hdr + pos + 24);
		if (!nr)
			break;
		if (nr > MAX_BITMAPS || !size || size > MAX_BITMAP_DIR || off % cs ||
		    off > q->file_size || size > q->file_size - off)
			ret = -EINVAL;
		else
			ret = bitmap_dir_read(li, off, size, nr);
		break;
	}
	free(hdr);
	if (ret < 0) {
		bitmaps_free(li);
		uq_err("%s: %s", li->img->path, ret == -EINVAL ? "invalid bitmap directory"
								: strerror(-ret));
	}
	return ret;
}

static int level_get(struct level_info *li, struct uq_image *img, const char *filename)
{
	struct stat st;

	memset(li, 0, sizeof(*li));
	li->filename = filename;
	li->img = img;
	if (fstat(img->fd, &st) == 0)
		li->actual_size = (uint64_t)st.st_blocks * 512;
	if (img->fmt != UQ_FMT_QCOW2)
		return 0;
	qcow2_get_info(img->qcow2, &li->q);
	if (qcow2_snapshot_list(img->qcow2, &li->snaps, &li->nr_snaps) < 0) {
		uq_err("%s", qcow2_errmsg(img->qcow2));
		return -EINVAL;
	}
	li->encrypted = qcow2_get_crypt_info(img->qcow2, &li->ci) == 0;
	if (bitmaps_get(li) < 0)
		return -EINVAL;
	if (li->q.backing_file) {
		li->full_backing = uq_backing_path(filename, li->q.backing_file);
		if (!li->full_backing) {
			uq_err("%s: out of memory", img->path);
			return -ENOMEM;
		}
	}
	return 0;
}

/* The "encrypt:" block, members in qemu-img's order. */
static void print_crypt_human(const struct level_info *li)
{
	const struct qcow2_crypt_info *c = &li->ci;
	int i;

	if (!li->encrypted)
		return;
	printf("    encrypt:\n");
	if (strcmp(c->format, "luks")) {
		printf("        format: %s\n", c->format);
		return;
	}
	printf("        ivgen alg: %s\n        hash alg: %s\n        cipher alg: %s\n"
	       "        uuid: %s\n", c->ivgen_alg, c->hash_alg, c->cipher_alg, c->uuid);
	if (c->ivgen_hash_alg)
		printf("        ivgen hash alg: %s\n", c->ivgen_hash_alg);
	printf("        format: luks\n        cipher mode: %s\n        slots:\n", c->cipher_mode);
	for (i = 0; i < 8; i++) {
		printf("            [%d]:\n                active: %s\n", i,
		       c->slots[i].active ? "true" : "false");
		if (c->slots[i].active)
			printf("                iters: %u\n", c->slots[i].iters);
		printf("                key offset: %llu\n",
		       (unsigned long long)c->slots[i].key_offset);
		if (c->slots[i].active)
			printf("                stripes: %u\n", c->slots[i].stripes);
	}
	printf("        payload offset: %llu\n        master key iters: %u\n",
	       (unsigned long long)c->payload_offset, c->master_key_iters);
}

static void print_crypt_json(struct uq_json *j, const struct level_info *li)
{
	const struct qcow2_crypt_info *c = &li->ci;
	int i;

	if (!li->encrypted)
		return;
	uq_json_open(j, "encrypt", '{');
	if (strcmp(c->format, "luks")) {
		uq_json_string(j, "format", c->format);
		uq_json_close(j, '}');
		return;
	}
	uq_json_string(j, "ivgen-alg", c->ivgen_alg);
	uq_json_string(j, "hash-alg", c->hash_alg);
	uq_json_string(j, "cipher-alg", c->cipher_alg);
	uq_json_string(j, "uuid", c->uuid);
	if (c->ivgen_hash_alg)
		uq_json_string(j, "ivgen-hash-alg", c->ivgen_hash_alg);
	uq_json_string(j, "format", "luks");
	uq_json_string(j, "cipher-mode", c->cipher_mode);
	uq_json_open(j, "slots", '[');
	for (i = 0; i < 8; i++) {
		uq_json_open(j, NULL, '{');
		uq_json_bool(j, "active", c->slots[i].active);
		if (c->slots[i].active)
			uq_json_int(j, "iters", c->slots[i].iters);
		uq_json_int(j, "key-offset", c->slots[i].key_offset);
		if (c->slots[i].active)
			uq_json_int(j, "stripes", c->slots[i].stripes);
		uq_json_close(j, '}');
	}
	uq_json_close(j, ']');
	uq_json_int(j, "payload-offset", c->payload_offset);
	uq_json_int(j, "master-key-iters", c->master_key_iters);
	uq_json_close(j, '}');
}

static void print_human(const struct level_info *li)
{
	const struct qcow2_info *q = &li->q;
	char vsize[32], asize[32];
	uint32_t i;

	uq_size_str(li->img->size, vsize, sizeof(vsize));
	uq_size_str(li->actual_size, asize, sizeof(asize));
	printf("image: %s\nfile format: %s\nvirtual size: %s (%llu bytes)\ndisk size: %s\n",
	       li->filename, uq_fmt_name(li->img->fmt), vsize,
	       (unsigned long long)li->img->size, asize);
	if (li->img->fmt != UQ_FMT_QCOW2)
		return;
	if (li->encrypted)
		printf("encrypted: yes\n");
	printf("cluster_size: %u\n", 1u << q->cluster_bits);
	if (q->backing_file) {
		printf("backing file: %s", q->backing_file);
		if (strcmp(q->backing_file, li->full_backing))
			printf(" (actual path: %s)", li->full_backing);
		printf("\n");
		if (q->backing_fmt)
			printf("backing file format: %s\n", q->backing_fmt);
	}
	if (q->dirty)
		printf("cleanly shut down: no\n");
	if (li->nr_snaps) {
		printf("Snapshot list:\n");
		uq_snapshot_print(li->snaps, li->nr_snaps);
	}
	printf("Format specific information:\n");
	printf("    compat: %s\n", q->version >= 3 ? "1.1" : "0.10");
	printf("    compression type: %s\n", q->compression_type ? "zstd" : "zlib");
	if (q->version < 3) {
		printf("    refcount bits: %u\n", q->refcount_bits);
		print_crypt_human(li);
		return;
	}
	printf("    lazy refcounts: %s\n", q->lazy_refcounts ? "true" : "false");
	if (li->nr_bitmaps)
		printf("    bitmaps:\n");
	for (i = 0; i < li->nr_bitmaps; i++) {
		const struct bitmap_info *b = &li->bitmaps[i];
		int n = 0;

		printf("        [%u]:\n            flags:\n", i);
		if (b->flags & BME_FLAG_IN_USE)
			printf("                [%d]: in-use\n", n++);
		if (b->flags & BME_FLAG_AUTO)
			printf("                [%d]: auto\n", n++);
		printf("            name: %s\n            granularity: %llu\n", b->name,
		       (unsigned long long)b->granularity);
	}
	printf("    refcount bits: %u\n", q->refcount_bits);
	print_crypt_human(li);
	/* As qemu-img: the incompatible bit 2 (data file) tells; the name may be missing. */
	if (q->incompatible & (1ull << 2)) {
		if (q->data_file)
			printf("    data file: %s\n", q->data_file);
		printf("    data file raw: %s\n", q->autoclear & 2 ? "true" : "false");
	}
	printf("    corrupt: %s\n", q->corrupt ? "true" : "false");
	printf("    extended l2: %s\n", q->extended_l2 ? "true" : "false");
}

static void print_json(struct uq_json *j, const struct level_info *li)
{
	const struct qcow2_info *q = &li->q;
	bool qcow2 = li->img->fmt == UQ_FMT_QCOW2;
	uint32_t i;

	uq_json_open(j, NULL, '{');
	if (qcow2 && q->backing_file && q->backing_fmt)
		uq_json_string(j, "backing-filename-format", q->backing_fmt);
	if (li->nr_snaps)
		uq_snapshot_json(j, li->snaps, li->nr_snaps);
	uq_json_int(j, "virtual-size", li->img->size);
	uq_json_string(j, "filename", li->filename);
	if (qcow2)
		uq_json_int(j, "cluster-size", 1u << q->cluster_bits);
	uq_json_string(j, "format", uq_fmt_name(li->img->fmt));
	uq_json_int(j, "actual-size", li->actual_size);
	if (qcow2) {
		uq_json_open(j, "format-specific", '{');
		uq_json_string(j, "type", "qcow2");
		uq_json_open(j, "data", '{');
		uq_json_string(j, "compat", q->version >= 3 ? "1.1" : "0.10");
		uq_json_string(j, "compression-type", q->compression_type ? "zstd" : "zlib");
		if (q->version >= 3)
			uq_json_bool(j, "lazy-refcounts", q->lazy_refcounts);
		if (li->nr_bitmaps)
			uq_json_open(j, "bitmaps", '[');
		for (i = 0; i < li->nr_bitmaps; i++) {
			const struct bitmap_info *b = &li->bitmaps[i];

			uq_json_open(j, NULL, '{');
			uq_json_open(j, "flags", '[');
			if (b->flags & BME_FLAG_IN_USE)
				uq_json_string(j, NULL, "in-use");
			if (b->flags & BME_FLAG_AUTO)
				uq_json_string(j, NULL, "auto");
			uq_json_close(j, ']');
			uq_json_string(j, "name", b->name);
			uq_json_int(j, "granularity", b->granularity);
			uq_json_close(j, '}');
		}
		if (li->nr_bitmaps)
			uq_json_close(j, ']');
		uq_json_int(j, "refcount-bits", q->refcount_bits);
		print_crypt_json(j, li);
		if (q->incompatible & (1ull << 2)) {
			if (q->data_file)
				uq_json_string(j, "data-file", q->data_file);
			uq_json_bool(j, "data-file-raw", q->autoclear & 2);
		}
		if (q->version >= 3) {
			uq_json_bool(j, "corrupt", q->corrupt);
			uq_json_bool(j, "extended-l2", q->extended_l2);
		}
		uq_json_close(j, '}');
		uq_json_close(j, '}');
		if (q->backing_file)
			uq_json_string(j, "full-backing-filename", li->full_backing);
	}
	/* qemu-img's key order (its hash table's): between the two backing names. */
	if (li->encrypted)
		uq_json_bool(j, "encrypted", true);
	if (qcow2 && q->backing_file)
		uq_json_string(j, "backing-filename", q->backing_file);
	uq_json_bool(j, "dirty-flag", qcow2 && q->dirty);
	uq_json_close(j, '}');
}

int cmd_info(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "output", required_argument, NULL, 'O' },
		{ "backing-chain", no_argument, NULL, 'B' },
		{ "help", no_argument, NULL, 'h' },
		UQ_KEY_LONGOPTS,
		{ NULL, 0, NULL, 0 },
	};
	struct uq_json j = { .f = stdout };
	struct uq_image *top, *img;
	const char *fmt = NULL;
	bool json = false, chain = false;
	char err[512];
	int opt, ret, status = 0;

	while ((opt = uq_getopt(argc, argv, ":f:h", longopts)) != -1) {
		switch (opt) {
		case 'f':
			fmt = optarg;
			break;
		case 'O':
			if (uq_parse_output("info", optarg, &json))
				return 1;
			break;
		case 'B':
			chain = true;
			break;
		case UQ_OPT_FAILED:
			return 1;
		case 'h':
			info_usage();
			return 0;
		default:
			return uq_usage_error("info", argv, opt);
		}
	}
	if (argc - optind != 1)
		return uq_usage_args("info", "one IMAGE");
	ret = uq_image_open(&top, argv[optind], fmt,
			    UQ_OPEN_RDONLY | UQ_OPEN_NO_KEY | UQ_OPEN_NO_DATA_FILE |
			    (chain ? UQ_OPEN_CHAIN : UQ_OPEN_NO_BACKING),
			    err, sizeof(err));
	if (ret < 0) {
		uq_err("%s", err);
		return 1;
	}
	if (json && chain)
		uq_json_open(&j, NULL, '[');
	for (img = top; img; img = chain ? img->backing : NULL) {
		struct level_info li;

		/* Backing files go by their resolved path, as in qemu-img. */
		if (level_get(&li, img, img == top ? argv[optind] : img->path) < 0) {
			qcow2_snapshot_list_free(li.snaps, li.nr_snaps);
			bitmaps_free(&li);
			status = 1;
			break;
		}
		if (json)
			print_json(&j, &li);
		else
			print_human(&li);
		if (chain && !json && img->backing)
			printf("\n");
		free(li.full_backing);
		qcow2_snapshot_list_free(li.snaps, li.nr_snaps);
		bitmaps_free(&li);
	}
	if (json && chain && !status)
		uq_json_close(&j, ']');
	uq_image_close(top);
	return status;
}
