/* The `agentwarden` command's front, and the one implementation of session
 * start (`agentwarden run`).
 *
 * Agent harnesses start one session per tool call, and Python's start-up alone
 * (tens of ms) is more than a session should cost. So the installed
 * `agentwarden` is this program: the plain line
 *
 *   agentwarden run [--agent A] [--user U] [--group G] [--task T] [--on-behalf-of P] -- CMD...
 *
 * (each option as `--opt VALUE` or `--opt=VALUE`, the last of a repeated one
 * wins; --agent and a command required) starts the session here; every other
 * line (--help, global options, other commands) is handed to the Python CLI
 * unchanged, whose help and errors stay the only ones. The Python CLI, given a
 * `run` line, resolves the settings and execs this program (session.launch).
 *
 * Session start, in this order (docs/sessions.md#start-up): connect to the
 * supervisor's sessions socket and ask it for the session filter and this
 * instance's name (`launch`), resolve the program and the accounts while it
 * answers, find the session's parent cgroup (this process's own when it is a
 * delegated unit, else the agent's, from the probe), make the session cgroup
 * and set its xattrs, have the probe watch it (`watch`), and start the
 * command as a child born in it (clone3 CLONE_INTO_CGROUP: no migration to
 * wait for). The child installs the filter with a listener, registers it with
 * the supervisor on a connection of its own (SCM_RIGHTS; SO_PEERCRED names a
 * process in the session cgroup), drops to --user / --group and execs; this
 * process stays its parent, passes signals on and ends as the command ended.
 * Every failure before the filter removes the cgroup; from the filter on,
 * failing means the command never runs. Errors are one line,
 * `agentwarden: error: ...`, with docs/cli.md's exit codes.
 *
 * The filter itself is the supervisor's (seccomp_notify.build_filter, sent as
 * BPF bytes); names and bounds shared with Python come from constants.h,
 * generated from their Python definitions (scripts/launcher-constants.py).
 * Only run_dir is read here (env, then the config files' plain `run_dir =
 * "..."` lines); a config this reader does not follow is handed to Python,
 * which resolves it and execs this program with LAUNCHER_RUN_DIR_ENV set.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <pwd.h>
#include <regex.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <unistd.h>

#include "constants.h"

/* The Python CLI that takes every line this program does not (-D at build). */
#ifndef AW_PYTHON
#define AW_PYTHON "/usr/bin/python3"
#endif

#ifndef SECCOMP_FILTER_FLAG_NEW_LISTENER
#define SECCOMP_FILTER_FLAG_NEW_LISTENER (1UL << 3)
#endif
#ifndef SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
#define SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV (1UL << 5)
#endif

#define SUPERVISOR_TIMEOUT 10   /* s, as session.request */
#define PROBE_TIMEOUT 5         /* s, as session.probe_request */

static char **original_argv;

/* ---- errors -------------------------------------------------------------- */

static const char *cgroup_made;   /* removed again if a failure comes before the filter */

