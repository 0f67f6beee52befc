// SPDX-License-Identifier: MIT
/*
 * A ublk device's life: target init → ADD_DEV → SET_PARAMS → queue threads
 * fetch every tag → START_DEV (from this thread: it blocks until all tags
 * are fetched) → serve → STOP_DEV aborts the fetches → threads drain and end
 * → target deinit (the image is flushed) → /dev/ublkcN closed → DEL_DEV.
 * Recovery of a device whose daemon died: GET_DEV_INFO → target init →
 * START_USER_RECOVERY → fetch every tag → END_USER_RECOVERY → serve.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

static int cfg_check(const struct ublk_dev_cfg *cfg)
{
	if (cfg->nr_queues < 1 || cfg->nr_queues > UBLK_MAX_QUEUES)
		return -EINVAL;
	if (cfg->depth < 1 || cfg->depth > UBLK_MAX_DEPTH)
		return -EINVAL;
	if (cfg->max_io_bytes < 4096 || cfg->max_io_bytes % 4096 ||
	    cfg->max_io_bytes > (1u << 25))
		return -EINVAL;
	return 0;
}

static void params_fill(struct ublk_params *p, const struct ublk_dev *dev)
{
	const struct ublk_tgt *t = dev->tgt;
	uint32_t max_sectors = dev->info.max_io_buf_bytes >> 9;

	memset(p, 0, sizeof(*p));
	p->types = UBLK_PARAM_TYPE_BASIC;
	p->basic.logical_bs_shift = 9;
	p->basic.physical_bs_shift = 12;
	p->basic.io_min_shift = 9;
	p->basic.io_opt_shift = 12;
	p->basic.max_sectors = max_sectors;
	p->basic.dev_sectors = t->dev_size >> 9;
	if (t->volatile_cache)
		p->basic.attrs |= UBLK_ATTR_VOLATILE_CACHE | UBLK_ATTR_FUA;
	if (dev->cfg.read_only)
		p->basic.attrs |= UBLK_ATTR_READ_ONLY;
	if (t->discard_granularity && !dev->cfg.read_only) {
		/* Discards carry no data: they may exceed the buffer size. */
		p->types |= UBLK_PARAM_TYPE_DISCARD;
		p->discard.discard_granularity = t->discard_granularity;
		p->discard.max_discard_sectors = UINT32_MAX >> 9;
		p->discard.max_write_zeroes_sectors = UINT32_MAX >> 9;
		p->discard.max_discard_segments = 1;
	}
}

/**
 * ublk_dev_create - init the target, ADD_DEV and SET_PARAMS
 * @out: the device
 * @ctrl: control handle, used by this thread only, kept by the device
 * @cfg: queues, depth, id
 * @tgt: the target; t->ops and what its init needs filled in
 *
 * Returns 0, or -errno: with tgt->err set when the target could not open
 * what it serves; otherwise the kernel refused ADD_DEV or SET_PARAMS.
 */
