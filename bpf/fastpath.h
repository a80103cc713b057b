/* agentwarden supervisor <-> kernel and fast path: the one definition of the
 * exec approvals, the exec stash and the fast path's ABI.
 *
 * Included by the BPF program (compiled by BCC) and by the supervisor's
 * fast path (daemon/fastpath.c, compiled by gcc with -Ibpf; it gives the
 * u32/u64 names BCC has from the kernel's headers). Python reads the
 * `#define AW_* <integer>` lines (agentwarden.headers.header_constants) and
 * builds the structs below as ctypes classes from this text
 * (agentwarden.headers.header_struct): one field per line, u32/s32/u64/s64
 * or char[CONSTANT]. Keep it so; tests/test_fastpath_layout.py compares that
 * view with the compiled structs.
 */
#ifndef AGENTWARDEN_FASTPATH_H
#define AGENTWARDEN_FASTPATH_H

#include "agentwarden.h"   /* AW_MAX_PATH: an approval holds what an exec record does */

/* Of fastpath.c's calls (aw_fast_*) and this file's layouts: a library built
 * from another version is not loaded. */
#define AW_FAST_ABI 7

/* Slots of approval_slots and exec_stash; a power of two (index tid % slots). */
#define AW_APPROVAL_SLOTS 1024
#define AW_MAX_APPROVED 16384      /* entries of approved_exec */

/* approved_exec value: the filename (as given to execve, in the kernel's
 * own form for execveat: /dev/fd/N/...) the daemon approved for a thread. */
struct aw_approved {
    u32 len;              /* bytes of path including the NUL */
    u32 reserved;
    char path[AW_MAX_PATH];
};

/* approved_interpreters value: for a session exec whose file the kernel will
 * run through interpreters (#! lines, binfmt_misc handlers), the arguments
 * they put in front of argv, as the supervisor read them before approving:
 * `count` of them, the first AW_MAX_INTERPRETERS each at most
 * AW_INTERPRETER_PATH bytes (a #! line is at most BINPRM_BUF_SIZE), at
 * path + i * AW_INTERPRETER_PATH. sched_process_exec kills a session exec
 * whose argc grew otherwise (a #! line swapped after the check). */
#define AW_INTERPRETER_PATH 256
#define AW_APPROVED_INTERPRETERS_BYTES 1280   /* AW_MAX_INTERPRETERS * AW_INTERPRETER_PATH */
#define AW_MAX_APPROVED_INTERPRETED 1024      /* entries: session scripts between approval and exec */
struct aw_approved_interpreters {
    u32 count;            /* arguments added in front of argv */
    u32 len[AW_MAX_INTERPRETERS];   /* bytes of each including the NUL */
    char path[AW_APPROVED_INTERPRETERS_BYTES];
};

/* exec_stash value: the filename of a session thread's execve, copied while
 * the thread waits for the supervisor's answer (tid 0: free). The supervisor
 * reads it through a shared mapping instead of the thread's memory. */
struct aw_exec_stash {
    u32 tid;
    u32 len;              /* bytes of path including the NUL */
    u64 filename;         /* the execve's filename pointer, as the notification has it */
    char path[AW_MAX_PATH];
};

/* approval_slots value: the same as aw_approved, for the thread tid (0:
 * free), written by the fast path through a shared mapping, so approving
 * takes no syscall. */
struct aw_approval_slot {
    u32 tid;
    u32 len;
    char path[AW_MAX_PATH];
};

/* A fast-path thread's message to the supervisor on their SOCK_SEQPACKET
 * pair: this, then the notification's struct seccomp_notif (all zero for a
 * hang-up). */
struct aw_fast_forward {
    u32 kind;             /* AW_FAST_FORWARD_* */
    s32 fd;               /* the session's listener */
};

#define AW_FAST_FORWARD_NOTIFICATION 1   /* forwarded unanswered: the supervisor decides */
#define AW_FAST_FORWARD_HANGUP 2         /* every process of the session is gone */

/* The fast path's counters (aw_fast_stats), by index; Python names them by
 * the lower-cased suffix. */
#define AW_FAST_COUNTER_CONTINUED 0         /* calls allowed by the fast path */
#define AW_FAST_COUNTER_FORWARDED 1         /* notifications left to the supervisor */
#define AW_FAST_COUNTER_HANGUPS 2
#define AW_FAST_COUNTER_GONE 3              /* the task died or was interrupted first */
#define AW_FAST_COUNTER_LEARNED 4           /* command lines the supervisor allowed */
#define AW_FAST_COUNTER_RESETS 5            /* the learned table was full: started again */
#define AW_FAST_COUNTER_MAP_FAILURES 6      /* an approval could not be written */
#define AW_FAST_COUNTER_FORWARD_FAILURES 7  /* the supervisor's socket was gone */
#define AW_FAST_COUNTER_RULED 8             /* of continued and performed: allowed by the compiled rules */
#define AW_FAST_COUNTER_APPROVED_IN_MAP 9   /* approvals in approved_exec: another held the slot */
#define AW_FAST_COUNTER_STASHED 10          /* exec filenames taken from exec_stash */
#define AW_FAST_COUNTER_PERFORMED 11        /* write-opens done here for the task (aw_fast_perform) */
#define AW_FAST_COUNTER_RECORDS_LOST 12     /* their records not sent to the daemon (a gap) */
#define AW_FAST_COUNTER_EXEC_FILES_READ 13   /* allowed execs whose file was read to see what runs it */
#define AW_FAST_COUNTER_EXEC_FILES_KNOWN 14  /* ... and those whose unchanged file was known already */
#define AW_FAST_COUNTERS 15
#define AW_FAST_RECENT 1024                 /* handling times kept for aw_fast_stats */

/* The compiled rules' encoding (aw_fast_policy; layout in fastpath.c). */
#define AW_FAST_TOKEN_ANY 1      /* `*` within a word */
#define AW_FAST_TOKEN_ONE 2      /* `?` */
#define AW_FAST_TOKEN_CLASS 3    /* `[...]`: then a 16-byte bitmap of ASCII */
#define AW_FAST_TOKEN_CHAR 4     /* then the byte */
#define AW_FAST_MANY 0xFFFF      /* word length: any number of components (`**`) or arguments */
#define AW_FAST_NO_ARGV 0xFFFF   /* arg-count: the rule has no argv pattern */

#endif