static void __attribute__((noreturn, format(printf, 2, 3))) fail(int code, const char *fmt, ...)
{
    va_list ap;
    if (cgroup_made != NULL)
        rmdir(cgroup_made);   /* gone already (the agent cgroup went away): nothing to undo */
    fputs("agentwarden: error: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(code);
}

/* The line, unchanged, to the Python CLI. */
static void __attribute__((noreturn)) hand_to_python(void)
{
    int argc = 0;
    while (original_argv[argc] != NULL)
        argc++;
    char **args = calloc((size_t)argc + 5, sizeof *args);
    if (args == NULL)
        fail(AW_EXIT_PROBLEM, "out of memory");
    int n = 0;
    args[n++] = AW_PYTHON;
    args[n++] = "-I";   /* neither PYTHONPATH nor the current directory shadows the package */
    args[n++] = "-m";
    args[n++] = "agentwarden";
    for (int i = 1; i < argc; i++)
        args[n++] = original_argv[i];
    execv(AW_PYTHON, args);
    fail(AW_EXIT_PROBLEM, "cannot start the Python CLI %s: %s", AW_PYTHON, strerror(errno));
}

/* ---- the command line ---------------------------------------------------- */

struct request {
    const char *agent, *user, *group, *task, *on_behalf_of;
    char **command;
};

/* The plain `run` line (args after `run`) as run_fast.parse reads it; 0 when
 * the Python CLI should parse it. */
static int parse_run(char **args, struct request *req)
{
    static const char *names[] = {"--agent", "--user", "--group", "--task", "--on-behalf-of"};
    const char **slots[] = {&req->agent, &req->user, &req->group, &req->task, &req->on_behalf_of};
    memset(req, 0, sizeof *req);
    for (int i = 0; args[i] != NULL; i++) {
        const char *word = args[i];
        if (strcmp(word, "--") == 0) {
            req->command = &args[i + 1];
            return req->command[0] != NULL && req->agent != NULL;
        }
        const char *equals = strchr(word, '=');
        size_t name_len = equals ? (size_t)(equals - word) : strlen(word);
        int which = -1;
        for (int k = 0; k < 5; k++)
            if (strlen(names[k]) == name_len && strncmp(word, names[k], name_len) == 0)
                which = k;
        if (which < 0)
            return 0;
        const char *value;
        if (equals) {
            value = equals + 1;   /* --task=-x: typer takes it as the value too */
        } else {
            if (args[i + 1] == NULL || args[i + 1][0] == '-')
                return 0;   /* typer says what is missing */
            value = args[++i];
        }
        *slots[which] = value;
    }
    return 0;
}

/* ---- small helpers ------------------------------------------------------- */

static char *joined(const char *a, const char *b)
{
    char *out;
    if (asprintf(&out, "%s/%s", a, b) < 0)
        fail(AW_EXIT_PROBLEM, "out of memory");
    return out;
}

/* os.path.normpath of an absolute path: no "//", ".", or "..". */
static char *normalized(const char *path)
{
    char *out = malloc(strlen(path) + 2);
    if (out == NULL)
        fail(AW_EXIT_PROBLEM, "out of memory");
    size_t len = 0;
    const char *p = path;
    while (*p) {
        while (*p == '/')
            p++;
        const char *end = strchrnul(p, '/');
        size_t part = (size_t)(end - p);
        if (part == 0 || (part == 1 && p[0] == '.')) {
            /* nothing */
        } else if (part == 2 && p[0] == '.' && p[1] == '.') {
            while (len > 0 && out[len - 1] != '/')
                len--;
            if (len > 0)
                len--;
        } else {
            out[len++] = '/';
            memcpy(out + len, p, part);
            len += part;
        }
        p = end;
    }
    if (len == 0)
        out[len++] = '/';
    out[len] = '\0';
    return out;
}

/* The first `limit` characters of UTF-8 text, in bytes (value[:limit] in Python). */
static size_t utf8_prefix(const char *text, size_t limit)
{
    size_t chars = 0, i = 0;
    for (; text[i]; i++) {
        if (((unsigned char)text[i] & 0xC0) != 0x80 && chars++ == limit)
            break;
    }
    return i;
}

static char *read_file(const char *path, size_t *size)
{
    FILE *f = fopen(path, "re");
    if (f == NULL)
        return NULL;
    char *data = NULL;
    size_t cap = 0, len = 0;
    for (;;) {
        if (len + 4096 + 1 > cap) {
            cap = cap ? cap * 2 : 8192;
            char *bigger = realloc(data, cap);
            if (bigger == NULL)
                fail(AW_EXIT_PROBLEM, "out of memory");
            data = bigger;
        }
        size_t got = fread(data + len, 1, cap - len - 1, f);
        len += got;
        if (got == 0)
            break;
    }
    int bad = ferror(f);
    fclose(f);
    if (bad) {
        free(data);
        return NULL;
    }
    data[len] = '\0';
    if (size)
        *size = len;
    return data;
}

/* ---- settings: run_dir ---------------------------------------------------- */

/* run_dir from one config file's plain `run_dir = "/path"` line: 1 found, 0
 * not set there, -1 a file this reader does not follow (Python reads it). */
static int config_run_dir(const char *path, char **run_dir)
{
    char *text = read_file(path, NULL);
    if (text == NULL)
        return -1;
    int result = 0;
    for (char *line = strtok(text, "\n"); line != NULL; line = strtok(NULL, "\n")) {
        line += strspn(line, " \t\r");
        if (*line == '\0' || *line == '#')
            continue;
        if (strstr(line, "\"\"\"") || strstr(line, "'''") || *line == '[') {
            result = -1;   /* multi-line strings, tables, arrays: not ours to read */
            break;
        }
        size_t key_len = strspn(line, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-");
        char *rest = line + key_len + strspn(line + key_len, " \t");
        if (key_len == 0 || *rest != '=') {
            result = -1;
            break;
        }
        if (key_len != strlen(AW_RUN_DIR_KEY) || strncmp(line, AW_RUN_DIR_KEY, key_len) != 0) {
            /* another key: a one-line value, unless it opens an array or table */
            rest += 1 + strspn(rest + 1, " \t");
            if (*rest == '[' || *rest == '{') {
                result = -1;
                break;
            }
            continue;
        }
        rest += 1 + strspn(rest + 1, " \t");
        char quote = *rest;
        char *end = (quote == '"' || quote == '\'') ? strchr(rest + 1, quote) : NULL;
        if (end == NULL || rest[1] != '/' || (quote == '"' && memchr(rest, '\\', (size_t)(end - rest)))) {
            result = -1;   /* escapes, a bare value, a relative path: Python says what is wrong */
            break;
        }
        char *after = end + 1 + strspn(end + 1, " \t\r");
        if (*after != '\0' && *after != '#') {
            result = -1;
            break;
        }
        *end = '\0';
        free(*run_dir);
        *run_dir = normalized(rest + 1);
        result = 1;
    }
    free(text);
    return result;
}

static int by_name(const struct dirent **a, const struct dirent **b)
{
    return strcmp((*a)->d_name, (*b)->d_name);
}

static int is_dropin(const struct dirent *entry)
{
    size_t len = strlen(entry->d_name);   /* as pathlib's glob("*.toml"): hidden ones too */
    return len >= 5 && strcmp(entry->d_name + len - 5, ".toml") == 0;
}

/* settings.load's run_dir: the config file, its drop-ins, the environment.
 * NULL: hand the line to Python, which reads what this does not. */
static char *resolve_run_dir(void)
{
    const char *resolved = getenv(AW_LAUNCHER_RUN_DIR_ENV);   /* from the Python CLI */
    if (resolved != NULL && resolved[0] == '/') {
        char *run_dir = normalized(resolved);
        unsetenv(AW_LAUNCHER_RUN_DIR_ENV);   /* not the command's business */
        return run_dir;
    }
    const char *env = getenv(AW_RUN_DIR_ENV);
    if (env != NULL)
        return env[0] == '/' ? normalized(env) : NULL;
    char *run_dir = NULL;
    const char *named = getenv(AW_CONFIG_ENV);
    if (named != NULL && named[0] == '\0')
        named = NULL;
    const char *config = named ? named : AW_DEFAULT_CONFIG;
    struct stat st;
    if (stat(config, &st) == 0) {
        if (!S_ISREG(st.st_mode) || config_run_dir(config, &run_dir) < 0)
            return NULL;
    } else if (named != NULL) {
        return NULL;   /* a named config file must exist: Python says so */
    }
    char *dir = strdup(config);
    if (dir == NULL)
        fail(AW_EXIT_PROBLEM, "out of memory");
    char *slash = strrchr(dir, '/');
    if (slash != NULL)
        *slash = '\0';
    char *dropins = joined(slash != NULL ? (*dir ? dir : "/") : ".", AW_DROPIN_DIR);
    struct dirent **entries;
    int count = scandir(dropins, &entries, is_dropin, by_name);
    for (int i = 0; i < count; i++) {
        char *path = joined(dropins, entries[i]->d_name);
        if (stat(path, &st) == 0 && S_ISREG(st.st_mode) && config_run_dir(path, &run_dir) < 0) {
            free(run_dir);
            return NULL;
        }
        free(path);
    }
    return run_dir != NULL ? run_dir : strdup(AW_DEFAULT_RUN_DIR);
}

/* ---- msgpack: the few maps of the sessions and probe sockets ------------- */

struct packer {
    uint8_t data[AW_MAX_ADMIN_REQUEST_BYTES];
    size_t len;
    int overflow;
};

static void put(struct packer *pk, const void *bytes, size_t n)
{
    if (pk->len + n > sizeof pk->data) {
        pk->overflow = 1;
        return;
    }
    memcpy(pk->data + pk->len, bytes, n);
    pk->len += n;
}

static void put_header(struct packer *pk, uint8_t small, uint8_t limit, uint8_t b8, uint8_t b16,
                       uint8_t b32, size_t n)
{
    uint8_t h[5];
    if (n < limit) {
        h[0] = (uint8_t)(small | n);
        put(pk, h, 1);
    } else if (b8 && n <= 0xff) {
        h[0] = b8, h[1] = (uint8_t)n;
        put(pk, h, 2);
    } else if (n <= 0xffff) {
        h[0] = b16, h[1] = (uint8_t)(n >> 8), h[2] = (uint8_t)n;
        put(pk, h, 3);
    } else {
        h[0] = b32, h[1] = (uint8_t)(n >> 24), h[2] = (uint8_t)(n >> 16), h[3] = (uint8_t)(n >> 8),
        h[4] = (uint8_t)n;
        put(pk, h, 5);
    }
}

static void put_map(struct packer *pk, size_t n) { put_header(pk, 0x80, 16, 0, 0xde, 0xdf, n); }

static void put_str(struct packer *pk, const char *s)
{
    size_t n = strlen(s);
    put_header(pk, 0xa0, 32, 0xd9, 0xda, 0xdb, n);
    put(pk, s, n);
}

static void put_pair(struct packer *pk, const char *key, const char *value)
{
    put_str(pk, key);
    put_str(pk, value);
}

enum mp_kind { MP_NIL, MP_BOOL, MP_INT, MP_STR, MP_BIN, MP_ARRAY, MP_MAP, MP_OTHER };

struct mp_value {
    enum mp_kind kind;
    const uint8_t *data;   /* str, bin */
    uint32_t len;          /* str, bin: bytes; array, map: items */
    int64_t number;        /* bool, int */
};

static uint64_t be(const uint8_t *p, int n)
{
    uint64_t v = 0;
    for (int i = 0; i < n; i++)
        v = v << 8 | p[i];
    return v;
}

/* One value's header at *p: scalars, strings and bins whole; of an array or a
 * map only the header (its items follow). -1 on truncated or unknown input. */
static int mp_next(const uint8_t **p, const uint8_t *end, struct mp_value *v)
{
    if (*p >= end)
        return -1;
    uint8_t b = *(*p)++;
    int size = 0, skip = 0;
    memset(v, 0, sizeof *v);
    if (b <= 0x7f || b >= 0xe0) {
        v->kind = MP_INT, v->number = (int8_t)b;
        if (b <= 0x7f)
            v->number = b;
        return 0;
    }
    if ((b & 0xf0) == 0x80) { v->kind = MP_MAP, v->len = b & 0x0f; return 0; }
    if ((b & 0xf0) == 0x90) { v->kind = MP_ARRAY, v->len = b & 0x0f; return 0; }
    if ((b & 0xe0) == 0xa0) { v->kind = MP_STR, v->len = b & 0x1f; goto bytes; }
    switch (b) {
    case 0xc0: v->kind = MP_NIL; return 0;
    case 0xc2: case 0xc3: v->kind = MP_BOOL, v->number = b == 0xc3; return 0;
    case 0xc4: case 0xd9: size = 1; break;
    case 0xc5: case 0xda: size = 2; break;
    case 0xc6: case 0xdb: size = 4; break;
    case 0xcc: case 0xcd: case 0xce: case 0xcf:
    case 0xd0: case 0xd1: case 0xd2: case 0xd3: {
        int n = 1 << (b & 3);
        if (end - *p < n)
            return -1;
        uint64_t raw = be(*p, n);
        *p += n;
        v->kind = MP_INT;
        if (b >= 0xd0)   /* signed: extend from n bytes */
            v->number = n == 8 ? (int64_t)raw : (int64_t)(raw << (64 - 8 * n)) >> (64 - 8 * n);
        else
            v->number = (int64_t)raw;
        return 0;
    }
    case 0xca: skip = 4; break;
    case 0xcb: skip = 8; break;
    case 0xd4: skip = 2; break;
    case 0xd5: skip = 3; break;
    case 0xd6: skip = 5; break;
    case 0xd7: skip = 9; break;
    case 0xd8: skip = 17; break;
    case 0xc7: case 0xc8: case 0xc9: {   /* ext: size, type, data */
        int n = b == 0xc7 ? 1 : b == 0xc8 ? 2 : 4;
        if (end - *p < n)
            return -1;
        skip = (int)be(*p, n) + 1;
        *p += n;
        break;
    }
    case 0xdc: case 0xdd: case 0xde: case 0xdf: {
        int n = (b & 1) ? 4 : 2;
        if (end - *p < n)
            return -1;
        v->kind = b <= 0xdd ? MP_ARRAY : MP_MAP, v->len = (uint32_t)be(*p, n);
        *p += n;
        return 0;
    }
    default:
        return -1;
    }
    if (skip) {
        if (end - *p < skip)
            return -1;
        v->kind = MP_OTHER;
        *p += skip;
        return 0;
    }
    if (end - *p < size)
        return -1;
    v->kind = (b == 0xc4 || b == 0xc5 || b == 0xc6) ? MP_BIN : MP_STR;
    v->len = (uint32_t)be(*p, size);
    *p += size;
bytes:
    if ((size_t)(end - *p) < v->len)
        return -1;
    v->data = *p;
    *p += v->len;
    return 0;
}

/* Past one whole value (arrays and maps with their items). */
static int mp_skip(const uint8_t **p, const uint8_t *end, int depth)
{
    struct mp_value v;
    if (depth > 32 || mp_next(p, end, &v) < 0)
        return -1;
    uint64_t items = v.kind == MP_ARRAY ? v.len : v.kind == MP_MAP ? 2ULL * v.len : 0;
    for (uint64_t i = 0; i < items; i++)
        if (mp_skip(p, end, depth + 1) < 0)
            return -1;
    return 0;
}

/* The value of `key` in the map at [p, end): 1 found (*at points to it), 0 not, -1 malformed. */
static int mp_lookup(const uint8_t *p, const uint8_t *end, const char *key, const uint8_t **at)
{
    struct mp_value map, k;
    if (mp_next(&p, end, &map) < 0 || map.kind != MP_MAP)
        return -1;
    for (uint32_t i = 0; i < map.len; i++) {
        if (mp_next(&p, end, &k) < 0)
            return -1;
        if (k.kind == MP_STR && k.len == strlen(key) && memcmp(k.data, key, k.len) == 0) {
            *at = p;
            return 1;
        }
        if (k.kind == MP_ARRAY || k.kind == MP_MAP)
            return -1;   /* keys here are strings */
        if (mp_skip(&p, end, 0) < 0)
            return -1;
    }
    return 0;
}

/* A copy of map[key] when it is a string (or bin), else NULL. */
static char *mp_string(const uint8_t *p, const uint8_t *end, const char *key, uint32_t *len)
{
    const uint8_t *at;
    struct mp_value v;
    if (mp_lookup(p, end, key, &at) != 1 || mp_next(&at, end, &v) < 0 ||
        (v.kind != MP_STR && v.kind != MP_BIN))
        return NULL;
    char *out = malloc((size_t)v.len + 1);
    if (out == NULL)
        fail(AW_EXIT_PROBLEM, "out of memory");
    memcpy(out, v.data, v.len);
    out[v.len] = '\0';
    if (len)
        *len = v.len;
    return out;
}

static int mp_ok(const uint8_t *p, const uint8_t *end)
{
    const uint8_t *at;
    struct mp_value v;
    return mp_lookup(p, end, "ok", &at) == 1 && mp_next(&at, end, &v) == 0 && v.kind == MP_BOOL && v.number;
}

/* ---- the sockets ---------------------------------------------------------- */

struct reply {
    uint8_t *data;
    const uint8_t *end;
};

static int seqpacket(int timeout)
{
    int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (fd < 0)
        fail(AW_EXIT_PROBLEM, "cannot make a socket: %s", strerror(errno));
    struct timeval tv = {.tv_sec = timeout};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    return fd;
}

static int connect_to(int fd, const char *path)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof addr.sun_path) {
        errno = ENAMETOOLONG;
        return -1;
    }
    strcpy(addr.sun_path, path);
    return connect(fd, (struct sockaddr *)&addr, sizeof addr);
}

