/* agentwarden: exec, file-open, chdir, descriptor, fork and exit records for agent cgroups.
 *
 * Reads only tracepoint arguments and BPF helpers, never kernel struct
 * fields through the headers, so kernel headers of another version compile
 * it correctly; the one look at kernel objects (the file behind an fd, "which
 * fd records go out") is at offsets from the running kernel's BTF.
 * Compiled by BCC from the probe; agentwarden.h defines every record,
 * fastpath.h the approvals and the stash it shares with the supervisor.
 */
#include "agentwarden.h"
#include "fastpath.h"

#define AW_AT_FDCWD -100

/* The ring wakes the probe at most once per this interval (the probe passes
 * it from its `wakeup_interval` setting): each wake-up costs the emitting
 * task about 10 us (an inter-processor interrupt, a VM exit under
 * virtualisation). Records in between are queued silently; the probe, once
 * woken, looks again this much later, so none waits longer. 0: the kernel's
 * own policy, a wake-up whenever the probe has caught up. */
#ifndef AW_WAKEUP_INTERVAL_NS
#error "AW_WAKEUP_INTERVAL_NS is passed by the probe (setting wakeup_interval)"
#endif

struct aw_config {
    u32 tagged_levels;  /* bit L set: some tagged cgroup sits at depth L */
    u32 session_levels; /* bit L set: some `run` session's cgroup sits at depth L */
};

/* [0] -> aw_config; written by the probe whenever the tag set changes. */
BPF_ARRAY(config, struct aw_config, 1);
/* cgroup id -> agent number (nonzero); the probe mirrors the
 * trusted.agentwarden.agent xattrs of cgroup directories into it. */
BPF_HASH(agent_cgroups, u64, u32, AW_MAX_AGENT_CGROUPS);
/* (agent number, path prefix) -> deny rule; the probe loads it from the
 * daemon's policy. A match kills the task in the tracepoint. */
BPF_LPM_TRIE(deny_paths, struct aw_deny_key, struct aw_deny_value, AW_MAX_DENY_RULES);
BPF_PERCPU_ARRAY(deny_scratch, struct aw_deny_key, 1);
/* thread id -> what the daemon approved it to execute. Written by the daemon
 * (through a pinned map) before it lets a held exec continue; the kernel
 * re-reads the filename after the check, so sched_process_exec compares. */
BPF_HASH(approved_exec, u32, struct aw_approved, AW_MAX_APPROVED);
/* tid % AW_APPROVAL_SLOTS -> the same, for the supervisor's compiled fast
 * path, which writes it through a shared mapping (no bpf() call per exec).
 * A slot holding this thread's tid decides; otherwise approved_exec does (the
 * slot was busy with another thread's approval, or the approval came from
 * elsewhere). */
BPF_F_TABLE("array", u32, struct aw_approval_slot, approval_slots, AW_APPROVAL_SLOTS, BPF_F_MMAPABLE);
/* tid % AW_APPROVAL_SLOTS -> the filename a session thread waiting in execve's
 * seccomp notification asked for (see sched_switch), for the supervisor. */
BPF_F_TABLE("array", u32, struct aw_exec_stash, exec_stash, AW_APPROVAL_SLOTS, BPF_F_MMAPABLE);
/* thread id -> the arguments the interpreters of its approved exec (a #!
 * script, a binfmt_misc binary) put in front of argv, as the supervisor read
 * them before approving (pinned for it); compared at sched_process_exec. */
BPF_HASH(approved_interpreters, u32, struct aw_approved_interpreters, AW_MAX_APPROVED_INTERPRETED);
/* pid_tgid -> record being built between a syscall's entry and exit. */
BPF_HASH(inflight_exec, u64, struct aw_exec, AW_MAX_INFLIGHT);
BPF_HASH(inflight_file, u64, struct aw_file, AW_MAX_INFLIGHT);
/* pid_tgid -> user pointer of a path that could not be read at entry
 * (page not yet faulted in); read again at exit, once the kernel has. */
BPF_HASH(unread_paths, u64, u64, AW_MAX_INFLIGHT);
/* task id -> parent tgid, learned at every fork (no task_struct reads). */
BPF_TABLE("lru_hash", u32, u32, parents, 65536);
/* Records are larger than the BPF stack: build them here. The probe also
 * takes the record layouts from these maps' leaf types. */
BPF_PERCPU_ARRAY(exec_scratch, struct aw_exec, 1);
BPF_PERCPU_ARRAY(file_scratch, struct aw_file, 1);
BPF_PERCPU_ARRAY(task_scratch, struct aw_task, 1);
/* [0] -> boot time (ns) of the last record that woke the probe. Shared by
 * all CPUs: two that race both wake it, which is harmless. */
BPF_ARRAY(last_wakeup, u64, 1);
/* [kind] emitted, [AW_COUNTER_DROPPED_BASE + kind] lost, [AW_COUNTER_UNTRACKED]
 * agent processes agent_tasks had no room for, [AW_COUNTER_FD_SKIPPED] fd
 * records not needed (see "which fd records go out"); summed by the probe. */
BPF_PERCPU_ARRAY(counters, u64, AW_COUNTER_SLOTS);
/* Two rings: `vital` for exec, fork, exit and move records and for records of
 * calls killed in the kernel, `events` for the rest (opens, chdir, fds). A
 * flood of opens fills only `events`. The probe drains `vital` first. */
BPF_RINGBUF_OUTPUT(vital, AW_VITAL_RINGBUF_PAGES);
BPF_RINGBUF_OUTPUT(events, AW_RINGBUF_PAGES);

/* ---- once an agent, always an agent -------------------------------------- */

/* tgid (and the id of each thread an agent task starts) -> the agent it
 * belongs to. Added at fork by an agent task and at a task's first watched
 * call in an agent cgroup; removed at exit; AW_TASK_LEFT set when it moves
 * out of its agent's cgroups (cgroup_attach_task). A hash, not an LRU: an
 * agent task is never forgotten silently (a full map is counted). */
BPF_HASH(agent_tasks, u32, struct aw_agent_task, AW_MAX_AGENT_TASKS);
/* [0] -> agent_tasks entries with AW_TASK_LEFT. While 0, agent_cgroup_of
 * never looks agent_tasks up: untagged tasks pay one array lookup for it. */
BPF_ARRAY(left_count, u64, 1);
/* tagged cgroup's path from the v2 root + '/' -> its id; the probe fills it
 * with agent_cgroups, so that a move's destination names its agent cgroup. */
BPF_LPM_TRIE(agent_paths, struct aw_path_key, u64, AW_MAX_AGENT_CGROUPS);
BPF_PERCPU_ARRAY(path_scratch, struct aw_path_key, 1);
/* agent number (without AW_AGENT_SESSION_BIT) -> AW_POLICY_*; the probe
 * loads it from the daemon's policy with the deny rules. */
BPF_HASH(agent_policy, u32, u32, AW_MAX_AGENT_CGROUPS);
BPF_PERCPU_ARRAY(move_scratch, struct aw_move, 1);
/* [AW_HEARTBEAT_*] -> the probe's heartbeat calls each program saw. */
BPF_ARRAY(heartbeats, u64, AW_HEARTBEAT_SLOTS);

/* A heartbeat call of the probe's (its path is AW_HEARTBEAT_ADDRESS): counted. */
static __always_inline int heartbeat(const void *path, u32 slot)
{
    if ((u64)path != AW_HEARTBEAT_ADDRESS)
        return 0;
    u64 *beats = heartbeats.lookup(&slot);
    if (beats)
        __sync_fetch_and_add(beats, 1);
    return 1;
}

static __always_inline void count(u32 slot)
{
    u64 *c = counters.lookup(&slot);
    if (c)
        (*c)++;
}

/* left_count += delta (agent tasks that went out of their cgroups, or came back or ended). */
static __always_inline void left_add(s64 delta)
{
    u32 zero = 0;
    u64 *left = left_count.lookup(&zero);
    if (left)
        __sync_fetch_and_add(left, delta);
}

/* Note an agent's task (no-op when it is known already). */
static __always_inline void track(u32 key, struct aw_agent_task *task)
{
    if (agent_tasks.lookup(&key))
        return;
    if (agent_tasks.insert(&key, task) == 0) {
        if (task->flags & AW_TASK_LEFT)
            left_add(1);
    } else if (!agent_tasks.lookup(&key)) {
        count(AW_COUNTER_UNTRACKED);   /* full: watched only while in its cgroups */
    }
}

/* The task is gone: its entry goes, and with it its part of left_count. */
static __always_inline void forget_task(u32 key)
{
    struct aw_agent_task *t = agent_tasks.lookup(&key);
    if (!t)
        return;
    if (t->flags & AW_TASK_LEFT)
        left_add(-1);
    agent_tasks.delete(&key);
}

/* The tagged cgroup the current task is in (itself or its deepest tagged
 * ancestor) and its agent number, or 0. */
static __always_inline u64 tagged_cgroup_of(u32 *agent)
{
    u32 zero = 0;
    struct aw_config *cfg = config.lookup(&zero);
    if (!cfg || !cfg->tagged_levels)
        return 0;
    u32 levels = cfg->tagged_levels;
    for (int level = AW_MAX_CGROUP_LEVELS - 1; level >= 0; level--) {
        if (!(levels & (1u << level)))
            continue;
        u64 id = bpf_get_current_ancestor_cgroup_id(level);
        u32 *number = id ? agent_cgroups.lookup(&id) : 0;
        if (number) {
            *agent = *number;
            return id;
        }
    }
    return 0;
}

/* The agent cgroup the current task belongs to, or 0: for a task that has
 * left its agent's cgroups, the one it left (kept in agent_tasks, looked up
 * only while some task has left); else the tagged cgroup it is in (itself or
 * the deepest tagged ancestor). Untagged tasks leave after two array lookups
 * when nothing is tagged and no agent task has left, else after one helper
 * call and one hash lookup per depth that holds a tag (and one hash lookup
 * while some agent task has left). A task that left where the policy kills
 * is killed here, at its first watched call after another task moved it. */
static __always_inline u64 agent_cgroup_of(u32 *agent)
{
    u32 zero = 0;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    u64 *left = left_count.lookup(&zero);
    if (left && *left) {
        struct aw_agent_task *t = agent_tasks.lookup(&tgid);
        if (t && (t->flags & AW_TASK_LEFT)) {
            if (t->flags & AW_TASK_KILL)
                bpf_send_signal(9);
            *agent = t->agent;
            return t->agent_cgroup_id;
        }
    }
    u64 id = tagged_cgroup_of(agent);
    if (id) {
        struct aw_agent_task task = {.agent_cgroup_id = id, .agent = *agent};
        track(tgid, &task);
    }
    return id;
}

static __always_inline u64 agent_cgroup(void)
{
    u32 agent;
    return agent_cgroup_of(&agent);
}

/* The deny rule matching a path already copied into a record, for this
 * agent and this kind of action; 0 when none. Kills the task on a match:
 * the signal is delivered before the syscall returns to the program. */
