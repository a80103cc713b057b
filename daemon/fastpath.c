/* The supervisor's compiled fast path: execs and write-opens the policy has
 * already allowed.
 *
 * A Python round trip per notification costs about 50 us on these machines;
 * these threads answer the common case in a few. Each session's listener has
 * one, blocked in SECCOMP_IOCTL_NOTIF_RECV: only a task waiting there gets the
 * kernel's synchronous wake-up (SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP switches
 * straight to it on the notifying CPU); an epoll or poll waiter is woken the
 * ordinary way, which costs tens of microseconds more. For an execve whose exact command line (agent,
 * absolute filename, argv) the Python supervisor decided `allow` under the
 * current policy, it does what the supervisor would: check the notification
 * is still valid, write the filename to the approved_exec map (the BPF
 * program kills anything else at sched_process_exec) and continue the call.
 * The same for an open, openat or creat of an absolute path with the same
 * flags. Everything else -- other syscalls, unknown command lines, relative
 * paths, unreadable arguments -- goes to the supervisor unanswered, as
 * (kind, fd, struct seccomp_notif) on a SOCK_SEQPACKET socket, and the
 * supervisor decides it exactly as if it had received it. Nothing here
 * decides policy: it only repeats decisions the supervisor made (`learn`),
 * and the supervisor forgets them all when the policy changes.
 *
 * The threads never touch Python. A crash here kills the supervisor, which
 * closes the listeners: notified calls then fail (closed, never open).
 *
 * Key layouts, shared with fastpath.py (a filename starts with '/', so the two
 * never collide):
 *   exec:  agent NUL filename NUL argv[0] NUL ... argv[n-1] NUL
 *   open:  agent NUL 0x01 flags-in-decimal NUL path NUL
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <linux/bpf.h>
#include <linux/seccomp.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define AW_FAST_ABI 2

#define MAX_AGENT 256
#define MAX_KEY (64 * 1024)        /* longer command lines go to the supervisor */
#define MAX_ARGS 1024
#define PAGE 4096
#define TABLE_SLOTS (1 << 15)       /* open addressing, at most half full */
#define TABLE_MAX_ENTRIES (TABLE_SLOTS / 2)
#define TABLE_MAX_BYTES (16u << 20) /* learned keys past this: start again */
#define RECENT 1024                 /* handling times kept for the summary */
#define FIRST_READ 256              /* most strings end well before: copy less */
#define BATCH 64                    /* argv strings read in one call */

enum { FORWARD_NOTIFICATION = 1, FORWARD_HANGUP = 2 };

/* What the supervisor reads for each forwarded event (fastpath.py: FORWARD). */
struct forward {
    uint32_t kind;
    int32_t fd;
    struct seccomp_notif notif;
} __attribute__((packed));

/* Counters, in the order fastpath.py names them (COUNTERS). */
enum { C_CONTINUED, C_FORWARDED, C_HANGUPS, C_GONE, C_LEARNED, C_RESETS, C_MAP_FAILURES,
       C_FORWARD_FAILURES, C_COUNT };

struct entry {
    uint64_t hash;
    uint32_t len;
    char *key;
};

struct listener {
    int fd;                      /* -1: free */
    pthread_t thread;
    volatile int stopping;
    uint32_t agent_len;
    char agent[MAX_AGENT];
    char key[MAX_KEY];
    char pieces[BATCH * FIRST_READ];
    uint64_t pointers[MAX_ARGS];
    /* aw_approved, reused: only its first len bytes of path are compared, so
     * it is not cleared each time (a 4 KiB memset on every exec). */
    struct { uint32_t len, reserved; char path[PAGE]; } approval;
};

#define STOP_SIGNAL (SIGRTMIN + 3)   /* interrupts a thread blocked in RECV */

static struct {
    int running;
    int forward_fd;              /* to the supervisor */
    int execve_nr, open_nr, openat_nr, creat_nr;
    uint32_t path_max;           /* aw_approved.path */
    pthread_mutex_t lock;        /* guards the table, map_fd and the counters */
    int map_fd;                  /* approved_exec, or -1: every exec forwarded */
    uint64_t seed;
    struct entry *table;
    uint32_t entries;
    uint64_t bytes;
    uint64_t counters[C_COUNT];
    uint32_t recent[RECENT];
    uint64_t recent_count;
    struct listener **listeners; /* indexed by fd */
    int listeners_cap;
} fp = { .lock = PTHREAD_MUTEX_INITIALIZER, .map_fd = -1, .forward_fd = -1 };

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

/* The key of an execve notification, in key (MAX_KEY bytes); its length and
 * where the filename starts, or -1 when the supervisor must look at it.
 * Two process_vm_readv calls in the common case: the filename with the
 * start of argv, then the start of every argument. */
