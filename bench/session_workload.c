/* One side of bench/sessions.py, built with gcc at bench time.
 *
 *   session_workload PROGRAM MISSING DIR
 *
 * Reads one operation per line on stdin, does it once, and answers with its
 * latency in ns on a line of stdout; the bench alternates its sides one
 * operation at a time, so drift of the machine hits every side alike.
 *
 *   exec      fork + execve(PROGRAM same line) + waitpid
 *   execnew   the same, with a new first argument each time (a command line
 *             the supervisor has not seen)
 *   execpy    execnew through PROGRAM's path with a "." component, which the
 *             compiled fast path leaves to the supervisor's Python
 *   execfail  execve(MISSING) in-process, which must fail ENOENT: the
 *             syscall alone
 *   wopen     open(DIR/w<i>, O_WRONLY|O_CREAT|O_TRUNC) + close
 *   wopenrel  the same by a path relative to the cwd, DIR: open(w<i>, ...)
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

static int fail(const char *what, const char *path)
{
    fprintf(stderr, "session_workload: %s %s: %s\n", what, path, strerror(errno));
    return 1;
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: session_workload PROGRAM MISSING DIR (operations on stdin)\n");
        return 2;
    }
    const char *program = argv[1], *missing = argv[2], *dir = argv[3];
    char line[64], path[4096], dotted[4096];
    const char *slash = strrchr(program, '/');
    if (!slash || snprintf(dotted, sizeof(dotted), "%.*s/.%s", (int)(slash - program), program, slash)
                      >= (int)sizeof(dotted)) {
        fprintf(stderr, "session_workload: PROGRAM must be a path\n");
        return 2;
    }
    if (chdir(dir) < 0)
        return fail("chdir to", dir);
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (long i = 0; fgets(line, sizeof(line), stdin); i++) {
        line[strcspn(line, "\n")] = 0;
        long long start = now_ns();
        if (strcmp(line, "execfail") == 0) {
            char *args[] = {(char *)missing, NULL};
            execv(missing, args);
            if (errno != ENOENT)
                return fail("exec of", missing);
        } else if (strcmp(line, "exec") == 0 || strcmp(line, "execnew") == 0 || strcmp(line, "execpy") == 0) {
            char nth[32];
            snprintf(nth, sizeof(nth), "%lld-%ld", start, i);
            const char *run = strcmp(line, "execpy") == 0 ? dotted : program;
            pid_t pid = fork();
            if (pid == 0) {
                /* Two arguments: with exactly one, coreutils' true loads the
                 * locale (to answer --help), 200 us more. */
                char *args[] = {(char *)run, strcmp(line, "exec") != 0 ? nth : "same", "line", NULL};
                execv(run, args);
                _exit(127);
            }
            int status;
            if (pid < 0 || waitpid(pid, &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
                errno = pid < 0 ? errno : ECHILD;
                return fail("fork+exec of", program);
            }
        } else if (strcmp(line, "wopen") == 0 || strcmp(line, "wopenrel") == 0) {
            if (strcmp(line, "wopen") == 0)
                snprintf(path, sizeof(path), "%s/w%ld", dir, i % 64);
            else
                snprintf(path, sizeof(path), "w%ld", i % 64);
            int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
            if (fd < 0)
                return fail("open", path);
            close(fd);
        } else {
            fprintf(stderr, "session_workload: unknown operation %s\n", line);
            return 2;
        }
        printf("%lld\n", now_ns() - start);
    }
    return 0;
}
