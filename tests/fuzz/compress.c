// SPDX-License-Identifier: MIT
/*
 * Compressed-cluster decoding, zlib and zstd, at every cluster size: the
 * first byte picks both, the rest is the compressed stream. Then a round
 * trip: the input compressed by the engine must decompress to itself.
 */
#include <string.h>

#include "fuzz.h"
#include "internal.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static uint8_t dst[1u << QCOW2_MAX_CLUSTER_BITS], src[1u << QCOW2_MAX_CLUSTER_BITS];
	static uint8_t packed[1u << QCOW2_MAX_CLUSTER_BITS], back[1u << QCOW2_MAX_CLUSTER_BITS];
	struct qcow2 img;
	size_t n;
	int len;

	if (size < 1)
		return 0;
	memset(&img, 0, sizeof(img));
	img.h.cluster_bits = QCOW2_MIN_CLUSTER_BITS +
			     (data[0] & 0x0f) % (QCOW2_MAX_CLUSTER_BITS - QCOW2_MIN_CLUSTER_BITS + 1);
	img.h.compression_type = (data[0] >> 4) & 1;
	img.cluster_size = 1u << img.h.cluster_bits;
	qcow2_decompress(&img, data + 1, size - 1, dst);

	n = size - 1 < img.cluster_size ? size - 1 : img.cluster_size;
	memset(src, 0, img.cluster_size);
	memcpy(src, data + 1, n);
	len = qcow2_compress(&img, src, packed, img.cluster_size);
	if (len > 0) {
		if (qcow2_decompress(&img, packed, len, back) < 0 ||
		    memcmp(back, src, img.cluster_size)) {
			fprintf(stderr, "fuzz_compress: round trip lost data (%u-byte cluster, type %u)\n",
				img.cluster_size, img.h.compression_type);
			abort();
		}
	}
	return 0;
}