static __always_inline u32 deny_and_kill(u32 agent, const char *path, u32 action)
{
    u32 zero = 0;
    struct aw_deny_key *key = deny_scratch.lookup(&zero);
    if (!key)
        return 0;
    int n = bpf_probe_read_kernel_str(key->path, sizeof(key->path), path);
    if (n <= 1 || key->path[0] != '/')
        return 0;
    if (n == sizeof(key->path))
        n--;  /* cut: the NUL is ours, so no exact rule may match */
    key->agent = agent & ~AW_AGENT_SESSION_BIT;   /* the rules are the agent's, in sessions too */
    key->prefixlen = 32 + 8 * n;
    struct aw_deny_value *rule = deny_paths.lookup(key);
    if (!rule || !(rule->applies & action))
        return 0;
    bpf_send_signal(9);
    return rule->rule;
}

static __always_inline void fill_header(struct aw_header *h, u32 kind, u64 agent)
{
    u64 id = bpf_get_current_pid_tgid();
    u64 ugid = bpf_get_current_uid_gid();
    u32 tgid = id >> 32;
    u32 *parent = parents.lookup(&tgid);

    h->ts_ns = bpf_ktime_get_boot_ns();
    h->cgroup_id = bpf_get_current_cgroup_id();
    h->agent_cgroup_id = agent;
    h->kind = kind;
    h->pid = (u32)id;
    h->tgid = tgid;
    h->ppid = parent ? *parent : 0;
    h->uid = (u32)ugid;
    h->gid = ugid >> 32;
    bpf_get_current_comm(h->comm, sizeof(h->comm));
}

/* BPF_RB_FORCE_WAKEUP once per AW_WAKEUP_INTERVAL_NS, else BPF_RB_NO_WAKEUP;
 * always for an exec record (at_once): the daemon's after-the-fact kill of a
 * forbidden program waits for it, and an exec is rare and slow next to the
 * wake-up's 10 us (the records queued before it go with it).
 * The time is the emission's, not the record's (an open is stamped at entry
 * and may have blocked for long). */
static __always_inline u64 wakeup_flag(int at_once)
{
    if (AW_WAKEUP_INTERVAL_NS == 0)
        return 0;
    u64 now = bpf_ktime_get_boot_ns();
    u32 zero = 0;
    u64 *last = last_wakeup.lookup(&zero);
    if (!last)
        return BPF_RB_FORCE_WAKEUP;
    if (!at_once && now - *last < AW_WAKEUP_INTERVAL_NS)
        return BPF_RB_NO_WAKEUP;
    *last = now;
    return BPF_RB_FORCE_WAKEUP;
}

/* Whether an exec record of this agent cgroup wakes the probe at once: unless
 * the daemon said its agent's exec violations are only recorded (monitor mode,
 * on-violation alert, no policy), when the next wake-up is soon enough. */
static __always_inline int exec_prompt(u64 agent_cgroup_id)
{
    u32 key = AW_POLICY_KNOWN_KEY;
    u32 *known = agent_policy.lookup(&key);
    if (!known || !(*known & AW_POLICY_KNOWN))
        return 1;
    u32 *number = agent_cgroups.lookup(&agent_cgroup_id);
    if (!number)
        return 1;
    key = *number & ~AW_AGENT_SESSION_BIT;
    u32 *policy = agent_policy.lookup(&key);
    return policy && (*policy & AW_POLICY_EXEC_PROMPT);
}

/* Into the `vital` ring when vital, else into `events`; counted either way. */
static __always_inline long emit_to(void *record, u32 size, u32 kind, int vital_ring)
{
    u64 flags = wakeup_flag(kind == AW_KIND_EXEC &&
                            exec_prompt(((struct aw_header *)record)->agent_cgroup_id));
    long err = vital_ring ? vital.ringbuf_output(record, size, flags)
                          : events.ringbuf_output(record, size, flags);
    if (err == 0)
        count(kind);
    else
        count(AW_COUNTER_DROPPED_BASE + kind);
    return err;
}

/* Records of what starts, changes or ends a process go to the `vital` ring. */
static __always_inline void emit(void *record, u32 size, u32 kind)
{
    emit_to(record, size, kind, kind == AW_KIND_EXEC || kind == AW_KIND_FORK ||
                                kind == AW_KIND_EXIT || kind == AW_KIND_MOVE);
}

/* ---- exec ---------------------------------------------------------------- */

/* Whether an approved filename (ok_len bytes, NUL included) equals the
 * kernel's (len bytes). Compared a word at a time: a byte loop is too long
 * to verify. */
static __always_inline int same_path(u32 ok_len, const char *ok, const char *path, int len)
{
    if (len <= 0 || ok_len != (u32)len)
        return 0;
    u32 words = (u32)len / 8;
    for (int i = 0; i < AW_MAX_PATH / 8; i++) {
        if (i >= words)
            break;
        if (((const u64 *)ok)[i] != ((const u64 *)path)[i])
            return 0;
    }
    for (int j = 0; j < 8; j++) {
        u32 k = words * 8 + j;
        if (k >= (u32)len)
            break;
        k &= AW_MAX_PATH - 1;
        if (ok[k] != path[k])
            return 0;
    }
    return 1;
}

/* Thread ids as the session supervisor knows them. Its notifications name
 * tasks in its pid namespace: the probe's, given at compile time when it is
 * not the initial one (a container), where ids differ from the kernel's. A
 * task outside that namespace is 0, which no approval names. */
static __always_inline u32 session_tid(void)
{
#ifdef AW_PIDNS_INO
    struct bpf_pidns_info ns = {};
    if (bpf_get_ns_current_pid_tgid(AW_PIDNS_DEV, AW_PIDNS_INO, &ns, sizeof(ns)))
        return 0;
    return ns.pid;
#else
    return (u32)bpf_get_current_pid_tgid();
#endif
}

/* At sched_process_exec: the id the exec'ing thread had when the supervisor
 * approved it. A thread other than the leader takes the leader's id as it
 * execs; its old id is known here only globally (old_pid), so in a pid
 * namespace such an exec matches no approval (fail closed: killed). */
static __always_inline u32 exec_session_tid(u32 old_pid)
{
#ifdef AW_PIDNS_INO
    return old_pid == (u32)bpf_get_current_pid_tgid() ? session_tid() : 0;
#else
    return old_pid;
#endif
}

static __always_inline struct aw_approval_slot *approval_slot(u32 tid)
{
    u32 index = tid & (AW_APPROVAL_SLOTS - 1);
    return approval_slots.lookup(&index);
}

/* Whether the supervisor approved tid to execute path (len bytes); the
 * approval is used up either way. */
static __always_inline int take_approval(u32 tid, const char *path, int len)
{
    int approved;
    if (!tid)
        return 0;   /* a cleared slot holds tid 0 and a stale path */
    struct aw_approval_slot *slot = approval_slot(tid);
    if (slot && slot->tid == tid) {
        approved = same_path(slot->len, slot->path, path, len);
        slot->tid = 0;
    } else {
        struct aw_approved *ok = approved_exec.lookup(&tid);
        approved = ok && same_path(ok->len, ok->path, path, len);
    }
    approved_exec.delete(&tid);
    return approved;
}

static __always_inline struct aw_exec_stash *exec_stash_slot(u32 tid)
{
    u32 index = tid & (AW_APPROVAL_SLOTS - 1);
    return exec_stash.lookup(&index);
}

/* The thread's execve has been answered (entered, failed or refused), or the
 * thread is gone: what was stashed for it no longer describes a waiting call. */
static __always_inline void forget_stash(u32 tid)
{
    struct aw_exec_stash *s = exec_stash_slot(tid);
    if (s && s->tid == tid)
        s->tid = 0;
}

/* A thread's unused approval goes: its exec failed, or it died first. */
static __always_inline void forget_approval(u32 tid)
{
    struct aw_approval_slot *slot = approval_slot(tid);
    if (slot && slot->tid == tid)
        slot->tid = 0;
    approved_exec.delete(&tid);
    approved_interpreters.delete(&tid);
}

/* Whether any task can be a session's: some `run` session cgroup is watched,
 * or some agent task is out of its cgroups (it may have left a session). No
 * approval or stash is made otherwise: every exec and exit on the host leaves
 * the session bookkeeping after these two array lookups, which stay cached,
 * where the slots it would clear are cold. */
static __always_inline int sessions_possible(void)
{
    u32 zero = 0;
    struct aw_config *cfg = config.lookup(&zero);
    u64 *left = left_count.lookup(&zero);
    return !cfg || cfg->session_levels || !left || *left;
}

/* argv into e: NUL-separated, at most AW_MAX_ARGS args of AW_ARG_MAX bytes;
 * e->real_argc counts every pointer (up to AW_MAX_ARGC_COUNTED), so that
 * sched_process_exec can tell the arguments an interpreter added. */
static __always_inline void read_argv(struct aw_exec *e, const char *const *argv)
{
    u32 off = 0;
    const char *arg = 0;
    e->argc = 0;
    e->argv_len = 0;
    e->real_argc = AW_ARGC_UNKNOWN;
    for (int i = 0; i < AW_MAX_ARGS; i++) {
        if (bpf_probe_read_user(&arg, sizeof(arg), &argv[i]))
            goto done;
        if (!arg) {
            e->real_argc = i;
            goto done;
        }
        if (off > AW_ARGV_BYTES) {
            e->flags |= AW_EXEC_ARGV_TRUNCATED;
            goto count;
        }
        int len = bpf_probe_read_user_str(&e->argv[off], AW_ARG_MAX, arg);
        if (len <= 0) {
            e->flags |= AW_EXEC_ARGV_TRUNCATED;
            goto count;
        }
        if (len == AW_ARG_MAX)
            e->flags |= AW_EXEC_ARGV_TRUNCATED;
        off += len;
        e->argc++;
    }
    /* All AW_MAX_ARGS slots used: is there more? */
    if (bpf_probe_read_user(&arg, sizeof(arg), &argv[AW_MAX_ARGS]) == 0 && arg)
        e->flags |= AW_EXEC_ARGV_TRUNCATED;
count:
    for (u32 i = e->argc; i < AW_MAX_ARGC_COUNTED; i++) {
        if (bpf_probe_read_user(&arg, sizeof(arg), &argv[i]))
            break;
        if (!arg) {
            e->real_argc = i;
            break;
        }
    }
done:
    e->argv_len = off;
}

static __always_inline int exec_enter(u32 syscall, s32 dirfd, const char *filename,
                                      const char *const *argv, u32 at_flags)
{
    u64 agent = agent_cgroup();
    if (!agent)
        return 0;
    forget_stash(session_tid());
    u32 zero = 0;
    struct aw_exec *e = exec_scratch.lookup(&zero);
    if (!e)
        return 0;

    fill_header(&e->h, AW_KIND_EXEC, agent);
    e->ret = 0;
    e->dirfd = dirfd;
    e->at_flags = at_flags;
    e->syscall = syscall;
    e->flags = 0;
    e->argc = 0;
    e->argv_len = 0;
    e->deny_rule = 0;
    e->exec_path[0] = 0;

    int n = bpf_probe_read_user_str(e->filename, sizeof(e->filename), filename);
    if (n < 0) {
        e->filename[0] = 0;
        e->flags |= AW_EXEC_FILENAME_UNREADABLE;
    } else if (n == sizeof(e->filename)) {
        e->flags |= AW_EXEC_FILENAME_TRUNCATED;
    }

    read_argv(e, argv);

    u64 key = bpf_get_current_pid_tgid();
    if (inflight_exec.update(&key, e))
        count(AW_COUNTER_DROPPED_BASE + AW_KIND_EXEC);
    return 0;
}

