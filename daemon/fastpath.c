/* The supervisor's compiled fast path: the execs and write-opens the policy
 * allows.
 *
 * A Python round trip per notification costs about 50 us on these machines;
 * these threads answer the common case in a few. Each session's listener has
 * one, blocked in SECCOMP_IOCTL_NOTIF_RECV: only a task waiting there gets the
 * kernel's synchronous wake-up (SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP switches
 * straight to it on the notifying CPU); an epoll or poll waiter is woken the
 * ordinary way, which costs tens of microseconds more.
 *
 * A thread answers `allow` and nothing else, in two cases:
 *  - the exact command line (agent, absolute filename, argv) of an execve, or
 *    the absolute path and flags of an open, openat or creat, that the Python
 *    supervisor decided `allow` under the current policy (`learn`);
 *  - an execve, or a write-open, of a normalised ASCII absolute path (for an
 *    open, also one relative to the task's cwd, joined to it) that the
 *    agent's rules, compiled by the supervisor (`aw_fast_policy`), allow:
 *    in the policy's precedence, the first rule list with a matching rule is
 *    an allow list. A deny or hold rule that matches, no rule at all, an
 *    indirect route (the dynamic loader, /dev/fd, /proc, memfd), anything
 *    outside ASCII or not normalised: the supervisor decides (and answers
 *    ENOENT/ENOTDIR/EACCES, as the kernel would, to a refused exec with no
 *    program to run, never EPERM, which would end execvp's PATH search:
 *    reader.exec_cannot_run). An exec's
 *    arguments are read only when a rule with an argv pattern matches its
 *    path: a read of the task's memory is most of an answer's cost. Its
 *    filename is usually not read either: the BPF program copies it while
 *    the thread waits (exec_stash, mapped here), which costs the thread a
 *    plain copy where process_vm_readv pins the page, and right after a fork
 *    copies it whole.
 * To allow, it does what the supervisor would: check the notification is still
 * valid, approve an exec's filename for the BPF program (which kills anything
 * else at sched_process_exec) and continue the call -- or, for a write-open
 * once aw_fast_perform is on, open it itself as the task and hand the fd back
 * (perform_open below), so a path swapped after the check changes nothing. Approvals go into the
 * thread's slot of approval_slots, a BPF array this library maps, so approving
 * costs no syscall; when another thread's approval holds that slot, into the
 * approved_exec hash map, by bpf(). Only these threads write slots: a thread's
 * notifications are answered one at a time, so no slot is rewritten while the
 * BPF program compares it. The supervisor's own approvals (execs it decided
 * itself) go to approved_exec, whose updates are atomic.
 * Everything else -- other syscalls, relative execs, opens relative to another
 * directory fd, unreadable arguments --
 * goes to the supervisor unanswered, as (kind, fd, struct seccomp_notif) on a
 * SOCK_SEQPACKET socket, and the supervisor decides it exactly as if it had
 * received it. A new policy replaces the rules and voids what was learned, at
 * once.
 *
 * The threads never touch Python. A crash here kills the supervisor, which
 * closes the listeners: notified calls then fail (closed, never open).
 *
 * Key layouts, shared with fastpath.py (a filename starts with '/', so the two
 * never collide):
 *   exec:  agent NUL filename NUL argv[0] NUL ... argv[n-1] NUL
 *   open:  agent NUL 0x01 flags-in-decimal NUL path NUL
 *
 * Compiled rules (aw_fast_policy), native byte order, made by fastpath.py:
 *   policy  := agent*
 *   agent   := u16 name-length, name, section (exec), section (write-open)
 *   section := u8 list-count, list*          (in the policy's precedence)
 *   list    := u8 allows, u32 rule-count, rule*
 *   rule    := u16 part-count, word*, u16 arg-count (NO_ARGV: none), word*
 *   word    := u16 length (MANY: `**`, or an argv `*`), token*
 *   token   := ANY | ONE | CLASS, 16-byte bitmap of ASCII | CHAR, byte
 * (AW_FAST_TOKEN_*, AW_FAST_MANY, AW_FAST_NO_ARGV: fastpath.h).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <linux/bpf.h>
#include <linux/seccomp.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/sysmacros.h>
#include <linux/capability.h>
#include <linux/openat2.h>
#include <time.h>
#include <unistd.h>

/* The kernel-style integer names of the shared headers (BCC has them from
 * the kernel's own headers). */
typedef __u32 u32;
typedef __s32 s32;
typedef __u64 u64;
typedef __s64 s64;
#include "fastpath.h"   /* with agentwarden.h: what the BPF program and fastpath.py share */

#define MAX_AGENT 256
#define MAX_KEY (64 * 1024)        /* longer command lines go to the supervisor */
#define MAX_ARGS 1024
#define PAGE 4096
#define TABLE_SLOTS (1 << 15)       /* open addressing, at most half full */
#define TABLE_MAX_ENTRIES (TABLE_SLOTS / 2)
#define TABLE_MAX_BYTES (16u << 20) /* learned keys past this: start again */
#define FIRST_READ 256              /* most strings end well before: copy less */
#define BATCH 64                    /* argv strings read in one call */
#define MAX_PARTS (PAGE / 2)        /* components of a path */
#define MAX_LISTS 4

/* What the supervisor reads for each forwarded event. */
struct forward {
    struct aw_fast_forward head;
    struct seccomp_notif notif;
} __attribute__((packed));
_Static_assert(offsetof(struct forward, notif) == sizeof(struct aw_fast_forward),
               "fastpath.py reads the notification right after aw_fast_forward");
_Static_assert((AW_APPROVAL_SLOTS & (AW_APPROVAL_SLOTS - 1)) == 0, "AW_APPROVAL_SLOTS: a power of two");
_Static_assert(AW_MAX_PATH % 8 == 0 && AW_MAX_PATH <= PAGE, "AW_MAX_PATH: whole words, at most a page");

struct entry {
    uint64_t hash;
    uint32_t len;
    char *key;
};

/* A compiled policy: arrays indexed from one another, over a copy of the blob. */
struct word { const uint8_t *tokens; uint16_t len; };         /* len MANY: any number */
struct rule { uint32_t first_part, first_arg; uint16_t parts, args; };   /* args NO_ARGV: none */
struct list { uint8_t allows; uint32_t first_rule, rules; };
struct section { uint8_t lists; struct list list[MAX_LISTS]; };
struct agent_rules { const char *name; uint16_t name_len; struct section exec, write; };

struct policy {
    uint8_t *blob;
    struct agent_rules *agents;
    struct rule *rules;
    struct word *words;
    uint32_t agent_count, rule_count, word_count;
};

/* A path's components or a command line's arguments, as matched. */
struct piece { const char *s; uint32_t len; };

struct scratch {
    struct piece parts[MAX_PARTS];
    struct piece args[MAX_ARGS];
};

/* An open/openat/creat as open_key read it: where its path is in the key
 * (path_at: as checked, absolute; raw_at: as the task passed it). */
struct open_call {
    int flags, dirfd, relative, cwd_len;
    uint64_t mode;
    int path_at, raw_at;
};

#define NGROUPS_MAX_HERE 1024   /* more groups than this: the supervisor performs it */
#define MAX_RECORD (3 * PAGE)

/* A thread's /proc/TID (O_PATH), its status and a pidfd of it, kept open by
 * the session's fast-path thread between performed opens (tid 0: none). */
struct task_files {
    pid_t tid;
    int proc, status, pidfd;     /* pidfd -1: none (an older kernel) */
};
#define TASK_FILES 4             /* per session: 12 fds at most */

/* A task's ids and credentials (read_status). */
struct task_info {
    int tgid, ppid;
    unsigned uid, gid, fsuid, fsgid, umask;
    uint64_t capabilities;
    int group_count;
    gid_t groups[NGROUPS_MAX_HERE];
    char comm[64];
};


struct listener {
    int fd;                      /* -1: free */
    uint64_t session_ino;        /* the session cgroup's inode: the records' agent_cgroup_id */
    char session_cgroup[PAGE];   /* its path below the cgroup v2 root, as /proc/PID/cgroup says it */
    pthread_t thread;
    volatile int stopping;
    uint32_t agent_len;
    char agent[MAX_AGENT];
    char key[MAX_KEY];
    char pieces[BATCH * FIRST_READ];
    uint64_t pointers[MAX_ARGS];
    char cwd[PAGE];              /* a relative open's base */
    int pointer_count, pointers_ended;   /* argv read so far (exec_filename, exec_args) */
    struct open_call open;       /* the open of the key being answered (open_key) */
    int can_perform;             /* this thread has its own fs_struct and saved credentials */
    int own_root;                /* to come back from a task's root (O_PATH) */
    struct __user_cap_data_struct own_caps[2];
    gid_t own_groups[NGROUPS_MAX_HERE];
    int own_group_count;
    unsigned own_uid, own_gid;   /* this thread's fs ids when it is itself */
    int umask_now;               /* this thread's umask (its own fs_struct); -1: unknown */
    int switched;                /* what become() changed and restore() takes back (SWITCHED_*) */
    char status[8192];           /* /proc/TID/status, read for each performed open */
    struct task_files tasks[TASK_FILES];   /* the /proc files of the threads it performed for lately */
    struct task_info task;
    char record[MAX_RECORD];     /* the performed open's record, msgpack */
    /* The session's receipt, a shared file mapping that outlives this process:
     * the last notification received, for a restarted supervisor to answer
     * (NULL: not kept). */
    struct seccomp_notif *receipt;
    struct scratch scratch;
};

#define STOP_SIGNAL (SIGRTMIN + 3)   /* interrupts a thread blocked in RECV */

static struct {
    int running;
    int forward_fd;              /* to the supervisor */
    int execve_nr, open_nr, openat_nr, creat_nr;
    /* Read by every thread for a whole answer, written on a new policy or map:
     * a session's matching never waits for another's, and nothing changes
     * under an answer between its lookup and its approval. Taken before lock. */
    pthread_rwlock_t config;     /* guards the policy, map_fd, slots and stash */
    pthread_mutex_t lock;        /* guards the table and the counters */
    pthread_mutex_t slots_lock;  /* one writer of approval_slots at a time */
    int map_fd;                  /* approved_exec, or -1: every exec forwarded */
    uint8_t *slots;              /* approval_slots, mapped; NULL: approved_exec only */
    uint8_t *stash;              /* exec_stash, mapped with slots; NULL: read the tasks */
    size_t slots_size, stash_size;
    uint64_t seed;
    struct entry *table;
    struct policy policy;        /* all zero: no rules, everything not learned is forwarded */
    uint32_t entries;
    uint64_t bytes;
    uint64_t counters[AW_FAST_COUNTERS];
    uint32_t recent[AW_FAST_RECENT];
    uint64_t recent_count;
    struct listener **listeners; /* indexed by fd */
    int listeners_cap;
} fp = { .config = PTHREAD_RWLOCK_WRITER_NONRECURSIVE_INITIALIZER_NP, .lock = PTHREAD_MUTEX_INITIALIZER,
          .slots_lock = PTHREAD_MUTEX_INITIALIZER, .map_fd = -1, .forward_fd = -1 };

/* The elements of the two BPF arrays (approval_slots, exec_stash): their
 * values, 8-byte aligned as the kernel lays them out. */
