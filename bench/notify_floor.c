/* The least a seccomp user-notify supervisor must do, as a reference side for
 * bench/sessions.py: what the notification round trip itself costs on this
 * machine, apart from anything agentwarden does.
 *
 *   notify_floor CMD [ARG...]
 *
 * Runs CMD under a filter that notifies on the calls a session notifies on
 * that the bench exercises (execve, execveat; open, openat and creat that can
 * write) and answers each notification from this process: read the path
 * (and, for an exec, argv) from the task, check the notification is still
 * valid, continue. No policy, no records, no exec verification. Exits with
 * CMD's status once every process under the filter is gone.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef SECCOMP_IOCTL_NOTIF_SET_FLAGS
#define SECCOMP_IOCTL_NOTIF_SET_FLAGS SECCOMP_IOW(4, __u64)
#endif
#ifndef SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP
#define SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP 1
#endif

#ifndef __NR_open   /* aarch64 has only openat */
#define __NR_open 0xffffffff
#define __NR_creat 0xffffffff
#endif

#define WRITE_BITS (O_WRONLY | O_RDWR | O_CREAT | O_TRUNC | O_APPEND)
#define LOAD_NR BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr))
#define LOAD_ARG(n) BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[n]))
#define NOTIFY BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_USER_NOTIF)
#define ALLOW BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW)

static int install_filter(void)
{
    struct sock_filter code[] = {
        LOAD_NR,
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_execve, 10, 0),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_execveat, 9, 0),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_creat, 8, 0),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_open, 2, 0),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_openat, 3, 0),
        ALLOW,
        LOAD_ARG(1),    /* open: flags */
        BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, WRITE_BITS, 3, 2),
        LOAD_ARG(2),    /* openat: flags */
        BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, WRITE_BITS, 1, 0),
        ALLOW,
        NOTIFY,
    };
    struct sock_fprog prog = { sizeof(code) / sizeof(code[0]), code };
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
        return -1;
    return syscall(__NR_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_NEW_LISTENER, &prog);
}

static void send_fd(int sock, int fd)
{
    char byte = 0, control[CMSG_SPACE(sizeof(int))] = {0};
    struct iovec io = { &byte, 1 };
    struct msghdr msg = { .msg_iov = &io, .msg_iovlen = 1, .msg_control = control,
                          .msg_controllen = sizeof(control) };
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof(fd));
    if (sendmsg(sock, &msg, 0) < 0)
        _exit(126);
}

static int receive_fd(int sock)
{
    char byte, control[CMSG_SPACE(sizeof(int))];
    struct iovec io = { &byte, 1 };
    struct msghdr msg = { .msg_iov = &io, .msg_iovlen = 1, .msg_control = control,
                          .msg_controllen = sizeof(control) };
    if (recvmsg(sock, &msg, 0) <= 0 || !CMSG_FIRSTHDR(&msg))
        return -1;
    int fd;
    memcpy(&fd, CMSG_DATA(CMSG_FIRSTHDR(&msg)), sizeof(fd));
    return fd;
}

/* What a supervisor reads to decide: up to 256 bytes at addr, in one call. */
static void read_task(pid_t pid, uint64_t addr, char *out)
{
    size_t size = 4096 - addr % 4096 < 256 ? 4096 - addr % 4096 : 256;
    struct iovec local = { out, size }, remote = { (void *)addr, size };
    process_vm_readv(pid, &local, 1, &remote, 1, 0);
}

static void answer(int fd, const struct seccomp_notif *n)
{
    char buf[256];
    int nr = n->data.nr;
    if (nr == __NR_execve || nr == __NR_execveat) {
        int at = nr == __NR_execveat;
        read_task(n->pid, n->data.args[at], buf);           /* the filename */
        uint64_t argv[32];
        read_task(n->pid, n->data.args[at + 1], (char *)argv);
        for (int i = 0; i < 32 && argv[i]; i++)              /* the arguments */
            read_task(n->pid, argv[i], buf);
    } else {
        read_task(n->pid, n->data.args[nr == __NR_openat], buf);   /* the path */
    }
    __u64 id = n->id;
    if (ioctl(fd, SECCOMP_IOCTL_NOTIF_ID_VALID, &id))
        return;
    struct seccomp_notif_resp resp = { .id = n->id, .flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE };
    ioctl(fd, SECCOMP_IOCTL_NOTIF_SEND, &resp);
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: notify_floor CMD [ARG...]\n");
        return 2;
    }
    int pair[2];
    if (socketpair(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0, pair))
        return perror("socketpair"), 1;
    pid_t child = fork();
    if (child == 0) {
        int fd = install_filter();
        if (fd < 0)
            _exit(126);
        send_fd(pair[1], fd);
        close(fd);
        execvp(argv[1], argv + 1);
        _exit(127);
    }
    int fd = receive_fd(pair[0]);
    if (fd < 0) {
        fprintf(stderr, "notify_floor: no listener from the child\n");
        return 1;
    }
    ioctl(fd, SECCOMP_IOCTL_NOTIF_SET_FLAGS, SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP, 0);
    int status = 0, reaped = 0;
    for (;;) {
        struct seccomp_notif n;
        memset(&n, 0, sizeof(n));
        if (ioctl(fd, SECCOMP_IOCTL_NOTIF_RECV, &n) == 0)
            answer(fd, &n);
        else if (errno == ENOENT) {   /* a task went away, or all of them did */
            if (waitpid(child, &status, WNOHANG) == child) {
                reaped = 1;
                break;
            }
        } else if (errno != EINTR)
            break;
    }
    if (!reaped && waitpid(child, &status, 0) != child)
        return 1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}