static __always_inline void emit_exec(struct aw_exec *e)
{
    u32 len = e->argv_len;
    if (len > sizeof(e->argv))
        len = sizeof(e->argv);
    emit(e, offsetof(struct aw_exec, argv) + len, AW_KIND_EXEC);
}

static __always_inline int exec_exit(long ret)
{
    u64 key = bpf_get_current_pid_tgid();
    if (sessions_possible())
        forget_stash(session_tid());   /* also after a call the supervisor refused (never entered) */
    struct aw_exec *e = inflight_exec.lookup(&key);
    if (!e)
        return 0;
    e->ret = ret;
    if (ret == 0) {
        /* The new program: its comm and, for set-id binaries, its ids. */
        u64 ugid = bpf_get_current_uid_gid();
        e->h.uid = (u32)ugid;
        e->h.gid = ugid >> 32;
        bpf_get_current_comm(e->h.comm, sizeof(e->h.comm));
    } else {
        /* A failed exec leaves no approval behind (a success used it up at
         * sched_process_exec): stale ones would fill the map. */
        forget_approval(session_tid());
    }
    emit_exec(e);
    inflight_exec.delete(&key);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_execve)
{
    if (heartbeat(args->filename, AW_HEARTBEAT_EXECVE))
        return 0;
    return exec_enter(AW_SYS_EXECVE, AW_AT_FDCWD, args->filename, args->argv, 0);
}

TRACEPOINT_PROBE(syscalls, sys_enter_execveat)
{
    if (heartbeat(args->filename, AW_HEARTBEAT_EXECVEAT))
        return 0;
    return exec_enter(AW_SYS_EXECVEAT, (s32)args->fd, args->filename, args->argv,
                      (u32)args->flags);
}

TRACEPOINT_PROBE(syscalls, sys_exit_execve) { return exec_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_execveat) { return exec_exit(args->ret); }

/* The first AW_INTERPRETER_ARGS arguments into e (an interpreter's record:
 * its own path, the script's, and what follows), short of read_argv. */
static __always_inline void read_some_argv(struct aw_exec *e, const char *const *argv)
{
    u32 off = 0;
    const char *arg = 0;
    e->argc = 0;
    e->real_argc = AW_ARGC_UNKNOWN;
    e->flags |= AW_EXEC_ARGV_TRUNCATED;
    for (int i = 0; i < AW_INTERPRETER_ARGS; i++) {
        if (bpf_probe_read_user(&arg, sizeof(arg), &argv[i]))
            break;
        if (!arg) {
            e->flags &= ~AW_EXEC_ARGV_TRUNCATED;
            e->real_argc = i;
            break;
        }
        if (off > AW_ARGV_BYTES)
            break;
        int len = bpf_probe_read_user_str(&e->argv[off], AW_ARG_MAX, arg);
        if (len <= 0)
            break;
        off += len;
        e->argc++;
    }
    e->argv_len = off;
}

#ifdef AW_EXEC_STASH
#define AW_REG_SP 19        /* pt_regs (x86-64, ptrace ABI): the user stack pointer */

/* Interpreters: for a script (#!) or a binfmt_misc binary the kernel runs
 * another program, which no exec call names. At sched_process_exec the new
 * program's registers are set: its stack pointer points at argc and argv,
 * which the kernel built (new memory, read as the task's own). Each
 * interpreter level replaced argv[0] by the interpreter (and an optional
 * argument) and the file's path, so argc grew by one or two per level; an
 * exec whose argc grew ran interpreters, argv[0] the one that runs. Each is
 * recorded as an exec of its own (syscall AW_SYS_INTERPRETER, argv from its
 * place on), checked against the deny rules (killed before its first
 * instruction) and judged by the daemon like any exec. Of the later added
 * arguments (an interpreter of a #! chain, or a #! line's optional argument)
 * those that are absolute paths are taken as interpreters. With more
 * arguments than counted, argv[0] is taken as one when it is an absolute
 * path other than the exec's. Returns the number recorded. */
/* Whether argument i an interpreter added (len bytes, NUL included) is the
 * one the supervisor approved there. */
static __always_inline int approved_interpreter(const struct aw_approved_interpreters *ok, u32 i,
                                                const char *path, int len)
{
    if (!ok)
        return 0;
    /* Not hoisted above the NULL check (the verifier refuses arithmetic on it). */
    asm volatile("" : "+r"(ok));
    if (i >= AW_MAX_INTERPRETERS || len <= 0 || len > AW_INTERPRETER_PATH || ok->len[i] != (u32)len)
        return 0;
    const char *want = ok->path + i * AW_INTERPRETER_PATH;
    u32 words = (u32)len / 8;
    for (int w = 0; w < AW_INTERPRETER_PATH / 8; w++) {
        if (w >= words)
            break;
        if (((const u64 *)want)[w] != ((const u64 *)path)[w])
            return 0;
    }
    for (int j = 0; j < 8; j++) {
        u32 k = words * 8 + j;
        if (k >= (u32)len)
            break;
        k &= AW_INTERPRETER_PATH - 1;
        if (want[k] != path[k])
            return 0;
    }
    return 1;
}

/* session: the exec is a `run` session's, whose interpreters must be the
 * ones approved (expected; NULL: none): *unapproved is set otherwise. */
static __always_inline u32 judge_interpreters(struct aw_exec *e, u32 agent, int exec_len, int session,
                                              const struct aw_approved_interpreters *expected,
                                              u32 *unapproved)
{
    const u64 *regs = (const u64 *)bpf_task_pt_regs((struct task_struct *)bpf_get_current_task_btf());
    u64 sp = 0, argc = 0;
    if (bpf_probe_read_kernel(&sp, sizeof(sp), &regs[AW_REG_SP]) ||
        bpf_probe_read_user(&argc, sizeof(argc), (void *)sp))
        return 0;
    const char *const *argv = (const char *const *)(sp + 8);
    u32 zero = 0;
    struct aw_exec *r = exec_scratch.lookup(&zero);
    if (!r)
        return 0;
    u64 added;
    if (e->real_argc == AW_ARGC_UNKNOWN) {
        const char *first = 0;
        if (bpf_probe_read_user(&first, sizeof(first), &argv[0]) || !first)
            return 0;
        int n = bpf_probe_read_user_str(r->exec_path, sizeof(r->exec_path), first);
        /* Arguments uncounted: argv[0] is what the supervisor approved first,
         * or, with nothing approved, the exec's own argv[0] or its path. */
        if (session && (expected ? !approved_interpreter(expected, 0, r->exec_path, n)
                                 : n > 1 && r->exec_path[0] == '/' &&
                                   !same_path(exec_len, e->exec_path, r->exec_path, n) &&
                                   !(e->argc && same_path(n, e->argv, r->exec_path, n))))
            *unapproved = 1;
        if (n <= 1 || r->exec_path[0] != '/' || same_path(exec_len, e->exec_path, r->exec_path, n))
            return 0;
        added = 1;
    } else {
        u64 before = e->real_argc ? e->real_argc : 1;   /* an empty argv gets "" */
        added = argc > before ? argc - before : 0;
        if (session && added != (expected ? expected->count : 0))
            *unapproved = 1;
        if (!added)
            return 0;
    }
    u32 recorded = 0;
    for (u32 i = 0; i < AW_MAX_INTERPRETERS; i++) {
        if (i >= added)
            break;
        const char *path = 0;
        if (bpf_probe_read_user(&path, sizeof(path), &argv[i]) || !path)
            break;
        __builtin_memcpy(&r->h, &e->h, sizeof(r->h));
        int n = bpf_probe_read_user_str(r->exec_path, sizeof(r->exec_path), path);
        int mismatch = session && e->real_argc != AW_ARGC_UNKNOWN &&
                       !approved_interpreter(expected, i, r->exec_path, n);
        if (mismatch)
            *unapproved = 1;
        if (n <= 1 || (i > 0 && r->exec_path[0] != '/'))
            continue;
        bpf_probe_read_kernel_str(r->filename, sizeof(r->filename), r->exec_path);
        r->ret = 0;
        r->dirfd = AW_AT_FDCWD;
        r->at_flags = 0;
        r->syscall = AW_SYS_INTERPRETER;
        r->flags = AW_EXEC_SEEN_BY_KERNEL;
        if (n == sizeof(r->exec_path))
            r->flags |= AW_EXEC_FILENAME_TRUNCATED;
        read_some_argv(r, &argv[i]);
        r->deny_rule = deny_and_kill(agent, r->exec_path, AW_DENY_EXEC);
        if (r->deny_rule)
            r->flags |= AW_EXEC_KILLED_IN_KERNEL;
        if (mismatch)
            r->flags |= AW_EXEC_NOT_APPROVED;   /* killed by the caller */
        emit_exec(r);
        recorded++;
    }
    return recorded;
}
#endif

/* What really runs: the kernel's own copy of the filename, taken past the
 * point of no return and before the new program's first instruction. */
TRACEPOINT_PROBE(sched, sched_process_exec)
{
    u64 id = bpf_get_current_pid_tgid();
    /* A non-leader thread that execs takes over the leader's pid. */
    u64 old_key = (id & 0xffffffff00000000ULL) | (u32)args->old_pid;
    struct aw_exec *e = inflight_exec.lookup(&old_key);
    unsigned short at = args->data_loc_filename & 0xFFFF;
    if (!e) {
        /* No record (inflight_exec was full: a drop, counted at entry). A
         * session exec is verified all the same: a full map is no way around
         * the check. */
        u32 agent, zero = 0;
        /* Every untagged exec on the host passes here: leave before the agent lookup. */
        if (!sessions_possible())
            return 0;
        if (agent_cgroup_of(&agent) && (agent & AW_AGENT_SESSION_BIT)) {
            struct aw_exec *scratch = exec_scratch.lookup(&zero);
            int len = scratch ? bpf_probe_read_kernel_str(scratch->exec_path, sizeof(scratch->exec_path),
                                                          (char *)args + at) : -1;
            u32 tid = exec_session_tid(args->old_pid);
            approved_interpreters.delete(&tid);   /* not verified without the record's argc */
            if (!scratch || !take_approval(tid, scratch->exec_path, len))
                bpf_send_signal(9);
        }
        return 0;
    }
    int exec_len = bpf_probe_read_kernel_str(e->exec_path, sizeof(e->exec_path), (char *)args + at);
    e->flags |= AW_EXEC_SEEN_BY_KERNEL;
    /* Denied program: killed before its first instruction. */
    u32 agent;
    if (agent_cgroup_of(&agent)) {
        e->deny_rule = deny_and_kill(agent, e->exec_path, AW_DENY_EXEC);
        if (e->deny_rule)
            e->flags |= AW_EXEC_KILLED_IN_KERNEL;
        u32 unapproved = 0;
#ifdef AW_EXEC_STASH
        /* A session's interpreters too: those the supervisor read from the
         * file before approving it, or none (a #! line swapped since). */
        u32 as_approved = (agent & AW_AGENT_SESSION_BIT) ? exec_session_tid(args->old_pid) : 0;
        struct aw_approved_interpreters *expected = as_approved ? approved_interpreters.lookup(&as_approved) : 0;
        if (judge_interpreters(e, agent, exec_len, (agent & AW_AGENT_SESSION_BIT) != 0, expected, &unapproved))
            e->flags |= AW_EXEC_INTERPRETED;
        if (expected)
            approved_interpreters.delete(&as_approved);
#endif
        if (agent & AW_AGENT_SESSION_BIT) {
            /* A session exec runs only what the daemon approved: a thread that
             * rewrote the path after the check, or an exec the daemon never
             * saw, is killed here, before the new program's first instruction. */
            if (!take_approval(exec_session_tid(args->old_pid), e->exec_path, exec_len) || unapproved) {
                bpf_send_signal(9);
                e->flags |= AW_EXEC_NOT_APPROVED;
            }
        }
    }
    if (old_key != id) {
        if (inflight_exec.update(&id, e))
            count(AW_COUNTER_DROPPED_BASE + AW_KIND_EXEC);
        inflight_exec.delete(&old_key);
    }
    return 0;
}

