// SPDX-License-Identifier: MIT
/*
 * Header and header extensions, the snapshot table (validated at open) and
 * the LUKS header (parsed without a key): open, describe, close.
 */
#include "fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct qcow2_snapshot_info *list;
	struct qcow2_crypt_info ci;
	struct qcow2_info info;
	struct qcow2 *img;
	char path[64];
	uint32_t nr;
	int fd = fuzz_file(data, size, path, sizeof(path));

	if (fd < 0)
		return 0;
	img = fuzz_open(path, false, NULL);
	if (img) {
		qcow2_get_info(img, &info);
		qcow2_get_crypt_info(img, &ci);
		if (qcow2_snapshot_list(img, &list, &nr) == 0)
			qcow2_snapshot_list_free(list, nr);
		qcow2_close(img);
	}
	close(fd);
	return 0;
}