int ublk_dev_create(struct ublk_dev **out, struct ublk_ctrl *ctrl,
		    const struct ublk_dev_cfg *cfg, struct ublk_tgt *tgt)
{
	struct ublk_dev *dev;
	struct ublk_params params;
	uint64_t features = 0;
	int ret;

	tgt->err[0] = '\0';
	ret = cfg_check(cfg);
	if (ret)
		return ret;
	dev = calloc(1, sizeof(*dev));
	if (!dev)
		return -ENOMEM;
	dev->ctrl = ctrl;
	dev->tgt = tgt;
	dev->cfg = *cfg;
	dev->char_fd = -1;
	dev->exit_fd = -1;

	/* The target first: nothing is created for an image that fails. */
	ret = tgt->ops->init(tgt, cfg);
	if (ret)
		goto err_free;

	dev->info.dev_id = cfg->dev_id < 0 ? (uint32_t)-1 : (uint32_t)cfg->dev_id;
	dev->info.nr_hw_queues = cfg->nr_queues;
	dev->info.queue_depth = cfg->depth;
	dev->info.max_io_buf_bytes = cfg->max_io_bytes;
	dev->info.flags = UBLK_F_NEED_GET_DATA;
	if (ublk_ctrl_get_features(ctrl, &features) == 0) {
		if (features & UBLK_F_CMD_IOCTL_ENCODE)
			dev->info.flags |= UBLK_F_CMD_IOCTL_ENCODE;
		/* The data by read/write on the char device: no NEED_GET_DATA round trip. */
		if ((features & UBLK_F_USER_COPY) && !cfg->no_user_copy)
			dev->info.flags = (dev->info.flags & ~UBLK_F_NEED_GET_DATA) | UBLK_F_USER_COPY;
		/*
		 * Zero copy on top: the target's READ/WRITE I/O uses the
		 * request's pages; USER_COPY stays for the rest (zero fill).
		 */
		if ((features & UBLK_F_AUTO_BUF_REG) && (dev->info.flags & UBLK_F_USER_COPY) &&
		    tgt->zero_copy && !cfg->no_zero_copy)
			dev->info.flags |= UBLK_F_AUTO_BUF_REG;
	} else {
		/* Before 6.5 there is no GET_FEATURES: 6.0+ has both recovery bits. */
		features = UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE;
	}
	if (cfg->recovery) {
		/* REISSUE: requests the dead daemon held go to the next one. */
		ret = -EOPNOTSUPP;
		if (!(features & UBLK_F_USER_RECOVERY) ||
		    !(features & UBLK_F_USER_RECOVERY_REISSUE))
			goto err_deinit;
		dev->info.flags |= UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE;
	}
	ret = ublk_ctrl_add_dev(ctrl, &dev->info);
	if (ret)
		goto err_deinit;
	dev->added = true;
	ret = -EOPNOTSUPP;
	if (cfg->recovery && !(dev->info.flags & UBLK_F_USER_RECOVERY))
		goto err_del;
	/* Newer kernels force ioctl encoding on; 6.1 leaves the bit clear. */
	dev->io_ioctl = dev->info.flags & UBLK_F_CMD_IOCTL_ENCODE;
	dev->user_copy = dev->info.flags & UBLK_F_USER_COPY;
	dev->zero_copy = dev->info.flags & UBLK_F_AUTO_BUF_REG;

	params_fill(&params, dev);
	ret = ublk_ctrl_set_params(ctrl, dev->info.dev_id, &params);
	if (ret)
		goto err_del;
	*out = dev;
	return 0;

err_del:
	ublk_ctrl_del_dev(ctrl, dev->info.dev_id);
err_deinit:
	tgt->ops->deinit(tgt);
err_free:
	free(dev);
	return ret;
}

/* START_USER_RECOVERY, waiting for the kernel to let go of the dead daemon. */
static int recovery_start(struct ublk_ctrl *ctrl, uint32_t dev_id)
{
	struct timespec ts = { .tv_nsec = 100 * 1000 * 1000 };
	int i, ret;

	/*
	 * -EBUSY until the device is QUIESCED and /dev/ublkcN released: 6.1
	 * notices a dead daemon in its 5 s monitor work, newer kernels when
	 * the dying process's file is released.
	 */
	for (i = 0; i < 300; i++) {
		ret = ublk_ctrl_start_user_recovery(ctrl, dev_id);
		if (ret != -EBUSY)
			break;
		nanosleep(&ts, NULL);
	}
	return ret;
}

/**
 * ublk_dev_recover - take over a device whose daemon died
 * @out: the device, to start with ublk_dev_start()
 * @ctrl: control handle, used by this thread only, kept by the device
 * @dev_id: the device
 * @cfg: in: read_only (and what the target reads); out: the kernel's id,
 *	 queues, depth and buffer size
 * @tgt: the target; t->ops and what its init needs filled in
 *
 * Returns 0 or -errno (see ublk.h).
 */
int ublk_dev_recover(struct ublk_dev **out, struct ublk_ctrl *ctrl, uint32_t dev_id,
		     struct ublk_dev_cfg *cfg, struct ublk_tgt *tgt)
{
	struct ublk_dev *dev;
	struct ublk_params params;
	int ret;