/* ---- which fd records go out -------------------------------------------- */

/* User space follows descriptors to name what a dirfd, fchdir, an f*() call
 * or an AT_EMPTY_PATH call acts on, and which file a writer still holds
 * (drift). It must follow directories, O_PATH fds and regular files opened
 * for writing, and anon inodes (pidfds, for pidfd_getfd); nothing else can
 * be a dirfd nor a written file: a regular file opened read-only, a device,
 * a pipe, a socket. Such an fd is "unfollowed": the open or copy that makes
 * it says so (AW_FILE_FD_UNFOLLOWED, AW_FD_UNFOLLOWED), user space keeps no
 * descriptor for its number, and its closes, copies and F_SETFD are counted
 * (AW_COUNTER_FD_SKIPPED), not emitted -- most fd records of an agent's
 * workload (its reads, its shell's /dev/null and pipe plumbing). A copy onto
 * a number that holds a followed fd (dup2, dup3) still goes out. The rule is
 * safe because what it looks at never changes for an open file: an inode's
 * type, and the access mode and O_PATH of a file's f_flags (F_SETFL cannot
 * change them). It skips a record only while no other task shares the
 * descriptor table (files_struct count 1): then nothing can put another file
 * at that number between this look and the call. Read at the offsets of the
 * running kernel's BTF (probe/btf.py, AW_OFF_*); without them every record
 * goes out. */
#ifdef AW_OFF_FILE_INODE
#define AW_S_IFMT 0170000
#define AW_S_IFREG 0100000
#define AW_S_IFCHR 0020000
#define AW_S_IFBLK 0060000
#define AW_S_IFIFO 0010000
#define AW_S_IFSOCK 0140000
#define AW_O_ACCMODE 3
#define AW_O_PATH 010000000
#define AW_FDK_FOLLOWED 0         /* followed, or not readable */
#define AW_FDK_UNFOLLOWED 1       /* not followed, in a table other tasks share */
#define AW_FDK_UNFOLLOWED_OWN 2   /* not followed, in a table no other task shares */
#define AW_FDK_EMPTY 3            /* no file at that number */

/* What fd names in the current task's descriptor table (AW_FDK_*); and,
 * when it is unfollowed and inode is given, the inode behind it. */
static __always_inline int fd_kind_inode(s32 fd, char **inode_out)
{
    if (fd < 0)
        return AW_FDK_FOLLOWED;
    char *task = (char *)bpf_get_current_task();
    char *files = 0, *fdt = 0, *file = 0, *inode = 0;
    struct file **table = 0;
    u32 max_fds = 0, f_flags = 0;
    int users = 0;
    u16 mode = 0;
    if (bpf_probe_read_kernel(&files, sizeof(files), task + AW_OFF_TASK_FILES) || !files ||
        bpf_probe_read_kernel(&users, sizeof(users), files + AW_OFF_FILES_COUNT) ||
        bpf_probe_read_kernel(&fdt, sizeof(fdt), files + AW_OFF_FILES_FDT) || !fdt ||
        bpf_probe_read_kernel(&max_fds, sizeof(max_fds), fdt + AW_OFF_FDT_MAX_FDS) ||
        bpf_probe_read_kernel(&table, sizeof(table), fdt + AW_OFF_FDT_FD) || !table)
        return AW_FDK_FOLLOWED;
    if ((u32)fd >= max_fds)
        return AW_FDK_EMPTY;
    if (bpf_probe_read_kernel(&file, sizeof(file), &table[fd]))
        return AW_FDK_FOLLOWED;
    if (!file)
        return AW_FDK_EMPTY;
    if (bpf_probe_read_kernel(&f_flags, sizeof(f_flags), file + AW_OFF_FILE_FLAGS) ||
        bpf_probe_read_kernel(&inode, sizeof(inode), file + AW_OFF_FILE_INODE) || !inode ||
        bpf_probe_read_kernel(&mode, sizeof(mode), inode + AW_OFF_INODE_MODE))
        return AW_FDK_FOLLOWED;
    u32 type = mode & AW_S_IFMT;
    if (f_flags & AW_O_PATH)
        return AW_FDK_FOLLOWED;
    if (type == AW_S_IFREG ? (f_flags & AW_O_ACCMODE) != 0 :
        type != AW_S_IFCHR && type != AW_S_IFBLK && type != AW_S_IFIFO && type != AW_S_IFSOCK)
        return AW_FDK_FOLLOWED;   /* a writable regular file, a directory, an anon inode, ... */
    if (inode_out)
        *inode_out = inode;
    return users == 1 ? AW_FDK_UNFOLLOWED_OWN : AW_FDK_UNFOLLOWED;
}

static __always_inline int fd_kind(s32 fd) { return fd_kind_inode(fd, 0); }
#else
#define AW_FDK_FOLLOWED 0
#define AW_FDK_UNFOLLOWED 1
#define AW_FDK_UNFOLLOWED_OWN 2
#define AW_FDK_EMPTY 3
static __always_inline int fd_kind(s32 fd) { return AW_FDK_FOLLOWED; }
static __always_inline int fd_kind_inode(s32 fd, char **inode_out) { return AW_FDK_FOLLOWED; }
#endif

/* A new fd (of an open, a dup) that user space is to keep no descriptor for. */
static __always_inline int fd_unfollowed(s32 fd)
{
    int kind = fd_kind(fd);
    return kind == AW_FDK_UNFOLLOWED || kind == AW_FDK_UNFOLLOWED_OWN;
}

/* ---- files: open, openat, openat2, creat, chdir, fchdir ------------------ */

/* ---- repeated opens ------------------------------------------------------ */

/* A tool that opens the same file again and again (a build reading its
 * headers, a loop) would make a record each time that says what the last
 * one said, but for its time. Such an open is folded: counted under the key
 * of the first one, which went out, in the map `folded` points at. The probe
 * swaps `folded` between folded_a and folded_b (an update of a map of maps:
 * the kernel returns from it only once no program still holds the old one)
 * and sends, for each key of the old map with a count, one record: the key's
 * open, how many more were made, the first and last of their times. Nothing
 * is lost or approximated but the single times, and a key's first open always
 * goes out as it happens, decided at once. Folded: only an open of an
 * absolute path (what it names does not depend on a cwd or dirfd that may
 * have changed) of at most AW_FOLD_PATH_MAX bytes, read whole, not killed in
 * the kernel, that failed or returned an fd user space does not follow, in a
 * descriptor table no other task shares (nothing can swap the file at that
 * number before the look); keyed on the whole record and the file's identity
 * (superblock, inode number and generation), so a symlink or mount that now
 * leads elsewhere makes another key. Without BTF offsets, or before the probe
 * points `folded` at a map, every open goes out. */
#ifdef AW_OFF_INODE_INO
_Static_assert(offsetof(struct aw_file, path) == AW_FILE_HEAD, "AW_FILE_HEAD");
BPF_HASH(folded_a, struct aw_fold_key, struct aw_fold, AW_MAX_FOLDED);
BPF_HASH(folded_b, struct aw_fold_key, struct aw_fold, AW_MAX_FOLDED);
BPF_ARRAY_OF_MAPS(folded, "folded_a", 1);
BPF_PERCPU_ARRAY(fold_scratch, struct aw_fold_key, 1);

/* The key of an open that may be folded, else 0. */
static __always_inline struct aw_fold_key *fold_key(struct aw_file *e, long ret, char *inode, int own)
{
    if (e->h.kind != AW_KIND_OPEN ||
        (e->flags & (AW_FILE_KILLED_IN_KERNEL | AW_FILE_PATH_UNREADABLE | AW_FILE_PATH_TRUNCATED)))
        return 0;
    u32 len = e->path_len;
    if (len < 2 || len > AW_FOLD_PATH_MAX || e->path[0] != '/')
        return 0;
    if (ret >= 0 && (!own || !inode))
        return 0;
    u32 zero = 0;
    struct aw_fold_key *k = fold_scratch.lookup(&zero);
    if (!k)
        return 0;
    __builtin_memset(k, 0, sizeof(*k));
    if (inode) {
        char *sb = 0;
        if (bpf_probe_read_kernel(&sb, sizeof(sb), inode + AW_OFF_INODE_SB) ||
            bpf_probe_read_kernel(&k->ino, sizeof(k->ino), inode + AW_OFF_INODE_INO) ||
            bpf_probe_read_kernel(&k->generation, sizeof(k->generation), inode + AW_OFF_INODE_GENERATION) ||
            !sb)
            return 0;
        k->sb = (u64)sb;
    }
    __builtin_memcpy(k->record, e, AW_FILE_HEAD);
    ((struct aw_header *)k->record)->ts_ns = 0;
    /* The path without its NUL (the key's zeros end it), masked for the verifier. */
    if (bpf_probe_read_kernel(k->record + AW_FILE_HEAD, (len - 1) & (AW_FOLD_PATH_MAX - 1), e->path))
        return 0;
    return k;
}

/* Counts the open under its key when the key's first open went out in this
 * generation (1: nothing to emit). */
static __always_inline int folded_again(struct aw_fold_key *k, u64 ts_ns)
{
    u32 zero = 0;
    void *map = folded.lookup(&zero);
    if (!map)
        return 0;
    struct aw_fold *f = bpf_map_lookup_elem(map, k);
    if (!f)
        return 0;
    /* Only this thread makes this key (its tid is in it): no other writer. */
    if (!f->count)
        f->first_ns = ts_ns;
    f->last_ns = ts_ns;
    f->count++;
    count(AW_COUNTER_FOLDED);
    return 1;
}

/* After the key's open went out: its repeats are folded from now on (when
 * the map is full they go out one by one). */
static __always_inline void fold_from_now(struct aw_fold_key *k)
{
    u32 zero = 0;
    void *map = folded.lookup(&zero);
    if (!map)
        return;
    struct aw_fold none = {};
    bpf_map_update_elem(map, k, &none, BPF_NOEXIST);
}
#else
static __always_inline struct aw_fold_key *fold_key(struct aw_file *e, long ret, char *inode, int own)
{
    return 0;
}
static __always_inline int folded_again(struct aw_fold_key *k, u64 ts_ns) { return 0; }
static __always_inline void fold_from_now(struct aw_fold_key *k) {}
#endif


