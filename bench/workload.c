/* Benchmark workloads for bench/run.py, built with gcc at bench time.
 *
 * Each mode times only its loop (not process start-up) and prints one JSON
 * object on stdout.
 *
 *   workload open COUNT PATH
 *       COUNT x open(PATH, O_RDONLY) + close: the per-open cost.
 *   workload exec COUNT PROGRAM
 *       COUNT x fork + execve(PROGRAM) + waitpid: the per-exec cost.
 *   workload change COUNT DIR
 *       COUNT x one of chmod, rename, rename back, link, unlink, in turn, on
 *       DIR/f: the per-call cost of file changes.
 *   workload rate RATE SECONDS DIR FILES [CGROUP_PROCS]
 *       Joins the cgroup first when CGROUP_PROCS is given (so every open that
 *       follows is an agent event and nothing before it is), then opens
 *       DIR/f<i> (i cycling over FILES names) at RATE opens/s, paced in 1 ms
 *       ticks, until SECONDS have passed. A late tick is caught up at once;
 *       what could not be caught up by the deadline is not made. Reports the
 *       opens made and the ticks it was late for: the rate it really got.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define NS_PER_S 1000000000LL
#define TICK_NS 1000000LL

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * NS_PER_S + ts.tv_nsec;
}

static void die(const char *what)
{
    fprintf(stderr, "workload: %s: %s\n", what, strerror(errno));
    exit(2);
}

static int open_loop(long count, const char *path)
{
    long long start = now_ns();
    for (long i = 0; i < count; i++) {
        int fd = open(path, O_RDONLY);
        if (fd < 0)
            die(path);
        close(fd);
    }
    long long elapsed = now_ns() - start;
    printf("{\"ops\": %ld, \"elapsed_ns\": %lld}\n", count, elapsed);
    return 0;
}

static int exec_loop(long count, const char *program)
{
    char *const argv[] = {(char *)program, NULL};
    char *const envp[] = {NULL};
    long long start = now_ns();
    for (long i = 0; i < count; i++) {
        pid_t pid = fork();
        if (pid < 0)
            die("fork");
        if (pid == 0) {
            execve(program, argv, envp);
            _exit(127);
        }
        int status;
        if (waitpid(pid, &status, 0) < 0)
            die("waitpid");
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            fprintf(stderr, "workload: %s failed (status %d)\n", program, status);
            return 2;
        }
    }
    long long elapsed = now_ns() - start;
    printf("{\"ops\": %ld, \"elapsed_ns\": %lld}\n", count, elapsed);
    return 0;
}

static int change_loop(long count, const char *dir)
{
    char f[4096], g[4096], h[4096];
    snprintf(f, sizeof(f), "%s/f", dir);
    snprintf(g, sizeof(g), "%s/g", dir);
    snprintf(h, sizeof(h), "%s/h", dir);
    int fd = open(f, O_WRONLY | O_CREAT, 0644);
    if (fd < 0)
        die(f);
    close(fd);
    long long start = now_ns();
    for (long i = 0; i < count; i++) {
        int failed;
        switch (i % 5) {
        case 0: failed = chmod(f, 0644); break;
        case 1: failed = rename(f, g); break;
        case 2: failed = rename(g, f); break;
        case 3: failed = link(f, h); break;
        default: failed = unlink(h); break;
        }
        if (failed)
            die("change");
    }
    long long elapsed = now_ns() - start;
    unlink(f);
    printf("{\"ops\": %ld, \"elapsed_ns\": %lld}\n", count, elapsed);
    return 0;
}

static void join_cgroup(const char *procs)
{
    FILE *f = fopen(procs, "w");
    if (!f || fprintf(f, "%d\n", getpid()) < 0 || fclose(f) != 0)
        die(procs);
}

static int rate_loop(long rate, double seconds, const char *dir, long files, const char *procs)
{
    char path[4096];
    long long ticks = (long long)(seconds * NS_PER_S / TICK_NS);
    long made = 0, late_ticks = 0, file = 0;
    /* Opens due by the end of each tick; fractional rates carry over. */
    double per_tick = rate * (double)TICK_NS / NS_PER_S;
    if (procs)
        join_cgroup(procs);
    long long start = now_ns();
    for (long long tick = 1; tick <= ticks; tick++) {
        for (long due = (long)(per_tick * tick); made < due; made++) {
            snprintf(path, sizeof(path), "%s/f%ld", dir, file);
            file = (file + 1) % files;
            int fd = open(path, O_RDONLY);
            if (fd >= 0)
                close(fd);
        }
        long long tick_end = start + tick * TICK_NS;
        long long now = now_ns();
        if (now >= start + ticks * TICK_NS)
            break;  /* out of time: stop even if behind, the caller sees the rate we got */
        if (now > tick_end) {
            late_ticks++;
            continue;
        }
        struct timespec until = {tick_end / NS_PER_S, tick_end % NS_PER_S};
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &until, NULL) == EINTR)
            ;
    }
    long long elapsed = now_ns() - start;
    printf("{\"ops\": %ld, \"elapsed_ns\": %lld, \"late_ticks\": %ld}\n", made, elapsed, late_ticks);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 4 && strcmp(argv[1], "open") == 0)
        return open_loop(atol(argv[2]), argv[3]);
    if (argc == 4 && strcmp(argv[1], "exec") == 0)
        return exec_loop(atol(argv[2]), argv[3]);
    if (argc == 4 && strcmp(argv[1], "change") == 0)
        return change_loop(atol(argv[2]), argv[3]);
    if ((argc == 6 || argc == 7) && strcmp(argv[1], "rate") == 0)
        return rate_loop(atol(argv[2]), atof(argv[3]), argv[4], atol(argv[5]),
                         argc == 7 ? argv[6] : NULL);
    fprintf(stderr, "usage: workload open COUNT PATH | exec COUNT PROGRAM | change COUNT DIR |\n"
                    "       workload rate RATE SECONDS DIR FILES [CGROUP_PROCS]\n");
    return 2;
}
