// SPDX-License-Identifier: MIT
/*
 * check: runs the engine's consistency check (and repair) and reports the
 * way qemu-img check does: the same sentences, JSON members and exit codes.
 */
#include <errno.h>
#include <getopt.h>
#include <stdlib.h>
#include <string.h>

#include "cmds.h"
#include "util.h"

/* qemu-img check's exit codes. */
enum {
	CHECK_CLEAN = 0,
	CHECK_FAILED = 1,
	CHECK_CORRUPT = 2,
	CHECK_LEAKS = 3,
	CHECK_UNSUPPORTED = 63,
};

static void check_usage(void)
{
	printf(
		"usage: " UQ_PROG " check [-f FMT] [-r leaks|all] [--output=human|json] [-q] [-p]\n"
		"                        IMAGE\n"
		"\n"
		"Check IMAGE's metadata (opened read-only unless -r). Exit status, as\n"
		"qemu-img: 0 no problem, 1 the check could not complete, 2 corruptions\n"
		"found, 3 only leaked clusters found, 63 the format (raw) has no checks.\n"
		"\n"
		"  -f FMT          image format: qcow2 or raw (default: detected)\n"
		"  -r leaks        repair leaked clusters\n"
		"  -r all          repair leaks and errors\n"
		"  --output=FMT    human (default) or json, as qemu-img check\n"
		"  -q              print nothing but errors\n"
		"  -p              show progress on stderr (one pass: 0%% and 100%%)\n"
		UQ_KEY_HELP
		"  -h, --help      show this help\n");
}

/*
 * The check reads metadata only, but qemu-img check opens the backing
 * chain and fails where it cannot (a backing file gone, an encrypted one
 * without its key): so do we.
 */
static int backing_opens(struct uq_image *img)
{
	struct uq_image *b;
	struct qcow2_info info;
	char *path, err[512];
	int ret;

	qcow2_get_info(img->qcow2, &info);
	if (!info.backing_file)
		return 0;
	path = uq_backing_path(img->path, info.backing_file);
	if (!path) {
		uq_err("%s: out of memory", img->path);
		return -ENOMEM;
	}
	ret = uq_image_open(&b, path, info.backing_fmt,
			    UQ_OPEN_RDONLY | UQ_OPEN_CHAIN, err, sizeof(err));
	free(path);
	if (ret < 0) {
		uq_err("%s: cannot open backing file: %s", img->path, err);
		return ret;
	}
	uq_image_close(b);
	return 0;
}

/* Problems found go to stderr, one per line, as qemu-img prints them. */
static void report_line(void *opaque, const char *line)
{
	(void)opaque;
	fprintf(stderr, "%s\n", line);
}

static void print_human(const struct qcow2_check_result *r)
{
	if (!r->corruptions && !r->leaks && !r->check_errors) {
		printf("No errors were found on the image.\n");
	} else {
		if (r->corruptions)
			printf("\n%llu errors were found on the image.\n"
			       "Data may be corrupted, or further writes to the image may corrupt it.\n",
			       (unsigned long long)r->corruptions);
		if (r->leaks)
			printf("\n%llu leaked clusters were found on the image.\n"
			       "This means waste of disk space, but no harm to data.\n",
			       (unsigned long long)r->leaks);
		if (r->check_errors)
			printf("\n%llu internal errors have occurred during the check.\n",
			       (unsigned long long)r->check_errors);
	}
	if (r->total_clusters && r->allocated_clusters)
		printf("%llu/%llu = %0.2f%% allocated, %0.2f%% fragmented, %0.2f%% compressed clusters\n",
		       (unsigned long long)r->allocated_clusters,
		       (unsigned long long)r->total_clusters,
		       r->allocated_clusters * 100.0 / r->total_clusters,
		       r->fragmented_clusters * 100.0 / r->allocated_clusters,
		       r->compressed_clusters * 100.0 / r->allocated_clusters);
	if (r->image_end_offset)
		printf("Image end offset: %llu\n", (unsigned long long)r->image_end_offset);
}

/* Members in QEMU's dictionary order; zero counts are left out as it does. */
static void print_json(const struct qcow2_check_result *r, const char *filename)
{
	struct uq_json j = { .f = stdout };

	uq_json_open(&j, NULL, '{');
	if (r->image_end_offset)
		uq_json_int(&j, "image-end-offset", r->image_end_offset);
	if (r->compressed_clusters)
		uq_json_int(&j, "compressed-clusters", r->compressed_clusters);
	if (r->total_clusters)
		uq_json_int(&j, "total-clusters", r->total_clusters);
	if (r->corruptions)
		uq_json_int(&j, "corruptions", r->corruptions);
	if (r->corruptions_fixed)
		uq_json_int(&j, "corruptions-fixed", r->corruptions_fixed);
	uq_json_int(&j, "check-errors", r->check_errors);
	if (r->leaks)
		uq_json_int(&j, "leaks", r->leaks);
	if (r->leaks_fixed)
		uq_json_int(&j, "leaks-fixed", r->leaks_fixed);
	if (r->allocated_clusters)
		uq_json_int(&j, "allocated-clusters", r->allocated_clusters);
	uq_json_string(&j, "filename", filename);
	uq_json_string(&j, "format", "qcow2");
	if (r->fragmented_clusters)
		uq_json_int(&j, "fragmented-clusters", r->fragmented_clusters);
	uq_json_close(&j, '}');
}