#define ELEMENT(type) ((sizeof(type) + 7) & ~(size_t)7)
#define SLOT_SIZE ELEMENT(struct aw_approval_slot)
#define STASH_SIZE ELEMENT(struct aw_exec_stash)

/* tid's element of an array mapped at base (tid modulo AW_APPROVAL_SLOTS). */
static void *slot_of(uint8_t *base, size_t element, uint32_t tid)
{
    return base + (size_t)(tid & (AW_APPROVAL_SLOTS - 1)) * element;
}

/* The bytes to map of such an array: every element, rounded up to pages. */
static size_t mapped_size(size_t element)
{
    return ((size_t)AW_APPROVAL_SLOTS * element + PAGE - 1) & ~(size_t)(PAGE - 1);
}

static void count(int counter)
{
    pthread_mutex_lock(&fp.lock);
    fp.counters[counter]++;
    pthread_mutex_unlock(&fp.lock);
}

/* ---- the learned command lines ------------------------------------------- */

static uint64_t key_hash(const char *key, uint32_t len)
{
    uint64_t h = 1469598103934665603ULL ^ fp.seed;   /* FNV-1a, seeded per process */
    for (uint32_t i = 0; i < len; i++) {
        h ^= (unsigned char)key[i];
        h *= 1099511628211ULL;
    }
    return h ? h : 1;   /* 0 marks an empty slot */
}

static void table_clear(void)
{
    if (!fp.table)
        return;   /* not started */
    for (uint32_t i = 0; i < TABLE_SLOTS; i++) {
        free(fp.table[i].key);
        fp.table[i] = (struct entry){0};
    }
    fp.entries = 0;
    fp.bytes = 0;
}

static struct entry *table_slot(const char *key, uint32_t len, uint64_t hash)
{
    for (uint32_t i = 0; i < TABLE_SLOTS; i++) {
        struct entry *e = &fp.table[(hash + i) & (TABLE_SLOTS - 1)];
        if (!e->hash || (e->hash == hash && e->len == len && !memcmp(e->key, key, len)))
            return e;
    }
    return NULL;   /* unreachable: the table is never more than half full */
}

/* ---- the compiled rules ------------------------------------------------------ */

struct reader { const uint8_t *at, *end; int bad; };

static const uint8_t *take(struct reader *r, size_t size)
{
    if (r->bad || (size_t)(r->end - r->at) < size) {
        r->bad = 1;
        return NULL;
    }
    const uint8_t *here = r->at;
    r->at += size;
    return here;
}

static uint32_t take_u(struct reader *r, size_t size)
{
    const uint8_t *p = take(r, size);
    if (!p)
        return 0;
    if (size == 1)
        return *p;
    if (size == 2) {
        uint16_t value;
        memcpy(&value, p, 2);
        return value;
    }
    uint32_t value;
    memcpy(&value, p, 4);
    return value;
}

/* Appends one element to a growing array; 0, or -1 when out of memory. */
static int grow(void **array, uint32_t *count, size_t size)
{
    if ((*count & (*count - 1)) == 0) {   /* 0, 1, 2, 4, ...: full */
        void *bigger = realloc(*array, (*count ? 2 * (size_t)*count : 1) * size);
        if (!bigger)
            return -1;
        *array = bigger;
    }
    (*count)++;
    return 0;
}

static uint32_t token_size(uint8_t kind)
{
    return kind == AW_FAST_TOKEN_CLASS ? 17 : kind == AW_FAST_TOKEN_CHAR ? 2 : 1;
}

/* A word: its tokens are checked here, so matching never reads past them. */
static int parse_word(struct reader *r, struct policy *p)
{
    uint32_t len = take_u(r, 2);
    const uint8_t *tokens = len == AW_FAST_MANY ? NULL : take(r, len);
    if (r->bad || grow((void **)&p->words, &p->word_count, sizeof(struct word)) < 0)
        return -1;
    p->words[p->word_count - 1] = (struct word){ tokens, (uint16_t)len };
    for (uint32_t i = 0; tokens && i < len;) {
        uint8_t kind = tokens[i];
        if (kind < AW_FAST_TOKEN_ANY || kind > AW_FAST_TOKEN_CHAR || i + token_size(kind) > len)
            return -1;
        i += token_size(kind);
    }
    return 0;
}

static int parse_section(struct reader *r, struct policy *p, struct section *section)
{
    section->lists = take_u(r, 1);
    if (section->lists > MAX_LISTS)
        return -1;
    for (int i = 0; i < section->lists; i++) {
        struct list *list = &section->list[i];
        list->allows = take_u(r, 1);
        list->rules = take_u(r, 4);
        list->first_rule = p->rule_count;
        for (uint32_t j = 0; j < list->rules && !r->bad; j++) {
            struct rule rule = {0};
            rule.parts = take_u(r, 2);
            rule.first_part = p->word_count;
            for (int k = 0; k < rule.parts; k++)
                if (parse_word(r, p) < 0)
                    return -1;
            rule.args = take_u(r, 2);
            rule.first_arg = p->word_count;
            for (int k = 0; rule.args != AW_FAST_NO_ARGV && k < rule.args; k++)
                if (parse_word(r, p) < 0)
                    return -1;
            if (r->bad || grow((void **)&p->rules, &p->rule_count, sizeof(struct rule)) < 0)
                return -1;
            p->rules[p->rule_count - 1] = rule;
        }
    }
    return r->bad ? -1 : 0;
}

static void policy_free(struct policy *p)
{
    free(p->blob);
    free(p->agents);
    free(p->rules);
    free(p->words);
    *p = (struct policy){0};
}

static int policy_parse(const uint8_t *blob, uint32_t len, struct policy *p)
{
    *p = (struct policy){0};
    if (len && !(p->blob = malloc(len)))
        return -ENOMEM;
    if (len)
        memcpy(p->blob, blob, len);
    struct reader r = { p->blob, p->blob + len, 0 };
    while (r.at < r.end) {
        struct agent_rules agent = {0};
        agent.name_len = take_u(&r, 2);
        agent.name = (const char *)take(&r, agent.name_len);
        if (r.bad || agent.name_len >= MAX_AGENT || parse_section(&r, p, &agent.exec) < 0 ||
            parse_section(&r, p, &agent.write) < 0 ||
            grow((void **)&p->agents, &p->agent_count, sizeof(agent)) < 0) {
            policy_free(p);
            return -EINVAL;
        }
        p->agents[p->agent_count - 1] = agent;
    }
    return 0;
}

static int token_matches(const uint8_t *token, unsigned char c)
{
    switch (*token) {
    case AW_FAST_TOKEN_ONE:
        return 1;
    case AW_FAST_TOKEN_CLASS:
        return c < 128 && (token[1 + c / 8] >> (c % 8)) & 1;
    default:   /* AW_FAST_TOKEN_CHAR */
        return token[1] == c;
    }
}

/* A glob word against one component or argument: `*` is any run of
 * characters. Greedy, going back only to the last `*`: every other token
 * takes exactly one character, so that is enough. */
static int word_matches(const struct word *w, const char *s, uint32_t n)
{
    const uint8_t *t = w->tokens, *end = t + w->len, *star = NULL;
    uint32_t i = 0, star_i = 0;
    while (i < n) {
        if (t < end && *t == AW_FAST_TOKEN_ANY) {
            star = ++t;
            star_i = i;
        } else if (t < end && token_matches(t, (unsigned char)s[i])) {
            t += token_size(*t);
            i++;
        } else if (star) {
            t = star;
            i = ++star_i;
        } else {
            return 0;
        }
    }
    while (t < end && *t == AW_FAST_TOKEN_ANY)
        t++;
    return t == end;
}

/* Words against pieces, the same way one level up: a MANY word is any number
 * of pieces (`**` components, `*` arguments), every other word exactly one. */
static int words_match(const struct word *words, uint32_t count, const struct piece *pieces, uint32_t n)
{
    uint32_t w = 0, i = 0, star = 0, star_i = 0;
    int starred = 0;
    while (i < n) {
        if (w < count && words[w].len == AW_FAST_MANY) {
            star = ++w;
            star_i = i;
            starred = 1;
        } else if (w < count && word_matches(&words[w], pieces[i].s, pieces[i].len)) {
            w++;
            i++;
        } else if (starred) {
            w = star;
            i = ++star_i;
        } else {
            return 0;
        }
    }
    while (w < count && words[w].len == AW_FAST_MANY)
        w++;
    return w == count;
}

/* What the rules say of a call: RULES_UNDECIDED when the call's arguments
 * are needed (not read yet, or the path is one the supervisor normalises). */
enum { RULES_NO = 0, RULES_ALLOW = 1, RULES_UNDECIDED = -1 };

/* In the policy's precedence, the first list with a matching rule decides.
 * Without the arguments (args NULL), RULES_UNDECIDED when that depends on an
 * argv pattern. */
static int section_verdict(const struct policy *p, const struct section *section, const struct piece *parts,
                           uint32_t part_count, const struct piece *args, uint32_t arg_count)
{
    for (int i = 0; i < section->lists; i++) {
        const struct list *list = &section->list[i];
        int matched = 0, needs_args = 0;
        for (uint32_t j = 0; j < list->rules && !matched; j++) {
            const struct rule *rule = &p->rules[list->first_rule + j];
            if (!words_match(&p->words[rule->first_part], rule->parts, parts, part_count))
                continue;
            if (rule->args == AW_FAST_NO_ARGV)
                matched = 1;
            else if (!args)
                needs_args = 1;
            else
                matched = words_match(&p->words[rule->first_arg], rule->args, args, arg_count);
        }
        if (matched)
            return list->allows ? RULES_ALLOW : RULES_NO;
        if (needs_args)
            return RULES_UNDECIDED;
    }
    return RULES_NO;
}

/* The components of a normalised ASCII absolute path, or -1 for any other
 * (empty, '.' or '..' components, a trailing '/', bytes past ASCII): the
 * supervisor normalises and decodes those. */
static int split_path(const char *path, struct piece *parts)
{
    if (*path != '/')
        return -1;
    int count = 0;
    const char *at = path + 1;
    for (;;) {
        const char *start = at;
        while (*at && *at != '/') {
            if ((unsigned char)*at >= 0x80)
                return -1;
            at++;
        }
        uint32_t len = at - start;
        if (len == 0 || (len == 1 && start[0] == '.') || (len == 2 && start[0] == '.' && start[1] == '.') ||
            count == MAX_PARTS)
            return -1;
        parts[count++] = (struct piece){ start, len };
        if (!*at)
            return count;
        at++;
    }
}

/* Routes that only an allow rule naming them may allow (policy.py,
 * _INDIRECT_ROUTES), told apart coarsely: the supervisor decides them. */
static int indirect(const struct piece *parts, int count)
{
    const struct piece *first = &parts[0], *last = &parts[count - 1];
    return (first->len == 3 && !memcmp(first->s, "dev", 3)) || (first->len == 4 && !memcmp(first->s, "proc", 4)) ||
           (first->len >= 6 && !memcmp(first->s, "memfd:", 6)) || (last->len >= 3 && !memcmp(last->s, "ld-", 3));
}

/* The components of an exec's filename when the rules may decide it (a
 * normalised ASCII absolute path, no indirect route), else -1. */
static int exec_parts(const char *filename, struct piece *parts)
{
    int count = split_path(filename, parts);
    return count > 0 && !indirect(parts, count) ? count : -1;
}