/* The request (with fd_to_pass as SCM_RIGHTS when >= 0): 0, or sendmsg's errno. */
static int send_request(int sock, struct packer *pk, int fd_to_pass, const char *who)
{
    if (pk->overflow)
        fail(AW_EXIT_USAGE, "the request to %s is longer than %d bytes: shorten --task or --on-behalf-of",
             who, AW_MAX_ADMIN_REQUEST_BYTES);
    struct iovec iov = {.iov_base = pk->data, .iov_len = pk->len};
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } control;
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    if (fd_to_pass >= 0) {
        msg.msg_control = control.buf;
        msg.msg_controllen = sizeof control.buf;
        struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
        cmsg->cmsg_level = SOL_SOCKET;
        cmsg->cmsg_type = SCM_RIGHTS;
        cmsg->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(cmsg), &fd_to_pass, sizeof(int));
    }
    return sendmsg(sock, &msg, MSG_NOSIGNAL) < 0 ? errno : 0;
}

/* The answer to a request sent, a map. */
static struct reply read_reply(int sock, const char *path, const char *who, int unreachable_code, int timeout)
{
    struct reply r = {.data = malloc(AW_MAX_ADMIN_REPLY_BYTES)};
    if (r.data == NULL)
        fail(AW_EXIT_PROBLEM, "out of memory");
    ssize_t got = recv(sock, r.data, AW_MAX_ADMIN_REPLY_BYTES, 0);
    if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
        fail(unreachable_code, "%s did not answer on %s within %ds", who, path, timeout);
    if (got < 0)
        fail(unreachable_code, "cannot read the answer of %s on %s: %s", who, path, strerror(errno));
    if (got == 0)
        fail(unreachable_code, "%s closed %s without an answer", who, path);
    r.end = r.data + got;
    const uint8_t *p = r.data;
    struct mp_value v;
    if (mp_next(&p, r.end, &v) < 0 || v.kind != MP_MAP || (p = r.data, mp_skip(&p, r.end, 0) < 0))
        fail(AW_EXIT_PROBLEM, "%s sent a malformed answer on %s", who, path);
    return r;
}