int cmd_check(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "output", required_argument, NULL, 'O' },
		{ "help", no_argument, NULL, 'h' },
		UQ_KEY_LONGOPTS,
		{ NULL, 0, NULL, 0 },
	};
	struct qcow2_check_result res;
	const char *fmt = NULL, *path;
	struct uq_image *img;
	struct uq_progress progress = { .last = -1 };
	bool json = false, quiet = false;
	int opt, ret, fix = 0;
	char err[512];

	while ((opt = uq_getopt(argc, argv, ":f:r:qph", longopts)) != -1) {
		switch (opt) {
		case 'f':
			fmt = optarg;
			break;
		case 'r':
			if (!strcmp(optarg, "leaks")) {
				fix = QCOW2_FIX_LEAKS;
			} else if (!strcmp(optarg, "all")) {
				fix = QCOW2_FIX_LEAKS | QCOW2_FIX_ERRORS;
			} else {
				uq_err("check: -r must be leaks or all");
				return CHECK_FAILED;
			}
			break;
		case 'O':
			if (uq_parse_output("check", optarg, &json))
				return CHECK_FAILED;
			break;
		case 'q':
			quiet = true;
			break;
		case 'p':
			uq_progress_init(&progress, true);
			break;
		case UQ_OPT_FAILED:
			return 1;
		case 'h':
			check_usage();
			return 0;
		default:
			return uq_usage_error("check", argv, opt);
		}
	}
	if (argc - optind != 1)
		return uq_usage_args("check", "one IMAGE");
	if (quiet)
		progress.on = false;	/* as qemu-img: -q wins */
	path = argv[optind];
	/*
	 * With -r, the check repairs a dirty image itself rather than open doing
	 * it; with or without, NO_REPAIR lets open leave what only the check
	 * handles (a snapshot table past the end of the file). An encrypted
	 * image needs its key, as in qemu-img check, though only metadata is
	 * read.
	 */
	ret = uq_image_open(&img, path, fmt, UQ_OPEN_NO_BACKING | UQ_OPEN_NO_REPAIR |
			    (fix ? 0 : UQ_OPEN_RDONLY),
			    err, sizeof(err));
	if (ret < 0) {
		uq_err("%s", err);
		return CHECK_FAILED;
	}
	if (img->fmt != UQ_FMT_QCOW2) {
		uq_err("%s: this image format does not support checks", path);
		uq_image_close(img);
		return CHECK_UNSUPPORTED;
	}
	if (backing_opens(img) < 0) {
		uq_image_close(img);
		return CHECK_FAILED;
	}
	/* The engine's check is one pass with no progress of its own: 0% and 100%. */
	uq_progress_update(&progress, 0, 1);
	ret = qcow2_check(img->qcow2, fix, &res, report_line, NULL);
	if (ret >= 0)
		uq_progress_done(&progress);
	if (ret < 0) {
		if (qcow2_errmsg(img->qcow2)[0])
			uq_err("%s", qcow2_errmsg(img->qcow2));
		else
			uq_err("%s: check failed: %s", path, strerror(-ret));
		uq_image_close(img);
		return CHECK_FAILED;
	}
	if (!json && !quiet && (res.corruptions_fixed || res.leaks_fixed))
		printf("The following inconsistencies were found and repaired:\n\n"
		       "    %llu leaked clusters\n    %llu corruptions\n\n"
		       "Double checking the fixed image now...\n",
		       (unsigned long long)res.leaks_fixed,
		       (unsigned long long)res.corruptions_fixed);
	if (json && !quiet)
		print_json(&res, path);
	else if (!quiet)
		print_human(&res);

	ret = uq_image_close(img);
	if (res.check_errors) {
		uq_err("%s: check failed", path);
		return CHECK_FAILED;
	}
	if (ret < 0) {
		uq_err("%s: cannot close: %s", path, strerror(-ret));
		return CHECK_FAILED;
	}
	return res.corruptions ? CHECK_CORRUPT : res.leaks ? CHECK_LEAKS : CHECK_CLEAN;
}
