/* Races the supervisor's look at a script's #! line, from two sides.
 *
 *   shebang_swap flip SCRIPT ALLOWED FORBIDDEN SECONDS
 *     swaps SCRIPT, in a loop, between a script whose #! line names ALLOWED
 *     and one naming FORBIDDEN (hard link, then rename over SCRIPT: a file
 *     open for writing could not be executed at all, ETXTBSY). Run by the
 *     agent outside the session -- its harness, say.
 *   shebang_swap exec SCRIPT MARKER ATTEMPTS
 *     execs SCRIPT with MARKER as its argument, in children, under
 *     `agentwarden run`: the supervisor reads the #! line, then the kernel
 *     reads it again, and a child whose check saw ALLOWED may be run by
 *     FORBIDDEN. A refused exec (EPERM: the check saw FORBIDDEN) is tried
 *     again. Stops after ATTEMPTS children, once 3 were killed and 1 ran, or
 *     once MARKER exists (FORBIDDEN ran: the attack won).
 *     Prints "killed=K ran=R refused=F other=O".
 *
 * FORBIDDEN is a program that would create MARKER (a copy of touch); the
 * script's body, run by ALLOWED (a shell), exits 0 and creates nothing. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int write_script(const char *path, const char *interpreter)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0755);
    if (fd < 0)
        return -1;
    int ok = dprintf(fd, "#!%s\nexit 0\n", interpreter) > 0;
    return close(fd) == 0 && ok ? 0 : -1;
}

static int flip(const char *script, const char *allowed, const char *forbidden, int seconds)
{
    char sources[2][4096], spare[4096];
    snprintf(sources[0], sizeof(sources[0]), "%s.allowed", script);
    snprintf(sources[1], sizeof(sources[1]), "%s.forbidden", script);
    snprintf(spare, sizeof(spare), "%s.next", script);
    if (write_script(sources[0], allowed) || write_script(sources[1], forbidden)) {
        perror("shebang_swap: writing the scripts");
        return 2;
    }
    time_t until = time(NULL) + seconds;
    long swaps = 0;
    for (unsigned i = 0; time(NULL) < until; i++) {
        unlink(spare);
        if (link(sources[i & 1], spare) == 0 && rename(spare, script) == 0)
            swaps++;
    }
    printf("swaps=%ld\n", swaps);
    return 0;
}

static int run(const char *script, const char *marker, int attempts)
{
    int killed = 0, ran = 0, refused = 0, other = 0;
    for (int i = 0; i < attempts && (killed < 3 || ran < 1) && access(marker, F_OK) != 0; i++) {
        pid_t pid = fork();
        if (pid == 0) {
            char *args[] = { (char *)script, (char *)marker, NULL };
            for (int k = 0; k < 1000; k++) {
                execve(script, args, environ);
                if (errno != EPERM && errno != ENOENT)
                    break;   /* refused while the line said FORBIDDEN (or between swaps): again */
            }
            _exit(errno == EPERM ? 126 : 127);
        }
        int status;
        waitpid(pid, &status, 0);
        if (WIFSIGNALED(status) && WTERMSIG(status) == 9)
            killed++;
        else if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
            ran++;
        else if (WIFEXITED(status) && WEXITSTATUS(status) == 126)
            refused++;
        else
            other++;
    }
    printf("killed=%d ran=%d refused=%d other=%d\n", killed, ran, refused, other);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 6 && !strcmp(argv[1], "flip"))
        return flip(argv[2], argv[3], argv[4], atoi(argv[5]));
    if (argc == 5 && !strcmp(argv[1], "exec"))
        return run(argv[2], argv[3], atoi(argv[4]));
    fprintf(stderr, "usage: shebang_swap flip SCRIPT ALLOWED FORBIDDEN SECONDS\n"
                    "       shebang_swap exec SCRIPT MARKER ATTEMPTS\n");
    return 2;
}
