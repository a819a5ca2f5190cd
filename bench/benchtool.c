/*
 * benchtool: small helpers for bench/run.sh (built on demand with cc -O2).
 *
 *   benchtool punch FILE OFFSET LEN STRIDE
 *       Punch holes (FALLOC_FL_PUNCH_HOLE|KEEP_SIZE) of STRIDE bytes every
 *       2*STRIDE bytes inside [OFFSET, OFFSET+LEN), i.e. discard 50% of the
 *       region, then fsync.  Prints "<seconds> <punched_bytes>".
 *
 *   benchtool sparsefill FILE NCHUNKS CHUNK BS MIN_FREE_GB
 *       pwrite one BS-sized block of random data into each of NCHUNKS
 *       distinct CHUNK-sized chunks spread evenly over the file (first chunk
 *       at 0, last near the end), then fsync.  Aborts (exit 3) if free space
 *       on the filesystem holding the current directory drops below
 *       MIN_FREE_GB.  Prints "<seconds> <stride_bytes>".
 *
 *   benchtool mkdata FILE SIZE EXTENT
 *       Create a sparse file of SIZE bytes whose even-numbered EXTENT-sized
 *       extents hold pseudo-random (incompressible) data and whose odd ones
 *       are holes (~50% data).  fsyncs.  Prints "<seconds>".
 *
 *   benchtool opentime FILE OFFSET
 *       Time open(O_RDONLY) and the first 4 KiB pread at OFFSET.
 *       Prints "<open_us> <open_plus_read_us>".
 *
 *   benchtool timeit CMD [ARGS...]
 *       Run CMD (stdout/stderr to /dev/null), print its wall time in ms,
 *       exit with its exit status.
 *
 *   benchtool waitmount DIR N TIMEOUT_S T0_NS [PID]
 *       Poll DIR (every 0.2 ms) until it is a mount point and readdir()
 *       sees >= N entries (excluding . and ..).  T0_NS is the start time
 *       (CLOCK_REALTIME ns, `date +%s%N` taken just before the mount
 *       command was started).  Prints "<ms since T0> <count>"; exit 2 on
 *       timeout or if PID (the mount daemon) exits first.  "Mount point"
 *       is STATX_ATTR_MOUNT_ROOT (falls back to st_dev != parent's).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint64_t parse_size(const char *s)
{
    char *end;
    double v = strtod(s, &end);
    switch (*end) {
    case 'k': case 'K': v *= 1024.0; break;
    case 'm': case 'M': v *= 1024.0 * 1024; break;
    case 'g': case 'G': v *= 1024.0 * 1024 * 1024; break;
    case 't': case 'T': v *= 1024.0 * 1024 * 1024 * 1024; break;
    default: break;
    }
    return (uint64_t)v;
}

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint64_t xorshift(void)
{
    uint64_t x = rng_state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return rng_state = x;
}

static void fill_random(void *buf, size_t len)
{
    uint64_t *p = buf;
    for (size_t i = 0; i < len / 8; i++)
        p[i] = xorshift();
}

static void die(const char *what)
{
    perror(what);
    exit(1);
}

static int cmd_punch(int argc, char **argv)
{
    if (argc != 6) return 64;
    uint64_t off = parse_size(argv[3]), len = parse_size(argv[4]),
             stride = parse_size(argv[5]);
    int fd = open(argv[2], O_RDWR);
    if (fd < 0) die("open");
    uint64_t punched = 0;
    double t0 = now();
    for (uint64_t o = off; o < off + len; o += 2 * stride) {
        uint64_t l = stride;
        if (o + l > off + len) l = off + len - o;
        if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, o, l) != 0)
            die("fallocate(PUNCH_HOLE)");
        punched += l;
    }
    if (fsync(fd) != 0) die("fsync");
    double t = now() - t0;
    close(fd);
    printf("%.6f %llu\n", t, (unsigned long long)punched);
    return 0;
}

static int cmd_sparsefill(int argc, char **argv)
{
    if (argc != 7) return 64;
    uint64_t n = parse_size(argv[3]), chunk = parse_size(argv[4]),
             bs = parse_size(argv[5]);
    double min_free_gb = atof(argv[6]);
    int fd = open(argv[2], O_RDWR);
    if (fd < 0) die("open");
    struct stat st;
    if (fstat(fd, &st) != 0) die("fstat");
    uint64_t nchunks_total = (uint64_t)st.st_size / chunk;
    if (nchunks_total < n) {
        fprintf(stderr, "file too small: %llu chunks < %llu\n",
                (unsigned long long)nchunks_total, (unsigned long long)n);
        return 1;
    }
    uint64_t stride = (nchunks_total / n) * chunk;
    char *buf;
    if (posix_memalign((void **)&buf, 4096, bs)) die("posix_memalign");
    double t0 = now();
    for (uint64_t i = 0; i < n; i++) {
        fill_random(buf, bs);
        if (pwrite(fd, buf, bs, (off_t)(i * stride)) != (ssize_t)bs) die("pwrite");
        if ((i & 1023) == 1023) {
            struct statvfs vfs;
            if (statvfs(".", &vfs) == 0) {
                double free_gb = (double)vfs.f_bavail * vfs.f_frsize / 1e9;
                if (free_gb < min_free_gb) {
                    fprintf(stderr, "sparsefill: only %.1f GB free after %llu chunks, aborting\n",
                            free_gb, (unsigned long long)i + 1);
                    return 3;
                }
            }
        }
    }
    if (fsync(fd) != 0) die("fsync");
    close(fd);
    printf("%.6f %llu\n", now() - t0, (unsigned long long)stride);
    return 0;
}

static int cmd_mkdata(int argc, char **argv)
{
    if (argc != 5) return 64;
    uint64_t size = parse_size(argv[3]), extent = parse_size(argv[4]);
    int fd = open(argv[2], O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) die("open");
    if (ftruncate(fd, (off_t)size) != 0) die("ftruncate");
    size_t bufsz = 1 << 20;
    char *buf = malloc(bufsz);
    if (!buf) die("malloc");
    double t0 = now();
    for (uint64_t o = 0, k = 0; o < size; o += extent, k++) {
        if (k & 1) continue;
        for (uint64_t p = o; p < o + extent && p < size; p += bufsz) {
            size_t l = bufsz;
            if (p + l > size) l = size - p;
            fill_random(buf, l);
            if (pwrite(fd, buf, l, (off_t)p) != (ssize_t)l) die("pwrite");
        }
    }
    if (fsync(fd) != 0) die("fsync");
    close(fd);
    printf("%.6f\n", now() - t0);
    return 0;
}

static int cmd_opentime(int argc, char **argv)
{
    if (argc != 4) return 64;
    uint64_t off = parse_size(argv[3]);
    char buf[4096];
    double t0 = now();
    int fd = open(argv[2], O_RDONLY);
    if (fd < 0) die("open");
    double t1 = now();
    if (pread(fd, buf, sizeof buf, (off_t)off) != (ssize_t)sizeof buf) die("pread");
    double t2 = now();
    close(fd);
    printf("%.1f %.1f\n", (t1 - t0) * 1e6, (t2 - t0) * 1e6);
    return 0;
}

static int is_mountpoint(const char *dir)
{
#ifdef STATX_ATTR_MOUNT_ROOT
    struct statx sx;
    if (statx(AT_FDCWD, dir, 0, STATX_BASIC_STATS, &sx) == 0 &&
        (sx.stx_attributes_mask & STATX_ATTR_MOUNT_ROOT))
        return (sx.stx_attributes & STATX_ATTR_MOUNT_ROOT) != 0;
#endif
    struct stat a, b;
    char parent[4096];
    snprintf(parent, sizeof parent, "%s/..", dir);
    if (stat(dir, &a) != 0 || stat(parent, &b) != 0) return 0;
    return a.st_dev != b.st_dev;
}

static long count_entries(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d) return -1;
    long n = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) n++;
    }
    closedir(d);
    return n;
}

static int cmd_waitmount(int argc, char **argv)
{
    if (argc != 6 && argc != 7) return 64;
    const char *dir = argv[2];
    long want = atol(argv[3]);
    double timeout = atof(argv[4]);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    double real_now = ts.tv_sec + ts.tv_nsec / 1e9;
    /* convert the caller's CLOCK_REALTIME start (ns) to CLOCK_MONOTONIC */
    double t0 = now() - (real_now - atof(argv[5]) / 1e9);
    pid_t pid = argc == 7 ? (pid_t)atol(argv[6]) : 0;
    long cnt = -1;
    /* A hung FUSE server blocks readdir()/statx() in the kernel, where the
     * polling loop cannot see the time pass: SIGALRM (default action: die)
     * ends us, which a fatal signal can do even inside a FUSE request. */
    signal(SIGALRM, SIG_DFL);
    alarm((unsigned)timeout + 2);
    for (;;) {
        if (is_mountpoint(dir)) {
            cnt = count_entries(dir);
            if (cnt >= want) break;
        }
        if (pid > 0 && kill(pid, 0) != 0) {
            fprintf(stderr, "waitmount: mount process %d exited early\n", (int)pid);
            return 2;
        }
        if (now() - t0 > timeout) {
            fprintf(stderr, "waitmount: timeout, %ld entries seen\n", cnt);
            return 2;
        }
        usleep(200);
    }
    printf("%.3f %ld\n", (now() - t0) * 1e3, cnt);
    return 0;
}

