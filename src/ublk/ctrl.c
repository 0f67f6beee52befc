// SPDX-License-Identifier: MIT
/*
 * The control device /dev/ublk-control: one synchronous URING_CMD at a time
 * on a private SQE128 ring. Opcodes are tried ioctl-encoded first (6.4+) and
 * then as the legacy numbers (6.1 knows only those); the first answer that
 * is not "unknown command" fixes the encoding for the rest of the handle.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

#ifndef ENOTSUPP
#define ENOTSUPP	524	/* the kernel's internal "unknown command" */
#endif

enum ctrl_enc {
	ENC_UNKNOWN,
	ENC_IOCTL,
	ENC_LEGACY,
};

struct ublk_ctrl {
	int fd;
	struct io_uring ring;
	enum ctrl_enc enc;
};

static void (*log_fn)(const char *line);

void ublk_set_log(void (*fn)(const char *line))
{
	log_fn = fn;
}

void ublk_log(const char *fmt, ...)
{
	char line[512];
	va_list ap;
	int n;

	n = snprintf(line, sizeof(line), "ublk: ");
	va_start(ap, fmt);
	vsnprintf(line + n, sizeof(line) - n, fmt, ap);
	va_end(ap);
	if (log_fn)
		log_fn(line);
	else
		fprintf(stderr, "%s\n", line);
}

/**
 * ublk_ctrl_open - open the control device
 * @out: the handle
 *
 * Returns 0, -ENOENT when /dev/ublk-control does not exist, or -errno.
 */
int ublk_ctrl_open(struct ublk_ctrl **out)
{
	struct ublk_ctrl *c = calloc(1, sizeof(*c));
	int ret;

	if (!c)
		return -ENOMEM;
	c->fd = open(UBLK_CONTROL_PATH, O_RDWR | O_CLOEXEC);
	if (c->fd < 0) {
		ret = -errno;
		goto err_free;
	}
	ret = io_uring_queue_init(4, &c->ring, IORING_SETUP_SQE128);
	if (ret < 0)
		goto err_close;
	*out = c;
	return 0;

err_close:
	close(c->fd);
err_free:
	free(c);
	return ret;
}

void ublk_ctrl_close(struct ublk_ctrl *c)
{
	if (!c)
		return;
	io_uring_queue_exit(&c->ring);
	close(c->fd);
	free(c);
}

static int ctrl_issue(struct ublk_ctrl *c, uint32_t op, const struct ublksrv_ctrl_cmd *cmd)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(&c->ring);
	struct io_uring_cqe *cqe;
	int ret;

	if (!sqe)
		return -EBUSY;
	io_uring_prep_rw(IORING_OP_URING_CMD, sqe, c->fd, NULL, 0, 0);
	sqe->cmd_op = op;
	memcpy(sqe->cmd, cmd, sizeof(*cmd));
	io_uring_sqe_set_data64(sqe, op);
	do {
		ret = io_uring_submit_and_wait(&c->ring, 1);
	} while (ret == -EINTR);
	if (ret < 0)
		return ret;
	do {
		ret = io_uring_wait_cqe(&c->ring, &cqe);
	} while (ret == -EINTR);
	if (ret < 0)
		return ret;
	ret = cqe->res;
	io_uring_cqe_seen(&c->ring, cqe);
	return ret;
}

/*
 * How a kernel says it does not know an opcode: 6.1 looks up the device
 * before it looks at the opcode (-ENODEV for ADD_DEV's id -1), then answers
 * -EOPNOTSUPP; some versions reject the unknown command's fields (-EINVAL).
 */
static bool unknown_cmd(int res)
{
	return res == -ENOTSUPP || res == -EOPNOTSUPP || res == -EINVAL || res == -ENODEV;
}

/* Send @cmd as @ioctl_op, or as its legacy number where that is all there is. */
static int ctrl_cmd(struct ublk_ctrl *c, uint32_t ioctl_op, struct ublksrv_ctrl_cmd *cmd)
{
	uint32_t legacy_op = _IOC_NR(ioctl_op);
	int ret, ret2;

	if (c->enc == ENC_LEGACY)
		return ctrl_issue(c, legacy_op, cmd);
	ret = ctrl_issue(c, ioctl_op, cmd);
	if (c->enc == ENC_IOCTL || !unknown_cmd(ret)) {
		if (ret >= 0)
			c->enc = ENC_IOCTL;
		return ret;
	}
	ret2 = ctrl_issue(c, legacy_op, cmd);
	if (ret2 >= 0) {
		c->enc = ENC_LEGACY;
		return ret2;
	}
	return unknown_cmd(ret2) ? ret : ret2;
}

