// SPDX-License-Identifier: MIT
/* Batched, parallel qemu-img check of image copies (qcheck.h). */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "qcheck.h"

void qcheck_init(struct qcheck *q, const char *dir)
{
	memset(q, 0, sizeof(*q));
	snprintf(q->dir, sizeof(q->dir), "%s", dir);
}

static int copy_file(const char *from, const char *to)
{
	int in = open(from, O_RDONLY), out = -1, ret = -1;
	struct stat st;
	char *buf = NULL;

	if (in < 0 || fstat(in, &st) < 0)
		goto out;
	buf = malloc(st.st_size ? st.st_size : 1);
	out = open(to, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (!buf || out < 0 || pread(in, buf, st.st_size, 0) != st.st_size ||
	    pwrite(out, buf, st.st_size, 0) != st.st_size)
		goto out;
	ret = 0;
out:
	free(buf);
	if (in >= 0)
		close(in);
	if (out >= 0)
		close(out);
	return ret;
}

int qcheck_add(struct qcheck *q, const char *image, const char *label, char *msg, size_t len)
{
	char to[300];

	snprintf(to, sizeof(to), "%s/qcheck-%u.qcow2", q->dir, q->n);
	if (copy_file(image, to) < 0) {
		snprintf(msg, len, "%s: cannot copy %s for qemu-img check", label, image);
		return -1;
	}
	snprintf(q->label[q->n], sizeof(q->label[0]), "%s", label);
	if (++q->n == QCHECK_BATCH)
		return qcheck_flush(q, msg, len);
	return 0;
}

int qcheck_flush(struct qcheck *q, char *msg, size_t len)
{
	char cmd[600], path[300];
	unsigned int i;
	int ret = 0;

	if (!q->n)
		return 0;
	snprintf(cmd, sizeof(cmd),
		 "cd %s && for i in $(seq 0 %u); do (qemu-img check -q qcheck-$i.qcow2 "
		 ">/dev/null 2>&1; echo $? > qcheck-$i.rc) & done; wait",
		 q->dir, q->n - 1);
	if (system(cmd) != 0) {
		snprintf(msg, len, "cannot run: %s", cmd);
		return -1;
	}
	for (i = 0; i < q->n; i++) {
		FILE *f;
		int rc = -1;

		snprintf(path, sizeof(path), "%s/qcheck-%u.rc", q->dir, i);
		f = fopen(path, "r");
		if (!f || fscanf(f, "%d", &rc) != 1)
			rc = -1;
		if (f)
			fclose(f);
		unlink(path);
		snprintf(path, sizeof(path), "%s/qcheck-%u.qcow2", q->dir, i);
		if (rc == 0 || rc == 3) {
			/* 0: clean; 3: leaked clusters only. */
			unlink(path);
			q->checked++;
		} else if (!ret) {
			char kept[320];

			snprintf(kept, sizeof(kept), "%s.failed-%u", path, q->seq++);
			rename(path, kept);
			snprintf(msg, len, "%s: qemu-img check exits %d on %s", q->label[i], rc,
				 kept);
			ret = -1;
		} else {
			unlink(path);
		}
	}
	q->n = 0;
	return ret;
}
