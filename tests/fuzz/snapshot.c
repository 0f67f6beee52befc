// SPDX-License-Identifier: MIT
/*
 * The snapshot table and snapshot L1 tables: list, then open each of the
 * first snapshots by id and read from it.
 */
#include "fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct qcow2_snapshot_info *list;
	struct qcow2 *img, *snap;
	char path[64];
	uint32_t nr, i;
	int fd = fuzz_file(data, size, path, sizeof(path));

	if (fd < 0)
		return 0;
	img = fuzz_open(path, false, NULL);
	if (img && qcow2_snapshot_list(img, &list, &nr) == 0) {
		for (i = 0; i < nr && i < 4; i++) {
			snap = fuzz_open(path, false, list[i].id);
			if (!snap)
				continue;
			fuzz_read(snap, 0, 64 << 10);
			qcow2_close(snap);
		}
		qcow2_snapshot_list_free(list, nr);
	}
	qcow2_close(img);
	close(fd);
	return 0;
}
