// SPDX-License-Identifier: MIT
/*
 * The header cluster: the one place that parses and writes the qcow2 header
 * and its extensions. Every field read from the image is validated here
 * before the rest of the engine sees it.
 */
#include <stdio.h>
#include <stdlib.h>

#include "internal.h"

/* Header field offsets (bytes), docs/interop/qcow2.rst. */
enum {
	H_MAGIC = 0, H_VERSION = 4, H_BACKING_OFF = 8, H_BACKING_SIZE = 16,
	H_CLUSTER_BITS = 20, H_SIZE = 24, H_CRYPT = 32, H_L1_SIZE = 36,
	H_L1_OFF = 40, H_RT_OFF = 48, H_RT_CLUSTERS = 56, H_NB_SNAP = 60,
	H_SNAP_OFF = 64, H_INCOMPAT = 72, H_COMPAT = 80, H_AUTOCLEAR = 88,
	H_RC_ORDER = 96, H_HDR_LEN = 100, H_COMPRESSION = 104,
};

#define KNOWN_INCOMPAT (QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT | \
			QCOW2_INCOMPAT_DATA_FILE | QCOW2_INCOMPAT_COMPRESSION | \
			QCOW2_INCOMPAT_EXTL2)

/* Name of incompatible bit @bit from the image's feature table, else NULL. */
static void feature_name(const uint8_t *table, uint32_t len, int bit, char *out, size_t outlen)
{
	uint32_t i;

	for (i = 0; i + 48 <= len; i += 48) {
		if (table[i] == 0 && table[i + 1] == bit) {
			snprintf(out, outlen, "%.46s", (const char *)table + i + 2);
			return;
		}
	}
	snprintf(out, outlen, "unknown feature bit %d", bit);
}

static int refuse_unknown_features(struct qcow2 *img, uint64_t unknown,
				   const uint8_t *table, uint32_t table_len)
{
	char names[256] = "", one[64];
	size_t used = 0;
	int bit;

	for (bit = 0; bit < 64; bit++) {
		if (!(unknown & (1ull << bit)))
			continue;
		feature_name(table, table_len, bit, one, sizeof(one));
		used += snprintf(names + used, sizeof(names) - used, "%s%s",
				 used ? ", " : "", one);
		if (used >= sizeof(names))
			break;
	}
	return qcow2_error(img, -ENOTSUP, "unsupported incompatible feature(s): %s", names);
}

static int table_check(struct qcow2 *img, const char *what, uint64_t off,
		       uint64_t bytes, uint64_t file_size)
{
	if (off & (img->cluster_size - 1))
		return qcow2_error(img, -EINVAL, "%s offset 0x%llx is not cluster aligned",
				   what, (unsigned long long)off);
	if (bytes && (off > file_size || bytes > file_size - off))
		return qcow2_error(img, -EINVAL,
				   "%s (0x%llx, %llu bytes) lies beyond the end of the file",
				   what, (unsigned long long)off, (unsigned long long)bytes);
	return 0;
}

static char *strndup_checked(const uint8_t *p, size_t n)
{
	char *s = malloc(n + 1);

	if (s) {
		memcpy(s, p, n);
		s[n] = '\0';
	}
	return s;
}

static int keep_ext(struct qcow2 *img, const uint8_t *ext, uint32_t bytes)
{
	uint8_t *n = realloc(img->unknown_exts, img->unknown_exts_len + bytes);

	if (!n)
		return -ENOMEM;
	memcpy(n + img->unknown_exts_len, ext, bytes);
	img->unknown_exts = n;
	img->unknown_exts_len += bytes;
	return 0;
}