	tgt->err[0] = '\0';
	dev = calloc(1, sizeof(*dev));
	if (!dev)
		return -ENOMEM;
	dev->ctrl = ctrl;
	dev->tgt = tgt;
	dev->char_fd = -1;
	dev->exit_fd = -1;
	ret = ublk_ctrl_get_info(ctrl, dev_id, &dev->info);
	if (ret)
		goto err_free;
	ret = -EOPNOTSUPP;
	if (!(dev->info.flags & UBLK_F_USER_RECOVERY))
		goto err_free;
	ret = ublk_ctrl_get_params(ctrl, dev_id, &params);
	if (ret)
		goto err_free;
	cfg->dev_id = (int)dev_id;
	cfg->nr_queues = dev->info.nr_hw_queues;
	cfg->depth = dev->info.queue_depth;
	cfg->max_io_bytes = dev->info.max_io_buf_bytes;
	cfg->recovery = true;
	ret = cfg_check(cfg);
	if (ret)
		goto err_free;
	dev->cfg = *cfg;

	ret = tgt->ops->init(tgt, cfg);
	if (ret)
		goto err_free;
	/* The kernel keeps the old size: serving another would shift data. */
	if (tgt->dev_size >> 9 != params.basic.dev_sectors) {
		snprintf(tgt->err, sizeof(tgt->err),
			 "%s: %llu bytes, but /dev/ublkb%u has %llu: not what it served",
			 tgt->path ? tgt->path : tgt->ops->name,
			 (unsigned long long)tgt->dev_size, dev_id,
			 (unsigned long long)params.basic.dev_sectors << 9);
		ret = -EINVAL;
		goto err_deinit;
	}
	/* The flags are the old daemon's: zero copy needs a target that can use it. */
	if ((dev->info.flags & UBLK_F_AUTO_BUF_REG) && !tgt->zero_copy) {
		snprintf(tgt->err, sizeof(tgt->err),
			 "/dev/ublkb%u was added with zero copy, which the %s target cannot serve",
			 dev_id, tgt->ops->name);
		ret = -EINVAL;
		goto err_deinit;
	}
	ret = recovery_start(ctrl, dev_id);
	if (ret)
		goto err_deinit;
	/* From here on the device is ours: a failure deletes it. */
	dev->added = true;
	dev->recovering = true;
	dev->io_ioctl = dev->info.flags & UBLK_F_CMD_IOCTL_ENCODE;
	dev->user_copy = dev->info.flags & UBLK_F_USER_COPY;
	dev->zero_copy = dev->info.flags & UBLK_F_AUTO_BUF_REG;
	*out = dev;
	return 0;

err_deinit:
	tgt->ops->deinit(tgt);
err_free:
	free(dev);
	return ret;
}

const struct ublksrv_ctrl_dev_info *ublk_dev_info(const struct ublk_dev *dev)
{
	return &dev->info;
}

/* /dev/ublkcN appears a little after ADD_DEV (udev or devtmpfs). */
static int char_open(uint32_t dev_id)
{
	struct timespec ts = { .tv_nsec = 10 * 1000 * 1000 };
	char path[64];
	int i, fd = -1;

	snprintf(path, sizeof(path), "/dev/ublkc%u", dev_id);
	for (i = 0; i < 1000; i++) {
		/*
		 * O_NONBLOCK: the char device sets no FMODE_NOWAIT, so without it
		 * io_uring hands every USER_COPY read and write to an io-wq
		 * worker thread; its copies never block, and with the flag they
		 * complete inline in the submitting io_uring_enter().
		 */
		fd = open(path, O_RDWR | O_CLOEXEC | O_NONBLOCK);
		if (fd >= 0 || errno != ENOENT)
			break;
		nanosleep(&ts, NULL);
	}
	return fd < 0 ? -errno : fd;
}

static int dev_stop(struct ublk_dev *dev)
{
	int ret;

	if (dev->stop_sent)
		return 0;
	dev->stop_sent = true;
	ret = ublk_ctrl_stop_dev(dev->ctrl, dev->info.dev_id);
	if (ret)
		ublk_log("dev %u: STOP_DEV: %s", dev->info.dev_id, strerror(-ret));
	return ret;
}

/**
 * ublk_dev_start - start the queue threads and START_DEV
 *
 * Returns 0 once /dev/ublkbN is live, or -errno. On failure the caller
 * still calls ublk_dev_destroy().
 */