static const struct agent_rules *agent_rules(const char *agent, uint32_t len)
{
    for (uint32_t i = 0; i < fp.policy.agent_count; i++) {
        const struct agent_rules *a = &fp.policy.agents[i];
        if (a->name_len == len && !memcmp(a->name, agent, len))
            return a;
    }
    return NULL;
}

/* Whether the compiled rules allow the call of a key (layouts at the top).
 * Called with fp.config held. */
static int rules_allow(struct scratch *scratch, const char *key, uint32_t len)
{
    const char *nul = memchr(key, 0, len);
    if (!nul || key[len - 1] || (uint32_t)(nul - key) + 1 >= len)
        return 0;
    const struct agent_rules *a = agent_rules(key, nul - key);
    if (!a)
        return 0;
    const char *subject = nul + 1;
    if (*subject == 1) {   /* an open: its flags, then the path */
        char *digits_end;
        long flags = strtol(subject + 1, &digits_end, 10);
        /* A write as policy.is_write counts it; a read has other rules, the supervisor's. */
        int write = (flags & O_ACCMODE) != O_RDONLY || (flags & (O_CREAT | O_TRUNC | O_APPEND));
        if (*digits_end || digits_end + 1 >= key + len || !write)
            return 0;
        int parts = split_path(digits_end + 1, scratch->parts);
        return parts > 0 && section_verdict(&fp.policy, &a->write, scratch->parts, parts, NULL, 0) == RULES_ALLOW;
    }
    int parts = exec_parts(subject, scratch->parts);
    if (parts < 0)
        return 0;
    /* argv[0] is the caller's to choose: rules see argv[1:]. */
    const char *at = subject + strlen(subject) + 1, *end = key + len;
    uint32_t args = 0;
    for (int index = 0; at < end; index++) {
        uint32_t arg_len = strlen(at);
        for (uint32_t i = 0; i < arg_len; i++)
            if ((unsigned char)at[i] >= 0x80)
                return 0;
        if (index > 0) {
            if (args == MAX_ARGS)
                return 0;
            scratch->args[args++] = (struct piece){ at, arg_len };
        }
        at += arg_len + 1;
    }
    return section_verdict(&fp.policy, &a->exec, scratch->parts, parts, scratch->args, args) == RULES_ALLOW;
}

/* What the rules say of an execve by its agent and filename alone: most
 * execs are decided by rules without argv patterns, and then the arguments
 * need not be read. Called with fp.config held. */
static int exec_path_verdict(struct scratch *scratch, const char *agent, uint32_t agent_len, const char *filename)
{
    const struct agent_rules *a = agent_rules(agent, agent_len);
    if (!a)
        return RULES_NO;
    int parts = exec_parts(filename, scratch->parts);
    if (parts < 0)
        return RULES_UNDECIDED;   /* the full key, and what the supervisor taught */
    return section_verdict(&fp.policy, &a->exec, scratch->parts, parts, NULL, 0);
}

/* ---- reading the stopped task ---------------------------------------------- */

/* Reads up to size bytes at addr, never across a page (the next may be unmapped). */
static ssize_t read_task(pid_t pid, uint64_t addr, char *out, size_t size)
{
    size_t room = PAGE - addr % PAGE;
    if (size > room)
        size = room;
    struct iovec local = { out, size }, remote = { (void *)addr, size };
    return process_vm_readv(pid, &local, 1, &remote, 1, 0);
}

/* Appends the NUL-terminated string at addr (NUL included) to key; the new
 * length, or -1 when unreadable or when it does not fit in limit bytes. */
static int append_string(pid_t pid, uint64_t addr, char *key, int at, int limit)
{
    int start = at;
    while (at < MAX_KEY) {
        ssize_t got = read_task(pid, addr + (at - start), key + at, MAX_KEY - at);
        if (got <= 0)
            return -1;
        char *nul = memchr(key + at, 0, got);
        if (nul) {
            at = nul - key + 1;
            return at - start <= limit ? at : -1;
        }
        at += got;
        if (at - start >= limit)
            return -1;
    }
    return -1;
}

/* The first FIRST_READ bytes (never past a page's end) at each address, in
 * one process_vm_readv, into out (FIRST_READ bytes apart; sizes[i] read at
 * addrs[i]); how many, from the first, were read. The kernel never splits
 * one piece, so the rest were unreadable or came after one that was. */
static int read_batch(pid_t pid, const uint64_t *addrs, int count, char *out, size_t *sizes)
{
    struct iovec local[BATCH], remote[BATCH];
    ssize_t want = 0;
    for (int i = 0; i < count; i++) {
        size_t room = PAGE - addrs[i] % PAGE;
        sizes[i] = room < FIRST_READ ? room : FIRST_READ;
        local[i] = (struct iovec){ out + i * FIRST_READ, sizes[i] };
        remote[i] = (struct iovec){ (void *)addrs[i], sizes[i] };
        want += sizes[i];
    }
    ssize_t got = process_vm_readv(pid, local, count, remote, count, 0);
    if (got == want)
        return count;
    int full = 0;
    while (full < count && got >= (ssize_t)sizes[full])
        got -= sizes[full++];
    return full;
}

/* append_string, starting from the first piece already read. */
static int append_from(pid_t pid, uint64_t addr, const char *piece, size_t size, char *key,
                       int at, int limit)
{
    const char *nul = memchr(piece, 0, size);
    int len = nul ? nul - piece + 1 : 0;
    if (!nul || len > limit || at + len > MAX_KEY)
        return append_string(pid, addr, key, at, limit);   /* longer: page by page */
    memcpy(key + at, piece, len);
    return at + len;
}

/* The filename the BPF program copied for pid while it waits on this very
 * notification (exec_stash; see sched_switch there), into out (room bytes):
 * its length with the NUL, or -1 when there is none to trust -- the slot
 * names another thread or another filename pointer, or the thread had not
 * yet switched out when this notification was received. The program writes
 * a slot only for a thread whose execve has not yet run (still -ENOSYS) and
 * clears it when the execve ends, so one naming pid and this pointer was
 * written during this wait. Called with fp.config held. */
static int stashed_filename(uint32_t pid, uint64_t filename, char *out, uint32_t room)
{
    if (!fp.stash)
        return -1;
    const struct aw_exec_stash *s = slot_of(fp.stash, STASH_SIZE, pid);
    if (__atomic_load_n(&s->tid, __ATOMIC_ACQUIRE) != pid || s->filename != filename)
        return -1;
    uint32_t len = s->len;
    if (len < 2 || len > room || len >= sizeof(s->path))
        return -1;
    memcpy(out, s->path, len);
    if (out[len - 1] != 0 || memchr(out, 0, len - 1) || __atomic_load_n(&s->tid, __ATOMIC_ACQUIRE) != pid)
        return -1;
    return (int)len;
}

/* The start of an execve's key, agent NUL filename NUL, in key (MAX_KEY
 * bytes); its length and where the filename starts, or -1 when the
 * supervisor must look at it. The filename the BPF program stashed, or else
 * one process_vm_readv: the filename, and the start of argv for exec_args. */
static int exec_filename(struct listener *l, const struct seccomp_notif *n, char *key,
                         int *filename_at, int *filename_len)
{
    pid_t pid = n->pid;
    uint64_t argv = n->data.args[1];
    if (!argv || argv % 8)
        return -1;    /* no argv, or unaligned: rare, the supervisor reads it */
    memcpy(key, l->agent, l->agent_len);
    key[l->agent_len] = 0;
    int at = l->agent_len + 1;
    *filename_at = at;
    l->pointer_count = l->pointers_ended = 0;   /* exec_args reads argv itself */
    pthread_rwlock_rdlock(&fp.config);
    int stashed = stashed_filename(n->pid, n->data.args[0], key + at, MAX_KEY - at);
    pthread_rwlock_unlock(&fp.config);
    if (stashed > 0) {
        count(AW_FAST_COUNTER_STASHED);
        if (key[at] != '/')
            return -1;    /* relative: decided against the cwd, by the supervisor */
        *filename_len = stashed;
        return at + stashed;
    }
    uint64_t first[2] = { n->data.args[0], argv };
    size_t sizes[BATCH];
    int read = read_batch(pid, first, 2, l->pieces, sizes);
    if (read < 1)
        return -1;
    at = append_from(pid, first[0], l->pieces, sizes[0], key, at, PAGE);
    if (at < 0 || key[*filename_at] != '/')
        return -1;    /* relative: decided against the cwd, by the supervisor */
    *filename_len = at - *filename_at;   /* with its NUL */
    if (read == 2) {
        const uint64_t *got = (const uint64_t *)(l->pieces + FIRST_READ);
        for (size_t i = 0; i < sizes[1] / 8 && !l->pointers_ended; i++) {
            if (got[i])
                l->pointers[l->pointer_count++] = got[i];
            else
                l->pointers_ended = 1;
        }
    }
    return at;
}

/* The rest of the key after exec_filename (at: its length): argv[0] NUL ...
 * argv[n-1] NUL. The new length, or -1. One more process_vm_readv in the
 * common case, for the start of every argument. */
static int exec_args(struct listener *l, const struct seccomp_notif *n, char *key, int at)
{
    pid_t pid = n->pid;
    uint64_t argv = n->data.args[1], *pointers = l->pointers;
    int count = l->pointer_count, ended = l->pointers_ended;
    while (!ended) {   /* a long argv: the rest a page at a time */
        if (count >= MAX_ARGS)
            return -1;
        uint64_t page[PAGE / 8];
        ssize_t got = read_task(pid, argv + 8 * (uint64_t)count, (char *)page, sizeof(page));
        if (got < 8)
            return -1;
        for (int i = 0; i < got / 8 && !ended; i++) {
            if (!page[i])
                ended = 1;
            else if (count < MAX_ARGS)
                pointers[count++] = page[i];
            else
                return -1;
        }
    }
    size_t sizes[BATCH];
    for (int i = 0; i < count; i += BATCH) {
        int batch = count - i < BATCH ? count - i : BATCH;
        int read = read_batch(pid, pointers + i, batch, l->pieces, sizes);
        for (int j = 0; j < batch; j++) {
            /* At most a page per argument, as the supervisor reads them: it
             * refuses longer ones as unreadable, so they are its to refuse. */
            int limit = MAX_KEY - at < PAGE ? MAX_KEY - at : PAGE;
            at = j < read ? append_from(pid, pointers[i + j], l->pieces + j * FIRST_READ, sizes[j],
                                        key, at, limit)
                          : append_string(pid, pointers[i + j], key, at, limit);
            if (at < 0)
                return -1;
        }
    }
    return at;
}

/* ---- answering ------------------------------------------------------------- */

/* Approves the thread tid's exec of path (len bytes, its NUL included) for the
 * BPF program: in tid's slot when it is free or holds a stale approval of
 * tid's own (tid is waiting on this notification, so none of its is in use),
 * else in approved_exec. The thread cannot run before the notification is
 * answered, so the BPF program never reads a half-written slot. Called with
 * fp.config held. 1 in the slot, 0 in approved_exec, -1 when nothing could be
 * written. */