/* Walk the extensions in [@start, @end); fills img fields, keeps the rest. */
static int parse_extensions(struct qcow2 *img, const uint8_t *buf, size_t start, size_t end,
			    const uint8_t **ftable, uint32_t *ftable_len)
{
	size_t off = start;

	while (off + 8 <= end) {
		uint32_t type = get_be32(buf + off);
		uint32_t len = get_be32(buf + off + 4);
		uint64_t padded = ((uint64_t)len + 7) & ~7ull;
		const uint8_t *data = buf + off + 8;

		if (type == QCOW2_EXT_END)
			return 0;
		if (padded > end - off - 8)
			return qcow2_error(img, -EINVAL,
					   "header extension 0x%08x (%u bytes) runs past the header cluster",
					   type, len);
		switch (type) {
		case QCOW2_EXT_BACKING_FMT:
			if (len > 16)
				return qcow2_error(img, -EINVAL, "backing format name too long");
			free(img->backing_fmt);
			img->backing_fmt = strndup_checked(data, len);
			if (!img->backing_fmt)
				return -ENOMEM;
			break;
		case QCOW2_EXT_DATA_FILE:
			if (len > QCOW2_MAX_BACKING_NAME)
				return qcow2_error(img, -EINVAL, "data file name too long");
			free(img->data_file);
			img->data_file = strndup_checked(data, len);
			if (!img->data_file)
				return -ENOMEM;
			break;
		case QCOW2_EXT_CRYPTO:
			if (len != 16)
				return qcow2_error(img, -EINVAL, "encryption header extension "
						   "has %u bytes, not 16", len);
			img->crypt_hdr_off = get_be64(data);
			img->crypt_hdr_len = get_be64(data + 8);
			/* kept verbatim */
			if (keep_ext(img, buf + off, 8 + padded) < 0)
				return -ENOMEM;
			break;
		case QCOW2_EXT_FEATURE_TABLE:
			*ftable = data;
			*ftable_len = len;
			/* kept verbatim */
			__attribute__((fallthrough));
		default:
			if (keep_ext(img, buf + off, 8 + padded) < 0)
				return -ENOMEM;
			break;
		}
		off += 8 + padded;
	}
	return 0;
}

/**
 * qcow2_header_parse - validate the header cluster and fill @img
 *
 * Returns 0, or -EINVAL/-ENOTSUP/-ENOMEM with img->errmsg naming the problem.
 */
