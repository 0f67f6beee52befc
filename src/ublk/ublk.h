/* SPDX-License-Identifier: MIT */
/*
 * The ublk side of ublk-qcow2: the control device, the per-queue data plane
 * and the target interface. It knows nothing of qcow2: a target (null, raw,
 * or the tools' qcow2 glue) serves requests through struct ublk_tgt_ops and
 * may put its own I/O on the queue's io_uring next to the ublk commands.
 */
#ifndef UBLK_H
#define UBLK_H

#include <sched.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include <liburing.h>

#include "ublk_uapi.h"

#define UBLK_CONTROL_PATH	"/dev/ublk-control"
#define UBLK_MAX_QUEUES		64
#define UBLK_MAX_DEPTH		1024
#define UBLK_DEF_IO_BYTES	(512u << 10)

/* ---- Control device ---------------------------------------------------- */

struct ublk_ctrl;

/*
 * Open /dev/ublk-control with its own SQE128 ring (one per thread).
 * Returns 0, -ENOENT when the driver is not loaded, or another -errno.
 */
int ublk_ctrl_open(struct ublk_ctrl **out);
void ublk_ctrl_close(struct ublk_ctrl *c);

/*
 * The commands. Each tries the ioctl-encoded opcode first and falls back to
 * the legacy number on kernels that predate it (6.1). 0 or -errno; @info
 * and @params are read and/or written as the kernel does.
 */
int ublk_ctrl_add_dev(struct ublk_ctrl *c, struct ublksrv_ctrl_dev_info *info);
int ublk_ctrl_del_dev(struct ublk_ctrl *c, uint32_t dev_id);
int ublk_ctrl_start_dev(struct ublk_ctrl *c, uint32_t dev_id, pid_t daemon_pid);
int ublk_ctrl_stop_dev(struct ublk_ctrl *c, uint32_t dev_id);
int ublk_ctrl_get_info(struct ublk_ctrl *c, uint32_t dev_id, struct ublksrv_ctrl_dev_info *info);
int ublk_ctrl_set_params(struct ublk_ctrl *c, uint32_t dev_id, struct ublk_params *params);
int ublk_ctrl_get_params(struct ublk_ctrl *c, uint32_t dev_id, struct ublk_params *params);
int ublk_ctrl_get_affinity(struct ublk_ctrl *c, uint32_t dev_id, uint16_t q_id, cpu_set_t *set);
int ublk_ctrl_start_user_recovery(struct ublk_ctrl *c, uint32_t dev_id);
int ublk_ctrl_end_user_recovery(struct ublk_ctrl *c, uint32_t dev_id, pid_t daemon_pid);

/* The driver's UBLK_F_* bits. 0, -EOPNOTSUPP before Linux 6.5, or -errno. */
int ublk_ctrl_get_features(struct ublk_ctrl *c, uint64_t *features);

/* "NEED_GET_DATA" for UBLK_F_NEED_GET_DATA's bit number, NULL if unknown. */
const char *ublk_feature_name(unsigned int bit);

/* "LIVE", "DEAD", "QUIESCED", "FAIL_IO" or "UNKNOWN". */
const char *ublk_state_name(unsigned int state);

/*
 * The ids of the ublk devices that exist, ascending, from sysfs. Returns the
 * number found (at most @max are stored) or -errno.
 */
int ublk_dev_ids(uint32_t *ids, int max);

/* ---- Targets ------------------------------------------------------------ */

struct ublk_dev;
struct ublk_queue;
struct ublk_tgt;

struct ublk_dev_cfg {
	int dev_id;			/* -1: the kernel picks one */
	unsigned int nr_queues;		/* 1..UBLK_MAX_QUEUES (the kernel may lower it) */
	unsigned int depth;		/* 1..UBLK_MAX_DEPTH */
	unsigned int max_io_bytes;	/* largest request, a multiple of 4 KiB */
	bool read_only;
	bool recovery;			/* USER_RECOVERY(+REISSUE): a dead daemon's device waits */
	bool no_user_copy;		/* NEED_GET_DATA even where the kernel has USER_COPY */
	bool no_zero_copy;		/* USER_COPY even where the kernel has AUTO_BUF_REG */
};