static int ctrl_simple(struct ublk_ctrl *c, uint32_t op, uint32_t dev_id, uint64_t data,
		       void *buf, uint16_t len)
{
	struct ublksrv_ctrl_cmd cmd = {
		.dev_id = dev_id,
		.queue_id = (uint16_t)-1,
		.len = len,
		.addr = (uint64_t)(uintptr_t)buf,
	};

	cmd.data[0] = data;
	return ctrl_cmd(c, op, &cmd);
}

/**
 * ublk_ctrl_add_dev - ADD_DEV
 * @c: control handle
 * @info: in: wanted id (or -1), queues, depth, flags, max_io_buf_bytes;
 *	  out: what the kernel made of it
 *
 * Returns 0 or -errno (-EEXIST: the id is taken).
 */
int ublk_ctrl_add_dev(struct ublk_ctrl *c, struct ublksrv_ctrl_dev_info *info)
{
	/* 6.1 insists that the command's dev_id equals info->dev_id. */
	return ctrl_simple(c, UBLK_U_CMD_ADD_DEV, info->dev_id, 0, info, sizeof(*info));
}

/**
 * ublk_ctrl_del_dev - DEL_DEV: remove the device, waiting until the daemon
 * has released /dev/ublkcN
 *
 * Returns 0 or -errno (-ENODEV: no such device).
 */
int ublk_ctrl_del_dev(struct ublk_ctrl *c, uint32_t dev_id)
{
	return ctrl_simple(c, UBLK_U_CMD_DEL_DEV, dev_id, 0, NULL, 0);
}

/**
 * ublk_ctrl_start_dev - START_DEV: blocks until every tag was fetched
 *
 * Returns 0 or -errno.
 */
int ublk_ctrl_start_dev(struct ublk_ctrl *c, uint32_t dev_id, pid_t daemon_pid)
{
	return ctrl_simple(c, UBLK_U_CMD_START_DEV, dev_id, (uint64_t)daemon_pid, NULL, 0);
}

/**
 * ublk_ctrl_stop_dev - STOP_DEV: remove /dev/ublkbN and abort the fetches
 *
 * Returns 0 or -errno.
 */
int ublk_ctrl_stop_dev(struct ublk_ctrl *c, uint32_t dev_id)
{
	return ctrl_simple(c, UBLK_U_CMD_STOP_DEV, dev_id, 0, NULL, 0);
}

/**
 * ublk_ctrl_get_info - GET_DEV_INFO
 *
 * Returns 0 or -errno (-ENODEV: no such device).
 */
int ublk_ctrl_get_info(struct ublk_ctrl *c, uint32_t dev_id, struct ublksrv_ctrl_dev_info *info)
{
	memset(info, 0, sizeof(*info));
	return ctrl_simple(c, UBLK_U_CMD_GET_DEV_INFO, dev_id, 0, info, sizeof(*info));
}

/**
 * ublk_ctrl_set_params - SET_PARAMS (params->len is set here)
 *
 * Returns 0 or -errno.
 */
int ublk_ctrl_set_params(struct ublk_ctrl *c, uint32_t dev_id, struct ublk_params *params)
{
	params->len = sizeof(*params);
	return ctrl_simple(c, UBLK_U_CMD_SET_PARAMS, dev_id, 0, params, sizeof(*params));
}

/**
 * ublk_ctrl_get_params - GET_PARAMS (the 6.1 subset: basic and discard)
 *
 * Returns 0 or -errno.
 */
int ublk_ctrl_get_params(struct ublk_ctrl *c, uint32_t dev_id, struct ublk_params *params)
{
	memset(params, 0, sizeof(*params));
	params->len = sizeof(*params);
	return ctrl_simple(c, UBLK_U_CMD_GET_PARAMS, dev_id, 0, params, sizeof(*params));
}

/**
 * ublk_ctrl_get_affinity - GET_QUEUE_AFFINITY: the CPUs queue @q_id maps to
 *
 * Returns 0 or -errno.
 */
int ublk_ctrl_get_affinity(struct ublk_ctrl *c, uint32_t dev_id, uint16_t q_id, cpu_set_t *set)
{
	CPU_ZERO(set);
	return ctrl_simple(c, UBLK_U_CMD_GET_QUEUE_AFFINITY, dev_id, q_id, set, sizeof(*set));
}

