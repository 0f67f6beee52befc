// SPDX-License-Identifier: MIT
/*
 * The L1/L2/refcount walks: check (every table, every refcount), map and
 * reads at the start, middle and end of the disk (compressed clusters
 * decoded on the way).
 */
#include "fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct qcow2_check_result res;
	struct qcow2_extent ext;
	struct qcow2_info info;
	struct qcow2 *img;
	uint64_t off = 0;
	char path[64];
	int i, fd = fuzz_file(data, size, path, sizeof(path));

	if (fd < 0)
		return 0;
	img = fuzz_open(path, false, NULL);
	if (img) {
		qcow2_get_info(img, &info);
		qcow2_check(img, 0, &res, NULL, NULL);
		for (i = 0; i < 16 && off < info.virtual_size; i++) {
			if (qcow2_map(img, off, info.virtual_size - off, &ext) < 0 || !ext.len)
				break;
			off += ext.len;
		}
		fuzz_read(img, 0, FUZZ_IO_MAX);
		fuzz_read(img, info.virtual_size / 2, 64 << 10);
		fuzz_read(img, info.virtual_size > (64 << 10) ? info.virtual_size - (64 << 10) : 0,
			  64 << 10);
		qcow2_close(img);
	}
	close(fd);
	return 0;
}
