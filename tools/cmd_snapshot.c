// SPDX-License-Identifier: MIT
/*
 * snapshot: list, create, apply and delete internal snapshots as qemu-img
 * snapshot does, and the snapshot list that info prints (qemu-img's table
 * and JSON members).
 */
#include <errno.h>
#include <getopt.h>
#include <string.h>
#include <time.h>

#include "cmds.h"
#include "util.h"

static void snapshot_usage(void)
{
	printf(
		"usage: " UQ_PROG " snapshot [-f FMT] [-q] [-l | -c NAME | -a NAME | -d NAME] IMAGE\n"
		"\n"
		"List, create, apply or delete IMAGE's internal snapshots (qcow2 only).\n"
		"\n"
		"  -l              list the snapshots (the default)\n"
		"  -c NAME         create snapshot NAME of the current state\n"
		"  -a NAME         apply (revert to) snapshot NAME (an id or a name)\n"
		"  -d NAME         delete snapshot NAME (a name or an id)\n"
		"  -f FMT          image format: qcow2 (default: detected)\n"
		"  -q              quiet\n"
		UQ_KEY_HELP
		"  -h, --help      show this help\n");
}

void uq_snapshot_print(const struct qcow2_snapshot_info *list, uint32_t nr)
{
	uint32_t i;

	printf("%-10s%-17s%8s%20s%13s%11s\n", "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK",
	       "ICOUNT");
	for (i = 0; i < nr; i++) {
		const struct qcow2_snapshot_info *sn = &list[i];
		uint64_t secs = sn->vm_clock_nsec / 1000000000;
		char date[64], clock[64], size[32], icount[32] = "";
		time_t t = sn->date_sec;
		struct tm tm;

		localtime_r(&t, &tm);
		strftime(date, sizeof(date), "%Y-%m-%d %H:%M:%S", &tm);
		snprintf(clock, sizeof(clock), "%02d:%02d:%02d.%03d", (int)(secs / 3600),
			 (int)((secs / 60) % 60), (int)(secs % 60),
			 (int)((sn->vm_clock_nsec / 1000000) % 1000));
		uq_size_str(sn->vm_state_size, size, sizeof(size));
		if (sn->icount != UINT64_MAX)
			snprintf(icount, sizeof(icount), "%lld", (long long)sn->icount);
		printf("%-9s %-16s %8s%20s%13s%11s\n", sn->id, sn->name, size, date, clock, icount);
	}
}

void uq_snapshot_json(struct uq_json *j, const struct qcow2_snapshot_info *list, uint32_t nr)
{
	uint32_t i;

	uq_json_open(j, "snapshots", '[');
	for (i = 0; i < nr; i++) {
		const struct qcow2_snapshot_info *sn = &list[i];

		/* Members in the order qemu-img prints them. */
		uq_json_open(j, NULL, '{');
		if (sn->icount != UINT64_MAX)
			uq_json_int(j, "icount", sn->icount);
		uq_json_int(j, "vm-clock-nsec", sn->vm_clock_nsec % 1000000000);
		uq_json_string(j, "name", sn->name);
		uq_json_int(j, "date-sec", sn->date_sec);
		uq_json_int(j, "date-nsec", sn->date_nsec);
		uq_json_int(j, "vm-clock-sec", sn->vm_clock_nsec / 1000000000);
		uq_json_string(j, "id", sn->id);
		uq_json_int(j, "vm-state-size", sn->vm_state_size);
		uq_json_close(j, '}');
	}
	uq_json_close(j, ']');
}

/*
 * As qemu-img (7.2): a snapshot of another disk size is loaded after the
 * active state is resized to that size, what lies beyond it dropped.
 */
static int snapshot_apply(struct qcow2 *q, const char *id_or_name)
{
	struct qcow2_snapshot_info *list;
	struct qcow2_info info;
	uint32_t nr, i, k = UINT32_MAX;
	int ret;

	/* A snapshot apply would refuse must not cost the image its resize. */
	ret = qcow2_snapshot_check(q, id_or_name);
	if (ret < 0)
		return ret;
	ret = qcow2_snapshot_list(q, &list, &nr);
	if (ret < 0)
		return ret;
	/* The engine's lookup: an id first, then a name. */
	for (i = 0; i < nr && k == UINT32_MAX; i++)
		if (!strcmp(list[i].id, id_or_name))
			k = i;
	for (i = 0; i < nr && k == UINT32_MAX; i++)
		if (!strcmp(list[i].name, id_or_name))
			k = i;
	qcow2_get_info(q, &info);
	if (k != UINT32_MAX && list[k].disk_size != info.virtual_size)
		ret = qcow2_resize(q, list[k].disk_size);
	qcow2_snapshot_list_free(list, nr);
	if (ret < 0)
		return ret;
	return qcow2_snapshot_apply(q, id_or_name);
}

int cmd_snapshot(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "help", no_argument, NULL, 'h' },
		UQ_KEY_LONGOPTS,
		{ NULL, 0, NULL, 0 },
	};
	struct qcow2_snapshot_info *list;
	const char *fmt = NULL, *name = NULL;
	struct uq_image *img;
	char action = 0, err[512];
	int opt, ret, status = 1;
	uint32_t nr;

	while ((opt = uq_getopt(argc, argv, ":f:lc:a:d:qh", longopts)) != -1) {
		switch (opt) {
		case 'f':
			fmt = optarg;
			break;
		case 'l':
		case 'c':
		case 'a':
		case 'd':
			if (action) {
				uq_err("snapshot: use only one of -l, -c, -a, -d");
				return 1;
			}
			action = opt;
			name = optarg;
			break;
		case 'q':
			break;
		case UQ_OPT_FAILED:
			return 1;
		case 'h':
			snapshot_usage();
			return 0;
		default:
			return uq_usage_error("snapshot", argv, opt);
		}
	}
	if (argc - optind != 1)
		return uq_usage_args("snapshot", "one IMAGE");
	if (!action)
		action = 'l';
	/*
	 * As qemu-img: an encrypted image opens only with its key, metadata
	 * edits too, and the backing chain must open (a missing backing file
	 * is an error for every command but info).
	 */
	ret = uq_image_open(&img, argv[optind], fmt, action == 'l' ? UQ_OPEN_RDONLY : 0,
			    err, sizeof(err));
	if (ret < 0) {
		uq_err("%s", err);
		return 1;
	}
	if (img->fmt != UQ_FMT_QCOW2) {
		/* As qemu-img: an empty list, but no changes. */
		if (action == 'l')
			status = 0;
		else
			uq_err("%s: raw images have no snapshots", argv[optind]);
		goto out;
	}
	switch (action) {
	case 'l':
		ret = qcow2_snapshot_list(img->qcow2, &list, &nr);
		if (ret < 0)
			break;
		if (nr) {
			printf("Snapshot list:\n");
			uq_snapshot_print(list, nr);
		}
		qcow2_snapshot_list_free(list, nr);
		break;
	case 'c':
		ret = qcow2_snapshot_create(img->qcow2, name);
		break;
	case 'a':
		ret = snapshot_apply(img->qcow2, name);
		break;
	default:
		ret = qcow2_snapshot_delete(img->qcow2, name);
		break;
	}
	if (ret < 0)
		uq_err("%s", qcow2_errmsg(img->qcow2));
	else
		status = 0;
out:
	ret = uq_image_close(img);
	if (ret < 0 && !status) {
		uq_err("%s: cannot write back: %s", argv[optind], strerror(-ret));
		status = 1;
	}
	return status;
}