int qcow2_header_parse(struct qcow2 *img, const uint8_t *buf, size_t len, uint64_t file_size)
{
	struct qcow2_header *h = &img->h;
	const uint8_t *ftable = NULL;
	uint32_t ftable_len = 0;
	uint64_t l2_span, need_l1, ext_end;
	size_t hdr_len;
	int ret;

	if (len < QCOW2_V2_HEADER_LEN)
		return qcow2_error(img, -EINVAL, "file too short for a qcow2 header (%zu bytes)", len);
	if (get_be32(buf + H_MAGIC) != QCOW2_MAGIC)
		return qcow2_error(img, -EINVAL, "not a qcow2 image (bad magic)");
	h->version = get_be32(buf + H_VERSION);
	if (h->version != 2 && h->version != 3)
		return qcow2_error(img, -ENOTSUP, "unsupported qcow2 version %u", h->version);
	h->backing_file_offset = get_be64(buf + H_BACKING_OFF);
	h->backing_file_size = get_be32(buf + H_BACKING_SIZE);
	h->cluster_bits = get_be32(buf + H_CLUSTER_BITS);
	h->size = get_be64(buf + H_SIZE);
	h->crypt_method = get_be32(buf + H_CRYPT);
	h->l1_size = get_be32(buf + H_L1_SIZE);
	h->l1_table_offset = get_be64(buf + H_L1_OFF);
	h->refcount_table_offset = get_be64(buf + H_RT_OFF);
	h->refcount_table_clusters = get_be32(buf + H_RT_CLUSTERS);
	h->nb_snapshots = get_be32(buf + H_NB_SNAP);
	h->snapshots_offset = get_be64(buf + H_SNAP_OFF);
	if (h->cluster_bits < QCOW2_MIN_CLUSTER_BITS || h->cluster_bits > QCOW2_MAX_CLUSTER_BITS)
		return qcow2_error(img, -EINVAL, "cluster_bits %u out of range (%d..%d)",
				   h->cluster_bits, QCOW2_MIN_CLUSTER_BITS, QCOW2_MAX_CLUSTER_BITS);
	img->cluster_size = 1u << h->cluster_bits;

	if (h->version == 2) {
		h->incompatible = h->compatible = h->autoclear = 0;
		h->refcount_order = 4;
		h->header_length = QCOW2_V2_HEADER_LEN;
		h->compression_type = 0;
	} else {
		if (len < QCOW2_V3_HEADER_LEN)
			return qcow2_error(img, -EINVAL, "file too short for a qcow2 v3 header");
		h->incompatible = get_be64(buf + H_INCOMPAT);
		h->compatible = get_be64(buf + H_COMPAT);
		h->autoclear = get_be64(buf + H_AUTOCLEAR);
		h->refcount_order = get_be32(buf + H_RC_ORDER);
		h->header_length = get_be32(buf + H_HDR_LEN);
		if (h->header_length < QCOW2_V3_HEADER_LEN || h->header_length % 8 ||
		    h->header_length > img->cluster_size || h->header_length > len)
			return qcow2_error(img, -EINVAL, "invalid header length %u", h->header_length);
		h->compression_type = h->header_length > H_COMPRESSION ? buf[H_COMPRESSION] : 0;
	}
	hdr_len = h->header_length;

	ext_end = len < img->cluster_size ? len : img->cluster_size;
	/* An empty name is no backing file, as for QEMU. */
	if (h->backing_file_offset && h->backing_file_size) {
		/* No offset + size: a huge offset from the image would wrap it. */
		if (h->backing_file_size > QCOW2_MAX_BACKING_NAME ||
		    h->backing_file_offset < hdr_len || h->backing_file_offset > ext_end ||
		    h->backing_file_size > ext_end - h->backing_file_offset)
			return qcow2_error(img, -EINVAL,
					   "backing file name (offset %llu, %u bytes) lies outside the header cluster",
					   (unsigned long long)h->backing_file_offset,
					   h->backing_file_size);
		img->backing_file = strndup_checked(buf + h->backing_file_offset,
						    h->backing_file_size);
		if (!img->backing_file)
			return -ENOMEM;
		ext_end = h->backing_file_offset;
	}
	ret = parse_extensions(img, buf, hdr_len, ext_end, &ftable, &ftable_len);
	if (ret < 0)
		return ret;

	if (h->incompatible & ~KNOWN_INCOMPAT)
		return refuse_unknown_features(img, h->incompatible & ~KNOWN_INCOMPAT,
					       ftable, ftable_len);
	/* Metadata only (info): as qemu-img info, shown whatever the data file. */
	if ((h->autoclear & QCOW2_AUTOCLEAR_DATA_FILE_RAW) &&
	    !(h->incompatible & QCOW2_INCOMPAT_DATA_FILE) && !img->no_data_file)
		return qcow2_error(img, -EINVAL, "data_file_raw set without an external data file");
	if ((h->incompatible & QCOW2_INCOMPAT_DATA_FILE) && !img->data_file && !img->no_data_file)
		return qcow2_error(img, -EINVAL, "external data file used but not named");
	img->data_raw = h->autoclear & QCOW2_AUTOCLEAR_DATA_FILE_RAW;
	/* 32 subclusters of at least 512 bytes each. */
	if ((h->incompatible & QCOW2_INCOMPAT_EXTL2) && h->cluster_bits < 14)
		return qcow2_error(img, -EINVAL, "extended L2 entries need clusters of 16 KiB or more");
	if (!!(h->incompatible & QCOW2_INCOMPAT_COMPRESSION) != (h->compression_type != 0) ||
	    h->compression_type > 1)
		return qcow2_error(img, -EINVAL, "invalid compression type %u", h->compression_type);
	if (h->refcount_order > 6)
		return qcow2_error(img, -EINVAL, "refcount_order %u out of range (0..6)",
				   h->refcount_order);
	if (img->crypt_hdr_off && h->crypt_method != 2)
		return qcow2_error(img, -EINVAL,
				   "encryption header extension without LUKS encryption");
	if (h->crypt_method > 2)
		return qcow2_error(img, -ENOTSUP, "unknown encryption method %u", h->crypt_method);
	if (h->crypt_method == 2) {
		if (!img->crypt_hdr_len || !img->crypt_hdr_off)
			return qcow2_error(img, -EINVAL,
					   "LUKS encrypted image without an encryption header");
		/* A LUKS1 header (592 bytes) at least, within what QEMU makes (~2 MiB). */
		if (img->crypt_hdr_len < 592 || img->crypt_hdr_len > (64u << 20))
			return qcow2_error(img, -EINVAL,
					   "encryption header length %llu out of range",
					   (unsigned long long)img->crypt_hdr_len);
		ret = table_check(img, "encryption header", img->crypt_hdr_off,
				  img->crypt_hdr_len, file_size);
		if (ret < 0)
			return ret;
	}

	img->refcount_bits = 1u << h->refcount_order;
	img->refcount_max = img->refcount_bits == 64 ? UINT64_MAX :
			    (1ull << img->refcount_bits) - 1;
	if (h->incompatible & QCOW2_INCOMPAT_EXTL2) {
		img->l2_entry_bytes = 16;
		img->l2_bits = h->cluster_bits - 4;
		img->unit_bits = h->cluster_bits - 5;
	} else {
		img->l2_entry_bytes = 8;
		img->l2_bits = h->cluster_bits - 3;
		img->unit_bits = h->cluster_bits;
	}
	img->rb_bits = h->cluster_bits + 3 - h->refcount_order;

	/* QEMU counts whole 512-byte sectors and drops a partial last one
	 * (and writes the size back so): reads and convert agree with it. */
	h->size &= ~511ull;
	l2_span = qcow2_l2_span(img);
	if (h->size > (1ull << 62))
		return qcow2_error(img, -EINVAL, "virtual size %llu is too large",
				   (unsigned long long)h->size);
	need_l1 = (h->size + l2_span - 1) / l2_span;
	if ((uint64_t)h->l1_size * 8 > QCOW2_MAX_L1_BYTES)
		return qcow2_error(img, -EFBIG, "L1 table too large (%u entries)", h->l1_size);
	if (h->l1_size < need_l1)
		return qcow2_error(img, -EINVAL, "L1 table too small (%u entries) for %llu bytes",
				   h->l1_size, (unsigned long long)h->size);
	ret = table_check(img, "L1 table", h->l1_table_offset, (uint64_t)h->l1_size * 8, file_size);
	if (ret < 0)
		return ret;
	if (!h->refcount_table_clusters ||
	    (uint64_t)h->refcount_table_clusters * img->cluster_size > QCOW2_MAX_REFTABLE_BYTES)
		return qcow2_error(img, -EFBIG, "refcount table size invalid (%u clusters)",
				   h->refcount_table_clusters);
	ret = table_check(img, "refcount table", h->refcount_table_offset,
			  (uint64_t)h->refcount_table_clusters * img->cluster_size, file_size);
	if (ret < 0)
		return ret;
	if (h->nb_snapshots > 65536)
		return qcow2_error(img, -EINVAL, "too many snapshots (%u)", h->nb_snapshots);
	if (h->nb_snapshots) {
		ret = table_check(img, "snapshot table", h->snapshots_offset, 0, file_size);
		if (ret < 0)
			return ret;
		/*
		 * QEMU reads a table past the end of the file as zeros, which
		 * its check reports and repairs: qcow2_open refuses it unless
		 * opened for the check.
		 */
		img->snaps_past_eof = h->snapshots_offset >= file_size;
	}
	return 0;
}