static __always_inline int file_enter(u32 kind, u32 syscall, s32 dirfd, const char *path,
                                      u64 open_flags, u64 mode, u64 resolve, u32 flags)
{
    u32 agent_number;
    u64 agent = agent_cgroup_of(&agent_number);
    if (!agent)
        return 0;
    u32 zero = 0;
    struct aw_file *e = file_scratch.lookup(&zero);
    if (!e)
        return 0;

    fill_header(&e->h, kind, agent);
    e->ret = 0;
    e->open_flags = open_flags;
    e->mode = mode;
    e->resolve = resolve;
    e->dirfd = dirfd;
    e->syscall = syscall;
    e->flags = flags;
    e->path_len = 0;
    e->deny_rule = 0;
    e->reserved = 0;

    u64 key = bpf_get_current_pid_tgid();
    if (path) {
        int n = bpf_probe_read_user_str(e->path, sizeof(e->path), path);
        if (n > 0) {
            e->path_len = n;
            if (n == sizeof(e->path))
                e->flags |= AW_FILE_PATH_TRUNCATED;
            if (kind == AW_KIND_OPEN) {
                e->deny_rule = deny_and_kill(agent_number, e->path, AW_DENY_OPEN);
                if (e->deny_rule)
                    e->flags |= AW_FILE_KILLED_IN_KERNEL;
            }
        } else {
            u64 ptr = (u64)path;
            e->flags |= AW_FILE_PATH_UNREADABLE;
            unread_paths.update(&key, &ptr);
        }
    }
    if (inflight_file.update(&key, e))
        count(AW_COUNTER_DROPPED_BASE + kind);
    return 0;
}

static __always_inline int file_exit(long ret)
{
    u64 key = bpf_get_current_pid_tgid();
    struct aw_file *e = inflight_file.lookup(&key);
    if (!e)
        return 0;
    e->ret = ret;
    if (e->flags & AW_FILE_PATH_UNREADABLE) {
        u64 *ptr = unread_paths.lookup(&key);
        if (ptr) {
            int n = bpf_probe_read_user_str(e->path, sizeof(e->path), (const char *)*ptr);
            if (n > 0) {
                e->path_len = n;
                e->flags &= ~AW_FILE_PATH_UNREADABLE;
                if (n == sizeof(e->path))
                    e->flags |= AW_FILE_PATH_TRUNCATED;
            }
        }
        unread_paths.delete(&key);
    }
    char *inode = 0;
    int fd_table_own = 0;
    if (e->h.kind == AW_KIND_OPEN && ret >= 0) {
        int kind = fd_kind_inode(ret, &inode);
        if (kind == AW_FDK_UNFOLLOWED || kind == AW_FDK_UNFOLLOWED_OWN)
            e->flags |= AW_FILE_FD_UNFOLLOWED;
        fd_table_own = kind == AW_FDK_UNFOLLOWED_OWN;
    }
    struct aw_fold_key *fold = fold_key(e, ret, inode, fd_table_own);
    if (fold && folded_again(fold, e->h.ts_ns)) {
        inflight_file.delete(&key);
        return 0;
    }
    u32 len = e->path_len;
    if (len > sizeof(e->path))
        len = sizeof(e->path);
    /* A call killed in the kernel is a violation: its record takes the vital ring. */
    long err = emit_to(e, offsetof(struct aw_file, path) + len, e->h.kind,
                       e->flags & AW_FILE_KILLED_IN_KERNEL);
    if (fold && !err)
        fold_from_now(fold);
    inflight_file.delete(&key);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_open)
{
    return file_enter(AW_KIND_OPEN, AW_SYS_OPEN, AW_AT_FDCWD, args->filename,
                      (u32)args->flags, (u32)args->mode, 0, 0);
}

TRACEPOINT_PROBE(syscalls, sys_enter_openat)
{
    if (heartbeat(args->filename, AW_HEARTBEAT_OPENAT))
        return 0;
    return file_enter(AW_KIND_OPEN, AW_SYS_OPENAT, (s32)args->dfd, args->filename,
                      (u32)args->flags, (u32)args->mode, 0, 0);
}

TRACEPOINT_PROBE(syscalls, sys_enter_openat2)
{
    /* struct open_how starts with u64 flags, u64 mode, u64 resolve. */
    u64 how[3] = {};
    bpf_probe_read_user(how, sizeof(how), args->how);
    return file_enter(AW_KIND_OPEN, AW_SYS_OPENAT2, (s32)args->dfd, args->filename,
                      how[0], how[1], how[2], AW_FILE_OPENAT2);
}

TRACEPOINT_PROBE(syscalls, sys_enter_creat)
{
    /* creat(path, mode) is open(path, O_CREAT|O_WRONLY|O_TRUNC, mode). */
    return file_enter(AW_KIND_OPEN, AW_SYS_CREAT, AW_AT_FDCWD, args->pathname,
                      01101, (u32)args->mode, 0, 0);
}

TRACEPOINT_PROBE(syscalls, sys_enter_chdir)
{
    return file_enter(AW_KIND_CHDIR, AW_SYS_CHDIR, AW_AT_FDCWD, args->filename, 0, 0, 0, 0);
}

TRACEPOINT_PROBE(syscalls, sys_enter_fchdir)
{
    return file_enter(AW_KIND_CHDIR, AW_SYS_FCHDIR, (s32)args->fd, 0, 0, 0, 0, 0);
}

TRACEPOINT_PROBE(syscalls, sys_exit_open) { return file_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_openat) { return file_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_openat2) { return file_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_creat) { return file_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_chdir) { return file_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_fchdir) { return file_exit(args->ret); }

/* ---- session execs: the filename, copied while the supervisor is asked ---- */

#ifdef AW_EXEC_STASH
/* The syscall's registers, by index in the x86-64 pt_regs, whose layout the
 * ptrace ABI fixes (the one read here of kernel memory other than tracepoint
 * arguments, through the bpf_task_pt_regs helper; the probe enables it only
 * on x86-64 with BTF). */
#define AW_REG_AX 10        /* -ENOSYS until the syscall has run, then its result */
#define AW_REG_DI 14        /* the first argument */
#define AW_REG_ORIG_AX 15   /* the syscall number */
#define AW_NR_EXECVE 59
#define AW_ENOSYS 38

/* A session thread that blocks in execve before the syscall has run (its
 * result register still -ENOSYS, no sys_enter record yet) -- that is, waiting
 * for the supervisor's answer to the seccomp notification -- has its filename
 * copied to exec_stash here, in its own context: a plain copy from
 * its memory, where the supervisor's process_vm_readv would pin the page and,
 * right after a fork, copy it (most of an answer's cost). The stash is a
 * shortcut, not a trust boundary: the supervisor decides on it, and what the
 * kernel then really executes is checked against the approval at
 * sched_process_exec, as when the supervisor reads the memory itself. */
TRACEPOINT_PROBE(sched, sched_switch)
{
    if (args->prev_state == 0)
        return 0;   /* preempted, not waiting */
    u32 zero = 0;
    struct aw_config *cfg = config.lookup(&zero);
    if (!cfg || !cfg->session_levels)
        return 0;
    const u64 *regs = (const u64 *)bpf_task_pt_regs((struct task_struct *)bpf_get_current_task_btf());
    u64 nr = 0, filename = 0;
    if (bpf_probe_read_kernel(&nr, sizeof(nr), &regs[AW_REG_ORIG_AX]) || nr != AW_NR_EXECVE)
        return 0;
    u32 agent;
    if (!agent_cgroup_of(&agent) || !(agent & AW_AGENT_SESSION_BIT))
        return 0;
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = session_tid();
    u64 ax = 0;
    if (bpf_probe_read_kernel(&ax, sizeof(ax), &regs[AW_REG_AX]) || (s64)ax != -AW_ENOSYS ||
        inflight_exec.lookup(&id)) {
        /* The execve has run (a stop after a refused one, say) or is running
         * (waiting for the disk): nothing of it is waiting for an answer. */
        forget_stash(tid);
        return 0;
    }
    if (!tid)
        return 0;   /* outside the supervisor's pid namespace: no session of its own */
    struct aw_exec_stash *s = exec_stash_slot(tid);
    if (!s || (s->tid && s->tid != tid))
        return 0;   /* another thread's call holds the slot: the supervisor reads */
    if (bpf_probe_read_kernel(&filename, sizeof(filename), &regs[AW_REG_DI]))
        return 0;
    s->tid = 0;
    s->filename = filename;
    int n = bpf_probe_read_user_str(s->path, sizeof(s->path), (const char *)filename);
    if (n <= 0 || n >= (int)sizeof(s->path))
        return 0;   /* unreadable now, or too long to be whole: the supervisor reads */
    s->len = n;
    asm volatile("" ::: "memory");
    s->tid = tid;   /* last: the supervisor takes the slot as whole once it names tid */
    return 0;
}
#endif

/* ---- process lineage ----------------------------------------------------- */

TRACEPOINT_PROBE(sched, sched_process_fork)
{
    /* Lineage of every task, so one that joins an agent cgroup after fork
     * still names its parent. Fork is rare next to open: cheap enough. */
    u32 child = args->child_pid;
    u32 parent_tgid = bpf_get_current_pid_tgid() >> 32;
    parents.update(&child, &parent_tgid);

    u32 number;
    u64 agent = agent_cgroup_of(&number);
    if (!agent)
        return 0;
    /* The child is the agent's wherever it goes, and has left when its parent has. */
    struct aw_agent_task *p = agent_tasks.lookup(&parent_tgid);
    struct aw_agent_task task = {.agent_cgroup_id = agent, .agent = number,
                                 .flags = p ? p->flags : 0};
    track(child, &task);
    u32 zero = 0;
    struct aw_task *t = task_scratch.lookup(&zero);
    if (!t)
        return 0;
    fill_header(&t->h, AW_KIND_FORK, agent);
    t->child_pid = child;
    t->reserved = 0;
    emit(t, sizeof(*t), AW_KIND_FORK);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;

    /* An exec killed past its point of no return never reaches sys_exit. */
    struct aw_exec *e = inflight_exec.lookup(&id);
    if (e) {
        e->flags |= AW_EXEC_DIED_BEFORE_RETURN;
        emit_exec(e);
        inflight_exec.delete(&id);
    }
    inflight_file.delete(&id);
    unread_paths.delete(&id);
    if (sessions_possible()) {
        u32 as_approved = session_tid();
        forget_approval(as_approved);   /* approved, then killed before the exec ran */
        forget_stash(as_approved);
    }

#ifdef AW_HAVE_GROUP_DEAD
    int process_ends = args->group_dead;
#else
    int process_ends = tid == (u32)(id >> 32);
#endif
    if (process_ends) {
        u64 agent = agent_cgroup();
        u32 zero = 0;
        struct aw_task *t = task_scratch.lookup(&zero);
        if (agent && t) {
            fill_header(&t->h, AW_KIND_EXIT, agent);
            t->child_pid = 0;
            t->reserved = 0;
            emit(t, sizeof(*t), AW_KIND_EXIT);
        }
        forget_task(id >> 32);
    }
    if (tid != (u32)(id >> 32))
        forget_task(tid);   /* a thread's own entry, made when it was started */
    parents.delete(&tid);
    return 0;
}

