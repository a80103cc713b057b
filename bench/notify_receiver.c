/* The notify_command of bench/notify.py: notes the wall-clock time it starts
 * (CLOCK_REALTIME, the clock of the hold record's `time`), reads the hold's
 * JSON from stdin, and appends one line "NS JSON" to the file named by argv[1].
 * C, so that what is measured is agentwarden's delivery, not an interpreter's
 * start-up. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

int main(int argc, char **argv)
{
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    if (argc != 2) {
        fprintf(stderr, "usage: notify_receiver FILE < hold.json\n");
        return 2;
    }
    static char json[1 << 16];
    size_t len = fread(json, 1, sizeof(json) - 1, stdin);
    json[len] = 0;
    for (size_t i = 0; i < len; i++)   /* one line per hold */
        if (json[i] == '\n')
            json[i] = ' ';
    FILE *out = fopen(argv[1], "a");
    if (!out) {
        perror(argv[1]);
        return 1;
    }
    fprintf(out, "%lld %s\n", (long long)now.tv_sec * 1000000000LL + now.tv_nsec, json);
    return fclose(out) == 0 ? 0 : 1;
}