/**
 * qcow2_header_serialize - lay out the header cluster from @img
 *
 * Returns the bytes used, or -ENOSPC if header, extensions and backing
 * file name do not fit in @len bytes.
 */
int qcow2_header_serialize(const struct qcow2 *img, uint8_t *buf, size_t len)
{
	const struct qcow2_header *h = &img->h;
	size_t need = h->header_length + img->unknown_exts_len + 8 +
		      (img->backing_fmt ? 8 + ((strlen(img->backing_fmt) + 7) & ~7ul) : 0) +
		      (img->data_file ? 8 + ((strlen(img->data_file) + 7) & ~7ul) : 0) +
		      (img->backing_file ? strlen(img->backing_file) : 0);
	uint32_t off;

	if (need > len)
		return -ENOSPC;
	memset(buf, 0, need);
	put_be32(buf + H_MAGIC, QCOW2_MAGIC);
	put_be32(buf + H_VERSION, h->version);
	put_be32(buf + H_CLUSTER_BITS, h->cluster_bits);
	put_be64(buf + H_SIZE, h->size);
	put_be32(buf + H_CRYPT, h->crypt_method);
	put_be32(buf + H_L1_SIZE, h->l1_size);
	put_be64(buf + H_L1_OFF, h->l1_table_offset);
	put_be64(buf + H_RT_OFF, h->refcount_table_offset);
	put_be32(buf + H_RT_CLUSTERS, h->refcount_table_clusters);
	put_be32(buf + H_NB_SNAP, h->nb_snapshots);
	put_be64(buf + H_SNAP_OFF, h->snapshots_offset);
	if (h->version >= 3) {
		put_be64(buf + H_INCOMPAT, h->incompatible);
		put_be64(buf + H_COMPAT, h->compatible);
		put_be64(buf + H_AUTOCLEAR, h->autoclear);
		put_be32(buf + H_RC_ORDER, h->refcount_order);
		put_be32(buf + H_HDR_LEN, h->header_length);
		if (h->header_length > H_COMPRESSION)
			buf[H_COMPRESSION] = h->compression_type;
	}
	off = h->header_length;
	if (img->backing_fmt)
		off = qcow2_put_ext(buf, off, QCOW2_EXT_BACKING_FMT, img->backing_fmt,
			      strlen(img->backing_fmt));
	if (img->data_file)
		off = qcow2_put_ext(buf, off, QCOW2_EXT_DATA_FILE, img->data_file,
			      strlen(img->data_file));
	if (img->unknown_exts_len)
		memcpy(buf + off, img->unknown_exts, img->unknown_exts_len);
	off += img->unknown_exts_len;
	put_be32(buf + off, QCOW2_EXT_END);
	put_be32(buf + off + 4, 0);
	off += 8;
	if (img->backing_file) {
		size_t n = strlen(img->backing_file);

		put_be64(buf + H_BACKING_OFF, off);
		put_be32(buf + H_BACKING_SIZE, n);
		memcpy(buf + off, img->backing_file, n);
		off += n;
	}
	return off;
}
