/* agentwarden kernel -> user event records.
 *
 * This header is the one definition of the records the BPF program emits.
 * User space never retypes them: the probe takes the layouts from BCC (the
 * leaf types of the scratch maps below, which hold exactly these structs)
 * and the numeric constants from the `#define AW_*` lines of this file.
 * Keep every constant a plain `#define AW_NAME <integer>` so it can be read.
 * What the supervisor shares with the program (exec approvals, the exec
 * stash) is in fastpath.h.
 */
#ifndef AGENTWARDEN_H
#define AGENTWARDEN_H

/* Record kinds (aw_header.kind). */
#define AW_KIND_EXEC 1
#define AW_KIND_OPEN 2
#define AW_KIND_FORK 3
#define AW_KIND_EXIT 4
#define AW_KIND_CHDIR 5
#define AW_KIND_FD 6
#define AW_KIND_CHANGE 7
#define AW_KIND_SIDEDOOR 8
#define AW_KIND_MOVE 9
#define AW_KIND_COUNT 10

/* Per-CPU counters: emitted records at index kind, lost records at
 * AW_COUNTER_DROPPED_BASE + kind; then the agent processes that could not be
 * tracked (agent_tasks full: they are watched only inside their cgroups). */
#define AW_COUNTER_DROPPED_BASE 16
#define AW_COUNTER_UNTRACKED 32
/* fd records not emitted: their fd was one user space does not follow (see
 * "which fd records go out" in the program). */
#define AW_COUNTER_FD_SKIPPED 33
/* opens not emitted: folded into a repeat count (see "repeated opens" in the
 * program); the probe sends one record for each key's count. */
#define AW_COUNTER_FOLDED 34
#define AW_COUNTER_SLOTS 35

/* Limits. A path longer than AW_MAX_PATH is cut and flagged; it then never
 * matches an allow rule (user space treats it as unresolvable). */
#define AW_MAX_PATH 4096
#define AW_MAX_ARGS 64
#define AW_ARG_MAX 1024
#define AW_ARGV_BYTES 4096
#define AW_COMM_LEN 16
#define AW_MAX_CGROUP_LEVELS 32
#define AW_MAX_AGENT_CGROUPS 4096
#define AW_MAX_INFLIGHT 16384
#define AW_MAX_INFLIGHT_CHANGES 1024   /* threads of agents in a file change at once (8 KiB each) */
#define AW_RINGBUF_PAGES 4096
/* The second ring: exec, fork, exit and move records, and records of a call
 * killed in the kernel. Opens never go there, so a flood of them cannot take
 * its room. */
#define AW_VITAL_RINGBUF_PAGES 1024
#define AW_MAX_AGENT_TASKS 65536
#define AW_CGROUP_PATH_MAX 256   /* LPM trie keys hold at most 256 data bytes */
#define AW_DENY_PATH_MAX 252  /* LPM trie keys hold at most 256 data bytes */
#define AW_MAX_DENY_RULES 65536

/* agent_cgroups value: agent number, plus this bit for `agentwarden run`
 * session cgroups, whose every exec must match what the daemon approved. */
#define AW_AGENT_SESSION_BIT 0x80000000

/* agent_policy value: what the policy asks of an agent's processes in the kernel. */
#define AW_POLICY_KILL_ON_LEAVE 1   /* enforce mode, on-violation kill or kill-agent */
#define AW_POLICY_EXEC_PROMPT 2     /* the daemon acts on its exec violations: wake the probe at once */
/* agent_policy[AW_POLICY_KNOWN_KEY] (no agent's number) holds AW_POLICY_KNOWN once the
 * probe has the daemon's AW_POLICY_EXEC_PROMPT list; until then every exec is prompt. */
#define AW_POLICY_KNOWN_KEY 0
#define AW_POLICY_KNOWN 4

/* agent_tasks value flags */
#define AW_TASK_LEFT 1   /* out of its agent's cgroups (or in another agent's) */
#define AW_TASK_KILL 2   /* left where the policy kills: dies at its next watched call */

