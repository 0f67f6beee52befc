// SPDX-License-Identifier: MIT
/*
 * Compressed clusters: the descriptor layout of a compressed L2 entry,
 * compression and decompression of one cluster (raw deflate with a 4 KiB
 * window, as QEMU's "zlib" type, or zstd). Where compressed clusters are
 * written is compressed_write.c's business.
 */
#include <zlib.h>
#include <zstd.h>
#include <zstd_errors.h>

#include "internal.h"

/**
 * qcow2_compressed_locate - where the compressed bytes of L2 entry @e lie
 *
 * Returns 0 with the host offset and byte count (at most twice the cluster
 * size), or -EIO (image marked corrupt) if they cannot be valid.
 */
int qcow2_compressed_locate(struct qcow2 *img, uint64_t e, uint64_t *off, uint32_t *len)
{
	uint32_t shift = 62 - (img->h.cluster_bits - 8);
	uint64_t sectors = ((e >> shift) & ((1ull << (img->h.cluster_bits - 8)) - 1)) + 1;

	*off = e & ((1ull << shift) - 1);
	*len = sectors * 512 - (*off & 511);
	if (*off < img->cluster_size || *off >= (1ull << 56))
		return qcow2_corrupt(img, "compressed cluster descriptor 0x%llx out of range",
				     (unsigned long long)e);
	/* Only its sector-rounded tail may lie past the end of the file. */
	if (*off >= img->file_end)
		return qcow2_corrupt(img, "compressed cluster at 0x%llx lies beyond the end of the file",
				     (unsigned long long)*off);
	return 0;
}

static int inflate_cluster(const uint8_t *src, size_t src_len, uint8_t *dst, size_t dst_len)
{
	z_stream z = { 0 };
	int ret;

	if (inflateInit2(&z, -12) != Z_OK)
		return -ENOMEM;
	z.next_in = (Bytef *)src;
	z.avail_in = src_len;
	z.next_out = dst;
	z.avail_out = dst_len;
	ret = inflate(&z, Z_FINISH);
	inflateEnd(&z);
	/* The stream may carry padding: a full cluster of output is success. */
	if ((ret == Z_STREAM_END || ret == Z_BUF_ERROR) && z.avail_out == 0)
		return 0;
	return -EIO;
}

static int zstd_cluster(const uint8_t *src, size_t src_len, uint8_t *dst, size_t dst_len)
{
	ZSTD_DCtx *dctx = ZSTD_createDCtx();
	ZSTD_outBuffer out = { dst, dst_len, 0 };
	ZSTD_inBuffer in = { src, src_len, 0 };
	size_t r = 1;

	if (!dctx)
		return -ENOMEM;
	/* QEMU writes one or more frames; stop once the cluster is full. */
	while (out.pos < out.size && in.pos < in.size) {
		r = ZSTD_decompressStream(dctx, &out, &in);
		if (ZSTD_isError(r))
			break;
		if (r == 0 && in.pos == in.size)
			break;
	}
	ZSTD_freeDCtx(dctx);
	if (ZSTD_isError(r) || out.pos != out.size)
		return -EIO;
	return 0;
}

/**
 * qcow2_decompress - decompress one cluster from @src into @dst
 *
 * @dst holds cluster_size bytes. Returns 0, or -EIO when the data does not
 * decompress to exactly one cluster.
 */
int qcow2_decompress(struct qcow2 *img, const uint8_t *src, size_t src_len, uint8_t *dst)
{
	int ret;

	if (img->h.compression_type == 1)
		ret = zstd_cluster(src, src_len, dst, img->cluster_size);
	else
		ret = inflate_cluster(src, src_len, dst, img->cluster_size);
	if (ret == -EIO)
		return qcow2_error(img, -EIO, "compressed cluster does not decompress");
	return ret;
}

/* Raw deflate, QEMU's parameters (window bits -12, memLevel 9). */
static int deflate_cluster(const uint8_t *src, size_t len, uint8_t *dst, size_t dst_len)
{
	z_stream z = { 0 };
	int ret;

	if (deflateInit2(&z, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY) != Z_OK)
		return -ENOMEM;
	z.next_in = (Bytef *)src;
	z.avail_in = len;
	z.next_out = dst;
	z.avail_out = dst_len;
	ret = deflate(&z, Z_FINISH);
	deflateEnd(&z);
	if (ret == Z_STREAM_END)
		return dst_len - z.avail_out;
	return ret == Z_OK || ret == Z_BUF_ERROR ? -ENOSPC : -EIO;
}

/* One zstd frame in one call, as QEMU writes it. */
static int zstd_compress_cluster(const uint8_t *src, size_t len, uint8_t *dst, size_t dst_len)
{
	ZSTD_CCtx *cctx = ZSTD_createCCtx();
	ZSTD_outBuffer out = { dst, dst_len, 0 };
	ZSTD_inBuffer in = { src, len, 0 };
	size_t r;

	if (!cctx)
		return -ENOMEM;
	r = ZSTD_compressStream2(cctx, &out, &in, ZSTD_e_end);
	ZSTD_freeCCtx(cctx);
	if (r == 0)
		return out.pos;
	/* Output left to flush, or no room: it does not fit. */
	if (!ZSTD_isError(r) || ZSTD_getErrorCode(r) == ZSTD_error_dstSize_tooSmall)
		return -ENOSPC;
	return -EIO;
}

/**
 * qcow2_compress - compress one cluster from @src into @dst
 *
 * Returns the compressed length (at most @dst_len), -ENOSPC when it does
 * not fit in @dst_len bytes, or -ENOMEM/-EIO with img->errmsg set.
 */
int qcow2_compress(struct qcow2 *img, const uint8_t *src, uint8_t *dst, size_t dst_len)
{
	int ret;

	if (img->h.compression_type == 1)
		ret = zstd_compress_cluster(src, img->cluster_size, dst, dst_len);
	else
		ret = deflate_cluster(src, img->cluster_size, dst, dst_len);
	if (ret < 0 && ret != -ENOSPC)
		return qcow2_error(img, ret, "cannot compress a cluster: %s", strerror(-ret));
	return ret;
}