/* ---- moves between cgroups ------------------------------------------------ */

/* A write to cgroup.procs (or cgroup.threads) has moved a task. Only an agent's
 * tasks matter: anyone else's move costs one hash lookup. Runs after the move,
 * in the mover's context. The destination's agent cgroup comes from its path
 * (agent_paths): a move to a cgroup of the same agent (its own, one below, a
 * `run` session of it) is recorded and nothing more; a move anywhere else --
 * an untagged cgroup, another agent's -- is a violation and leaves the task,
 * and every task it starts, its first agent's: agent_cgroup_of answers from
 * agent_tasks for it from now on. Where the agent's policy kills, the mover
 * that moved itself is killed here; a task moved by another dies at its next
 * watched call (and the daemon kills it too). */
TRACEPOINT_PROBE(cgroup, cgroup_attach_task)
{
    if (args->dst_root != 0)
        return 0;   /* a cgroup v1 hierarchy; the v2 one is hierarchy 0 */
    u32 moved = args->pid;
    struct aw_agent_task *t = agent_tasks.lookup(&moved);
    if (!t)
        return 0;
    u32 zero = 0;
    struct aw_move *m = move_scratch.lookup(&zero);
    struct aw_path_key *key = path_scratch.lookup(&zero);
    if (!m || !key)
        return 0;
    unsigned short at = args->data_loc_dst_path & 0xFFFF;
    int n = bpf_probe_read_kernel_str(key->path, sizeof(key->path), (char *)args + at);
    m->flags = 0;
    m->path_len = n > 0 ? n : 0;
    if (n == sizeof(key->path))
        m->flags |= AW_MOVE_PATH_TRUNCATED;
    bpf_probe_read_kernel(m->dst_path, sizeof(m->dst_path), key->path);
    if (n > 0 && n < (int)sizeof(key->path)) {
        key->path[(n - 1) & (AW_CGROUP_PATH_MAX - 1)] = '/';   /* in place of the NUL */
        key->prefixlen = 8 * n;
    } else {
        key->prefixlen = n > 1 ? 8 * (n - 1) : 0;
    }
    u64 *holder = agent_paths.lookup(key);
    u64 dst_agent = holder ? *holder : 0;
    u32 *dst_number = dst_agent ? agent_cgroups.lookup(&dst_agent) : 0;
    u32 agent = t->agent & ~AW_AGENT_SESSION_BIT;
    u64 from = t->agent_cgroup_id;
    if (dst_number && (*dst_number & ~AW_AGENT_SESSION_BIT) == agent) {
        /* Within its agent: back in, if it had left. */
        if (t->flags & AW_TASK_LEFT)
            left_add(-1);
        t->flags = 0;
        t->agent_cgroup_id = dst_agent;
        t->agent = *dst_number;
    } else {
        m->flags |= AW_MOVE_LEFT;
        if (!(t->flags & AW_TASK_LEFT)) {
            t->flags |= AW_TASK_LEFT;
            left_add(1);
        }
        u32 *policy = agent_policy.lookup(&agent);
        if (policy && (*policy & AW_POLICY_KILL_ON_LEAVE)) {
            if ((u32)(bpf_get_current_pid_tgid() >> 32) == moved) {
                bpf_send_signal(9);
                m->flags |= AW_MOVE_KILLED_IN_KERNEL;
            } else {
                t->flags |= AW_TASK_KILL;
                m->flags |= AW_MOVE_KILL_PENDING;
            }
        }
    }
    fill_header(&m->h, AW_KIND_MOVE, from);
    m->dst_cgroup_id = args->dst_id;
    m->dst_agent_cgroup_id = dst_agent;
    m->moved_pid = moved;
    m->reserved = 0;
    u32 len = m->path_len;
    if (len > sizeof(m->dst_path))
        len = sizeof(m->dst_path);
    emit(m, offsetof(struct aw_move, dst_path) + len, AW_KIND_MOVE);
    return 0;
}

/* clone3(CLONE_INTO_CGROUP) makes a child right in a cgroup of the caller's
 * choice: no cgroup_attach_task. The child returns from clone3 in its own
 * context, before its first instruction: an agent's child (noted at fork)
 * looks here at where it was born. Within its agent: nothing to say. Anywhere
 * else it has left, as if moved: a move record (AW_MOVE_AT_CLONE, the
 * destination named by id only), agent_cgroup_of answers from agent_tasks
 * for it, and where the policy kills it dies here. One hash lookup per new
 * task returning from clone3. */
static __always_inline void check_birthplace(void)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    struct aw_agent_task *t = agent_tasks.lookup(&tgid);
    if (!t || (t->flags & AW_TASK_LEFT))
        return;
    u32 number = 0;
    u64 here = tagged_cgroup_of(&number);
    u32 agent = t->agent & ~AW_AGENT_SESSION_BIT;
    if (here && (number & ~AW_AGENT_SESSION_BIT) == agent)
        return;
    u32 zero = 0;
    struct aw_move *m = move_scratch.lookup(&zero);
    if (!m)
        return;
    u64 from = t->agent_cgroup_id;
    t->flags |= AW_TASK_LEFT;
    left_add(1);
    m->flags = AW_MOVE_LEFT | AW_MOVE_AT_CLONE;
    u32 *policy = agent_policy.lookup(&agent);
    if (policy && (*policy & AW_POLICY_KILL_ON_LEAVE)) {
        bpf_send_signal(9);
        m->flags |= AW_MOVE_KILLED_IN_KERNEL;
    }
    fill_header(&m->h, AW_KIND_MOVE, from);
    m->dst_cgroup_id = bpf_get_current_cgroup_id();
    m->dst_agent_cgroup_id = here;
    m->moved_pid = (u32)id == tgid ? tgid : (u32)id;
    m->path_len = 0;
    m->reserved = 0;
    m->dst_path[0] = 0;
    emit(m, offsetof(struct aw_move, dst_path), AW_KIND_MOVE);
}

/* ---- descriptors: dup*, fcntl, close*, pidfd_open, pidfd_getfd ----------- */

#define AW_F_DUPFD 0
#define AW_F_SETFD 2
#define AW_F_DUPFD_CLOEXEC 1030
#define AW_O_CLOEXEC 02000000
#define AW_CLOSE_RANGE_CLOEXEC 4

/* pid_tgid -> the descriptor change being made. These calls always return
 * (none execs or exits), so sys_exit always takes the entry back. The probe
 * takes the aw_fd layout from this map's leaf type. */
BPF_HASH(inflight_fd, u64, struct aw_fd, AW_MAX_INFLIGHT);

/* A call that makes a descriptor is recorded at its exit, which tells the new
 * fd (AW_FD_AT_EXIT); one that only drops descriptors (close, close_range) at
 * its entry, with ret 0, whatever it then returns: it drops them all the same
 * (but for EBADF, when there was none), and close is among the most frequent
 * syscalls of every process -- an untagged one pays for one program, not two. */
#define AW_FD_AT_EXIT 1
#define AW_FD_AT_ENTRY 0

/* A copy of oldfd to newfd (dup2, dup3) is not needed when oldfd is
 * unfollowed in an unshared table and newfd held nothing user space follows. */
static __always_inline int dup_to_skips(s32 oldfd, s32 newfd)
{
    if (fd_kind(oldfd) != AW_FDK_UNFOLLOWED_OWN)
        return 0;
    if (newfd == oldfd)
        return 1;
    int target = fd_kind(newfd);
    return target == AW_FDK_EMPTY || target == AW_FDK_UNFOLLOWED_OWN;
}

/* aw_fd.reserved while in flight: the call is to be counted, not emitted
 * (AW_COUNTER_FD_SKIPPED), if it succeeds. Never emitted set. */
#define AW_FD_INFLIGHT_SKIP 1

/* When a call's record is not needed (see "which fd records go out"); looked
 * at only for agents' calls. */
#define AW_SKIP_NEVER 0
#define AW_SKIP_IF_UNFOLLOWED 1   /* fd is unfollowed, in an unshared table */
#define AW_SKIP_IF_DUP_TO 2       /* that, and fd copied onto arg replaces nothing followed */

static __always_inline int fd_enter(u32 syscall, s32 fd, u64 arg, u32 flags, int at_exit, int when)
{
    u64 agent = agent_cgroup();
    if (!agent)
        return 0;
    int skip = 0;
    if (when == AW_SKIP_IF_UNFOLLOWED)
        skip = fd_kind(fd) == AW_FDK_UNFOLLOWED_OWN;
    else if (when == AW_SKIP_IF_DUP_TO)
        skip = dup_to_skips(fd, (s32)arg);
    if (skip && !at_exit) {
        count(AW_COUNTER_FD_SKIPPED);
        return 0;
    }
    struct aw_fd r = {};
    fill_header(&r.h, AW_KIND_FD, agent);
    r.fd = fd;
    r.arg = arg;
    r.syscall = syscall;
    r.flags = flags;
    if (!at_exit) {
        emit(&r, sizeof(r), AW_KIND_FD);
        return 0;
    }
    r.reserved = skip ? AW_FD_INFLIGHT_SKIP : 0;
    u64 key = bpf_get_current_pid_tgid();
    if (inflight_fd.update(&key, &r))
        count(AW_COUNTER_DROPPED_BASE + AW_KIND_FD);
    return 0;
}

static __always_inline int fd_exit(long ret)
{
    u64 key = bpf_get_current_pid_tgid();
    struct aw_fd *r = inflight_fd.lookup(&key);
    if (!r)
        return 0;
    if (ret >= 0) {   /* a failed call made no descriptor: not recorded */
        if (r->reserved == AW_FD_INFLIGHT_SKIP) {
            count(AW_COUNTER_FD_SKIPPED);
        } else {
            r->ret = ret;
            /* every call in flight but F_SETFD returns a new descriptor */
            if (r->syscall != AW_SYS_FCNTL_SETFD && fd_unfollowed(ret))
                r->flags |= AW_FD_UNFOLLOWED;
            emit(r, sizeof(*r), AW_KIND_FD);
        }
    }
    inflight_fd.delete(&key);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_dup)
{
    return fd_enter(AW_SYS_DUP, (s32)args->fildes, 0, 0, AW_FD_AT_EXIT, AW_SKIP_IF_UNFOLLOWED);
}

TRACEPOINT_PROBE(syscalls, sys_enter_dup2)
{
    return fd_enter(AW_SYS_DUP2, (s32)args->oldfd, (u32)args->newfd, 0, AW_FD_AT_EXIT,
                    AW_SKIP_IF_DUP_TO);
}

TRACEPOINT_PROBE(syscalls, sys_enter_dup3)
{
    return fd_enter(AW_SYS_DUP3, (s32)args->oldfd, (u32)args->newfd,
                    (args->flags & AW_O_CLOEXEC) ? AW_FD_CLOEXEC : 0, AW_FD_AT_EXIT,
                    AW_SKIP_IF_DUP_TO);
}

