// SPDX-License-Identifier: MIT
/*
 * map: the guest-to-file mapping through the backing chain, printed as
 * qemu-img map prints it (the human table of data extents, or one JSON
 * object per run), with like runs merged the way qemu-img merges them.
 */
#include <errno.h>
#include <getopt.h>
#include <string.h>

#include "cmds.h"
#include "util.h"

#define MAP_STEP	(1ull << 30)	/* qemu-img asks for 1 GiB at a time */

static void map_usage(void)
{
	printf(
		"usage: " UQ_PROG " map [-f FMT] [--output=human|json] [--no-backing] IMAGE\n"
		"\n"
		"Show where IMAGE's guest ranges live, through its backing chain.\n"
		"\n"
		"  -f FMT          image format: qcow2 or raw (default: detected)\n"
		"  --output=FMT    human (default: data extents only) or json (every run),\n"
		"                  as qemu-img map\n"
		UQ_KEY_HELP
		UQ_NO_BACKING_HELP
		"  -h, --help      show this help\n");
}

struct map_entry {
	uint64_t start;
	struct uq_status st;
};

static bool mergeable(const struct map_entry *a, const struct map_entry *b)
{
	if (!a->st.len)
		return false;
	if (a->st.zero != b->st.zero || a->st.data != b->st.data ||
	    a->st.depth != b->st.depth || a->st.present != b->st.present ||
	    a->st.has_offset != b->st.has_offset)
		return false;
	/* With an offset comes a file name: the same file, contiguous. */
	if (a->st.has_offset && (a->st.img != b->st.img ||
				 a->st.offset + a->st.len != b->st.offset))
		return false;
	return true;
}

/* Print one merged run; 0, or -EINVAL where the human table cannot show it. */
static int print_entry(const struct map_entry *e, const char *top_name,
		       struct uq_image *top, bool json, bool last)
{
	const struct uq_status *st = &e->st;
	const char *file;

	if (json) {
		printf("{ \"start\": %llu, \"length\": %llu, \"depth\": %u, \"present\": %s, "
		       "\"zero\": %s, \"data\": %s", (unsigned long long)e->start,
		       (unsigned long long)st->len, st->depth, st->present ? "true" : "false",
		       st->zero ? "true" : "false", st->data ? "true" : "false");
		if (st->has_offset)
			printf(", \"offset\": %llu", (unsigned long long)st->offset);
		printf(last ? "}" : "},\n");
		return 0;
	}
	if (!st->data)
		return 0;
	file = st->img == top ? top_name : st->img->path;
	/* The data lives in the external data file: qemu-img names that one.
	 * A data file name without the incompatible bit 2 (data file) is unused. */
	if (st->img->qcow2) {
		struct qcow2_info info;

		qcow2_get_info(st->img->qcow2, &info);
		if (info.data_file && (info.incompatible & (1ull << 2)))
			file = info.data_file;
	}
	if (!st->has_offset) {
		uq_err("%s: encrypted or compressed clusters have no place in the human map "
		       "(use --output=json)", file);
		return -EINVAL;
	}
	if (!st->zero)
		printf("%#-16llx%#-16llx%#-16llx%s\n", (unsigned long long)e->start,
		       (unsigned long long)st->len, (unsigned long long)st->offset, file);
	return 0;
}

int cmd_map(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "output", required_argument, NULL, 'O' },
		{ "help", no_argument, NULL, 'h' },
		UQ_KEY_LONGOPTS,
		UQ_NO_BACKING_LONGOPT,
		{ NULL, 0, NULL, 0 },
	};
	struct map_entry curr = { 0 }, next;
	const char *fmt = NULL, *path;
	struct uq_image *img;
	bool json = false;
	int opt, ret;
	char err[512];

	while ((opt = uq_getopt(argc, argv, ":f:h", longopts)) != -1) {
		switch (opt) {
		case 'f':
			fmt = optarg;
			break;
		case 'O':
			if (uq_parse_output("map", optarg, &json))
				return 1;
			break;
		case UQ_OPT_FAILED:
			return 1;
		case 'h':
			map_usage();
			return 0;
		default:
			return uq_usage_error("map", argv, opt);
		}
	}
	if (argc - optind != 1)
		return uq_usage_args("map", "one IMAGE");
	path = argv[optind];
	ret = uq_image_open(&img, path, fmt, UQ_OPEN_RDONLY | UQ_OPEN_CHAIN, err, sizeof(err));
	if (ret < 0) {
		uq_err("%s", err);
		return 1;
	}
	if (json)
		printf("[");
	else
		printf("%-16s%-16s%-16s%s\n", "Offset", "Length", "Mapped to", "File");

	while (curr.start + curr.st.len < img->size) {
		uint64_t off = curr.start + curr.st.len;
		uint64_t n = img->size - off < MAP_STEP ? img->size - off : MAP_STEP;

		next.start = off;
		ret = uq_image_status(img, off, n, &next.st);
		if (ret < 0) {
			uq_err("%s", uq_image_errmsg());
			goto out;
		}
		if (mergeable(&curr, &next)) {
			curr.st.len += next.st.len;
			continue;
		}
		if (curr.st.len) {
			ret = print_entry(&curr, path, img, json, false);
			if (ret < 0)
				goto out;
		}
		curr = next;
	}
	ret = print_entry(&curr, path, img, json, true);
	if (json)
		printf("]\n");
out:
	uq_image_close(img);
	return ret < 0 ? 1 : 0;
}
