/* The flood of bench/flood.py, built statically with gcc at bench time (no
 * dynamic loader: a process of it makes no syscall the bench did not count).
 *
 *   flood flood RATE SECONDS DIR FILES CGROUP_PROCS
 *       Joins the cgroup, then opens and closes DIR/f<i> (i cycling over FILES
 *       names) at RATE opens/s, paced in 1 ms ticks (a late tick is caught up
 *       at once), or as fast as it can with RATE 0, until SECONDS have passed.
 *       Prints the calls it made once in the cgroup, each one record:
 *       {"opens", "closes", "elapsed_ns", "late_ticks"}. The close of the
 *       cgroup.procs descriptor is the first (the open and the write came
 *       before the join, untagged); the exit follows the print.
 *   flood exec CGROUP_PROCS PROGRAM MARK [linger]
 *       Joins the cgroup (one close), then execve(PROGRAM, [PROGRAM, "target",
 *       MARK]) (or "linger"): one exec record and, killed or not, one exit.
 *   flood target ...
 *       Returns at once: the forbidden program (a copy of this one), which
 *       makes no syscall of its own if it runs at all.
 *   flood linger ...
 *       Sleeps LINGER_SECONDS, then returns: the forbidden program the daemon
 *       kills (no allow rule matches it), which runs until then unless killed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define NS_PER_S 1000000000LL
#define TICK_NS 1000000LL
#define LINGER_SECONDS 30

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * NS_PER_S + ts.tv_nsec;
}

static void die(const char *what)
{
    fprintf(stderr, "flood: %s: %s\n", what, strerror(errno));
    exit(2);
}

/* Every call after the write is the agent's: the close is one fd record. */
static void join_cgroup(const char *procs)
{
    int fd = open(procs, O_WRONLY);
    if (fd < 0)
        die(procs);
    if (write(fd, "0", 1) != 1)
        die(procs);
    close(fd);
}

static int flood(double rate, double seconds, const char *dir, long files, const char *procs)
{
    char path[4096];
    long long deadline_ticks = (long long)(seconds * NS_PER_S / TICK_NS);
    long opens = 0, closes = 0, late_ticks = 0, file = 0;
    double per_tick = rate * TICK_NS / NS_PER_S;   /* opens due by each tick's end */
    join_cgroup(procs);
    closes++;
    long long start = now_ns(), end = start + deadline_ticks * TICK_NS;
    for (long long tick = 1;; tick++) {
        long due = rate > 0 ? (long)(per_tick * tick) : opens + 1000;
        while (opens < due) {
            snprintf(path, sizeof(path), "%s/f%ld", dir, file);
            file = (file + 1) % files;
            int fd = open(path, O_RDONLY);
            opens++;
            if (fd >= 0) {
                close(fd);
                closes++;
            }
        }
        long long now = now_ns();
        if (now >= end)
            break;
        if (rate <= 0)
            continue;
        long long tick_end = start + tick * TICK_NS;
        if (now > tick_end) {
            late_ticks++;
            continue;
        }
        struct timespec until = {tick_end / NS_PER_S, tick_end % NS_PER_S};
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &until, NULL) == EINTR)
            ;
    }
    printf("{\"opens\": %ld, \"closes\": %ld, \"elapsed_ns\": %lld, \"late_ticks\": %ld}\n",
           opens, closes, now_ns() - start, late_ticks);
    return 0;
}

static int exec_joined(const char *procs, const char *program, const char *mark, const char *mode)
{
    char *const argv[] = {(char *)program, (char *)mode, (char *)mark, NULL};
    char *const envp[] = {NULL};
    join_cgroup(procs);
    execve(program, argv, envp);
    _exit(127);
}

int main(int argc, char **argv)
{
    if (argc == 7 && strcmp(argv[1], "flood") == 0)
        return flood(atof(argv[2]), atof(argv[3]), argv[4], atol(argv[5]), argv[6]);
    if ((argc == 5 || (argc == 6 && strcmp(argv[5], "linger") == 0)) && strcmp(argv[1], "exec") == 0)
        return exec_joined(argv[2], argv[3], argv[4], argc == 6 ? "linger" : "target");
    if (argc >= 2 && strcmp(argv[1], "target") == 0)
        return 0;
    if (argc >= 2 && strcmp(argv[1], "linger") == 0) {
        struct timespec linger = {LINGER_SECONDS, 0};
        while (nanosleep(&linger, &linger) == -1 && errno == EINTR)
            ;
        return 0;
    }
    fprintf(stderr, "usage: flood flood RATE SECONDS DIR FILES CGROUP_PROCS | "
                    "flood exec CGROUP_PROCS PROGRAM MARK [linger] | flood target | flood linger\n");
    return 2;
}