/* One request and its answer; failures end the launcher with
 * `unreachable_code` (who: "the daemon", "the probe"). */
static struct reply exchange(int sock, const char *path, struct packer *pk, int fd_to_pass,
                             const char *who, int unreachable_code, int timeout)
{
    int err = send_request(sock, pk, fd_to_pass, who);
    if (err != 0)
        fail(unreachable_code, "cannot send to %s on %s: %s", who, path, strerror(err));
    return read_reply(sock, path, who, unreachable_code, timeout);
}

static char *probe_path, *sessions_path;

/* One request on the probe's watch socket (root only; wire.PROBE_COMMANDS). */
/* A request sent to the probe, whose answer is read later (probe_answer);
 * what went wrong on the way is said then, not before. */
struct probe_call {
    int sock, connect_error, send_error;
};

static struct probe_call probe_ask(struct packer *pk)
{
    struct probe_call call = {.sock = seqpacket(PROBE_TIMEOUT)};
    if (connect_to(call.sock, probe_path) < 0)
        call.connect_error = errno;
    else
        call.send_error = send_request(call.sock, pk, -1, "the probe");
    return call;
}

static struct reply probe_answer(struct probe_call *call)
{
    if (call->connect_error == EACCES || call->connect_error == EPERM)
        fail(AW_EXIT_PERMISSION, "asking the probe needs root (CAP_BPF, CAP_SYS_ADMIN): run it with sudo");
    if (call->connect_error != 0)
        fail(AW_EXIT_UNREACHABLE, "the probe is not running (nothing listens on %s); start it with "
             "`agentwarden up`", probe_path);
    if (call->send_error != 0)
        fail(AW_EXIT_UNREACHABLE, "cannot send to the probe on %s: %s", probe_path, strerror(call->send_error));
    struct reply r = read_reply(call->sock, probe_path, "the probe", AW_EXIT_UNREACHABLE, PROBE_TIMEOUT);
    close(call->sock);
    return r;
}

static struct reply probe_request(struct packer *pk)
{
    struct probe_call call = probe_ask(pk);
    return probe_answer(&call);
}

/* Why the supervisor's sessions socket could not be reached. */
struct unreachable {
    enum { REACHED, DIR_CLOSED, NO_SOCKET, NOT_CONNECTED } why;
    int err;
};

/* Connected to the supervisor's sessions socket (SO_PEERCRED tells it who
 * asks), or -1 and why (supervisor_unreachable says it). */
static int open_supervisor(const char *run_dir, struct unreachable *problem)
{
    struct stat st;
    problem->why = REACHED;
    if (access(run_dir, X_OK) != 0 && stat(run_dir, &st) == 0 && S_ISDIR(st.st_mode)) {
        problem->why = DIR_CLOSED;
        return -1;
    }
    if (lstat(sessions_path, &st) != 0) {
        problem->why = NO_SOCKET;
        return -1;
    }
    int sock = seqpacket(SUPERVISOR_TIMEOUT);
    if (connect_to(sock, sessions_path) < 0) {
        problem->why = NOT_CONNECTED;
        problem->err = errno;
        close(sock);
        return -1;
    }
    return sock;
}

/* One clear error (control.check_reachable's). */
static void __attribute__((noreturn)) supervisor_unreachable(const char *run_dir, const struct unreachable *problem)
{
    if (problem->why == DIR_CLOSED)
        fail(AW_EXIT_PERMISSION, "%s is not open to you: run this as root (sudo)", run_dir);
    if (problem->why == NO_SOCKET)
        fail(AW_EXIT_UNREACHABLE, "the daemon is not running (no socket at %s); start it with "
             "`agentwarden up`", sessions_path);
    if (problem->err == EACCES || problem->err == EPERM)
        fail(AW_EXIT_PERMISSION, "cannot reach %s: run this as root or as a member of the admin group",
             sessions_path);
    if (problem->err == ECONNREFUSED || problem->err == ENOENT)
        fail(AW_EXIT_UNREACHABLE, "the daemon is not running (nothing listens on %s, a socket left by "
             "a stopped daemon); start it with `agentwarden up`", sessions_path);
    fail(AW_EXIT_UNREACHABLE, "cannot reach %s: %s", sessions_path, strerror(problem->err));
}