/* aw_move.flags */
#define AW_MOVE_LEFT 1              /* the destination is not its agent's: a violation */
#define AW_MOVE_KILLED_IN_KERNEL 2  /* the mover was the moved process: killed at once */
#define AW_MOVE_KILL_PENDING 4      /* moved by another: killed at its next watched call */
#define AW_MOVE_PATH_TRUNCATED 8    /* dst_path cut at AW_CGROUP_PATH_MAX - 1 bytes */
#define AW_MOVE_AT_CLONE 16         /* born elsewhere: clone3(CLONE_INTO_CGROUP); no dst_path */

/* aw_deny_value.applies */
#define AW_DENY_EXEC 1
#define AW_DENY_OPEN 2   /* files.deny: opens, and the paths file changes (aw_change) touch */

/* aw_exec.flags */
#define AW_EXEC_ARGV_TRUNCATED 1
#define AW_EXEC_FILENAME_UNREADABLE 2
#define AW_EXEC_SEEN_BY_KERNEL 4
#define AW_EXEC_DIED_BEFORE_RETURN 8
#define AW_EXEC_FILENAME_TRUNCATED 16
#define AW_EXEC_KILLED_IN_KERNEL 32
#define AW_EXEC_NOT_APPROVED 64   /* session exec that ran something else than was approved */
#define AW_EXEC_INTERPRETED 128   /* the kernel ran it through an interpreter (#!, binfmt_misc):
                                     the interpreter has its own record (AW_SYS_INTERPRETER) */

/* aw_exec.real_argc when the arguments were more than counted */
#define AW_MAX_ARGC_COUNTED 1024
#define AW_ARGC_UNKNOWN 0xFFFFFFFF
/* Interpreters judged per exec: the kernel nests at most 5 (BINPRM_MAX_RECURSION + 1). */
#define AW_MAX_INTERPRETERS 5
#define AW_INTERPRETER_ARGS 8
/* Heartbeat: the probe calls execve, execveat and openat with this address as
 * the path (unmapped: the calls fail with EFAULT); the programs on their
 * entry count it in `heartbeats`, by slot. A slot that stops counting: that
 * program no longer runs (detached) while the probe lives. */
#define AW_HEARTBEAT_ADDRESS 0x4157484200
#define AW_HEARTBEAT_EXECVE 0
#define AW_HEARTBEAT_EXECVEAT 1
#define AW_HEARTBEAT_OPENAT 2
#define AW_HEARTBEAT_SLOTS 3   /* arguments an interpreter's record carries */

/* aw_file.flags */
#define AW_FILE_PATH_UNREADABLE 1
#define AW_FILE_PATH_TRUNCATED 2
#define AW_FILE_OPENAT2 4
#define AW_FILE_KILLED_IN_KERNEL 8
/* open: the fd it returned is one user space does not follow (a read-only
 * regular file, a device, a FIFO, a socket): its copies and closes are not
 * recorded (counted: AW_COUNTER_FD_SKIPPED) */
#define AW_FILE_FD_UNFOLLOWED 16

/* Syscall identifiers carried in aw_file.syscall and aw_exec.syscall. */
#define AW_SYS_EXECVE 1
#define AW_SYS_EXECVEAT 2
#define AW_SYS_OPEN 3
#define AW_SYS_OPENAT 4
#define AW_SYS_OPENAT2 5
#define AW_SYS_CREAT 6
#define AW_SYS_CHDIR 7
#define AW_SYS_FCHDIR 8
/* ... and in aw_fd.syscall: the calls that make, copy or drop descriptors. */
#define AW_SYS_DUP 9
#define AW_SYS_DUP2 10
#define AW_SYS_DUP3 11
#define AW_SYS_FCNTL_DUPFD 12
#define AW_SYS_FCNTL_DUPFD_CLOEXEC 13
#define AW_SYS_FCNTL_SETFD 14
#define AW_SYS_CLOSE 15
#define AW_SYS_CLOSE_RANGE 16
#define AW_SYS_PIDFD_OPEN 17
#define AW_SYS_PIDFD_GETFD 18
/* ... in aw_change.syscall: the calls that change files without opening them. */
#define AW_SYS_UNLINK 19
#define AW_SYS_UNLINKAT 20
#define AW_SYS_RMDIR 21
#define AW_SYS_RENAME 22
#define AW_SYS_RENAMEAT 23
#define AW_SYS_RENAMEAT2 24
#define AW_SYS_TRUNCATE 25
#define AW_SYS_FTRUNCATE 26
#define AW_SYS_CHMOD 27
#define AW_SYS_FCHMOD 28
#define AW_SYS_FCHMODAT 29
#define AW_SYS_FCHMODAT2 30
#define AW_SYS_CHOWN 31
#define AW_SYS_LCHOWN 32
#define AW_SYS_FCHOWN 33
#define AW_SYS_FCHOWNAT 34
#define AW_SYS_LINK 35
#define AW_SYS_LINKAT 36
#define AW_SYS_SYMLINK 37
#define AW_SYS_SYMLINKAT 38
#define AW_SYS_MKDIR 39
#define AW_SYS_MKDIRAT 40
/* ... and in a side door record (aw_file, kind AW_KIND_SIDEDOOR): calls that
 * reach files without the open syscalls, or change what paths mean. */