TRACEPOINT_PROBE(syscalls, sys_enter_fcntl)
{
    /* Only the commands that make a descriptor or change its close-on-exec
     * flag; the others (locks, status flags, ...) leave early. */
    u32 cmd = (u32)args->cmd;
    if (cmd == AW_F_DUPFD)
        return fd_enter(AW_SYS_FCNTL_DUPFD, (s32)args->fd, args->arg, 0, AW_FD_AT_EXIT,
                        AW_SKIP_IF_UNFOLLOWED);
    if (cmd == AW_F_DUPFD_CLOEXEC)
        return fd_enter(AW_SYS_FCNTL_DUPFD_CLOEXEC, (s32)args->fd, args->arg, AW_FD_CLOEXEC,
                        AW_FD_AT_EXIT, AW_SKIP_IF_UNFOLLOWED);
    if (cmd == AW_F_SETFD)   /* at exit: a refused change (EBADF) changed nothing */
        return fd_enter(AW_SYS_FCNTL_SETFD, (s32)args->fd, args->arg, 0, AW_FD_AT_EXIT,
                        AW_SKIP_IF_UNFOLLOWED);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_close)
{
    return fd_enter(AW_SYS_CLOSE, (s32)args->fd, 0, 0, AW_FD_AT_ENTRY, AW_SKIP_IF_UNFOLLOWED);
}

TRACEPOINT_PROBE(syscalls, sys_enter_close_range)
{
    return fd_enter(AW_SYS_CLOSE_RANGE, (s32)args->fd, (u32)args->max_fd,
                    (args->flags & AW_CLOSE_RANGE_CLOEXEC) ? AW_FD_CLOEXEC : 0, AW_FD_AT_ENTRY, AW_SKIP_NEVER);
}

TRACEPOINT_PROBE(syscalls, sys_enter_pidfd_open)
{
    /* A pidfd is always close-on-exec. */
    return fd_enter(AW_SYS_PIDFD_OPEN, -1, (u32)args->pid, AW_FD_CLOEXEC, AW_FD_AT_EXIT, AW_SKIP_NEVER);
}

TRACEPOINT_PROBE(syscalls, sys_enter_pidfd_getfd)
{
    /* The fd it makes is always close-on-exec. */
    return fd_enter(AW_SYS_PIDFD_GETFD, (s32)args->pidfd, (u32)args->fd, AW_FD_CLOEXEC,
                    AW_FD_AT_EXIT, AW_SKIP_NEVER);
}

TRACEPOINT_PROBE(syscalls, sys_exit_dup) { return fd_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_dup2) { return fd_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_dup3) { return fd_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_fcntl) { return fd_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_pidfd_open) { return fd_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_pidfd_getfd) { return fd_exit(args->ret); }

/* ---- file changes: unlink*, rmdir, rename*, truncate, chmod*, chown*, link*,
 * symlink*, mkdir* ---------------------------------------------------------- */

/* pid_tgid -> the change being made, from entry to exit. These calls always
 * return (none execs or exits; a thread killed meanwhile still passes
 * sys_exit), so sys_exit always takes the entry back. The probe takes the
 * aw_change layout from this map's leaf type. */
BPF_HASH(inflight_change, u64, struct aw_change, AW_MAX_INFLIGHT_CHANGES);
BPF_PERCPU_ARRAY(change_scratch, struct aw_change, 1);

/* The user pointers of a change's paths, for reading them again at exit when
 * one could not be read at entry (its page not yet faulted in). */
struct aw_change_ptrs {
    u64 path;
    u64 path2;
};
BPF_HASH(unread_change_paths, u64, struct aw_change_ptrs, AW_MAX_INFLIGHT_CHANGES);

/* Where path2 starts in e->paths: right after path. */
static __always_inline char *change_path2(struct aw_change *e)
{
    u32 off = e->path_len;
    if (off > AW_MAX_PATH)
        off = AW_MAX_PATH;
    return &e->paths[off];
}

/* Both paths into e->paths, packed: path at 0, path2 right after it. */
static __always_inline void change_read_paths(struct aw_change *e, const char *path, const char *path2)
{
    e->flags &= ~(AW_FILE_PATH_UNREADABLE | AW_FILE_PATH_TRUNCATED |
                  AW_CHANGE_PATH2_UNREADABLE | AW_CHANGE_PATH2_TRUNCATED);
    e->path_len = 0;
    e->path2_len = 0;
    if (path) {
        int n = bpf_probe_read_user_str(e->paths, AW_MAX_PATH, path);
        if (n > 0) {
            e->path_len = n;
            if (n == AW_MAX_PATH)
                e->flags |= AW_FILE_PATH_TRUNCATED;
        } else {
            e->flags |= AW_FILE_PATH_UNREADABLE;
        }
    }
    if (path2) {
        int n = bpf_probe_read_user_str(change_path2(e), AW_MAX_PATH, path2);
        if (n > 0) {
            e->path2_len = n;
            if (n == AW_MAX_PATH)
                e->flags |= AW_CHANGE_PATH2_TRUNCATED;
        } else {
            e->flags |= AW_CHANGE_PATH2_UNREADABLE;
        }
    }
}

/* path is the target of a symlink (its content, not a file it changes) for
 * symlink and symlinkat: the in-kernel deny rules look at path2 alone then. */
static __always_inline int change_enter(u32 syscall, s32 dirfd, const char *path, s32 dirfd2,
                                        const char *path2, u32 mode, s32 new_uid, s32 new_gid,
                                        u32 at_flags, s64 length)
{
    u32 agent_number;
    u64 agent = agent_cgroup_of(&agent_number);
    if (!agent)
        return 0;
    u32 zero = 0;
    struct aw_change *e = change_scratch.lookup(&zero);
    if (!e)
        return 0;
    fill_header(&e->h, AW_KIND_CHANGE, agent);
    e->ret = 0;
    e->length = length;
    e->dirfd = dirfd;
    e->dirfd2 = dirfd2;
    e->mode = mode;
    e->new_uid = new_uid;
    e->new_gid = new_gid;
    e->at_flags = at_flags;
    e->syscall = syscall;
    e->flags = 0;
    e->deny_rule = 0;
    e->reserved = 0;
    change_read_paths(e, path, path2);

    /* A denied path (absolute, as given): killed before the call returns. */
    int symlink = syscall == AW_SYS_SYMLINK || syscall == AW_SYS_SYMLINKAT;
    if (e->path_len && !symlink)
        e->deny_rule = deny_and_kill(agent_number, e->paths, AW_DENY_OPEN);
    if (!e->deny_rule && e->path2_len)
        e->deny_rule = deny_and_kill(agent_number, change_path2(e), AW_DENY_OPEN);
    if (e->deny_rule)
        e->flags |= AW_FILE_KILLED_IN_KERNEL;

    u64 key = bpf_get_current_pid_tgid();
    if (e->flags & (AW_FILE_PATH_UNREADABLE | AW_CHANGE_PATH2_UNREADABLE)) {
        struct aw_change_ptrs ptrs = {(u64)path, (u64)path2};
        unread_change_paths.update(&key, &ptrs);
    }
    if (inflight_change.update(&key, e))
        count(AW_COUNTER_DROPPED_BASE + AW_KIND_CHANGE);
    return 0;
}

static __always_inline int change_exit(long ret)
{
    u64 key = bpf_get_current_pid_tgid();
    struct aw_change *e = inflight_change.lookup(&key);
    if (!e)
        return 0;
    e->ret = ret;
    if (e->flags & (AW_FILE_PATH_UNREADABLE | AW_CHANGE_PATH2_UNREADABLE)) {
        struct aw_change_ptrs *ptrs = unread_change_paths.lookup(&key);
        if (ptrs)
            change_read_paths(e, (const char *)ptrs->path, (const char *)ptrs->path2);
        unread_change_paths.delete(&key);
    }
    u64 len = (u64)e->path_len + e->path2_len;   /* 64-bit: the bound holds for what emit gets */
    if (len > sizeof(e->paths))
        len = sizeof(e->paths);
    emit(e, offsetof(struct aw_change, paths) + len, AW_KIND_CHANGE);
    inflight_change.delete(&key);
    return 0;
}

#define AW_NO_ID -1
#define AW_CHANGE_PATH(sys, dfd, p) change_enter(sys, dfd, p, AW_AT_FDCWD, 0, 0, AW_NO_ID, AW_NO_ID, 0, 0)

TRACEPOINT_PROBE(syscalls, sys_enter_unlink) { return AW_CHANGE_PATH(AW_SYS_UNLINK, AW_AT_FDCWD, args->pathname); }
TRACEPOINT_PROBE(syscalls, sys_enter_rmdir) { return AW_CHANGE_PATH(AW_SYS_RMDIR, AW_AT_FDCWD, args->pathname); }

TRACEPOINT_PROBE(syscalls, sys_enter_unlinkat)
{
    return change_enter(AW_SYS_UNLINKAT, (s32)args->dfd, args->pathname, AW_AT_FDCWD, 0, 0,
                        AW_NO_ID, AW_NO_ID, (u32)args->flag, 0);
}

TRACEPOINT_PROBE(syscalls, sys_enter_rename)
{
    return change_enter(AW_SYS_RENAME, AW_AT_FDCWD, args->oldname, AW_AT_FDCWD, args->newname, 0,
                        AW_NO_ID, AW_NO_ID, 0, 0);
}

TRACEPOINT_PROBE(syscalls, sys_enter_renameat)
{
    return change_enter(AW_SYS_RENAMEAT, (s32)args->olddfd, args->oldname, (s32)args->newdfd,
                        args->newname, 0, AW_NO_ID, AW_NO_ID, 0, 0);
}

TRACEPOINT_PROBE(syscalls, sys_enter_renameat2)
{
    return change_enter(AW_SYS_RENAMEAT2, (s32)args->olddfd, args->oldname, (s32)args->newdfd,
                        args->newname, 0, AW_NO_ID, AW_NO_ID, (u32)args->flags, 0);
}

TRACEPOINT_PROBE(syscalls, sys_enter_truncate)
{
    return change_enter(AW_SYS_TRUNCATE, AW_AT_FDCWD, args->path, AW_AT_FDCWD, 0, 0, AW_NO_ID,
                        AW_NO_ID, 0, (s64)args->length);
}

TRACEPOINT_PROBE(syscalls, sys_enter_ftruncate)
{
    return change_enter(AW_SYS_FTRUNCATE, (s32)args->fd, 0, AW_AT_FDCWD, 0, 0, AW_NO_ID, AW_NO_ID,
                        0, (s64)args->length);
}

TRACEPOINT_PROBE(syscalls, sys_enter_chmod)
{
    return change_enter(AW_SYS_CHMOD, AW_AT_FDCWD, args->filename, AW_AT_FDCWD, 0, (u32)args->mode,
                        AW_NO_ID, AW_NO_ID, 0, 0);
}

TRACEPOINT_PROBE(syscalls, sys_enter_fchmod)
{
    return change_enter(AW_SYS_FCHMOD, (s32)args->fd, 0, AW_AT_FDCWD, 0, (u32)args->mode, AW_NO_ID,
                        AW_NO_ID, 0, 0);
}

TRACEPOINT_PROBE(syscalls, sys_enter_fchmodat)
{
    return change_enter(AW_SYS_FCHMODAT, (s32)args->dfd, args->filename, AW_AT_FDCWD, 0,
                        (u32)args->mode, AW_NO_ID, AW_NO_ID, 0, 0);
}