static int connect_supervisor(const char *run_dir)
{
    struct unreachable problem;
    int sock = open_supervisor(run_dir, &problem);
    if (sock < 0)
        supervisor_unreachable(run_dir, &problem);
    return sock;
}

/* ---- cgroups -------------------------------------------------------------- */

/* The cgroup v2 mount point, from /proc/self/mountinfo. */
static char *cgroup2_root(void)
{
    char *text = read_file("/proc/self/mountinfo", NULL);
    if (text == NULL)
        fail(AW_EXIT_PROBLEM, "cannot read /proc/self/mountinfo: %s", strerror(errno));
    for (char *line = strtok(text, "\n"); line != NULL; line = strtok(NULL, "\n")) {
        char *dash = strstr(line, " - ");
        if (dash == NULL || strncmp(dash + 3, "cgroup2 ", 8) != 0)
            continue;
        char *field = line;
        for (int i = 0; i < 4 && field; i++) {
            field = strchr(field, ' ');
            if (field)
                field++;
        }
        if (field == NULL)
            continue;
        size_t len = strcspn(field, " ");
        char *out = malloc(len + 1), *o = out;
        if (out == NULL)
            fail(AW_EXIT_PROBLEM, "out of memory");
        for (size_t i = 0; i < len; i++) {   /* mountinfo writes space, tab, \n, \ as \ooo */
            if (field[i] == '\\' && i + 3 < len + 1 && field[i + 1] >= '0' && field[i + 1] <= '7') {
                *o++ = (char)((field[i + 1] - '0') * 64 + (field[i + 2] - '0') * 8 + (field[i + 3] - '0'));
                i += 3;
            } else {
                *o++ = field[i];
            }
        }
        *o = '\0';
        free(text);
        return out;
    }
    fail(AW_EXIT_PROBLEM, "cgroup v2 is not mounted; mount it with: mkdir -p /sys/fs/cgroup/unified && "
         "mount -t cgroup2 none /sys/fs/cgroup/unified");
}

/* This process's cgroup directory, or NULL. */
static char *own_cgroup(const char *root)
{
    char *text = read_file("/proc/self/cgroup", NULL), *found = NULL;
    if (text == NULL)
        return NULL;
    for (char *line = strtok(text, "\n"); line != NULL; line = strtok(NULL, "\n"))
        if (strncmp(line, "0::", 3) == 0) {
            const char *relative = line + 3 + strspn(line + 3, "/");
            found = *relative ? joined(root, relative) : strdup(root);
            break;
        }
    free(text);
    return found;
}

static int is_delegated(const char *path)
{
    char value[8];
    ssize_t n = getxattr(path, AW_DELEGATE_XATTR, value, sizeof value);
    return n == 1 && value[0] == '1';
}

/* Where the session cgroup goes: below this process's own cgroup when that is
 * a delegated unit (agent@NAME.service: nothing of ours ran in an agent's
 * cgroup before the session; delegated_parent), else below the agent's tagged
 * cgroup, as the probe knows it (it scans the tree for one tagged since its
 * last rescan; agent_parent). */
static char *delegated_parent(void)
{
    char *own = own_cgroup(cgroup2_root());
    return own != NULL && is_delegated(own) ? own : NULL;
}

static struct probe_call ask_agent_parent(const char *agent)
{
    struct packer pk = {0};
    put_map(&pk, 2);
    put_pair(&pk, "cmd", "agent");
    put_pair(&pk, "agent", agent);
    return probe_ask(&pk);
}

static char *agent_parent(const char *agent, struct probe_call *asked)
{
    struct reply r = probe_answer(asked);
    const uint8_t *at;
    struct mp_value list, first;
    if (!mp_ok(r.data, r.end))
        fail(AW_EXIT_PROBLEM, "the probe cannot name the cgroups of agent '%s': %s", agent,
             mp_string(r.data, r.end, "error", NULL) ?: "refused");
    if (mp_lookup(r.data, r.end, "cgroups", &at) != 1 || mp_next(&at, r.end, &list) < 0 ||
        list.kind != MP_ARRAY)
        fail(AW_EXIT_PROBLEM, "the probe sent a malformed answer on %s", probe_path);
    if (list.len == 0)
        fail(AW_EXIT_PROBLEM, "unknown agent '%s': no cgroup is tagged with it (tag one: agentwarden tag "
             "agents/%s --agent %s --create)", agent, agent, agent);
    if (mp_next(&at, r.end, &first) < 0 || first.kind != MP_STR || first.len == 0 || first.data[0] != '/')
        fail(AW_EXIT_PROBLEM, "the probe sent a malformed answer on %s", probe_path);
    char *parent = strndup((const char *)first.data, first.len);
    free(r.data);
    return parent;
}

static void set_xattr(const char *cgroup, const char *name, const char *value, int whole)
{
    size_t len = whole ? strlen(value) : utf8_prefix(value, AW_ATTRIBUTION_MAX);
    if (setxattr(cgroup, name, value, len, 0) != 0) {
        if (errno == EPERM)
            fail(AW_EXIT_PROBLEM, "cannot tag %s: trusted.* xattrs need root (run with sudo)", cgroup);
        fail(AW_EXIT_PROBLEM, "cannot tag %s: %s", cgroup, strerror(errno));
    }
}

/* ---- session start -------------------------------------------------------- */

/* shutil.which: the executable file the command names, as an absolute path. */
static char *find_program(const char *name)
{
    char *found = NULL;
    struct stat st;
    if (strchr(name, '/') != NULL) {
        if (access(name, X_OK) == 0 && stat(name, &st) == 0 && !S_ISDIR(st.st_mode))
            found = strdup(name);
    } else {
        const char *path = getenv("PATH");
        char *dirs = strdup(path != NULL ? path : "/bin:/usr/bin");   /* os.defpath */
        for (char *dir = dirs, *next; dir != NULL && found == NULL; dir = next) {
            next = strchr(dir, ':');
            if (next)
                *next++ = '\0';
            char *candidate = joined(*dir ? dir : ".", name);
            if (access(candidate, X_OK) == 0 && stat(candidate, &st) == 0 && !S_ISDIR(st.st_mode))
                found = candidate;
            else
                free(candidate);
        }
        free(dirs);
    }
    if (found == NULL || found[0] == '/')
        return found ? normalized(found) : NULL;
    char cwd[PATH_MAX];
    if (getcwd(cwd, sizeof cwd) == NULL)
        fail(AW_EXIT_PROBLEM, "cannot read the current directory: %s", strerror(errno));
    return normalized(joined(cwd, found));
}