#define AW_SYS_IO_URING_SETUP 41
#define AW_SYS_OPEN_BY_HANDLE_AT 42
#define AW_SYS_UNSHARE 43
#define AW_SYS_CLONE 44
#define AW_SYS_CLONE3 45
#define AW_SYS_SETNS 46
#define AW_SYS_MOUNT 47
#define AW_SYS_UMOUNT 48
#define AW_SYS_FSOPEN 49
#define AW_SYS_FSMOUNT 50
#define AW_SYS_MOVE_MOUNT 51
#define AW_SYS_OPEN_TREE 52
#define AW_SYS_FSPICK 53
#define AW_SYS_MOUNT_SETATTR 54
#define AW_SYS_CHROOT 55
#define AW_SYS_PIVOT_ROOT 56
/* Not a syscall: the interpreter (#! line, binfmt_misc handler) the kernel
 * started for an exec, recorded as an exec of its own at sched_process_exec. */
#define AW_SYS_INTERPRETER 57

/* Side door groups, as the policy names them ([agent.NAME.syscalls] allow =
 * ["io_uring", ...]): bits of a side door record's group and of the
 * sidedoor_allowed map's masks. */
#define AW_SIDEDOOR_IO_URING 1
#define AW_SIDEDOOR_OPEN_BY_HANDLE 2
#define AW_SIDEDOOR_UNSHARE 4      /* unshare, and clone/clone3 with CLONE_NEW* flags */
#define AW_SIDEDOOR_SETNS 8
#define AW_SIDEDOOR_MOUNT 16       /* mount, umount2, fsopen, fsmount, move_mount, open_tree, fspick, mount_setattr */
#define AW_SIDEDOOR_CHROOT 32
#define AW_SIDEDOOR_PIVOT_ROOT 64

/* Common header of every record. */
struct aw_header {
    u64 ts_ns;            /* bpf_ktime_get_boot_ns() */
    u64 cgroup_id;        /* the task's own cgroup (v2) */
    u64 agent_cgroup_id;  /* the tagged cgroup (itself or nearest tagged ancestor) */
    u32 kind;             /* AW_KIND_* */
    u32 pid;              /* thread id */
    u32 tgid;             /* process id */
    u32 ppid;             /* parent process id if seen forking, else 0 */
    u32 uid;
    u32 gid;
    char comm[AW_COMM_LEN];
};

/* execve / execveat: argv and filename as given, the kernel's own copy of
 * the filename from sched_process_exec, and the syscall result. */
struct aw_exec {
    struct aw_header h;
    s64 ret;
    s32 dirfd;            /* execveat dirfd; AT_FDCWD for execve */
    u32 at_flags;         /* execveat flags */
    u32 syscall;          /* AW_SYS_EXECVE / AW_SYS_EXECVEAT */
    u32 flags;            /* AW_EXEC_* */
    u32 argc;             /* arguments read (<= AW_MAX_ARGS) */
    u32 argv_len;         /* bytes used in argv, NUL separated */
    u32 deny_rule;        /* in-kernel deny rule that killed it, else 0 */
    u32 real_argc;        /* all arguments (pointers counted), AW_ARGC_UNKNOWN past AW_MAX_ARGC_COUNTED */
    char filename[AW_MAX_PATH];
    char exec_path[AW_MAX_PATH];
    char argv[AW_ARGV_BYTES + AW_ARG_MAX];
};

