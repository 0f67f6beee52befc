// SPDX-License-Identifier: MIT
/*
 * info: what qemu-img info prints, in its human and JSON forms (JSON
 * members in the order QEMU's dictionaries come out), for one image or
 * its whole backing chain.
 */
#include <errno.h>
#include <getopt.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

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
		"  -h, --help       show this help\n");
}

struct level_info {
	const char *filename;
	struct uq_image *img;
	struct qcow2_info q;		/* qcow2 only */
	uint64_t actual_size;
	char *full_backing;		/* NULL without a backing file */
	struct qcow2_snapshot_info *snaps;
	uint32_t nr_snaps;
};

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
	if (li->q.backing_file) {
		li->full_backing = uq_backing_path(filename, li->q.backing_file);
		if (!li->full_backing) {
			uq_err("%s: out of memory", img->path);
			return -ENOMEM;
		}
	}
	return 0;
}

static void print_human(const struct level_info *li)
{
	const struct qcow2_info *q = &li->q;
	char vsize[32], asize[32];

	uq_size_str(li->img->size, vsize, sizeof(vsize));
	uq_size_str(li->actual_size, asize, sizeof(asize));
	printf("image: %s\nfile format: %s\nvirtual size: %s (%llu bytes)\ndisk size: %s\n",
	       li->filename, uq_fmt_name(li->img->fmt), vsize,
	       (unsigned long long)li->img->size, asize);
	if (li->img->fmt != UQ_FMT_QCOW2)
		return;
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
		return;
	}
	printf("    lazy refcounts: %s\n", q->lazy_refcounts ? "true" : "false");
	printf("    refcount bits: %u\n", q->refcount_bits);
	if (q->data_file)
		printf("    data file: %s\n", q->data_file);
	printf("    corrupt: %s\n", q->corrupt ? "true" : "false");
	printf("    extended l2: %s\n", q->extended_l2 ? "true" : "false");
}

static void print_json(struct uq_json *j, const struct level_info *li)
{
	const struct qcow2_info *q = &li->q;
	bool qcow2 = li->img->fmt == UQ_FMT_QCOW2;

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
		uq_json_int(j, "refcount-bits", q->refcount_bits);
		if (q->data_file)
			uq_json_string(j, "data-file", q->data_file);
		if (q->version >= 3) {
			uq_json_bool(j, "corrupt", q->corrupt);
			uq_json_bool(j, "extended-l2", q->extended_l2);
		}
		uq_json_close(j, '}');
		uq_json_close(j, '}');
		if (q->backing_file)
			uq_json_string(j, "full-backing-filename", li->full_backing);
		if (q->backing_file)
			uq_json_string(j, "backing-filename", q->backing_file);
	}
	uq_json_bool(j, "dirty-flag", qcow2 && q->dirty);
	uq_json_close(j, '}');
}

int cmd_info(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "output", required_argument, NULL, 'O' },
		{ "backing-chain", no_argument, NULL, 'B' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct uq_json j = { .f = stdout };
	struct uq_image *top, *img;
	const char *fmt = NULL;
	bool json = false, chain = false;
	char err[512];
	int opt, ret, status = 0;

	while ((opt = getopt_long(argc, argv, ":f:h", longopts, NULL)) != -1) {
		switch (opt) {
		case 'f':
			fmt = optarg;
			break;
		case 'O':
			if (strcmp(optarg, "json") && strcmp(optarg, "human")) {
				uq_err("info: --output must be human or json");
				return 1;
			}
			json = !strcmp(optarg, "json");
			break;
		case 'B':
			chain = true;
			break;
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
			    UQ_OPEN_RDONLY | (chain ? UQ_OPEN_CHAIN : UQ_OPEN_NO_BACKING),
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
	}
	if (json && chain && !status)
		uq_json_close(&j, ']');
	uq_image_close(top);
	return status;
}