struct ublk_tgt_ops {
	const char *name;
	/* Open what the target serves and fill in the size and limits of @t.
	 * Runs before the device exists. 0, or -errno with t->err set. */
	int (*init)(struct ublk_tgt *t, const struct ublk_dev_cfg *cfg);
	/* A request for @tag of @q (WRITE data already in its buffer); finish
	 * it with ublk_queue_complete() on @q's thread, now or later. */
	void (*queue_io)(struct ublk_queue *q, unsigned int tag);
	/* Optional, for two-phase writes (NEED_GET_DATA): a WRITE for @tag
	 * arrived without its data. Prepare it (map, allocate), then call
	 * ublk_queue_get_data() on @q's thread; data_ready() follows. */
	void (*prep_write)(struct ublk_queue *q, unsigned int tag);
	/* The data asked for by ublk_queue_get_data() is in place (@res 0),
	 * or never will be (-errno: the device is going away; still finish
	 * the tag with ublk_queue_complete(), which then sends nothing). */
	void (*data_ready)(struct ublk_queue *q, unsigned int tag, int res);
	/* The completion of an SQE marked with ublk_queue_sqe_tgt(). */
	void (*tgt_io_done)(struct ublk_queue *q, uint64_t data, int res);
	/* Optional: ublk_queue_wake() was called for @q; runs on @q's thread. */
	void (*wake)(struct ublk_queue *q);
	/* Release what init() took, after every queue stopped. 0 or -errno
	 * (for instance a final flush that failed). */
	int (*deinit)(struct ublk_tgt *t);
};

struct ublk_tgt {
	const struct ublk_tgt_ops *ops;
	const char *path;		/* what is served (NULL for null) */
	const void *opts;		/* target-specific options */
	void *priv;			/* target state, owned by init/deinit */
	uint64_t dev_size;		/* bytes, set by init */
	uint32_t discard_granularity;	/* bytes; 0: no discard nor write-zeroes */
	bool volatile_cache;		/* has a cache: FLUSH and FUA matter */
	bool zero_copy;			/* set by init: READ/WRITE can use the request's pages */
	char err[256];			/* init's one-line error */
};

/* The null target (-t null): completes everything at once. */
extern const struct ublk_tgt_ops ublk_null_ops;
/* The raw target (-f raw): a loop device on the queue's ring. */
extern const struct ublk_tgt_ops ublk_raw_ops;

/* The raw target's opts (optional). */
struct ublk_raw_opts {
	/*
	 * The format was guessed, not given: a WRITE that would put a qcow2
	 * header in the first sector fails with -EPERM, so that the guest
	 * cannot make the next guess qcow2 (with a backing file of its choice).
	 */
	bool probed;
};

/* ---- Queues: what a target may call on its queue's thread ---------------- */

struct ublk_tgt *ublk_queue_tgt(const struct ublk_queue *q);
unsigned int ublk_queue_id(const struct ublk_queue *q);
unsigned int ublk_queue_depth(const struct ublk_queue *q);
const struct ublksrv_io_desc *ublk_queue_iod(const struct ublk_queue *q, unsigned int tag);
void *ublk_queue_buf(const struct ublk_queue *q, unsigned int tag);

/*
 * Zero copy (UBLK_F_AUTO_BUF_REG, 6.16+, for a target that set zero_copy):
 * true when the data of every READ and WRITE stays in the request's own
 * pages, which the driver registers in @q's ring at buffer index @tag. The
 * target then moves it with READ_FIXED/WRITE_FIXED (address = byte offset
 * in the request, buf_index = tag) and ublk_queue_buf() is no buffer.
 */
bool ublk_queue_zero_copy(const struct ublk_queue *q);

/*
 * With zero copy: serve request @tag the copying way instead, for a target
 * that needs its bytes in memory. The target lets go of @tag; the queue
 * gives it a buffer and hands it back as without zero copy (prep_write for
 * a WRITE when the target has it, queue_io otherwise), its data moving by
 * USER_COPY. On @q's thread only; callable from within the target's ops
 * (the queue loop dispatches the tag again once they returned).
 */
void ublk_queue_copy(struct ublk_queue *q, unsigned int tag);

/* True when @tag's data is in the request's pages only: zero copy, no ublk_queue_copy(). */
bool ublk_queue_tag_zero_copy(const struct ublk_queue *q, unsigned int tag);