/* open / openat / openat2 / creat / chdir / fchdir. Emitted at syscall exit;
 * only the first path_len bytes of path travel. Side door records
 * (AW_KIND_SIDEDOOR) have this layout too: open_flags holds the call's flags
 * (unshare, clone: the namespace flags; io_uring_setup: the ring's entries;
 * open_by_handle_at, setns, mount, ...: their flags argument), mode the
 * AW_SIDEDOOR_* group, dirfd its descriptor argument (else AT_FDCWD), path its
 * path argument if any (mount, move_mount, pivot_root: the target). */
struct aw_file {
    struct aw_header h;
    s64 ret;
    u64 open_flags;
    u64 mode;
    u64 resolve;          /* openat2 how->resolve */
    s32 dirfd;            /* AT_FDCWD when not given; the fd for fchdir */
    u32 syscall;          /* AW_SYS_* */
    u32 flags;            /* AW_FILE_* */
    u32 path_len;         /* bytes of path including the NUL, 0 if unread */
    u32 deny_rule;        /* in-kernel deny rule that killed it, else 0 */
    u32 reserved;
    char path[AW_MAX_PATH];
};
#define AW_FILE_HEAD 120   /* offsetof(struct aw_file, path), asserted in the program */

/* Repeated opens (see "repeated opens" in the program). An open of an
 * absolute path of at most AW_FOLD_PATH_MAX bytes whose record would say
 * exactly what an earlier one of the same generation said -- same thread,
 * path, flags, result, fd number and file -- is counted under the earlier
 * one's key instead of going out. */
#define AW_FOLD_PATH_MAX 256
#define AW_MAX_FOLDED 16384
struct aw_fold_key {
    u64 sb;           /* the opened file's superblock, inode number and */
    u64 ino;          /* generation: 0 for a failed open */
    u32 generation;
    u32 reserved;
    /* the record (struct aw_file) with ts_ns 0 and its path, zero-filled */
    char record[AW_FILE_HEAD + AW_FOLD_PATH_MAX];
};
struct aw_fold {
    u64 count;        /* opens folded since the key's record went out */
    u64 first_ns;     /* the first and the last of them (ts_ns) */
    u64 last_ns;
};

/* sched_process_fork (the child may be a thread) and process exit. */
struct aw_task {
    struct aw_header h;
    u32 child_pid;        /* fork: new task id; exit: 0 */
    u32 reserved;
};

/* aw_fd.flags */
#define AW_FD_CLOEXEC 1   /* the new fd is close-on-exec; close_range: marks instead of closing */
#define AW_FD_UNFOLLOWED 2   /* the new fd is one user space does not follow (as AW_FILE_FD_UNFOLLOWED) */

/* dup / dup2 / dup3 / fcntl(F_DUPFD, F_DUPFD_CLOEXEC, F_SETFD) / close /
 * close_range / pidfd_open / pidfd_getfd: how a process's descriptors change,
 * so that user space can tell what a dirfd names. Emitted at syscall exit when
 * the call succeeded; close and close_range at their entry, whatever they
 * then return (they drop the fds all the same, but for EBADF: none was open). */
struct aw_fd {
    struct aw_header h;
    s64 ret;              /* the new fd (dup*, F_DUPFD*, pidfd_*), else 0 */
    u64 arg;              /* dup2/dup3: the fd asked for; F_DUPFD*: the lowest acceptable;
                             F_SETFD: the fd flags; close_range: the last fd;
                             pidfd_open: the pid; pidfd_getfd: the fd in the other process */
    s32 fd;               /* the fd copied, changed or closed (close_range: the first);
                             pidfd_getfd: the pidfd; pidfd_open: -1 */
    u32 syscall;          /* AW_SYS_* */
    u32 flags;            /* AW_FD_* */
    u32 reserved;
};

/* aw_change.flags: AW_FILE_PATH_UNREADABLE, AW_FILE_PATH_TRUNCATED and
 * AW_FILE_KILLED_IN_KERNEL for path, and these for path2. */