static int approve(uint32_t tid, const char *path, uint32_t len)
{
    if (tid == 0 || len == 0 || len > AW_MAX_PATH)
        return -1;    /* 0: the task is not in the supervisor's pid namespace */
    if (fp.slots) {
        struct aw_approval_slot *slot = slot_of(fp.slots, SLOT_SIZE, tid);
        pthread_mutex_lock(&fp.slots_lock);
        uint32_t holder = __atomic_load_n(&slot->tid, __ATOMIC_ACQUIRE);
        int mine = holder == 0 || holder == tid;
        if (mine) {
            slot->len = len;
            memcpy(slot->path, path, len);
            __atomic_store_n(&slot->tid, tid, __ATOMIC_RELEASE);
        }
        pthread_mutex_unlock(&fp.slots_lock);
        if (mine)
            return 1;
        count(AW_FAST_COUNTER_APPROVED_IN_MAP);
    }
    if (fp.map_fd < 0)
        return -1;
    struct aw_approved value = { .len = len };
    memcpy(value.path, path, len);
    union bpf_attr attr = {0};
    attr.map_fd = fp.map_fd;
    attr.key = (uint64_t)(uintptr_t)&tid;
    attr.value = (uint64_t)(uintptr_t)&value;
    attr.flags = BPF_ANY;
    return syscall(SYS_bpf, BPF_MAP_UPDATE_ELEM, &attr, sizeof(attr)) ? -1 : 0;
}

/* Takes back the approval approve() made (in_slot: its result) after the
 * call could not be continued (the task died meanwhile, perhaps before its
 * exit could remove it). Called with fp.config held. */
static void withdraw(uint32_t tid, int in_slot)
{
    if (in_slot) {
        struct aw_approval_slot *slot = slot_of(fp.slots, SLOT_SIZE, tid);
        uint32_t expected = tid;
        pthread_mutex_lock(&fp.slots_lock);
        __atomic_compare_exchange_n(&slot->tid, &expected, 0, 0, __ATOMIC_RELEASE, __ATOMIC_RELAXED);
        pthread_mutex_unlock(&fp.slots_lock);
    } else if (fp.map_fd >= 0) {
        union bpf_attr attr = {0};
        attr.map_fd = fp.map_fd;
        attr.key = (uint64_t)(uintptr_t)&tid;
        syscall(SYS_bpf, BPF_MAP_DELETE_ELEM, &attr, sizeof(attr));
    }
}

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ULL + t.tv_nsec;
}

static void forward(uint32_t kind, int fd, const struct seccomp_notif *n)
{
    struct forward msg = { .head = { .kind = kind, .fd = fd } };
    if (n)
        msg.notif = *n;
    /* Blocks while the supervisor is busy: the agent's call waits, nothing is lost. */
    while (send(fp.forward_fd, &msg, sizeof(msg), MSG_NOSIGNAL) < 0) {
        if (errno == EINTR)
            continue;
        /* The supervisor is gone: it closes the listeners as it goes, so
         * this call fails when the fd closes. Count it and stop trying. */
        count(AW_FAST_COUNTER_FORWARD_FAILURES);
        return;
    }
}

/* The key of a write-open, or -1. A relative path is resolved as the
 * supervisor resolves it, against the task's cwd (/proc/PID/cwd), when it
 * is relative to the cwd; other directory fds are the supervisor's. */
static int open_key(struct listener *l, const struct seccomp_notif *n, char *key)
{
    uint64_t path, mode;
    int flags, dirfd = AT_FDCWD;
    if (n->data.nr == fp.open_nr) {
        path = n->data.args[0];
        flags = (int)(uint32_t)n->data.args[1];
        mode = n->data.args[2];
    } else if (n->data.nr == fp.openat_nr) {
        dirfd = (int)(uint32_t)n->data.args[0];
        path = n->data.args[1];   /* the directory fd does not matter for an absolute path */
        flags = (int)(uint32_t)n->data.args[2];
        mode = n->data.args[3];
    } else if (n->data.nr == fp.creat_nr) {
        path = n->data.args[0];
        flags = O_CREAT | O_WRONLY | O_TRUNC;
        mode = n->data.args[1];
    } else {
        return -1;
    }
    l->open = (struct open_call){ .flags = flags, .mode = mode, .dirfd = dirfd };
    int at = l->agent_len;
    memcpy(key, l->agent, at);
    at += snprintf(key + at, 32, "%c%c%d%c", 0, 1, flags, 0);
    int start = at;
    l->open.path_at = l->open.raw_at = start;
    at = append_string(n->pid, path, key, at, PAGE);
    if (at < 0 || key[start] == '/')
        return at;
    if (dirfd != AT_FDCWD)
        return -1;
    char link[32], *cwd = l->cwd;
    snprintf(link, sizeof(link), "/proc/%u/cwd", n->pid);
    ssize_t cwd_len = readlink(link, cwd, PAGE);
    if (cwd_len <= 0 || cwd_len >= PAGE || cwd[0] != '/')
        return -1;
    /* cwd '/' path, as the supervisor joins them ("/" itself gains no second '/') */
    int slash = cwd_len > 1, relative_len = at - start;
    if (start + cwd_len + slash + relative_len > MAX_KEY)
        return -1;
    memmove(key + start + cwd_len + slash, key + start, relative_len);
    memcpy(key + start, cwd, cwd_len);
    if (slash)
        key[start + cwd_len] = '/';
    l->open.raw_at = start + cwd_len + slash;
    l->open.relative = 1;
    l->open.cwd_len = cwd_len;
    return start + cwd_len + slash + relative_len;
}

/* ---- performing an allowed write-open for the task ------------------------- */

/* With perform on (aw_fast_perform), an allowed open/openat/creat is not
 * continued: the kernel would read its path from the task again, after the
 * check, and a second thread can swap it. This thread opens the path it
 * checked itself, as the task -- its fs uid and gid, groups (raw setgroups:
 * glibc's would change every thread), effective capabilities (capset: this
 * thread only), umask (the thread unshares its fs_struct), cwd -- with
 * openat2(RESOLVE_NO_MAGICLINKS), installs the fd in the task
 * (SECCOMP_IOCTL_NOTIF_ADDFD), sends the call's record to the daemon on the
 * ordered release pair, and answers with the fd's number. What needs more
 * (another root, mount or user namespace, a path under /proc or naming the
 * task itself, a result that is /dev/tty or in /proc, ELOOP, ENXIO, a cwd
 * that moved since the check, more than NGROUPS_MAX_HERE groups) goes to the
 * supervisor, which does the same in Python (daemon/supervisor/perform.py);
 * nothing was changed by then. */

#define PROC_SUPER_MAGIC_HERE 0x9fa0
#define VALID_OPEN_FLAGS_HERE (O_ACCMODE | O_CREAT | O_EXCL | O_NOCTTY | O_TRUNC | O_APPEND | O_NONBLOCK | \
                               O_DSYNC | O_ASYNC | O_DIRECT | O_LARGEFILE | O_DIRECTORY | O_NOFOLLOW | \
                               O_NOATIME | O_CLOEXEC | O_SYNC | O_PATH | O_TMPFILE)
#define O_PATH_FLAGS_HERE (O_DIRECTORY | O_NOFOLLOW | O_PATH | O_CLOEXEC)

static struct {
    int release_fd;              /* the daemon's ordered pair; -1: opens continue */
    uint64_t seq;                /* of source "supervisor-fast" */
    pthread_mutex_t lock;        /* one record at a time, in seq order */
    struct stat root;            /* ours, to tell a chrooted task */
    char mount_ns[64], user_ns[64];   /* ours, as their /proc links read: "mnt:[4026531841]" */
} perf = { .release_fd = -1, .lock = PTHREAD_MUTEX_INITIALIZER };


static const char *field(const char *status, const char *name)
{
    const char *at = strstr(status, name);
    return at ? at + strlen(name) : NULL;
}

/* The thread's ids and credentials from its /proc/TID/status (status, an
 * open fd: read from offset 0, the kernel writes it afresh); -1 when
 * unreadable (ESRCH: that thread is gone). */
static int read_status(struct listener *l, int status, struct task_info *t)
{
    ssize_t got = pread(status, l->status, sizeof(l->status) - 1, 0);
    if (got <= 0 || got == (ssize_t)sizeof(l->status) - 1)
        return -1;
    l->status[got] = 0;
    const char *name = field(l->status, "Name:\t"), *tgid = field(l->status, "\nTgid:\t"),
               *ppid = field(l->status, "\nPPid:\t"), *uid = field(l->status, "\nUid:\t"),
               *gid = field(l->status, "\nGid:\t"), *groups = field(l->status, "\nGroups:\t"),
               *mask = field(l->status, "\nUmask:\t"), *cap = field(l->status, "\nCapEff:\t");
    unsigned u[4], g[4];
    if (!name || !tgid || !ppid || !uid || !gid || !groups || !mask || !cap ||
        sscanf(uid, "%u %u %u %u", &u[0], &u[1], &u[2], &u[3]) != 4 ||
        sscanf(gid, "%u %u %u %u", &g[0], &g[1], &g[2], &g[3]) != 4 ||
        sscanf(tgid, "%d", &t->tgid) != 1 || sscanf(ppid, "%d", &t->ppid) != 1 ||
        sscanf(mask, "%o", &t->umask) != 1 || sscanf(cap, "%" SCNx64, &t->capabilities) != 1)
        return -1;
    t->uid = u[0], t->fsuid = u[3], t->gid = g[0], t->fsgid = g[3];
    size_t name_len = strcspn(name, "\n");
    if (name_len >= sizeof(t->comm))
        return -1;
    memcpy(t->comm, name, name_len);
    t->comm[name_len] = 0;
    t->group_count = 0;
    for (const char *at = groups; *at && *at != '\n';) {
        char *end;
        unsigned long value = strtoul(at, &end, 10);
        if (end == at)
            break;
        if (t->group_count == NGROUPS_MAX_HERE)
            return -1;
        t->groups[t->group_count++] = (gid_t)value;
        at = end;
        while (*at == ' ' || *at == '\t')
            at++;
    }
    return 0;
}

/* Whether the task's namespace (its /proc link `name`) is ours: 1, 0, or -1
 * when it cannot be read. The link's text names the namespace; a readlink
 * costs half a stat through it. */
static int ns_is_ours(int proc, const char *name, const char *ours)
{
    char link[64];
    ssize_t len = readlinkat(proc, name, link, sizeof(link));
    if (len <= 0 || len >= (ssize_t)sizeof(link))
        return -1;
    return (size_t)len == strlen(ours) && !memcmp(link, ours, len);
}

/* Whether the task's root is not ours -- a chroot, or another mount
 * namespace (under systemd's ProtectSystem the supervisor has its own):
 * then the call is made chrooted into it. -1: unknown. */
static int other_root(int proc)
{
    struct stat st;
    if (fstatat(proc, "root", &st, 0) < 0)
        return -1;
    if (st.st_dev != perf.root.st_dev || st.st_ino != perf.root.st_ino)
        return 1;
    int ours = ns_is_ours(proc, "ns/mnt", perf.mount_ns);
    return ours < 0 ? -1 : !ours;
}

/* PIDFD_GET_INFO (Linux 6.13), declared here: the C library's headers may
 * predate it. The kernel takes a shorter struct than its own. */