/* identity.invoking_user: the login user behind this process when it is not
 * who it runs as (sudo), from the kernel's audit login uid; else "". */
static const char *invoking_user(void)
{
    char *text = read_file("/proc/self/loginuid", NULL);
    if (text == NULL)
        return "";
    char *end;
    unsigned long login = strtoul(text, &end, 10);
    int valid = end != text && login != 0xFFFFFFFFUL;
    free(text);
    if (!valid || login == getuid())
        return "";
    struct passwd *pw = getpwuid((uid_t)login);
    char *name;
    if (pw != NULL)
        return strdup(pw->pw_name);
    if (asprintf(&name, "uid:%lu", login) < 0)
        fail(AW_EXIT_PROBLEM, "out of memory");
    return name;
}

static int install_filter(const uint8_t *program, uint32_t len)
{
    struct sock_fprog prog = {.len = (unsigned short)(len / sizeof(struct sock_filter)),
                              .filter = (struct sock_filter *)program};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
        fail(AW_EXIT_PROBLEM, "prctl(NO_NEW_PRIVS) failed: %s", strerror(errno));
    long fd = syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER,
                      SECCOMP_FILTER_FLAG_NEW_LISTENER | SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV, &prog);
    if (fd < 0 && errno == EINVAL)   /* before 5.19: no killable waits, signals may re-issue a held call */
        fd = syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_NEW_LISTENER, &prog);
    if (fd < 0)
        fail(AW_EXIT_PROBLEM, "cannot install the seccomp filter: %s (needs seccomp user notification, "
             "kernel 5.0 or newer)", strerror(errno));
    return (int)fd;
}

/* ---- the command: born in the session cgroup ------------------------------ */

/* Joining a cgroup by writing cgroup.procs waits for the kernel's cgroup
 * migration (an RCU grace period on a hybrid mount: 5-15 ms); a process
 * made by clone3(CLONE_INTO_CGROUP) is born there instead. So the command is
 * this process's child, and this process stays its parent: it passes signals
 * on, follows the child's stops, and ends as the child ended. The launcher
 * itself stays where it was started, outside the session. */

struct command {
    const char *run_dir, *program, *session, *cgroup;
    char **argv;
    const struct passwd *account;
    gid_t gid;
    const uint8_t *filter;
    uint32_t filter_len;
    struct packer *registration;
};

/* Passed on to the command: what a terminal, a service manager or a harness
 * sends the process it started. SIGKILL and SIGSTOP cannot be caught: the
 * command has PR_SET_PDEATHSIG, and a stopped launcher stops nothing. */
static const int forwarded_signals[] = {SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2,
                                        SIGWINCH, SIGCONT, SIGTSTP, SIGTTIN, SIGTTOU};
#define FORWARDED_COUNT (sizeof forwarded_signals / sizeof forwarded_signals[0])

/* The child's pid (no pidfd needed: it is this process's child, reaped only
 * by waitid below, so until then the pid cannot name another process). */
static volatile pid_t command_pid;
static int caught[FORWARDED_COUNT];   /* 1: handled here; 0: ignored when we started, left so */
static sigset_t original_mask;

static void forward(int sig, siginfo_t *info, void *context)
{
    (void)context;
    pid_t child = command_pid;
    if (child <= 0)
        return;
    int saved = errno;
    /* The terminal signals its foreground process group (Ctrl-C, Ctrl-Z, a
     * resize, a hang-up): the command already has it when it shares ours. A
     * signal the command sent (kill(0, ...) reaches us too) is not sent back. */
    int from_terminal = info->si_code == SI_KERNEL && getpgid(child) == getpgrp();
    int from_command = info->si_code <= 0 && info->si_pid == child;
    if (!from_terminal && !from_command)
        kill(child, sig);
    errno = saved;
}

static void catch_signals(void)
{
    sigset_t all;
    sigemptyset(&all);
    for (size_t i = 0; i < FORWARDED_COUNT; i++)
        sigaddset(&all, forwarded_signals[i]);
    sigprocmask(SIG_BLOCK, &all, &original_mask);   /* until the child's pid is known */
    struct sigaction action = {.sa_sigaction = forward, .sa_flags = SA_SIGINFO | SA_RESTART};
    sigfillset(&action.sa_mask);
    for (size_t i = 0; i < FORWARDED_COUNT; i++) {
        struct sigaction old;
        sigaction(forwarded_signals[i], NULL, &old);
        caught[i] = old.sa_handler != SIG_IGN;   /* nohup's SIGHUP, a background job's SIGINT stay ignored */
        if (caught[i])
            sigaction(forwarded_signals[i], &action, NULL);
    }
}

/* In the child: the signals as they were when the launcher started (a
 * pending one is delivered now, with its default action). */
static void restore_signals(void)
{
    for (size_t i = 0; i < FORWARDED_COUNT; i++)
        if (caught[i])
            signal(forwarded_signals[i], SIG_DFL);
    sigprocmask(SIG_SETMASK, &original_mask, NULL);
}

/* The child, in the session cgroup: filter, registration, user, exec. From
 * here on, failing means the command never runs. */
static void __attribute__((noreturn)) become_command(const struct command *cmd, pid_t launcher,
                                                     volatile int *registered)
{
    cgroup_made = NULL;   /* the launcher removes it, if the daemon never took the session */
    /* A connection of its own: the supervisor learns this process from the
     * kernel (SO_PEERCRED) and checks that it is in the session cgroup. */
    int supervisor = connect_supervisor(cmd->run_dir);
    int listener = install_filter(cmd->filter, cmd->filter_len);
    struct reply registered_reply = exchange(supervisor, sessions_path, cmd->registration, listener, "the daemon",
                                             AW_EXIT_UNREACHABLE, SUPERVISOR_TIMEOUT);
    close(listener);
    close(supervisor);
    if (!mp_ok(registered_reply.data, registered_reply.end))
        fail(AW_EXIT_PROBLEM, "the daemon refused the session: %s",
             mp_string(registered_reply.data, registered_reply.end, "error", NULL) ?: "no reason given");
    *registered = 1;

    const struct passwd *account = cmd->account;
    if (account != NULL) {
        if (initgroups(account->pw_name, cmd->gid) != 0 || setgid(cmd->gid) != 0 || setuid(account->pw_uid) != 0)
            fail(AW_EXIT_PROBLEM, "cannot become user %s: %s", account->pw_name, strerror(errno));
        setenv("HOME", account->pw_dir, 1);
        setenv("USER", account->pw_name, 1);
        setenv("LOGNAME", account->pw_name, 1);
    }
    setenv(AW_SESSION_ENV, cmd->session, 1);
    /* Killed with the launcher (SIGKILL cannot be passed on: a harness's
     * timeout kills the `run` it started), as when it was the command.
     * After setuid, which clears it; before exec, which keeps it. */
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0 || getppid() != launcher)
        _exit(AW_EXIT_PROBLEM);   /* the launcher is gone already */
    restore_signals();
    execv(cmd->program, cmd->argv);
    fail(AW_EXIT_PROBLEM, "cannot run %s: %s", cmd->program, strerror(errno));
}