#define AW_CHANGE_PATH2_UNREADABLE 16
#define AW_CHANGE_PATH2_TRUNCATED 32

/* unlink / unlinkat / rmdir / rename / renameat / renameat2 / truncate /
 * ftruncate / chmod / fchmod / fchmodat / fchmodat2 / chown / lchown / fchown /
 * fchownat / link / linkat / symlink / symlinkat / mkdir / mkdirat: a file
 * changed without being opened. Paths are read at entry (again at exit when
 * their page was not yet faulted in), emitted at exit with the result. path
 * is the first path argument (rename, link: the old name; symlink: the link's
 * content, the target), path2 the second (rename, link, symlink: the new
 * name), packed one after the other in paths: path_len bytes of path, then
 * path2_len of path2 (each counting its NUL; 0 when not given or unread). The
 * fd calls (ftruncate, fchmod, fchown) have no path: dirfd is their fd. */
struct aw_change {
    struct aw_header h;
    s64 ret;
    s64 length;           /* truncate, ftruncate: the new size */
    s32 dirfd;            /* for path; AT_FDCWD when not given; the fd of f*() */
    s32 dirfd2;           /* for path2; AT_FDCWD when not given */
    u32 mode;             /* chmod family, mkdir family: the mode asked for */
    s32 new_uid;          /* chown family: the new owner, -1 unchanged */
    s32 new_gid;          /* chown family: the new group, -1 unchanged */
    u32 at_flags;         /* unlinkat, renameat2, linkat, fchownat, fchmodat2: their flags */
    u32 syscall;          /* AW_SYS_* */
    u32 flags;            /* AW_FILE_PATH_*, AW_CHANGE_PATH2_*, AW_FILE_KILLED_IN_KERNEL */
    u32 path_len;
    u32 path2_len;
    u32 deny_rule;        /* in-kernel deny rule that killed it, else 0 */
    u32 reserved;
    char paths[2 * AW_MAX_PATH];
};

/* cgroup_attach_task of an agent's process (a write to cgroup.procs, or to
 * cgroup.threads for one thread). The header is the mover's (usually the
 * moved process itself; cgroup_id its cgroup after the move when so), its
 * agent_cgroup_id the moved process's agent cgroup from before the move. */
struct aw_move {
    struct aw_header h;
    u64 dst_cgroup_id;
    u64 dst_agent_cgroup_id;  /* the tagged cgroup that holds the destination, else 0 */
    u32 moved_pid;            /* the process (thread group leader) or thread moved */
    u32 flags;                /* AW_MOVE_* */
    u32 path_len;             /* bytes of dst_path including the NUL */
    u32 reserved;
    char dst_path[AW_CGROUP_PATH_MAX];   /* from the cgroup v2 root, as the kernel names it */
};

/* agent_tasks value: an agent's process, wherever it runs now. */
struct aw_agent_task {
    u64 agent_cgroup_id;  /* its agent cgroup (the one it left, once it has left) */
    u32 agent;            /* that cgroup's agent number */
    u32 flags;            /* AW_TASK_* */
};

/* agent_paths key: a tagged cgroup's path from the cgroup v2 root, with a
 * trailing '/', so that the longest match of a cgroup's path plus '/' is the
 * tagged cgroup that holds it. */
struct aw_path_key {
    u32 prefixlen;        /* bits: 8 per path byte */
    char path[AW_CGROUP_PATH_MAX];
};

/* In-kernel deny rules: an LPM trie keyed by agent number and path bytes.
 * An exact rule is stored with the path's NUL, so it matches only the whole
 * path; a prefix rule without, so it matches every path that starts with it.
 * Only absolute paths as given can match: the daemon is the backstop for
 * relative and non-canonical spellings. */
struct aw_deny_key {
    u32 prefixlen;        /* bits: 32 for agent + 8 per path byte */
    u32 agent;
    char path[AW_DENY_PATH_MAX];
};

struct aw_deny_value {
    u32 rule;             /* rule number (nonzero), named by the probe */
    u32 applies;          /* AW_DENY_EXEC | AW_DENY_OPEN */
};

#endif