struct pidfd_info_here {
    uint64_t mask, cgroupid;
    uint32_t pid, tgid, ppid, ruid, rgid, euid, egid, suid, sgid, fsuid, fsgid;
    int32_t exit_code;
};
#define PIDFD_GET_INFO_HERE _IOWR(0xFF, 11, struct pidfd_info_here)
#define PIDFD_INFO_CGROUPID_HERE (1ULL << 2)
#define PIDFD_THREAD_HERE O_EXCL

/* The thread's cgroup v2 id (its directory's inode) from a pidfd of it,
 * which the kernel gives without formatting /proc/TID/cgroup (a tenth of
 * the cost); 0 when it cannot (an older kernel, the thread gone). */
static uint64_t cgroup_id_of(int pidfd)
{
    struct pidfd_info_here info = { .mask = PIDFD_INFO_CGROUPID_HERE };
    if (pidfd < 0 || ioctl(pidfd, PIDFD_GET_INFO_HERE, &info) < 0 || !(info.mask & PIDFD_INFO_CGROUPID_HERE))
        return 0;
    return info.cgroupid;
}

/* The task's user namespace is ours, and it is in the session's own cgroup. */
static int same_world(struct listener *l, int proc, int pidfd)
{
    if (ns_is_ours(proc, "ns/user", perf.user_ns) != 1)
        return 0;
    uint64_t cgroup = cgroup_id_of(pidfd);
    if (cgroup)
        return cgroup == l->session_ino;
    int fd = openat(proc, "cgroup", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    char line[PAGE + 8];
    ssize_t got = read(fd, line, sizeof(line) - 1);
    close(fd);
    if (got <= 3)
        return 0;
    line[got] = 0;
    const char *v2 = strstr(line, "0::");   /* the unified hierarchy's line */
    if (!v2)
        return 0;
    v2 += 3;
    size_t len = strcspn(v2, "\n");
    return len == strlen(l->session_cgroup) && !memcmp(v2, l->session_cgroup, len);
}

static void task_files_close(struct task_files *f)
{
    if (f->tid) {
        close(f->proc);
        close(f->status);
        if (f->pidfd >= 0)
            close(f->pidfd);
    }
    *f = (struct task_files){ .proc = -1, .status = -1, .pidfd = -1 };
}

/* The /proc files of thread tid, kept from an earlier call (afresh: opened
 * again), or NULL. A /proc file stays bound to the thread it was opened for
 * -- once that is gone its reads fail (ESRCH), whichever thread gets its
 * number -- so a kept one reads what a new one would, three syscalls less.
 * Out of fds, nothing is kept: the supervisor performs the call. */
static struct task_files *task_files(struct listener *l, pid_t tid, int afresh)
{
    struct task_files *f = &l->tasks[(uint32_t)tid % TASK_FILES];
    if (f->tid == tid && !afresh)
        return f;
    task_files_close(f);
    char link[40];
    snprintf(link, sizeof(link), "/proc/%u", (unsigned)tid);
    int proc = open(link, O_PATH | O_DIRECTORY | O_CLOEXEC);
    int status = proc < 0 ? -1 : openat(proc, "status", O_RDONLY | O_CLOEXEC);
    if (status < 0) {
        if (proc >= 0)
            close(proc);
        return NULL;
    }
    *f = (struct task_files){ .tid = tid, .proc = proc, .status = status,
                              .pidfd = (int)syscall(SYS_pidfd_open, tid, PIDFD_THREAD_HERE) };
    return f;
}

static int set_groups(const gid_t *groups, int count)
{
    return syscall(SYS_setgroups, count, groups) < 0 ? -1 : 0;
}

#define SWITCHED_GROUPS 1
#define SWITCHED_IDS 2
#define SWITCHED_CAPS 4

/* The thread takes the task's credentials, changing only what differs from
 * its own (a root task with every capability, the usual agent of a root
 * harness, needs no change at all): what the call is checked against is the
 * task's as read for this very call, never a remembered copy. */
static int become(struct listener *l, const struct task_info *t)
{
    l->switched = 0;
    if (t->group_count != l->own_group_count ||
        memcmp(t->groups, l->own_groups, sizeof(gid_t) * (size_t)t->group_count)) {
        l->switched |= SWITCHED_GROUPS;
        if (set_groups(t->groups, t->group_count) < 0)
            return -1;
    }
    if (t->fsuid != l->own_uid || t->fsgid != l->own_gid) {
        l->switched |= SWITCHED_IDS;
        syscall(SYS_setfsgid, t->fsgid);
        syscall(SYS_setfsuid, t->fsuid);
        /* -1 changes nothing and returns the current id */
        if ((unsigned)syscall(SYS_setfsgid, -1) != t->fsgid || (unsigned)syscall(SYS_setfsuid, -1) != t->fsuid)
            return -1;
    }
    /* Set after the ids: a change of the fs uid from or to 0 changes the effective set. */
    struct __user_cap_header_struct header = { _LINUX_CAPABILITY_VERSION_3, 0 };
    struct __user_cap_data_struct caps[2];
    memcpy(caps, l->own_caps, sizeof(caps));
    for (int i = 0; i < 2; i++)
        caps[i].effective = (uint32_t)(t->capabilities >> (32 * i)) & l->own_caps[i].permitted;
    if ((l->switched & SWITCHED_IDS) || caps[0].effective != l->own_caps[0].effective ||
        caps[1].effective != l->own_caps[1].effective) {
        l->switched |= SWITCHED_CAPS;
        if (syscall(SYS_capset, &header, caps) < 0)
            return -1;
    }
    if ((int)t->umask != l->umask_now) {
        umask(t->umask);   /* this thread's fs_struct alone */
        l->umask_now = (int)t->umask;
    }
    return 0;
}

static void restore(struct listener *l)
{
    struct __user_cap_header_struct header = { _LINUX_CAPABILITY_VERSION_3, 0 };
    int ok = 1;
    if (l->switched & SWITCHED_CAPS)
        ok = syscall(SYS_capset, &header, l->own_caps) == 0;
    if (l->switched & SWITCHED_IDS) {
        syscall(SYS_setfsuid, l->own_uid);
        syscall(SYS_setfsgid, l->own_gid);
        ok = ok && (unsigned)syscall(SYS_setfsuid, -1) == l->own_uid &&
             (unsigned)syscall(SYS_setfsgid, -1) == l->own_gid;
    }
    if (l->switched & SWITCHED_GROUPS)
        ok = ok && set_groups(l->own_groups, l->own_group_count) == 0;
    if (!ok)
        abort();   /* a thread stuck as a task: fail closed, the supervisor dies */
    l->switched = 0;
}

/* This thread's part of performing: its own fs_struct (umask) and its credentials to go back to. */
static void perform_prepare(struct listener *l)
{
    struct __user_cap_header_struct header = { _LINUX_CAPABILITY_VERSION_3, 0 };
    int groups = getgroups(NGROUPS_MAX_HERE, l->own_groups);
    l->own_root = open("/", O_PATH | O_DIRECTORY | O_CLOEXEC);
    l->own_uid = geteuid();
    l->own_gid = getegid();
    l->umask_now = -1;
    l->switched = 0;
    l->can_perform = unshare(CLONE_FS) == 0 && syscall(SYS_capget, &header, l->own_caps) == 0 && groups >= 0 &&
                     l->own_root >= 0 && (unsigned)syscall(SYS_setfsuid, -1) == l->own_uid &&
                     (unsigned)syscall(SYS_setfsgid, -1) == l->own_gid;
    l->own_group_count = groups;
}

/* ---- the record, in msgpack (the daemon's wire format: agentwarden/wire.py) ---- */

struct packer { char *buf; size_t len, cap; int bad, fields; };

static void put(struct packer *p, const void *data, size_t len)
{
    if (p->bad || p->len + len > p->cap) {
        p->bad = 1;
        return;
    }
    memcpy(p->buf + p->len, data, len);
    p->len += len;
}

static void put_byte(struct packer *p, uint8_t b) { put(p, &b, 1); }

static void put_int(struct packer *p, int64_t value)
{
    uint8_t b[9] = { 0xd3 };   /* int 64 */
    for (int i = 0; i < 8; i++)
        b[1 + i] = (uint8_t)((uint64_t)value >> (56 - 8 * i));
    put(p, b, 9);
}

static void put_text(struct packer *p, const char *s, size_t len, int binary)
{
    uint8_t head[3] = { binary ? 0xc5 : 0xda, (uint8_t)(len >> 8), (uint8_t)len };   /* bin16 / str16 */
    put(p, head, 3);
    put(p, s, len);
}

static void put_str(struct packer *p, const char *s) { put_text(p, s, strlen(s), 0); }

/* A key of the record's map: counted for its header. */
static void put_key(struct packer *p, const char *key) { put_str(p, key); p->fields++; }

static void put_key_int(struct packer *p, const char *key, int64_t value) { put_key(p, key); put_int(p, value); }

static void put_key_bool(struct packer *p, const char *key, int value) { put_key(p, key); put_byte(p, value ? 0xc3 : 0xc2); }

static int ascii(const char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s >= 0x80)
            return 0;
    return 1;
}

static uint64_t wall_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

/* Sends the performed open's record; 0, or -1 when it could not be (counted). */
static int send_record(struct listener *l, const struct seccomp_notif *n, const struct task_info *t,
                       const char *syscall_name, const char *raw, int flags, uint64_t mode, long ret,
                       int delivered, uint64_t when)
{
    struct packer p = { .buf = l->record, .cap = sizeof(l->record) };
    pthread_mutex_lock(&perf.lock);
    put_byte(&p, 0x85);   /* the batch: v, type, source, seq, records */
    put_key_int(&p, "v", 1);
    put_str(&p, "type");
    put_str(&p, "batch");
    put_str(&p, "source");
    put_str(&p, "supervisor-fast");
    put_key_int(&p, "seq", (int64_t)perf.seq);
    put_str(&p, "records");
    put_byte(&p, 0x91);
    size_t map_at = p.len;
    put(&p, "\xde\0\0", 3);   /* map16: its count written once the fields are in */
    p.fields = 0;
    put_key(&p, "kind");
    put_str(&p, "open");
    put_key_int(&p, "time", (int64_t)when);
    put_key_int(&p, "pid", t->tgid);
    put_key_int(&p, "tid", n->pid);
    put_key_int(&p, "ppid", t->ppid);
    put_key_int(&p, "uid", t->uid);
    put_key_int(&p, "gid", t->gid);
    put_key(&p, "comm");
    put_text(&p, t->comm, strlen(t->comm), !ascii(t->comm));
    put_key_int(&p, "cgroup_id", (int64_t)l->session_ino);
    put_key_int(&p, "agent_cgroup_id", (int64_t)l->session_ino);
    put_key(&p, "syscall");
    put_str(&p, syscall_name);
    put_key(&p, "path");
    put_str(&p, raw);     /* ASCII: the fast path takes no other */
    put_key_int(&p, "dirfd", l->open.dirfd);
    put_key_int(&p, "flags", flags);
    put_key_int(&p, "mode", (int64_t)mode);
    put_key_int(&p, "resolve", 0);
    put_key_int(&p, "ret", ret);
    put_key(&p, "error");
    if (ret < 0) {
        const char *name = strerrorname_np((int)-ret);
        if (name)
            put_str(&p, name);
        else
            put_byte(&p, 0xc0);
    } else {
        put_byte(&p, 0xc0);
    }
    put_key_bool(&p, "path_unreadable", 0);
    put_key_bool(&p, "path_truncated", 0);
    put_key_bool(&p, "killed_in_kernel", 0);
    put_key(&p, "kernel_rule");
    put_byte(&p, 0xc0);
    put_key_bool(&p, "performed", 1);
    if (!delivered)
        put_key_bool(&p, "performed_for_gone_task", 1);
    if (!p.bad) {
        p.buf[map_at + 1] = (char)(p.fields >> 8);
        p.buf[map_at + 2] = (char)p.fields;
    }
    int sent = -1;
    if (!p.bad) {
        /* The daemon reads the pair before each message it takes in; a full
         * queue is waited for, at most 2 s, as the supervisor's releases are. */
        for (int tries = 0; tries < 2; tries++) {
            if (send(perf.release_fd, p.buf, p.len, MSG_NOSIGNAL | MSG_DONTWAIT) == (ssize_t)p.len) {
                sent = 0;
                break;
            }
            if (errno != EAGAIN)
                break;
            struct pollfd out = { .fd = perf.release_fd, .events = POLLOUT };
            poll(&out, 1, 2000);
        }
    }
    perf.seq++;   /* a record not sent leaves a gap the daemon records */
    pthread_mutex_unlock(&perf.lock);
    if (sent < 0)
        count(AW_FAST_COUNTER_RECORDS_LOST);
    return sent;
}

