// SPDX-License-Identifier: MIT
/*
 * resize: change an image's virtual size as qemu-img resize does: an
 * absolute SIZE or +SIZE/-SIZE relative to the current one, shrinking only
 * with --shrink. qcow2 through the engine (qcow2_resize), raw files by
 * truncation.
 */
#include <errno.h>
#include <getopt.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cmds.h"
#include "util.h"

static void resize_usage(void)
{
	printf(
		"usage: " UQ_PROG " resize [-f qcow2|raw] [-q] [--shrink] IMAGE [+|-]SIZE\n"
		"\n"
		"Set IMAGE's virtual size to SIZE, or grow (+) or shrink (-) it by SIZE;\n"
		"SIZE takes k, M, G, T suffixes.\n"
		"\n"
		"  -f FMT          IMAGE's format: qcow2 or raw (default: detected)\n"
		"  --shrink        allow shrinking (data past the new end is lost)\n"
		"  -q              quiet\n"
		"  -h, --help      show this help\n");
}

/* "+SIZE", "-SIZE" or "SIZE" against @cur. 0 with *@out or 1 (error printed). */
static int new_size(const char *path, const char *arg, uint64_t cur, uint64_t *out)
{
	int sign = arg[0] == '+' ? 1 : arg[0] == '-' ? -1 : 0;
	uint64_t n;

	if (uq_parse_size(arg + (sign != 0), &n) < 0 || n > INT64_MAX) {
		uq_err("%s: invalid size '%s'", path, arg);
		return 1;
	}
	if (sign > 0 && n > INT64_MAX - cur) {
		uq_err("%s: image size must be less than 8 EiB", path);
		return 1;
	}
	if ((sign < 0 && n >= cur) || (!sign && !n)) {
		uq_err("%s: new image size must be positive", path);
		return 1;
	}
	*out = sign > 0 ? cur + n : sign < 0 ? cur - n : n;
	return 0;
}

int cmd_resize(int argc, char **argv)
{
	enum { OPT_SHRINK = 256 };
	static const struct option longopts[] = {
		{ "help", no_argument, NULL, 'h' },
		{ "shrink", no_argument, NULL, OPT_SHRINK },
		{ NULL, 0, NULL, 0 },
	};
	const char *fmt = NULL, *path, *size_arg;
	bool shrink = false, quiet = false;
	struct uq_image *img;
	uint64_t size;
	char err[512];
	int opt, ret, status = 1;

	/* SIZE goes before getopt sees it, so that "-1G" is no option (as qemu-img). */
	if (argc >= 3 && strcmp(argv[argc - 1], "--help") && strcmp(argv[argc - 1], "-h"))
		size_arg = argv[--argc];
	else
		size_arg = NULL;
	while ((opt = getopt_long(argc, argv, ":f:qh", longopts, NULL)) != -1) {
		switch (opt) {
		case 'f':
			fmt = optarg;
			break;
		case 'q':
			quiet = true;
			break;
		case OPT_SHRINK:
			shrink = true;
			break;
		case 'h':
			resize_usage();
			return 0;
		default:
			return uq_usage_error("resize", argv, opt);
		}
	}
	if (!size_arg || argc - optind != 1)
		return uq_usage_args("resize", "IMAGE and SIZE");
	path = argv[optind];

	ret = uq_image_open(&img, path, fmt, 0, err, sizeof(err));
	if (ret < 0) {
		uq_err("%s", err);
		return 1;
	}
	if (new_size(path, size_arg, img->size, &size))
		goto out;
	if (size < img->size && !shrink) {
		uq_err("%s: use the --shrink option to perform a shrink operation "
		       "(data past the new end is lost)", path);
		goto out;
	}
	if (img->qcow2) {
		ret = qcow2_resize(img->qcow2, size);
		if (ret < 0) {
			uq_err("%s", qcow2_errmsg(img->qcow2));
			goto out;
		}
	} else if (ftruncate(img->fd, size) < 0) {
		uq_err("%s: cannot resize: %s", path, strerror(errno));
		goto out;
	}
	status = 0;
out:
	ret = uq_image_close(img);
	if (ret < 0 && !status) {
		uq_err("%s: cannot write back: %s", path, strerror(-ret));
		status = 1;
	}
	if (!status && !quiet)
		printf("Image resized.\n");
	return status;
}