/* A child born in the cgroup cgroup_fd names; 0 in the child. Where clone3
 * or CLONE_INTO_CGROUP is missing (before 5.7, or refused by a container's
 * seccomp profile), a plain fork whose child joins by cgroup.procs. */
static pid_t spawn_in_cgroup(int cgroup_fd, const char *cgroup)
{
    struct clone_args args = {.flags = CLONE_INTO_CGROUP, .exit_signal = SIGCHLD, .cgroup = (uint64_t)cgroup_fd};
    long pid = syscall(SYS_clone3, &args, sizeof args);
    if (pid >= 0 || (errno != ENOSYS && errno != EINVAL && errno != E2BIG && errno != EPERM))
        return (pid_t)pid;
    pid = fork();
    if (pid == 0) {
        char *procs = joined(cgroup, "cgroup.procs");
        int fd = open(procs, O_WRONLY | O_CLOEXEC);
        if (fd < 0 || write(fd, "0", 1) != 1)
            fail(AW_EXIT_PROBLEM, "cannot join the session cgroup %s: %s", cgroup, strerror(errno));
        close(fd);
    }
    return (pid_t)pid;
}

/* The child stopped (a terminal's Ctrl-Z, a read from the terminal in the
 * background): stop the same way, so that the shell sees its job stopped;
 * on SIGCONT go on waiting (the handler passes SIGCONT on). */
static void stop_as(int sig)
{
    if (sig != SIGTSTP && sig != SIGTTIN && sig != SIGTTOU)
        return;   /* a SIGSTOP sent to the command alone: whoever sent it continues it */
    struct sigaction dfl = {.sa_handler = SIG_DFL}, mine;
    sigaction(sig, &dfl, &mine);
    sigset_t one;
    sigemptyset(&one);
    sigaddset(&one, sig);
    sigprocmask(SIG_UNBLOCK, &one, NULL);
    kill(getpid(), sig);
    sigaction(sig, &mine, NULL);
}

/* Ends as the command ended: its exit code, or killed by the same signal
 * (a shell then stops its loop on Ctrl-C, and reports what killed it);
 * without a core dump of this process. 128+N when that signal cannot end it. */
static void __attribute__((noreturn)) end_as(const siginfo_t *info)
{
    if (info->si_code == CLD_EXITED)
        exit(info->si_status);
    int sig = info->si_status;
    struct rlimit no_core = {0, 0};
    setrlimit(RLIMIT_CORE, &no_core);
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);   /* nor to a core_pattern pipe, which ignores the limit */
    signal(sig, SIG_DFL);
    sigset_t one;
    sigemptyset(&one);
    sigaddset(&one, sig);
    sigprocmask(SIG_UNBLOCK, &one, NULL);
    kill(getpid(), sig);
    exit(128 + sig);
}