static const char *open_name(const struct seccomp_notif *n)
{
    return n->data.nr == fp.open_nr ? "open" : n->data.nr == fp.openat_nr ? "openat" : "creat";
}

/* Paths the supervisor rewrites to the task's own /proc/PID, or that
 * name the calling process: never opened here. */
static int selfward(const char *path)
{
    return !strncmp(path, "/proc/", 6) || !strcmp(path, "/proc") || !strncmp(path, "/dev/fd/", 8) ||
           !strcmp(path, "/dev/stdin") || !strcmp(path, "/dev/stdout") || !strcmp(path, "/dev/stderr") ||
           !strcmp(path, "/dev/tty");
}

/* Performs the allowed open of l->key for the task and answers it: 1; or 0
 * when it is the supervisor's to do (nothing the task can see happened). */
static int perform_open(struct listener *l, const struct seccomp_notif *n, int ruled, uint64_t started)
{
    const char *path = l->key + l->open.path_at, *raw = l->key + l->open.raw_at;
    struct task_info *t = &l->task;
    if (!l->can_perform || selfward(path))
        return 0;
    /* The status first: kept files of a thread that is gone fail there, and are opened afresh. */
    struct task_files *files = task_files(l, n->pid, 0);
    if (files && read_status(l, files->status, t) < 0)
        files = task_files(l, n->pid, 1);
    if (!files || read_status(l, files->status, t) < 0)
        return 0;
    int proc = files->proc;
    int chrooted = other_root(proc);
    if (chrooted < 0 || !same_world(l, proc, files->pidfd))
        return 0;
    int base = AT_FDCWD;
    if (l->open.relative) {
        char now[PAGE], link[40];
        base = openat(proc, "cwd", O_PATH | O_DIRECTORY | O_CLOEXEC);
        if (base < 0)
            return 0;
        snprintf(link, sizeof(link), "/proc/self/fd/%d", base);
        ssize_t len = readlink(link, now, sizeof(now));
        if (len != l->open.cwd_len || memcmp(now, l->cwd, len)) {
            close(base);   /* moved since the check (another thread's chdir): the supervisor decides again */
            return 0;
        }
    }
    int flags = l->open.flags & VALID_OPEN_FLAGS_HERE;
    uint64_t mode = (flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE ? l->open.mode & 07777 : 0;
    if (flags & O_PATH)
        flags &= O_PATH_FLAGS_HERE;
    int ours = flags & O_PATH ? O_CLOEXEC : O_CLOEXEC | O_NOCTTY | O_NONBLOCK;
    struct open_how how = { .flags = (uint64_t)(unsigned)(flags | ours), .mode = mode,
                            .resolve = RESOLVE_NO_MAGICLINKS };
    uint64_t when = wall_ns();
    int fd = -1, err = EPERM;
    if (chrooted) {
        int root = openat(proc, "root", O_PATH | O_DIRECTORY | O_CLOEXEC);
        int moved = root >= 0 && fchdir(root) == 0, rooted = moved && chroot(".") == 0;
        if (root >= 0)
            close(root);
        if (!rooted) {
            if (moved && fchdir(l->own_root) < 0)
                abort();
            if (base >= 0)
                close(base);
            return 0;   /* no CAP_SYS_CHROOT: the supervisor's */
        }
    }
    if (become(l, t) == 0) {
        fd = syscall(SYS_openat2, base, raw, &how, sizeof(how));
        err = errno;
    }
    restore(l);
    if (chrooted && (fchdir(l->own_root) < 0 || chroot(".") < 0))
        abort();   /* a thread stuck in a task's root: fail closed */
    if (base >= 0)
        close(base);
    if (fd < 0 && (err == ELOOP || err == ENXIO || err == ENOSYS))
        return 0;   /* a magic link, a FIFO without a reader, a device; or openat2 barred by a
                     * sandbox's seccomp filter (ENOSYS; systemd-nspawn's): the supervisor's */
    if (fd >= 0) {
        struct stat st;
        struct statfs fs;
        if (fstat(fd, &st) < 0 || fstatfs(fd, &fs) < 0 || fs.f_type == PROC_SUPER_MAGIC_HERE ||
            (S_ISCHR(st.st_mode) && st.st_rdev == makedev(5, 0))) {
            close(fd);
            return 0;   /* /proc (reached through a link), /dev/tty: the supervisor's */
        }
        if (!(flags & (O_NONBLOCK | O_PATH)))
            /* O_NONBLOCK was only so a FIFO cannot hold us. F_SETFL takes only the
             * status flags, all of which the open kept (it fails otherwise). */
            fcntl(fd, F_SETFL, (int)how.flags & ~O_NONBLOCK);
    }
    long ret = fd < 0 ? -err : 0;
    int delivered = 1;
    if (fd >= 0) {
        struct seccomp_notif_addfd add = { .id = n->id, .srcfd = fd, .newfd_flags = flags & O_CLOEXEC };
        int installed = ioctl(l->fd, SECCOMP_IOCTL_NOTIF_ADDFD, &add);
        int add_err = errno;
        close(fd);
        if (installed >= 0)
            ret = installed;
        else if (add_err == ENOENT || add_err == ESRCH)
            delivered = 0, ret = -ESRCH;
        else
            ret = -add_err;   /* EMFILE: its table is full */
    }
    send_record(l, n, t, open_name(n), raw, flags, mode, ret, delivered, when);
    int sent = delivered;
    if (delivered) {
        struct seccomp_notif_resp resp = { .id = n->id, .val = ret >= 0 ? ret : 0,
                                           .error = ret >= 0 ? 0 : (int)ret };
        sent = ioctl(l->fd, SECCOMP_IOCTL_NOTIF_SEND, &resp) == 0;
    }
    pthread_mutex_lock(&fp.lock);
    fp.counters[sent ? AW_FAST_COUNTER_PERFORMED : AW_FAST_COUNTER_GONE]++;
    if (sent && ruled)
        fp.counters[AW_FAST_COUNTER_RULED]++;
    fp.recent[fp.recent_count++ % AW_FAST_RECENT] = (uint32_t)(now_ns() - started);
    pthread_mutex_unlock(&fp.lock);
    return 1;
}

/* ---- what else an exec runs: #! scripts, binfmt_misc ----------------------- */

#define HEAD_SIZE 256   /* what the kernel reads of a file to choose its handler (BINPRM_BUF_SIZE) */

/* The enabled binfmt_misc entries as the supervisor read them (aw_fast_binfmt),
 * guarded by fp.config: entry := u8 kind ('M' magic, 'E' extension),
 * u16 offset, u16 size, size bytes (magic or extension), for 'M' size bytes
 * of mask. */
static struct { uint8_t *blob; uint32_t len; } binfmt;

/* Whether a binfmt_misc entry claims a file whose first HEAD_SIZE bytes
 * (zero-padded) are head, run by the path filename; a malformed entry does. */
static int binfmt_claims(const uint8_t *head, const char *filename)
{
    const uint8_t *at = binfmt.blob, *end = at ? at + binfmt.len : NULL;
    while (at && at < end) {
        uint16_t offset, size;
        if (end - at < 5)
            return 1;
        memcpy(&offset, at + 1, 2);
        memcpy(&size, at + 3, 2);
        uint8_t kind = at[0];
        at += 5;
        if (end - at < (kind == 'M' ? 2 * size : size))
            return 1;
        if (kind == 'E') {   /* as the kernel: after the last '.' of the whole path */
            const char *dot = strrchr(filename, '.');
            if (dot && strlen(dot + 1) == size && !memcmp(dot + 1, at, size))
                return 1;
        } else if ((uint32_t)offset + size <= HEAD_SIZE) {
            uint16_t i = 0;
            while (i < size && !((head[offset + i] ^ at[i]) & at[size + i]))
                i++;
            if (i == size)
                return 1;
        }
        at += kind == 'M' ? 2 * size : size;
    }
    return 0;
}

/* The files runs_alone read that the kernel runs alone (ELF), by identity:
 * device, inode, and what changes when anything about the file does -- its
 * size, mode, and mtime and ctime to the nanosecond (a write, truncate,
 * chmod or link count change moves ctime; since the kernel's multigrain
 * timestamps, a change after a statx gets a ctime of its own). Its first
 * bytes are kept, so binfmt_misc entries registered since are tried again at
 * each exec. Direct-mapped: a file whose slot another takes is read again.
 * A file changed in place within one clock tick without a change of size
 * (coarse timestamps) could be taken for what it was: the BPF program's check
 * of the interpreters (approved_interpreters: none for a file approved here)
 * still kills its exec before the first instruction. Guarded by known_lock. */
#define KNOWN_SLOTS 1024   /* a power of two; about 300 KiB */
#define KNOWN_MASK (STATX_TYPE | STATX_MODE | STATX_INO | STATX_SIZE | STATX_MTIME | STATX_CTIME)

struct known_file {
    uint64_t ino, size;
    uint32_t dev_major, dev_minor, mode, used;
    struct statx_timestamp mtime, ctime;
    uint8_t head[HEAD_SIZE];
};

static struct known_file *known;   /* KNOWN_SLOTS of them (aw_fast_start) */
static pthread_mutex_t known_lock = PTHREAD_MUTEX_INITIALIZER;

static struct known_file *known_slot(const struct statx *sx)
{
    uint64_t h = (sx->stx_ino ^ ((uint64_t)sx->stx_dev_major << 40) ^ ((uint64_t)sx->stx_dev_minor << 20)) *
                 0x9E3779B97F4A7C15ULL;
    return &known[h >> 54 & (KNOWN_SLOTS - 1)];
}

static int same_file(const struct known_file *k, const struct statx *sx)
{
    return k->used && k->ino == sx->stx_ino && k->dev_major == sx->stx_dev_major &&
           k->dev_minor == sx->stx_dev_minor && k->size == sx->stx_size && k->mode == sx->stx_mode &&
           k->mtime.tv_sec == sx->stx_mtime.tv_sec && k->mtime.tv_nsec == sx->stx_mtime.tv_nsec &&
           k->ctime.tv_sec == sx->stx_ctime.tv_sec && k->ctime.tv_nsec == sx->stx_ctime.tv_nsec;
}

/* Copies the first bytes of the file sx names into head when it is known; 1 then. */
static int known_head(const struct statx *sx, uint8_t *head)
{
    if (!known)
        return 0;
    pthread_mutex_lock(&known_lock);
    const struct known_file *k = known_slot(sx);
    int hit = same_file(k, sx);
    if (hit)
        memcpy(head, k->head, HEAD_SIZE);
    pthread_mutex_unlock(&known_lock);
    return hit;
}

/* Remembers an ELF file's first bytes, read after sx was taken: a change
 * meanwhile gave the file another marker, so the entry is never found. */
static void know(const struct statx *sx, const uint8_t *head)
{
    if (!known)
        return;
    pthread_mutex_lock(&known_lock);
    struct known_file *k = known_slot(sx);
    *k = (struct known_file){ .ino = sx->stx_ino, .size = sx->stx_size, .dev_major = sx->stx_dev_major,
                              .dev_minor = sx->stx_dev_minor, .mode = sx->stx_mode, .used = 1,
                              .mtime = sx->stx_mtime, .ctime = sx->stx_ctime };
    memcpy(k->head, head, HEAD_SIZE);
    pthread_mutex_unlock(&known_lock);
}

/* Whether the kernel will run the file an exec names (a normalised absolute
 * path) alone: an ELF binary no binfmt_misc entry claims. Anything else -- a
 * #! script, a file a binfmt_misc entry claims, not ELF, not a regular file,
 * unreadable here -- the supervisor decides, with the interpreters the kernel
 * would run for it (interpreters.py); the BPF program kills a session exec
 * whose interpreters were not approved, so a file changed after this look
 * runs nothing unapproved. Looked up in the task's root, never through a
 * magic link; its first bytes read as root (the kernel reads what it runs
 * without read permission), only a regular file, with O_NONBLOCK and
 * O_NOATIME -- or taken from the files known (an unchanged one: its statx
 * is the only look then). Called with fp.config held. */
static int runs_alone(pid_t pid, const char *filename)
{
    char link[40];
    snprintf(link, sizeof(link), "/proc/%u/root", (unsigned)pid);
    int root = open(link, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (root < 0)
        return 0;
    struct open_how how = { .flags = O_PATH | O_CLOEXEC, .resolve = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS };
    int found = syscall(SYS_openat2, root, filename, &how, sizeof(how));
    int missing = errno == ENOENT || errno == ENOTDIR || errno == ENAMETOOLONG;
    close(root);
    if (found < 0)
        return missing;   /* the kernel runs nothing there either (a PATH search); a file put there meanwhile is checked */
    struct statx sx;
    if (statx(found, "", AT_EMPTY_PATH | AT_STATX_SYNC_AS_STAT, KNOWN_MASK, &sx) < 0 ||
        (sx.stx_mask & KNOWN_MASK) != KNOWN_MASK) {
        close(found);
        return 0;
    }
    if (!S_ISREG(sx.stx_mode)) {   /* never open a device; the kernel runs no directory, device or FIFO (EACCES) */
        close(found);
        return 1;
    }
    uint8_t head[HEAD_SIZE] = {0};
    if (known_head(&sx, head)) {
        close(found);
        count(AW_FAST_COUNTER_EXEC_FILES_KNOWN);
        return !binfmt_claims(head, filename);
    }
    snprintf(link, sizeof(link), "/proc/self/fd/%d", found);
    int fd = open(link, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK | O_NOATIME);
    close(found);
    if (fd < 0)
        return 0;
    ssize_t got = pread(fd, head, sizeof(head), 0);
    close(fd);
    count(AW_FAST_COUNTER_EXEC_FILES_READ);
    if (got < 4 || memcmp(head, "\177ELF", 4))
        return 0;
    know(&sx, head);
    return !binfmt_claims(head, filename);
}

/* Continues an allowed call: checks it is still valid, approves an exec's
 * filename in approved_exec (filename NULL: not an exec), continues it.
 * Called with fp.config held, which it releases. True when answered here. */
static int allow_call(struct listener *l, const struct seccomp_notif *n, const char *filename,
                      int filename_len, int ruled, uint64_t started)
{
    if (filename && !runs_alone(n->pid, filename)) {
        pthread_rwlock_unlock(&fp.config);
        return 0;   /* a script, or what binfmt_misc runs: the supervisor reads its interpreters */
    }
    __u64 id = n->id;
    if (ioctl(l->fd, SECCOMP_IOCTL_NOTIF_ID_VALID, &id) < 0) {
        pthread_rwlock_unlock(&fp.config);
        count(AW_FAST_COUNTER_GONE);     /* the task died or was interrupted */
        return 1;
    }
    if (!filename && perf.release_fd >= 0) {
        pthread_rwlock_unlock(&fp.config);
        return perform_open(l, n, ruled, started);   /* not continued: done here, as the task */
    }
    int in_slot = filename ? approve(n->pid, filename, filename_len) : 0;
    if (in_slot < 0) {
        pthread_rwlock_unlock(&fp.config);
        count(AW_FAST_COUNTER_MAP_FAILURES);   /* the supervisor retries or refuses */
        return 0;
    }
    struct seccomp_notif_resp resp = { .id = n->id, .flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE };
    int sent = ioctl(l->fd, SECCOMP_IOCTL_NOTIF_SEND, &resp);
    if (sent < 0 && filename)
        withdraw(n->pid, in_slot);
    pthread_rwlock_unlock(&fp.config);
    pthread_mutex_lock(&fp.lock);
    fp.counters[sent < 0 ? AW_FAST_COUNTER_GONE : AW_FAST_COUNTER_CONTINUED]++;
    if (sent == 0 && ruled)
        fp.counters[AW_FAST_COUNTER_RULED]++;
    fp.recent[fp.recent_count++ % AW_FAST_RECENT] = (uint32_t)(now_ns() - started);
    pthread_mutex_unlock(&fp.lock);
    return 1;
}

/* A call by its whole key: allowed when learned or when the rules allow it. */
static int answer_key(struct listener *l, const struct seccomp_notif *n, const char *key, int len,
                      const char *filename, int filename_len, uint64_t started)
{
    uint64_t hash = key_hash(key, len);
    pthread_rwlock_rdlock(&fp.config);
    pthread_mutex_lock(&fp.lock);
    struct entry *e = fp.entries ? table_slot(key, len, hash) : NULL;
    int learned = e && e->hash;
    pthread_mutex_unlock(&fp.lock);
    int ruled = !learned && rules_allow(&l->scratch, key, len);
    if (!learned && !ruled) {
        pthread_rwlock_unlock(&fp.config);
        return 0;
    }
    return allow_call(l, n, filename, filename_len, ruled, started);
}

/* True when answered here; false when the supervisor must decide. */
static int answer(struct listener *l, const struct seccomp_notif *n, uint64_t started)
{
    char *key = l->key;
    if (n->data.nr != fp.execve_nr) {
        int len = open_key(l, n, key);
        return len >= 0 && answer_key(l, n, key, len, NULL, 0, started);
    }
    int filename_at, filename_len;
    /* Not under fp.config: reading the task can take as long as the agent
     * makes a page fault take, and a policy or map change would wait. */
    int len = exec_filename(l, n, key, &filename_at, &filename_len);
    if (len < 0)
        return 0;
    const char *filename = key + filename_at;
    pthread_rwlock_rdlock(&fp.config);
    int verdict = exec_path_verdict(&l->scratch, l->agent, l->agent_len, filename);
    if (verdict == RULES_ALLOW)
        return allow_call(l, n, filename, filename_len, 1, started);
    pthread_rwlock_unlock(&fp.config);
    if (verdict == RULES_NO)
        return 0;
    len = exec_args(l, n, key, len);
    return len >= 0 && answer_key(l, n, key, len, filename, filename_len, started);
}

static void *serve(void *arg)
{
    struct listener *l = arg;
    sigset_t signals;
    sigfillset(&signals);
    sigdelset(&signals, STOP_SIGNAL);
    pthread_sigmask(SIG_SETMASK, &signals, NULL);   /* the rest are the supervisor's */
    perform_prepare(l);
    while (!l->stopping) {
        struct seccomp_notif n;
        memset(&n, 0, sizeof(n));
        if (ioctl(l->fd, SECCOMP_IOCTL_NOTIF_RECV, &n) == 0) {
            if (l->receipt)
                *l->receipt = n;
            if (!answer(l, &n, now_ns())) {
                count(AW_FAST_COUNTER_FORWARDED);
                forward(AW_FAST_FORWARD_NOTIFICATION, l->fd, &n);
            }
            continue;
        }
        if (errno == EINTR)
            continue;
        /* ENOENT: a task went away before we looked, or every process of
         * the session is gone (then RECV no longer waits: a hang-up). */
        struct pollfd p = { .fd = l->fd, .events = POLLIN };
        if (errno == ENOENT && !(poll(&p, 1, 0) == 1 && (p.revents & POLLHUP) && !(p.revents & POLLIN)))
            continue;
        count(AW_FAST_COUNTER_HANGUPS);
        forward(AW_FAST_FORWARD_HANGUP, l->fd, NULL);
        break;   /* the supervisor closes the fd once it reads the hang-up */
    }
    if (l->own_root >= 0)
        close(l->own_root);
    for (int i = 0; i < TASK_FILES; i++)
        task_files_close(&l->tasks[i]);
    return NULL;
}

static void nothing(int signal) { (void)signal; }

static void stop_thread(struct listener *l)
{
    l->stopping = 1;
    /* A signal can land just before the thread blocks again: repeat it. */
    for (;;) {
        pthread_kill(l->thread, STOP_SIGNAL);
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_nsec += 10 * 1000 * 1000;
        if (until.tv_nsec >= 1000000000L) {
            until.tv_sec++;
            until.tv_nsec -= 1000000000L;
        }
        if (pthread_timedjoin_np(l->thread, NULL, &until) == 0)
            return;
    }
}

/* ---- the supervisor's calls (ctypes; none of them blocks for long) -------- */

int aw_fast_abi(void) { return AW_FAST_ABI; }

/* Prepares the threads. forward_fd: the socket the supervisor reads
 * forwarded events from; the native numbers of execve, open, openat and
 * creat (-1: none on this architecture). 0, or -errno. */
int aw_fast_start(int forward_fd, int execve_nr, int open_nr, int openat_nr, int creat_nr)
{
    if (fp.running)
        return -EBUSY;
    fp.forward_fd = forward_fd;
    fp.execve_nr = execve_nr;
    fp.open_nr = open_nr;
    fp.openat_nr = openat_nr;
    fp.creat_nr = creat_nr;
    if (getrandom(&fp.seed, sizeof(fp.seed), 0) != sizeof(fp.seed))
        return -errno;
    fp.listeners_cap = (int)sysconf(_SC_OPEN_MAX);
    if (fp.listeners_cap <= 0 || fp.listeners_cap > (1 << 20))
        fp.listeners_cap = 1 << 20;
    fp.listeners = calloc(fp.listeners_cap, sizeof(*fp.listeners));
    fp.table = calloc(TABLE_SLOTS, sizeof(*fp.table));
    known = calloc(KNOWN_SLOTS, sizeof(*known));   /* none: every exec's file is read */
    if (!fp.listeners || !fp.table)
        return -ENOMEM;
    /* No SA_RESTART: the signal must end a blocked RECV with EINTR. */
    struct sigaction action = { .sa_handler = nothing };
    sigemptyset(&action.sa_mask);
    if (sigaction(STOP_SIGNAL, &action, NULL) < 0)
        return -errno;
    fp.running = 1;
    return 0;
}

/* Performs allowed write-opens for the tasks from now on, and sends their
 * records on release_fd (the daemon's ordered pair, the supervisor's: it
 * stays open while threads run); -1: opens continue after the check. 0, or -errno. */
int aw_fast_perform(int release_fd)
{
    if (release_fd >= 0) {
        if (stat("/", &perf.root) < 0)
            return -errno;
        ssize_t mnt = readlink("/proc/self/ns/mnt", perf.mount_ns, sizeof(perf.mount_ns) - 1),
                user = readlink("/proc/self/ns/user", perf.user_ns, sizeof(perf.user_ns) - 1);
        if (mnt <= 0 || user <= 0)
            return mnt < 0 || user < 0 ? -errno : -EINVAL;
        perf.mount_ns[mnt] = perf.user_ns[user] = 0;
    }
    pthread_rwlock_wrlock(&fp.config);
    perf.release_fd = release_fd;
    pthread_rwlock_unlock(&fp.config);
    return 0;
}

/* Hands a session's listener to a thread of its own. From now on only that
 * thread receives on it; the supervisor still answers what it forwards.
 * session_cgroup/session_ino: the session's cgroup as /proc/PID/cgroup names
 * it and its inode (the records of performed opens); receipt_fd: a file whose
 * first bytes the thread keeps the last received notification in (mapped
 * shared; -1: none). */
int aw_fast_watch(int fd, const char *agent, uint32_t agent_len, const char *session_cgroup,
                  uint64_t session_ino, int receipt_fd)
{
    if (!fp.running || fd < 0 || fd >= fp.listeners_cap || agent_len >= MAX_AGENT || fp.listeners[fd] ||
        strlen(session_cgroup) >= PAGE)
        return -EINVAL;
    struct listener *l = calloc(1, sizeof(*l));
    if (!l)
        return -ENOMEM;
    if (receipt_fd >= 0) {
        void *mapped = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, receipt_fd, 0);
        l->receipt = mapped == MAP_FAILED ? NULL : mapped;
    }
    l->fd = fd;
    l->session_ino = session_ino;
    strcpy(l->session_cgroup, session_cgroup);
    memcpy(l->agent, agent, agent_len);
    l->agent_len = agent_len;
    int err = pthread_create(&l->thread, NULL, serve, l);
    if (err) {
        if (l->receipt)
            munmap(l->receipt, PAGE);
        free(l);
        return -err;
    }
    fp.listeners[fd] = l;
    return 0;
}

/* Ends the thread of fd (it has forwarded the hang-up, or the supervisor is
 * stopping); the fd stays open, the supervisor's to close. */
void aw_fast_release(int fd)
{
    if (fd < 0 || fd >= fp.listeners_cap || !fp.listeners[fd])
        return;
    stop_thread(fp.listeners[fd]);
    if (fp.listeners[fd]->receipt)
        munmap(fp.listeners[fd]->receipt, PAGE);
    free(fp.listeners[fd]);
    fp.listeners[fd] = NULL;
}

/* A command line the supervisor decided `allow` (key layout at the top). */
int aw_fast_learn(const char *key, uint32_t len)
{
    if (len == 0 || len > MAX_KEY)
        return -EINVAL;
    uint64_t hash = key_hash(key, len);
    pthread_mutex_lock(&fp.lock);
    if (fp.entries >= TABLE_MAX_ENTRIES || fp.bytes + len > TABLE_MAX_BYTES) {
        table_clear();
        fp.counters[AW_FAST_COUNTER_RESETS]++;
    }
    struct entry *e = table_slot(key, len, hash);
    if (e && !e->hash) {
        e->key = malloc(len);
        if (!e->key) {
            pthread_mutex_unlock(&fp.lock);
            return -ENOMEM;
        }
        memcpy(e->key, key, len);
        e->len = len;
        e->hash = hash;
        fp.entries++;
        fp.bytes += len;
        fp.counters[AW_FAST_COUNTER_LEARNED]++;
    }
    pthread_mutex_unlock(&fp.lock);
    return 0;
}

/* A new policy: its compiled rules (layout at the top; len 0: none) replace
 * the old ones, and every learned decision is void. When the rules do not
 * parse, none are kept and -EINVAL is returned: everything not learned again
 * goes to the supervisor. */
int aw_fast_policy(const uint8_t *blob, uint32_t len)
{
    struct policy parsed;
    int err = policy_parse(blob, len, &parsed);
    pthread_rwlock_wrlock(&fp.config);
    struct policy old = fp.policy;
    fp.policy = parsed;   /* all zero when it did not parse */
    pthread_mutex_lock(&fp.lock);
    table_clear();
    pthread_mutex_unlock(&fp.lock);
    pthread_rwlock_unlock(&fp.config);
    policy_free(&old);
    return err;
}

/* The enabled binfmt_misc entries (see binfmt above), replacing the last;
 * 0 or -ENOMEM (then every exec goes to the supervisor). */
int aw_fast_binfmt(const uint8_t *blob, uint32_t len)
{
    static uint8_t malformed[1] = { 'M' };   /* claims every file */
    uint8_t *copy = malloc(len ? len : 1);
    if (copy)
        memcpy(copy, blob, len);
    pthread_rwlock_wrlock(&fp.config);
    if (binfmt.blob != malformed)
        free(binfmt.blob);
    binfmt.blob = copy ? copy : malformed;
    binfmt.len = copy ? len : sizeof(malformed);
    pthread_rwlock_unlock(&fp.config);
    return copy ? 0 : -ENOMEM;
}

/* What the current rules say of an execve by agent and filename alone: 1
 * allow, 0 not, -1 the arguments are needed (for tests). */
int aw_fast_exec_path_verdict(const char *agent, uint32_t agent_len, const char *filename)
{
    struct scratch *scratch = malloc(sizeof(*scratch));
    if (!scratch)
        return -ENOMEM;
    pthread_rwlock_rdlock(&fp.config);
    int verdict = exec_path_verdict(scratch, agent, agent_len, filename);
    pthread_rwlock_unlock(&fp.config);
    free(scratch);
    return verdict;
}

/* Whether the current rules allow the call of a key, learned or not (for tests). */
int aw_fast_rules_allow(const char *key, uint32_t len)
{
    struct scratch *scratch = malloc(sizeof(*scratch));
    if (!scratch || len == 0) {
        free(scratch);
        return -EINVAL;
    }
    pthread_rwlock_rdlock(&fp.config);
    int allows = rules_allow(scratch, key, len);
    pthread_rwlock_unlock(&fp.config);
    free(scratch);
    return allows;
}

/* The maps to approve execs in, approved_exec (-1: none; then execs go to
 * the supervisor) and approval_slots, and exec_stash to take waiting execs'
 * filenames from. The last two are mapped here, both or neither (-1: neither;
 * then approved_exec alone, and the tasks' memory is read); their fds may be
 * closed once this returns. Once it returns, no thread uses the previous
 * ones. 0, or -errno when they could not be mapped (then neither is used). */
int aw_fast_set_map(int fd, int slots_fd, int stash_fd)
{
    size_t slots_size = mapped_size(SLOT_SIZE), stash_size = mapped_size(STASH_SIZE);
    void *slots = NULL, *stash = NULL;
    int err = 0;
    if (slots_fd >= 0 && stash_fd >= 0 && fp.running) {
        slots = mmap(NULL, slots_size, PROT_READ | PROT_WRITE, MAP_SHARED, slots_fd, 0);
        stash = mmap(NULL, stash_size, PROT_READ, MAP_SHARED, stash_fd, 0);
        if (slots == MAP_FAILED || stash == MAP_FAILED) {
            err = -errno;
            if (slots != MAP_FAILED)
                munmap(slots, slots_size);
            if (stash != MAP_FAILED)
                munmap(stash, stash_size);
            slots = stash = NULL;
        }
    }
    pthread_rwlock_wrlock(&fp.config);
    fp.map_fd = fd;
    void *old_slots = fp.slots, *old_stash = fp.stash;
    size_t old_slots_size = fp.slots_size, old_stash_size = fp.stash_size;
    fp.slots = slots;
    fp.stash = stash;
    fp.slots_size = slots ? slots_size : 0;
    fp.stash_size = stash ? stash_size : 0;
    pthread_rwlock_unlock(&fp.config);
    if (old_slots)
        munmap(old_slots, old_slots_size);
    if (old_stash)
        munmap(old_stash, old_stash_size);
    return err;
}

/* Copies the counters (AW_FAST_COUNTERS of them) and up to `room` recent handling
 * times in ns; returns how many times were copied. */
int aw_fast_stats(uint64_t *counters, uint32_t *recent, int room)
{
    pthread_mutex_lock(&fp.lock);
    memcpy(counters, fp.counters, sizeof(fp.counters));
    int count = fp.recent_count < AW_FAST_RECENT ? (int)fp.recent_count : AW_FAST_RECENT;
    if (count > room)
        count = room;
    memcpy(recent, fp.recent, count * sizeof(*recent));
    pthread_mutex_unlock(&fp.lock);
    return count;
}

int aw_fast_counter_count(void) { return AW_FAST_COUNTERS; }

/* fastpath.h's structs as compiled here, for the test that Python's view of
 * them (built from the header's text) has not drifted: the field's offset
 * and size, the struct's size for field "". Entry i, or -1 past the last. */
#define FIELD(type, field) { #type, #field, offsetof(struct type, field), sizeof(((struct type *)0)->field) }
#define STRUCT(type) { #type, "", 0, sizeof(struct type) }
static const struct { const char *type, *field; uint32_t offset, size; } layout[] = {
    STRUCT(aw_approved), FIELD(aw_approved, len), FIELD(aw_approved, reserved), FIELD(aw_approved, path),
    STRUCT(aw_exec_stash), FIELD(aw_exec_stash, tid), FIELD(aw_exec_stash, len),
    FIELD(aw_exec_stash, filename), FIELD(aw_exec_stash, path),
    STRUCT(aw_approval_slot), FIELD(aw_approval_slot, tid), FIELD(aw_approval_slot, len),
    FIELD(aw_approval_slot, path),
    STRUCT(aw_fast_forward), FIELD(aw_fast_forward, kind), FIELD(aw_fast_forward, fd),
    STRUCT(aw_approved_interpreters), FIELD(aw_approved_interpreters, count),
    FIELD(aw_approved_interpreters, len), FIELD(aw_approved_interpreters, path),
};

int aw_fast_layout(int i, const char **type, const char **field, uint32_t *offset, uint32_t *size)
{
    if (i < 0 || i >= (int)(sizeof(layout) / sizeof(layout[0])))
        return -1;
    *type = layout[i].type;
    *field = layout[i].field;
    *offset = layout[i].offset;
    *size = layout[i].size;
    return 0;
}

/* Ends every thread; the listeners stay open (the supervisor's). */
void aw_fast_stop(void)
{
    for (int fd = 0; fp.running && fd < fp.listeners_cap; fd++)
        aw_fast_release(fd);
}