static int exec_key(struct listener *l, const struct seccomp_notif *n, char *key,
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
    uint64_t first[2] = { n->data.args[0], argv };
    size_t sizes[BATCH];
    int read = read_batch(pid, first, 2, l->pieces, sizes);
    if (read < 1)
        return -1;
    at = append_from(pid, first[0], l->pieces, sizes[0], key, at, PAGE);
    if (at < 0 || key[*filename_at] != '/')
        return -1;    /* relative: decided against the cwd, by the supervisor */
    *filename_len = at - *filename_at;   /* with its NUL */

    uint64_t *pointers = l->pointers;
    int count = 0, ended = 0;
    if (read == 2) {
        const uint64_t *got = (const uint64_t *)(l->pieces + FIRST_READ);
        for (size_t i = 0; i < sizes[1] / 8 && !ended; i++) {
            if (got[i])
                pointers[count++] = got[i];
            else
                ended = 1;
        }
    }
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
    for (int i = 0; i < count; i += BATCH) {
        int batch = count - i < BATCH ? count - i : BATCH;
        read = read_batch(pid, pointers + i, batch, l->pieces, sizes);
        for (int j = 0; j < batch; j++) {
            at = j < read ? append_from(pid, pointers[i + j], l->pieces + j * FIRST_READ, sizes[j],
                                        key, at, MAX_KEY - at)
                          : append_string(pid, pointers[i + j], key, at, MAX_KEY - at);
            if (at < 0)
                return -1;
        }
    }
    return at;
}

/* ---- answering ------------------------------------------------------------- */

static int approve_exec(struct listener *l, uint32_t tid, const char *filename, int len)
{
    if ((uint32_t)len > fp.path_max || fp.map_fd < 0)
        return -1;
    l->approval.len = len;
    memcpy(l->approval.path, filename, len);
    union bpf_attr attr = {0};
    attr.map_fd = fp.map_fd;
    attr.key = (uint64_t)(uintptr_t)&tid;
    attr.value = (uint64_t)(uintptr_t)&l->approval;
    attr.flags = BPF_ANY;
    return syscall(SYS_bpf, BPF_MAP_UPDATE_ELEM, &attr, sizeof(attr)) ? -1 : 0;
}

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ULL + t.tv_nsec;
}

static void count(int counter)
{
    pthread_mutex_lock(&fp.lock);
    fp.counters[counter]++;
    pthread_mutex_unlock(&fp.lock);
}

static void forward(uint32_t kind, int fd, const struct seccomp_notif *n)
{
    struct forward msg = { .kind = kind, .fd = fd };
    if (n)
        msg.notif = *n;
    /* Blocks while the supervisor is busy: the agent's call waits, nothing is lost. */
    while (send(fp.forward_fd, &msg, sizeof(msg), MSG_NOSIGNAL) < 0) {
        if (errno == EINTR)
            continue;
        /* The supervisor is gone: it closes the listeners as it goes, so
         * this call fails when the fd closes. Count it and stop trying. */
        count(C_FORWARD_FAILURES);
        return;
    }
}

/* True when answered here; false when the supervisor must decide. */
/* The key of a write-open of an absolute path, or -1. */
static int open_key(struct listener *l, const struct seccomp_notif *n, char *key)
{
    uint64_t path;
    int flags;
    if (n->data.nr == fp.open_nr) {
        path = n->data.args[0];
        flags = (int)(uint32_t)n->data.args[1];
    } else if (n->data.nr == fp.openat_nr) {
        path = n->data.args[1];   /* the directory fd does not matter for an absolute path */
        flags = (int)(uint32_t)n->data.args[2];
    } else if (n->data.nr == fp.creat_nr) {
        path = n->data.args[0];
        flags = O_CREAT | O_WRONLY | O_TRUNC;
    } else {
        return -1;
    }
    int at = l->agent_len;
    memcpy(key, l->agent, at);
    at += snprintf(key + at, 32, "%c%c%d%c", 0, 1, flags, 0);
    int start = at;
    at = append_string(n->pid, path, key, at, PAGE);
    return at < 0 || key[start] != '/' ? -1 : at;
}

static int answer(struct listener *l, const struct seccomp_notif *n, uint64_t started)
{
    char *key = l->key;
    int filename_at = 0, filename_len = 0;
    int is_exec = n->data.nr == fp.execve_nr;
    int len = is_exec ? exec_key(l, n, key, &filename_at, &filename_len) : open_key(l, n, key);
    if (len < 0)
        return 0;
    uint64_t hash = key_hash(key, len);
    pthread_mutex_lock(&fp.lock);
    struct entry *e = fp.entries ? table_slot(key, len, hash) : NULL;
    if (!e || !e->hash) {
        pthread_mutex_unlock(&fp.lock);
        return 0;
    }
    __u64 id = n->id;
    if (ioctl(l->fd, SECCOMP_IOCTL_NOTIF_ID_VALID, &id) < 0) {
        fp.counters[C_GONE]++;     /* the task died or was interrupted */
        pthread_mutex_unlock(&fp.lock);
        return 1;
    }
    if (is_exec && approve_exec(l, n->pid, key + filename_at, filename_len) < 0) {
        fp.counters[C_MAP_FAILURES]++;   /* the supervisor retries or refuses */
        pthread_mutex_unlock(&fp.lock);
        return 0;
    }
    pthread_mutex_unlock(&fp.lock);
    struct seccomp_notif_resp resp = { .id = n->id, .flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE };
    int sent = ioctl(l->fd, SECCOMP_IOCTL_NOTIF_SEND, &resp);
    pthread_mutex_lock(&fp.lock);
    fp.counters[sent < 0 ? C_GONE : C_CONTINUED]++;
    fp.recent[fp.recent_count++ % RECENT] = (uint32_t)(now_ns() - started);
    pthread_mutex_unlock(&fp.lock);
    return 1;
}