static int cmd_timeit(int argc, char **argv)
{
    if (argc < 3) return 64;
    double t0 = now();
    pid_t pid = fork();
    if (pid < 0) die("fork");
    if (pid == 0) {
        int fd = open("/dev/null", O_WRONLY);
        if (fd >= 0) { dup2(fd, 1); dup2(fd, 2); }
        execvp(argv[2], &argv[2]);
        _exit(127);
    }
    int status;
    if (waitpid(pid, &status, 0) != pid) die("waitpid");
    double t = now() - t0;
    printf("%.3f\n", t * 1e3);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
}

int main(int argc, char **argv)
{
    int rc = 64;
    if (argc >= 2) {
        if (!strcmp(argv[1], "punch")) rc = cmd_punch(argc, argv);
        else if (!strcmp(argv[1], "sparsefill")) rc = cmd_sparsefill(argc, argv);
        else if (!strcmp(argv[1], "mkdata")) rc = cmd_mkdata(argc, argv);
        else if (!strcmp(argv[1], "opentime")) rc = cmd_opentime(argc, argv);
        else if (!strcmp(argv[1], "timeit")) rc = cmd_timeit(argc, argv);
        else if (!strcmp(argv[1], "waitmount")) rc = cmd_waitmount(argc, argv);
    }
    if (rc == 64)
        fprintf(stderr, "usage: benchtool punch|sparsefill|mkdata|opentime|waitmount|timeit ... (see source)\n");
    return rc;
}
