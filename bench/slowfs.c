/* slowfs: a read-only FUSE passthrough of one folder that sleeps SLOWFS_DELAY_US microseconds in
 * every read, a stand-in for shared storage (Lustre, GPFS, NFS) where each read costs milliseconds.
 * Files are opened with direct_io, so every read reaches this daemon (no page cache on the mount,
 * as for a cohort far larger than a node's memory); reads run in parallel on up to max_threads
 * daemon threads, so reads kept in flight overlap as they would on a parallel file system.
 *
 *   gcc -O2 -o slowfs bench/slowfs.c $(pkg-config --cflags --libs fuse3)
 *   SLOWFS_SOURCE=/real/folder SLOWFS_DELAY_US=5000 ./slowfs /mnt/slow -o max_threads=64
 *   fusermount3 -u /mnt/slow
 *
 * bench/storage.py builds, mounts and unmounts it.
 */
#define FUSE_USE_VERSION 31
#include <fuse.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <dirent.h>

static const char *source;
static long delay_us;

static void full_path(char *out, const char *path) { snprintf(out, PATH_MAX, "%s%s", source, path); }

static int sf_getattr(const char *path, struct stat *st, struct fuse_file_info *fi) {
    char p[PATH_MAX];
    (void)fi;
    full_path(p, path);
    return lstat(p, st) == -1 ? -errno : 0;
}

static int sf_readdir(const char *path, void *buf, fuse_fill_dir_t fill, off_t off, struct fuse_file_info *fi,
                      enum fuse_readdir_flags flags) {
    char p[PATH_MAX];
    (void)off; (void)fi; (void)flags;
    full_path(p, path);
    DIR *d = opendir(p);
    if (!d) return -errno;
    struct dirent *e;
    while ((e = readdir(d))) fill(buf, e->d_name, NULL, 0, 0);
    closedir(d);
    return 0;
}

static int sf_open(const char *path, struct fuse_file_info *fi) {
    char p[PATH_MAX];
    if ((fi->flags & O_ACCMODE) != O_RDONLY) return -EROFS;
    full_path(p, path);
    int fd = open(p, O_RDONLY);
    if (fd == -1) return -errno;
    fi->fh = fd;
    fi->direct_io = 1; /* every read comes here: no page cache on the mount */
    return 0;
}

static int sf_read(const char *path, char *buf, size_t size, off_t off, struct fuse_file_info *fi) {
    (void)path;
    if (delay_us > 0) {
        struct timespec t = {delay_us / 1000000, (delay_us % 1000000) * 1000};
        nanosleep(&t, NULL);
    }
    ssize_t n = pread(fi->fh, buf, size, off);
    return n == -1 ? -errno : (int)n;
}

static int sf_release(const char *path, struct fuse_file_info *fi) {
    (void)path;
    close(fi->fh);
    return 0;
}

static const struct fuse_operations ops = {
    .getattr = sf_getattr, .readdir = sf_readdir, .open = sf_open, .read = sf_read, .release = sf_release,
};

int main(int argc, char *argv[]) {
    source = getenv("SLOWFS_SOURCE");
    delay_us = getenv("SLOWFS_DELAY_US") ? atol(getenv("SLOWFS_DELAY_US")) : 0;
    if (!source) {
        fprintf(stderr, "slowfs: set SLOWFS_SOURCE to the folder to serve\n");
        return 2;
    }
    return fuse_main(argc, argv, &ops, NULL);
}