/*
 * Zero bytes [@off, @off + @len) of READ @tag's data, wherever it lives (the
 * tag's buffer, or with zero copy the request's pages). 0 or -errno.
 */
int ublk_queue_zero_data(struct ublk_queue *q, unsigned int tag, uint32_t off, uint32_t len);

/*
 * Finish @tag with @res: the byte count for READ/WRITE, 0 for the others,
 * or -errno. Queues COMMIT_AND_FETCH_REQ.
 */
void ublk_queue_complete(struct ublk_queue *q, unsigned int tag, int res);

/*
 * Have the driver copy WRITE @tag's data to @dst (at least the request's
 * length), for a target with prep_write. On @q's thread only.
 */
void ublk_queue_get_data(struct ublk_queue *q, unsigned int tag, void *dst);

/*
 * A free SQE on @q's ring for target I/O (submitting what is queued when the
 * ring is full), or NULL if none can be had. Prepare it, then hand it to
 * ublk_queue_sqe_tgt(): its completion comes back through tgt_io_done().
 */
struct io_uring_sqe *ublk_queue_sqe(struct ublk_queue *q);

/* Mark a prepared @sqe as target I/O carrying @data (below 1 << 62). */
void ublk_queue_sqe_tgt(struct ublk_queue *q, struct io_uring_sqe *sqe, uint64_t data);

/* The queue whose thread is calling, NULL outside queue threads. */
struct ublk_queue *ublk_queue_self(void);

/* Make ops->wake() run on @q's thread soon. Callable from any thread. */
void ublk_queue_wake(struct ublk_queue *q);

/* ---- Devices ------------------------------------------------------------- */

/*
 * Run the target's init, then ADD_DEV and SET_PARAMS: the device exists but
 * serves nothing yet. 0, or -errno with a message in t->err (init) or
 * nothing (the kernel refused; the caller names the command).
 */
int ublk_dev_create(struct ublk_dev **out, struct ublk_ctrl *ctrl,
		    const struct ublk_dev_cfg *cfg, struct ublk_tgt *tgt);

/*
 * Take over device @dev_id, whose daemon died (USER_RECOVERY): GET_DEV_INFO
 * gives the queues, depth and buffer size; the target's init runs (@cfg's
 * dev_id, queues, depth and buffer size are filled in from the kernel) and
 * must serve the device's size; then START_USER_RECOVERY, retried while the
 * kernel still quiesces the device or the old daemon still holds
 * /dev/ublkcN. ublk_dev_start() then ends the recovery instead of starting.
 * Returns 0, or -errno: with tgt->err set when the target failed; -ENODEV
 * no such device; -EOPNOTSUPP not added with recovery; -EBUSY still not
 * recoverable after 30 s. Before START_USER_RECOVERY succeeded nothing
 * changed; after, a failure ends with the device deleted, as a failed add.
 */
int ublk_dev_recover(struct ublk_dev **out, struct ublk_ctrl *ctrl, uint32_t dev_id,
		     struct ublk_dev_cfg *cfg, struct ublk_tgt *tgt);

/* What the kernel made of the device (id, queues, depth, flags). */
const struct ublksrv_ctrl_dev_info *ublk_dev_info(const struct ublk_dev *dev);

/*
 * Start one thread per queue (pinned to the queue's CPUs), let each fetch
 * every tag, then START_DEV (END_USER_RECOVERY for a recovered device) from
 * this thread. Returns 0 once /dev/ublkbN is live, or -errno.
 */
int ublk_dev_start(struct ublk_dev *dev);

/*
 * Serve until the device stops: the kernel stopped it (del, or a queue
 * failed), or a signal arrived on @sig_fd (a signalfd, -1 for none), which
 * sends STOP_DEV. Returns once every queue thread has finished: 0 or -errno.
 */
int ublk_dev_wait(struct ublk_dev *dev, int sig_fd);

/*
 * Stop what still runs, deinit the target, close the char device and
 * DEL_DEV. Returns 0 or the first -errno (the target's deinit included).
 */
int ublk_dev_destroy(struct ublk_dev *dev);

/*
 * Where the library's error lines go ("ublk: ..." without a newline):
 * stderr unless @fn is set (a daemon's logger). Set it before any device
 * exists; NULL restores stderr.
 */
void ublk_set_log(void (*fn)(const char *line));

#endif
