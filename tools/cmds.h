/* SPDX-License-Identifier: MIT */
/*
 * The subcommands of the ublk-qcow2 binary, and what create shares with
 * convert: turning "-o" lists into creation options and creating an image.
 */
#ifndef UQ_CMDS_H
#define UQ_CMDS_H

#include "image.h"

/* Each takes the subcommand's argv (argv[0] is its name); returns the exit status. */
int cmd_create(int argc, char **argv);
int cmd_info(int argc, char **argv);
int cmd_check(int argc, char **argv);
int cmd_map(int argc, char **argv);
int cmd_convert(int argc, char **argv);
int cmd_io(int argc, char **argv);
int cmd_add(int argc, char **argv);
int cmd_del(int argc, char **argv);
int cmd_list(int argc, char **argv);
int cmd_features(int argc, char **argv);
int cmd_snapshot(int argc, char **argv);
int cmd_bench(int argc, char **argv);

struct uq_json;

/* The snapshot list as qemu-img prints it: the table (after "Snapshot list:"), and JSON. */
void uq_snapshot_print(const struct qcow2_snapshot_info *list, uint32_t nr);
void uq_snapshot_json(struct uq_json *j, const struct qcow2_snapshot_info *list, uint32_t nr);
int cmd_rebase(int argc, char **argv);
int cmd_commit(int argc, char **argv);
int cmd_resize(int argc, char **argv);
int cmd_recover(int argc, char **argv);

struct uq_create {
	enum uq_fmt fmt;
	struct qcow2_create_opts o;
	bool size_set;
	const char *qcow2_only;		/* first qcow2-only option seen, for raw's error */
	struct qcow2_encrypt_opts enc;	/* -o encrypt.*; o.encrypt points here when used */
	const char *key_secret;		/* encrypt.key-secret=ID */
};

/*
 * Apply an "-o a=b,c=d" list (modified in place) to @c; "help" lists the
 * options. 0, 1 (help printed) or -EINVAL with one error line naming
 * @path printed.
 */
int uq_create_parse(struct uq_create *c, const char *path, char *list);

/*
 * Create @path as described by @c (size rounded up to 512 bytes, as QEMU
 * does). 0 or -errno with one error line printed; a file this call created
 * is removed on failure.
 */
int uq_create_image(const char *path, struct uq_create *c);

/*
 * A throw-away qcow2 overlay over @image (format @fmt, NULL: detected),
 * created in $TMPDIR (default /var/tmp) and unlinked at once: it lives as
 * long as the descriptor in *@fd, and @path (@pathlen bytes) gets a name
 * that opens it ("/proc/self/fd/N"). Its backing file is @image's absolute
 * path, opened read-only: writes go to the overlay only. 0 or -errno with
 * one line naming @image in @err.
 */
int uq_overlay_create(const char *image, const char *fmt, int *fd, char *path,
		      size_t pathlen, char *err, size_t errlen);

#endif