static void __attribute__((noreturn)) start_command(const struct command *cmd, int cgroup_fd)
{
    volatile int *registered = mmap(NULL, sizeof(int), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (registered == MAP_FAILED)
        fail(AW_EXIT_PROBLEM, "out of memory");
    pid_t launcher = getpid();
    catch_signals();
    pid_t child = spawn_in_cgroup(cgroup_fd, cmd->cgroup);
    if (child < 0)
        fail(AW_EXIT_PROBLEM, "cannot start %s in the session cgroup %s: %s", cmd->program, cmd->cgroup,
             strerror(errno));
    if (child == 0)
        become_command(cmd, launcher, registered);
    close(cgroup_fd);
    cgroup_made = NULL;
    command_pid = child;
    sigprocmask(SIG_SETMASK, &original_mask, NULL);
    /* The command's stdin and stdout are its own: a writer into its stdin
     * gets EPIPE once the command closes it, a reader of its stdout sees the
     * end once the command closes it, not only when this process ends. */
    int null = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (null >= 0) {
        dup2(null, STDIN_FILENO);
        dup2(null, STDOUT_FILENO);
        close(null);
    }
    siginfo_t info;
    for (;;) {
        memset(&info, 0, sizeof info);
        if (waitid(P_PID, (id_t)child, &info, WEXITED | WSTOPPED) != 0) {
            if (errno == EINTR)
                continue;
            fail(AW_EXIT_PROBLEM, "cannot wait for %s: %s", cmd->program, strerror(errno));
        }
        if (info.si_code != CLD_STOPPED)
            break;
        stop_as(info.si_status);
    }
    command_pid = 0;
    if (!*registered)
        rmdir(cmd->cgroup);   /* the daemon never took the session: nothing ran in it */
    end_as(&info);
}

static void __attribute__((noreturn)) start_session(const struct request *req)
{
    if (geteuid() != 0)
        fail(AW_EXIT_PERMISSION, "agentwarden run needs root (CAP_BPF, CAP_SYS_ADMIN): run it with sudo");
    regex_t agent_name;
    if (regcomp(&agent_name, AW_AGENT_NAME_ERE, REG_EXTENDED | REG_NOSUB) != 0)
        fail(AW_EXIT_PROBLEM, "cannot compile the agent name pattern");
    if (regexec(&agent_name, req->agent, 0, NULL, 0) != 0)
        fail(AW_EXIT_PROBLEM, "invalid agent name '%s': use 1-64 letters, digits, '_', '.', '@' or '-', "
             "starting with a letter or digit", req->agent);
    char *run_dir = resolve_run_dir();
    if (run_dir == NULL)
        hand_to_python();
    sessions_path = joined(run_dir, AW_SESSIONS_SOCKET);
    probe_path = joined(run_dir, AW_PROBE_SOCKET);

    /* Ask the supervisor for the session filter and its instance, and the
     * probe for the agent's cgroup, at once, and read their answers after this
     * side's own work: they overlap. What is wrong is said in the order it
     * was: this side's first, then the supervisor's, then the probe's. */
    struct unreachable problem;
    int supervisor = open_supervisor(run_dir, &problem);
    struct packer pk = {0};
    put_map(&pk, 1);
    put_pair(&pk, "cmd", "launch");
    int send_error = supervisor >= 0 ? send_request(supervisor, &pk, -1, "the daemon") : 0;
    char *parent = delegated_parent();
    struct probe_call asked = {.sock = -1};
    if (parent == NULL)
        asked = ask_agent_parent(req->agent);   /* the probe answers meanwhile too */

    char *program = find_program(req->command[0]);
    if (program == NULL)
        fail(AW_EXIT_PROBLEM, "command not found: %s", req->command[0]);
    struct passwd *account = NULL;
    if (req->user != NULL) {
        account = getpwnam(req->user);
        if (account == NULL)
            fail(AW_EXIT_PROBLEM, "no such user: %s", req->user);
    }
    if (req->group != NULL && account == NULL)
        fail(AW_EXIT_PROBLEM, "--group needs --user (the group the user runs in)");
    gid_t gid = account != NULL ? account->pw_gid : 0;
    if (req->group != NULL) {
        struct group *g = getgrnam(req->group);
        if (g == NULL)
            fail(AW_EXIT_PROBLEM, "no such group: %s", req->group);
        gid = g->gr_gid;
    }
    const char *task = req->task ? req->task : "";
    const char *on_behalf_of = req->on_behalf_of && *req->on_behalf_of ? req->on_behalf_of : invoking_user();
    struct passwd *self = getpwuid(getuid());
    const char *registering_user = req->user ? req->user : self ? strdup(self->pw_name) : "root";
    char host[256] = "";
    gethostname(host, sizeof host - 1);
    uint8_t random[6];
    if (getrandom(random, sizeof random, 0) != sizeof random)
        fail(AW_EXIT_PROBLEM, "getrandom failed: %s", strerror(errno));
    char session[16];
    snprintf(session, sizeof session, "s-%02x%02x%02x%02x%02x%02x", random[0], random[1], random[2],
             random[3], random[4], random[5]);

    /* The supervisor listens, or this says why before anything is made; its
     * answer carries the session filter and the instance it serves. */
    if (supervisor < 0)
        supervisor_unreachable(run_dir, &problem);
    if (send_error != 0)
        fail(AW_EXIT_UNREACHABLE, "cannot send to the daemon on %s: %s", sessions_path, strerror(send_error));
    struct reply launch = read_reply(supervisor, sessions_path, "the daemon", AW_EXIT_UNREACHABLE, SUPERVISOR_TIMEOUT);
    if (!mp_ok(launch.data, launch.end))
        fail(AW_EXIT_PROBLEM, "the daemon refused the session: %s",
             mp_string(launch.data, launch.end, "error", NULL) ?: "no reason given");
    uint32_t filter_len = 0;
    char *filter = mp_string(launch.data, launch.end, "filter", &filter_len);
    char *instance = mp_string(launch.data, launch.end, "instance", NULL);
    if (filter == NULL || filter_len == 0 || filter_len % sizeof(struct sock_filter) != 0 ||
        filter_len / sizeof(struct sock_filter) > BPF_MAXINSNS || instance == NULL || !*instance)
        fail(AW_EXIT_PROBLEM, "the daemon sent a malformed answer on %s: no session filter", sessions_path);

    if (parent == NULL)
        parent = agent_parent(req->agent, &asked);
    char *cgroup = joined(parent, session);
    if (mkdir(cgroup, 0777) != 0)
        fail(AW_EXIT_PROBLEM, "cannot create the session cgroup %s: %s", cgroup, strerror(errno));
    cgroup_made = cgroup;
    set_xattr(cgroup, AW_TAG_XATTR, req->agent, 1);
    set_xattr(cgroup, AW_SESSION_XATTR, session, 0);
    set_xattr(cgroup, AW_INSTANCE_XATTR, instance, 0);
    if (*task)
        set_xattr(cgroup, AW_TASK_XATTR, task, 0);
    if (*on_behalf_of)
        set_xattr(cgroup, AW_ON_BEHALF_OF_XATTR, on_behalf_of, 0);
    set_xattr(cgroup, AW_USER_XATTR, req->user ? req->user : "root", 0);

    /* The probe watches the cgroup as this session of this instance when it
     * answers: the command's first exec is seen by the BPF program. */
    pk.len = 0;
    put_map(&pk, 2);
    put_pair(&pk, "cmd", "watch");
    put_pair(&pk, "cgroup", cgroup);
    struct reply watched = probe_request(&pk);
    if (!mp_ok(watched.data, watched.end))
        fail(AW_EXIT_PROBLEM, "the probe cannot watch %s: %s", cgroup,
             mp_string(watched.data, watched.end, "error", NULL) ?: "no reason given");
    const uint8_t *tag;
    char *tag_session = NULL, *tag_instance = NULL;
    if (mp_lookup(watched.data, watched.end, "tag", &tag) == 1) {
        tag_session = mp_string(tag, watched.end, "session", NULL);
        tag_instance = mp_string(tag, watched.end, "instance", NULL);
    }
    if (tag_session == NULL || strcmp(tag_session, session) != 0 || tag_instance == NULL ||
        strcmp(tag_instance, instance) != 0)
        fail(AW_EXIT_PROBLEM, "the probe does not watch %s as session %s of this instance (%s): it reports "
             "session %s of instance %s", cgroup, session, instance, tag_session ?: "none",
             tag_instance ?: "none");

    /* The command is born in the session cgroup, a child of this process,
     * which stays to pass signals on and its status back (start_command). */
    int cgroup_fd = open(cgroup, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (cgroup_fd < 0)
        fail(AW_EXIT_PROBLEM, "cannot join the session cgroup %s: %s", cgroup, strerror(errno));
    close(supervisor);   /* the command registers on a connection of its own */
    struct command cmd = {
        .run_dir = run_dir, .program = program, .argv = req->command, .account = account, .gid = gid,
        .filter = (const uint8_t *)filter, .filter_len = filter_len, .session = session,
        .cgroup = cgroup, .registration = &pk,
    };
    pk.len = 0;
    put_map(&pk, 8);
    put_pair(&pk, "cmd", "register");
    put_pair(&pk, "session", session);
    put_pair(&pk, "agent", req->agent);
    put_pair(&pk, "user", registering_user);
    put_pair(&pk, "task", task);
    put_pair(&pk, "on_behalf_of", on_behalf_of);
    put_pair(&pk, "host", host);
    put_pair(&pk, "cgroup", cgroup);
    start_command(&cmd, cgroup_fd);
}

int main(int argc, char **argv)
{
    original_argv = argv;
    struct request req;
    if (argc >= 3 && strcmp(argv[1], "run") == 0 && parse_run(&argv[2], &req))
        start_session(&req);
    hand_to_python();
}