static void *serve(void *arg)
{
    struct listener *l = arg;
    sigset_t signals;
    sigfillset(&signals);
    sigdelset(&signals, STOP_SIGNAL);
    pthread_sigmask(SIG_SETMASK, &signals, NULL);   /* the rest are the supervisor's */
    while (!l->stopping) {
        struct seccomp_notif n;
        memset(&n, 0, sizeof(n));
        if (ioctl(l->fd, SECCOMP_IOCTL_NOTIF_RECV, &n) == 0) {
            if (!answer(l, &n, now_ns())) {
                count(C_FORWARDED);
                forward(FORWARD_NOTIFICATION, l->fd, &n);
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
        count(C_HANGUPS);
        forward(FORWARD_HANGUP, l->fd, NULL);
        break;   /* the supervisor closes the fd once it reads the hang-up */
    }
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
 * creat (-1: none on this architecture); path_max: the size of
 * aw_approved.path. 0, or -errno. */
int aw_fast_start(int forward_fd, int execve_nr, int open_nr, int openat_nr, int creat_nr,
                  uint32_t path_max)
{
    if (fp.running)
        return -EBUSY;
    if (path_max > PAGE)
        return -EINVAL;
    fp.forward_fd = forward_fd;
    fp.execve_nr = execve_nr;
    fp.open_nr = open_nr;
    fp.openat_nr = openat_nr;
    fp.creat_nr = creat_nr;
    fp.path_max = path_max;
    if (getrandom(&fp.seed, sizeof(fp.seed), 0) != sizeof(fp.seed))
        return -errno;
    fp.listeners_cap = (int)sysconf(_SC_OPEN_MAX);
    if (fp.listeners_cap <= 0 || fp.listeners_cap > (1 << 20))
        fp.listeners_cap = 1 << 20;
    fp.listeners = calloc(fp.listeners_cap, sizeof(*fp.listeners));
    fp.table = calloc(TABLE_SLOTS, sizeof(*fp.table));
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

/* Hands a session's listener to a thread of its own. From now on only that
 * thread receives on it; the supervisor still answers what it forwards. */
int aw_fast_watch(int fd, const char *agent, uint32_t agent_len)
{
    if (!fp.running || fd < 0 || fd >= fp.listeners_cap || agent_len >= MAX_AGENT || fp.listeners[fd])
        return -EINVAL;
    struct listener *l = calloc(1, sizeof(*l));
    if (!l)
        return -ENOMEM;
    l->fd = fd;
    memcpy(l->agent, agent, agent_len);
    l->agent_len = agent_len;
    int err = pthread_create(&l->thread, NULL, serve, l);
    if (err) {
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
        fp.counters[C_RESETS]++;
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
        fp.counters[C_LEARNED]++;
    }
    pthread_mutex_unlock(&fp.lock);
    return 0;
}

/* The policy changed: every learned decision is void. */
void aw_fast_forget(void)
{
    pthread_mutex_lock(&fp.lock);
    table_clear();
    pthread_mutex_unlock(&fp.lock);
}

/* The approved_exec map to write (-1: none; execs go to the supervisor).
 * Once this returns, the thread no longer uses the previous fd. */
void aw_fast_set_map(int fd)
{
    pthread_mutex_lock(&fp.lock);
    fp.map_fd = fd;
    pthread_mutex_unlock(&fp.lock);
}

/* Copies the counters (C_COUNT of them) and up to `room` recent handling
 * times in ns; returns how many times were copied. */
int aw_fast_stats(uint64_t *counters, uint32_t *recent, int room)
{
    pthread_mutex_lock(&fp.lock);
    memcpy(counters, fp.counters, sizeof(fp.counters));
    int count = fp.recent_count < RECENT ? (int)fp.recent_count : RECENT;
    if (count > room)
        count = room;
    memcpy(recent, fp.recent, count * sizeof(*recent));
    pthread_mutex_unlock(&fp.lock);
    return count;
}

int aw_fast_counter_count(void) { return C_COUNT; }

/* Ends every thread; the listeners stay open (the supervisor's). */
void aw_fast_stop(void)
{
    for (int fd = 0; fp.running && fd < fp.listeners_cap; fd++)
        aw_fast_release(fd);
}
