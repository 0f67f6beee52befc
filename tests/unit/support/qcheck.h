/* SPDX-License-Identifier: MIT */
/*
 * qemu-img check on many images, in parallel batches: each run costs a
 * fraction of a second of start-up latency and little CPU, so the tests
 * queue copies of the images to judge and check them QCHECK_BATCH at a time.
 */
#ifndef UQ_TEST_QCHECK_H
#define UQ_TEST_QCHECK_H

#include <stddef.h>
#include <stdint.h>

#define QCHECK_BATCH	16

struct qcheck {
	char dir[200];
	unsigned int n;
	unsigned int seq;
	char label[QCHECK_BATCH][160];
	uint64_t checked;
};

void qcheck_init(struct qcheck *q, const char *dir);
/*
 * Queue a copy of @image (labelled @label in failure messages); a full
 * queue is checked at once. 0, or -1 with @msg set when qemu-img check
 * found corruption (exit status other than 0 or 3, "leaks only") or the
 * copy failed; the failing copy is kept and named in @msg.
 */
int qcheck_add(struct qcheck *q, const char *image, const char *label, char *msg, size_t len);
/* Check what is queued. 0 or -1 with @msg, as above. */
int qcheck_flush(struct qcheck *q, char *msg, size_t len);

#endif