/**
 * ublk_ctrl_start_user_recovery - START_USER_RECOVERY: forget the dead
 * daemon's queues so that a new one can mmap and fetch
 *
 * Returns 0, -EBUSY while the device is not quiesced yet or the old daemon
 * still holds /dev/ublkcN, -EINVAL when the device has no USER_RECOVERY or
 * was never started, or -errno.
 */
int ublk_ctrl_start_user_recovery(struct ublk_ctrl *c, uint32_t dev_id)
{
	return ctrl_simple(c, UBLK_U_CMD_START_USER_RECOVERY, dev_id, 0, NULL, 0);
}

/**
 * ublk_ctrl_end_user_recovery - END_USER_RECOVERY: blocks until every tag
 * of every queue was fetched again, then the device is live for @daemon_pid
 *
 * Returns 0 or -errno.
 */
int ublk_ctrl_end_user_recovery(struct ublk_ctrl *c, uint32_t dev_id, pid_t daemon_pid)
{
	return ctrl_simple(c, UBLK_U_CMD_END_USER_RECOVERY, dev_id, (uint64_t)daemon_pid,
			   NULL, 0);
}

/**
 * ublk_ctrl_get_features - GET_FEATURES
 *
 * Returns 0, -EOPNOTSUPP when the kernel predates the command, or -errno.
 */
int ublk_ctrl_get_features(struct ublk_ctrl *c, uint64_t *features)
{
	struct ublksrv_ctrl_cmd cmd = {
		.dev_id = (uint32_t)-1,
		.queue_id = (uint16_t)-1,
		.len = sizeof(*features),
		.addr = (uint64_t)(uintptr_t)features,
	};
	int ret;

	*features = 0;
	/* No legacy number exists: a miss must not decide the encoding. */
	ret = ctrl_issue(c, UBLK_U_CMD_GET_FEATURES, &cmd);
	if (ret >= 0) {
		c->enc = ENC_IOCTL;
		return 0;
	}
	return unknown_cmd(ret) ? -EOPNOTSUPP : ret;
}

static const char *const feature_names[] = {
	"ZERO_COPY", "URING_CMD_COMP_IN_TASK", "NEED_GET_DATA", "USER_RECOVERY",
	"USER_RECOVERY_REISSUE", "UNPRIVILEGED_DEV", "CMD_IOCTL_ENCODE", "USER_COPY",
	"ZONED", "USER_RECOVERY_FAIL_IO", "UPDATE_SIZE", "AUTO_BUF_REG",
	"QUIESCE", "PER_IO_DAEMON", "BUF_REG_OFF_DAEMON", "BATCH_IO",
	"INTEGRITY", "SAFE_STOP_DEV", "NO_AUTO_PART_SCAN", "SHMEM_ZC",
};

const char *ublk_feature_name(unsigned int bit)
{
	if (bit >= sizeof(feature_names) / sizeof(feature_names[0]))
		return NULL;
	return feature_names[bit];
}

const char *ublk_state_name(unsigned int state)
{
	switch (state) {
	case UBLK_S_DEV_DEAD:
		return "DEAD";
	case UBLK_S_DEV_LIVE:
		return "LIVE";
	case UBLK_S_DEV_QUIESCED:
		return "QUIESCED";
	case UBLK_S_DEV_FAIL_IO:
		return "FAIL_IO";
	}
	return "UNKNOWN";
}

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;

	return x < y ? -1 : x > y;
}

/**
 * ublk_dev_ids - list the ublk devices from /sys/class/ublk-char
 * @ids: filled with up to @max ids, ascending
 *
 * Returns the number of devices (possibly more than @max), or -errno.
 */
int ublk_dev_ids(uint32_t *ids, int max)
{
	DIR *d = opendir("/sys/class/ublk-char");
	struct dirent *e;
	int n = 0;

	if (!d)
		return errno == ENOENT ? 0 : -errno;
	while ((e = readdir(d))) {
		char *end;
		unsigned long id;

		if (strncmp(e->d_name, "ublkc", 5))
			continue;
		id = strtoul(e->d_name + 5, &end, 10);
		if (end == e->d_name + 5 || *end || id > UINT32_MAX)
			continue;
		if (n < max)
			ids[n] = (uint32_t)id;
		n++;
	}
	closedir(d);
	qsort(ids, n < max ? n : max, sizeof(*ids), cmp_u32);
	return n;
}
