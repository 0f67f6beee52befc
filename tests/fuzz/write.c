// SPDX-License-Identifier: MIT
/*
 * Writes into a hostile image: a dirty image is repaired at open, then
 * allocating writes, write-zeroes, a discard and flushes run against
 * whatever the tables claim; the overlap checks must stop anything that
 * would land on metadata, and nothing may crash or leak.
 */
#include <string.h>

#include "fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static uint8_t buf[64 << 10];
	struct qcow2_info info;
	struct qcow2 *img;
	char path[64];
	uint64_t v;
	int fd = fuzz_file(data, size, path, sizeof(path));

	if (fd < 0)
		return 0;
	img = fuzz_open(path, true, NULL);
	if (img) {
		qcow2_get_info(img, &info);
		v = info.virtual_size & ~511ull;
		memset(buf, 0x5a, sizeof(buf));
		if (v >= sizeof(buf)) {
			qcow2_pwrite(img, buf, 4096, 0);
			qcow2_pwrite(img, buf, sizeof(buf), (v / 2) & ~511ull);
			qcow2_write_zeroes(img, 8192, (v / 3) & ~511ull, v & 1);
			qcow2_flush(img);
			qcow2_discard(img, sizeof(buf), 0);
			qcow2_pwrite(img, buf, 512, v - 512);
		}
		qcow2_close(img);
	}
	close(fd);
	return 0;
}