#ifdef AW_HAVE_SYS_FCHMODAT2
TRACEPOINT_PROBE(syscalls, sys_enter_fchmodat2)
{
    return change_enter(AW_SYS_FCHMODAT2, (s32)args->dfd, args->filename, AW_AT_FDCWD, 0,
                        (u32)args->mode, AW_NO_ID, AW_NO_ID, (u32)args->flags, 0);
}
TRACEPOINT_PROBE(syscalls, sys_exit_fchmodat2) { return change_exit(args->ret); }
#endif

TRACEPOINT_PROBE(syscalls, sys_enter_chown)
{
    return change_enter(AW_SYS_CHOWN, AW_AT_FDCWD, args->filename, AW_AT_FDCWD, 0, 0,
                        (s32)args->user, (s32)args->group, 0, 0);
}

TRACEPOINT_PROBE(syscalls, sys_enter_lchown)
{
    return change_enter(AW_SYS_LCHOWN, AW_AT_FDCWD, args->filename, AW_AT_FDCWD, 0, 0,
                        (s32)args->user, (s32)args->group, 0, 0);
}

TRACEPOINT_PROBE(syscalls, sys_enter_fchown)
{
    return change_enter(AW_SYS_FCHOWN, (s32)args->fd, 0, AW_AT_FDCWD, 0, 0, (s32)args->user,
                        (s32)args->group, 0, 0);
}

TRACEPOINT_PROBE(syscalls, sys_enter_fchownat)
{
    return change_enter(AW_SYS_FCHOWNAT, (s32)args->dfd, args->filename, AW_AT_FDCWD, 0, 0,
                        (s32)args->user, (s32)args->group, (u32)args->flag, 0);
}

TRACEPOINT_PROBE(syscalls, sys_enter_link)
{
    return change_enter(AW_SYS_LINK, AW_AT_FDCWD, args->oldname, AW_AT_FDCWD, args->newname, 0,
                        AW_NO_ID, AW_NO_ID, 0, 0);
}

TRACEPOINT_PROBE(syscalls, sys_enter_linkat)
{
    return change_enter(AW_SYS_LINKAT, (s32)args->olddfd, args->oldname, (s32)args->newdfd,
                        args->newname, 0, AW_NO_ID, AW_NO_ID, (u32)args->flags, 0);
}

TRACEPOINT_PROBE(syscalls, sys_enter_symlink)
{
    return change_enter(AW_SYS_SYMLINK, AW_AT_FDCWD, args->oldname, AW_AT_FDCWD, args->newname, 0,
                        AW_NO_ID, AW_NO_ID, 0, 0);
}

TRACEPOINT_PROBE(syscalls, sys_enter_symlinkat)
{
    return change_enter(AW_SYS_SYMLINKAT, AW_AT_FDCWD, args->oldname, (s32)args->newdfd,
                        args->newname, 0, AW_NO_ID, AW_NO_ID, 0, 0);
}

TRACEPOINT_PROBE(syscalls, sys_enter_mkdir)
{
    return change_enter(AW_SYS_MKDIR, AW_AT_FDCWD, args->pathname, AW_AT_FDCWD, 0, (u32)args->mode,
                        AW_NO_ID, AW_NO_ID, 0, 0);
}

TRACEPOINT_PROBE(syscalls, sys_enter_mkdirat)
{
    return change_enter(AW_SYS_MKDIRAT, (s32)args->dfd, args->pathname, AW_AT_FDCWD, 0,
                        (u32)args->mode, AW_NO_ID, AW_NO_ID, 0, 0);
}

TRACEPOINT_PROBE(syscalls, sys_exit_unlink) { return change_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_unlinkat) { return change_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_rmdir) { return change_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_rename) { return change_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_renameat) { return change_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_renameat2) { return change_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_truncate) { return change_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_ftruncate) { return change_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_chmod) { return change_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_fchmod) { return change_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_fchmodat) { return change_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_chown) { return change_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_lchown) { return change_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_fchown) { return change_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_fchownat) { return change_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_link) { return change_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_linkat) { return change_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_symlink) { return change_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_symlinkat) { return change_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_mkdir) { return change_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_mkdirat) { return change_exit(args->ret); }

/* ---- side doors: io_uring, open_by_handle_at, namespaces, mounts, chroot --- */

/* agent number (without AW_AGENT_SESSION_BIT) -> the AW_SIDEDOOR_* groups its
 * policy allows. Filled by the probe from the daemon's kernel-rules message,
 * for enforcing agents whose violations kill: a listed agent that enters any
 * other side door is killed at the call's entry, before it returns to the
 * program (the call itself may still complete: an io_uring made is never
 * used). An agent not listed is only recorded; the daemon decides. */
BPF_HASH(sidedoor_allowed, u32, u32, AW_MAX_AGENT_CGROUPS);

#define AW_CLONE_NEW_NAMESPACES 0xfe020080ULL  /* CLONE_NEWNS|NEWTIME|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET */

/* Recorded like an open (aw_file, kind AW_KIND_SIDEDOOR, see agentwarden.h),
 * at exit with the result. */
static __always_inline int sidedoor_enter(u32 syscall, u32 group, s32 fd, const char *path, u64 arg)
{
    u32 agent;
    if (!agent_cgroup_of(&agent))
        return 0;
    u32 number = agent & ~AW_AGENT_SESSION_BIT;
    u32 *allowed = sidedoor_allowed.lookup(&number);
    u32 flags = 0;
    if (allowed && !(*allowed & group)) {
        bpf_send_signal(9);
        flags = AW_FILE_KILLED_IN_KERNEL;
    }
    return file_enter(AW_KIND_SIDEDOOR, syscall, fd, path, arg, group, 0, flags);
}

TRACEPOINT_PROBE(syscalls, sys_enter_io_uring_setup)
{
    return sidedoor_enter(AW_SYS_IO_URING_SETUP, AW_SIDEDOOR_IO_URING, AW_AT_FDCWD, 0, (u32)args->entries);
}

TRACEPOINT_PROBE(syscalls, sys_enter_open_by_handle_at)
{
    return sidedoor_enter(AW_SYS_OPEN_BY_HANDLE_AT, AW_SIDEDOOR_OPEN_BY_HANDLE, (s32)args->mountdirfd, 0,
                          (u32)args->flags);
}

TRACEPOINT_PROBE(syscalls, sys_enter_unshare)
{
    /* Only new namespaces; unsharing the fd table or fs info is no side door. */
    u64 flags = args->unshare_flags;
    if (!(flags & AW_CLONE_NEW_NAMESPACES))
        return 0;
    return sidedoor_enter(AW_SYS_UNSHARE, AW_SIDEDOOR_UNSHARE, AW_AT_FDCWD, 0, flags);
}

TRACEPOINT_PROBE(syscalls, sys_enter_clone)
{
    /* Every fork passes here: the flags first, before any lookup. */
    u64 flags = args->clone_flags;
    if (!(flags & AW_CLONE_NEW_NAMESPACES))
        return 0;
    return sidedoor_enter(AW_SYS_CLONE, AW_SIDEDOOR_UNSHARE, AW_AT_FDCWD, 0, flags);
}

TRACEPOINT_PROBE(syscalls, sys_enter_clone3)
{
    /* struct clone_args starts with u64 flags: read only for agents. */
    if (!agent_cgroup())
        return 0;
    u64 flags = 0;
    bpf_probe_read_user(&flags, sizeof(flags), args->uargs);
    if (!(flags & AW_CLONE_NEW_NAMESPACES))
        return 0;
    return sidedoor_enter(AW_SYS_CLONE3, AW_SIDEDOOR_UNSHARE, AW_AT_FDCWD, 0, flags);
}

TRACEPOINT_PROBE(syscalls, sys_enter_setns)
{
    return sidedoor_enter(AW_SYS_SETNS, AW_SIDEDOOR_SETNS, (s32)args->fd, 0, (u32)args->flags);
}

TRACEPOINT_PROBE(syscalls, sys_enter_mount)
{
    return sidedoor_enter(AW_SYS_MOUNT, AW_SIDEDOOR_MOUNT, AW_AT_FDCWD, args->dir_name, args->flags);
}

TRACEPOINT_PROBE(syscalls, sys_enter_umount)
{
    return sidedoor_enter(AW_SYS_UMOUNT, AW_SIDEDOOR_MOUNT, AW_AT_FDCWD, args->name, (u32)args->flags);
}

TRACEPOINT_PROBE(syscalls, sys_enter_fsopen)
{
    return sidedoor_enter(AW_SYS_FSOPEN, AW_SIDEDOOR_MOUNT, AW_AT_FDCWD, 0, (u32)args->flags);
}

TRACEPOINT_PROBE(syscalls, sys_enter_fsmount)
{
    return sidedoor_enter(AW_SYS_FSMOUNT, AW_SIDEDOOR_MOUNT, (s32)args->fs_fd, 0, (u32)args->flags);
}

TRACEPOINT_PROBE(syscalls, sys_enter_move_mount)
{
    return sidedoor_enter(AW_SYS_MOVE_MOUNT, AW_SIDEDOOR_MOUNT, (s32)args->to_dfd, args->to_pathname,
                          (u32)args->flags);
}

TRACEPOINT_PROBE(syscalls, sys_enter_open_tree)
{
    return sidedoor_enter(AW_SYS_OPEN_TREE, AW_SIDEDOOR_MOUNT, (s32)args->dfd, args->filename,
                          (u32)args->flags);
}

TRACEPOINT_PROBE(syscalls, sys_enter_fspick)
{
    return sidedoor_enter(AW_SYS_FSPICK, AW_SIDEDOOR_MOUNT, (s32)args->dfd, args->path, (u32)args->flags);
}

#ifdef AW_HAVE_SYS_MOUNT_SETATTR
TRACEPOINT_PROBE(syscalls, sys_enter_mount_setattr)
{
    return sidedoor_enter(AW_SYS_MOUNT_SETATTR, AW_SIDEDOOR_MOUNT, (s32)args->dfd, args->path,
                          (u32)args->flags);
}
TRACEPOINT_PROBE(syscalls, sys_exit_mount_setattr) { return file_exit(args->ret); }
#endif

TRACEPOINT_PROBE(syscalls, sys_enter_chroot)
{
    return sidedoor_enter(AW_SYS_CHROOT, AW_SIDEDOOR_CHROOT, AW_AT_FDCWD, args->filename, 0);
}

TRACEPOINT_PROBE(syscalls, sys_enter_pivot_root)
{
    return sidedoor_enter(AW_SYS_PIVOT_ROOT, AW_SIDEDOOR_PIVOT_ROOT, AW_AT_FDCWD, args->new_root, 0);
}

TRACEPOINT_PROBE(syscalls, sys_exit_io_uring_setup) { return file_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_open_by_handle_at) { return file_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_unshare) { return file_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_clone) { return file_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_clone3)
{
    if (args->ret == 0)
        check_birthplace();   /* the new task, before its first instruction */
    return file_exit(args->ret);
}
TRACEPOINT_PROBE(syscalls, sys_exit_setns) { return file_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_mount) { return file_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_umount) { return file_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_fsopen) { return file_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_fsmount) { return file_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_move_mount) { return file_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_open_tree) { return file_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_fspick) { return file_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_chroot) { return file_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_pivot_root) { return file_exit(args->ret); }
