/* Races the supervisor's check of a file change: one thread flips a path
 * buffer between an allowed path and forbidden ones, byte by byte, while
 * other threads hand that very buffer to open (write, create, truncate,
 * append), creat, openat2, truncate, rename (as the old and as the new name)
 * and unlink, for the given seconds. Under `agentwarden run` the check reads
 * the buffer; a call let continue would make the kernel read it again.
 *
 * usage: write_race ALLOWED FORBIDDEN MISSING SPARE SECONDS
 *   ALLOWED, FORBIDDEN (an existing file) and MISSING (a file that must
 *   never appear) are paths of the same length; SPARE a file in the allowed
 *   directory renames use as their other name.
 * Prints "calls N ok M": calls made and calls that succeeded. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/openat2.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static char target[4096];          /* the buffer every call names */
static const char *paths[3];
static size_t length;
static atomic_int stop;
static atomic_long calls, ok;
static const char *spare;

static void *flip(void *arg)
{
    (void)arg;
    for (unsigned i = 0; !atomic_load(&stop); i++) {
        const char *from = paths[i % 3];
        for (size_t j = 0; j < length; j++)        /* byte by byte: mixtures too */
            ((volatile char *)target)[j] = from[j];
    }
    return NULL;
}

static void tally(long result)
{
    atomic_fetch_add(&calls, 1);
    if (result >= 0)
        atomic_fetch_add(&ok, 1);
}

static void *attack(void *arg)
{
    int kind = (int)(long)arg;
    static const char evil[] = "changed by the race\n";
    while (!atomic_load(&stop)) {
        int fd = -1;
        switch (kind) {
        case 0:
            fd = open(target, O_WRONLY | O_CREAT | O_TRUNC, 0644);
            break;
        case 1:
            fd = openat(AT_FDCWD, target, O_WRONLY | O_APPEND);
            break;
        case 2:
            fd = creat(target, 0600);
            break;
        case 3: {
            struct open_how how = { .flags = O_RDWR | O_CREAT, .mode = 0644 };
            fd = syscall(SYS_openat2, AT_FDCWD, target, &how, sizeof(how));
            break;
        }
        case 4:
            tally(truncate(target, 0));
            break;
        case 5:
            tally(rename(target, spare));             /* the checked name, moved away */
            break;
        case 6:
            tally(syscall(SYS_renameat2, AT_FDCWD, spare, AT_FDCWD, target, 0));   /* onto it */
            break;
        case 7:
            tally(unlink(target));
            break;
        }
        if (kind <= 3) {
            tally(fd);
            if (fd >= 0) {
                if (write(fd, evil, sizeof(evil) - 1) < 0)
                    perror("write");
                close(fd);
            }
        }
        if (kind == 5 || kind == 6) {                 /* keep a spare to rename */
            int made = open(spare, O_WRONLY | O_CREAT, 0644);
            if (made >= 0)
                close(made);
        }
    }
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 6) {
        fprintf(stderr, "usage: %s ALLOWED FORBIDDEN MISSING SPARE SECONDS\n", argv[0]);
        return 2;
    }
    paths[0] = argv[1];
    paths[1] = argv[2];
    paths[2] = argv[3];
    spare = argv[4];
    length = strlen(argv[1]) + 1;
    if (strlen(argv[2]) + 1 != length || strlen(argv[3]) + 1 != length) {
        fprintf(stderr, "the three paths must have the same length\n");
        return 2;
    }
    memcpy(target, argv[1], length);
    pthread_t flipper, workers[8];
    pthread_create(&flipper, NULL, flip, NULL);
    for (long i = 0; i < 8; i++)
        pthread_create(&workers[i], NULL, attack, (void *)i);
    struct timespec span = { atoi(argv[5]), 0 };
    nanosleep(&span, NULL);
    atomic_store(&stop, 1);
    pthread_join(flipper, NULL);
    for (int i = 0; i < 8; i++)
        pthread_join(workers[i], NULL);
    printf("calls %ld ok %ld\n", atomic_load(&calls), atomic_load(&ok));
    return 0;
}
