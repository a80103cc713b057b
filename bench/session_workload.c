/* Per-operation latencies for bench/sessions.py, built with gcc at bench time.
 *
 *   session_workload exec COUNT PROGRAM   fork + execve(PROGRAM) + waitpid
 *   session_workload execnew COUNT PROGRAM  the same, with a new argument each time
 *                                           (a command line the supervisor has not seen)
 *   session_workload execfail COUNT PATH    execve(PATH) of a missing file, in-process:
 *                                           the syscall alone (it must fail ENOENT)
 *   session_workload wopen COUNT DIR      open(DIR/w<i>, O_WRONLY|O_CREAT|O_TRUNC) + close
 *
 * Prints {"ns": [one latency per operation]} on stdout.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: session_workload exec|execnew|execfail|wopen COUNT PROGRAM|DIR\n");
        return 2;
    }
    int count = atoi(argv[2]);
    long long *ns = calloc(count, sizeof(*ns));
    char path[4096];
    for (int i = 0; i < count; i++) {
        long long start = now_ns();
        if (strcmp(argv[1], "execfail") == 0) {
            char *args[] = {argv[3], NULL};
            execv(argv[3], args);
            if (errno != ENOENT) {
                fprintf(stderr, "session_workload: exec of %s: %s\n", argv[3], strerror(errno));
                return 1;
            }
        } else if (strncmp(argv[1], "exec", 4) == 0) {
            char nth[32];
            snprintf(nth, sizeof(nth), "%lld-%d", start, i);
            pid_t pid = fork();
            if (pid == 0) {
                char *args[] = {argv[3], strcmp(argv[1], "execnew") == 0 ? nth : NULL, NULL};
                execv(argv[3], args);
                _exit(127);
            }
            int status;
            if (waitpid(pid, &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
                fprintf(stderr, "session_workload: exec of %s failed\n", argv[3]);
                return 1;
            }
        } else {
            snprintf(path, sizeof(path), "%s/w%d", argv[3], i % 64);
            int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
            if (fd < 0) {
                fprintf(stderr, "session_workload: open %s: %s\n", path, strerror(errno));
                return 1;
            }
            close(fd);
        }
        ns[i] = now_ns() - start;
    }
    printf("{\"ns\": [");
    for (int i = 0; i < count; i++)
        printf("%s%lld", i ? ", " : "", ns[i]);
    printf("]}\n");
    return 0;
}