int ublk_dev_start(struct ublk_dev *dev)
{
	unsigned int i, nr = dev->info.nr_hw_queues;
	int ret;

	ret = char_open(dev->info.dev_id);
	if (ret < 0)
		return ret;
	dev->char_fd = ret;
	dev->exit_fd = eventfd(0, EFD_CLOEXEC);
	if (dev->exit_fd < 0)
		return -errno;
	if (sem_init(&dev->ready, 0, 0))
		return -errno;
	dev->queues = calloc(nr, sizeof(*dev->queues));
	if (!dev->queues)
		return -ENOMEM;
	for (i = 0; i < nr; i++) {
		struct ublk_queue *q = &dev->queues[i];

		ret = ublk_queue_setup(q, dev, i);
		if (ret)
			return ret;
		dev->nr_setup++;
		q->pin = ublk_ctrl_get_affinity(dev->ctrl, dev->info.dev_id, i, &q->cpus) == 0 &&
			 CPU_COUNT(&q->cpus) > 0;
	}
	for (i = 0; i < nr; i++) {
		struct ublk_queue *q = &dev->queues[i];

		ret = -pthread_create(&q->thread, NULL, ublk_queue_thread, q);
		if (ret)
			return ret;
		q->thread_started = true;
		dev->nr_threads++;
	}
	for (i = 0; i < nr; i++)
		while (sem_wait(&dev->ready) && errno == EINTR)
			;
	for (i = 0; i < nr; i++)
		if (dev->queues[i].err)
			return dev->queues[i].err;

	if (dev->recovering)
		ret = ublk_ctrl_end_user_recovery(dev->ctrl, dev->info.dev_id, getpid());
	else
		ret = ublk_ctrl_start_dev(dev->ctrl, dev->info.dev_id, getpid());
	if (ret)
		return ret;
	dev->started = true;
	ret = ublk_ctrl_get_info(dev->ctrl, dev->info.dev_id, &dev->info);
	return ret;
}

/**
 * ublk_dev_wait - serve until every queue thread has ended
 * @dev: a started device
 * @sig_fd: a signalfd whose signals mean "stop", or -1
 *
 * Returns 0, or the first queue thread's -errno.
 */
int ublk_dev_wait(struct ublk_dev *dev, int sig_fd)
{
	unsigned int i;

	while (dev->nr_exited < dev->nr_threads) {
		struct pollfd pfd[2] = {
			{ .fd = dev->exit_fd, .events = POLLIN },
			{ .fd = sig_fd, .events = POLLIN },
		};

		if (poll(pfd, sig_fd >= 0 ? 2 : 1, -1) < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (sig_fd >= 0 && (pfd[1].revents & POLLIN)) {
			struct signalfd_siginfo si;

			if (read(sig_fd, &si, sizeof(si)) == sizeof(si))
				dev_stop(dev);
		}
		if (pfd[0].revents & POLLIN) {
			eventfd_t n;

			if (eventfd_read(dev->exit_fd, &n) == 0)
				dev->nr_exited += n;
			/* One queue gone means the device is going: stop the rest. */
			if (dev->nr_exited < dev->nr_threads)
				dev_stop(dev);
		}
	}
	for (i = 0; i < dev->info.nr_hw_queues; i++)
		if (dev->queues[i].err)
			return dev->queues[i].err;
	return 0;
}

/**
 * ublk_dev_destroy - stop, deinit the target, DEL_DEV and free @dev
 *
 * Returns 0 or the first -errno; the target's deinit (its final flush)
 * counts.
 */
int ublk_dev_destroy(struct ublk_dev *dev)
{
	unsigned int i;
	int ret = 0, ret2;

	if (dev->nr_threads) {
		if (dev->nr_exited < dev->nr_threads)
			dev_stop(dev);
		for (i = 0; i < dev->info.nr_hw_queues; i++)
			if (dev->queues[i].thread_started)
				pthread_join(dev->queues[i].thread, NULL);
	}
	ret2 = dev->tgt->ops->deinit(dev->tgt);
	if (ret2)
		ret = ret2;
	if (dev->queues) {
		for (i = 0; i < dev->nr_setup; i++)
			ublk_queue_teardown(&dev->queues[i]);
		free(dev->queues);
		sem_destroy(&dev->ready);
	}
	if (dev->exit_fd >= 0)
		close(dev->exit_fd);
	/* DEL_DEV waits for /dev/ublkcN to be released: close it first. */
	if (dev->char_fd >= 0)
		close(dev->char_fd);
	if (dev->added) {
		ret2 = ublk_ctrl_del_dev(dev->ctrl, dev->info.dev_id);
		if (ret2 && ret2 != -ENODEV && !ret)
			ret = ret2;
	}
	free(dev);
	return ret;
}
