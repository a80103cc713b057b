/* An agent's way around the open syscalls: open and read a file through
 * io_uring (IORING_OP_OPENAT, then IORING_OP_READ), with no liburing -- just
 * io_uring_setup, the three mmaps and io_uring_enter. Prints what it read.
 * Exit 2: the ring could not be made; 3: an operation failed. */
#include <fcntl.h>
#include <linux/io_uring.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

static char buf[4096];

int main(int argc, char **argv)
{
    if (argc != 2)
        return 1;
    struct io_uring_params p;
    memset(&p, 0, sizeof(p));
    int ring = syscall(__NR_io_uring_setup, 4, &p);
    if (ring < 0) {
        perror("io_uring_setup");
        return 2;
    }
    char *sq = mmap(0, p.sq_off.array + p.sq_entries * sizeof(unsigned), PROT_READ | PROT_WRITE,
                    MAP_SHARED | MAP_POPULATE, ring, IORING_OFF_SQ_RING);
    char *cq = mmap(0, p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe),
                    PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring, IORING_OFF_CQ_RING);
    struct io_uring_sqe *sqes = mmap(0, p.sq_entries * sizeof(struct io_uring_sqe), PROT_READ | PROT_WRITE,
                                     MAP_SHARED | MAP_POPULATE, ring, IORING_OFF_SQES);
    if (sq == MAP_FAILED || cq == MAP_FAILED || sqes == MAP_FAILED) {
        perror("mmap");
        return 2;
    }
    unsigned *sq_tail = (unsigned *)(sq + p.sq_off.tail), *sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
    unsigned *sq_array = (unsigned *)(sq + p.sq_off.array);
    unsigned *cq_head = (unsigned *)(cq + p.cq_off.head), *cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
    struct io_uring_cqe *cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
    int results[2];
    for (int step = 0; step < 2; step++) {
        unsigned tail = *sq_tail, index = tail & *sq_mask;
        struct io_uring_sqe *sqe = &sqes[index];
        memset(sqe, 0, sizeof(*sqe));
        if (step == 0) {
            sqe->opcode = IORING_OP_OPENAT;
            sqe->fd = AT_FDCWD;
            sqe->addr = (unsigned long)argv[1];
            sqe->open_flags = O_RDONLY;
        } else {
            sqe->opcode = IORING_OP_READ;
            sqe->fd = results[0];
            sqe->addr = (unsigned long)buf;
            sqe->len = sizeof(buf) - 1;
        }
        sq_array[index] = index;
        __atomic_store_n(sq_tail, tail + 1, __ATOMIC_RELEASE);
        if (syscall(__NR_io_uring_enter, ring, 1, 1, IORING_ENTER_GETEVENTS, NULL, 0) < 0) {
            perror("io_uring_enter");
            return 2;
        }
        unsigned head = __atomic_load_n(cq_head, __ATOMIC_ACQUIRE);
        results[step] = cqes[head & *cq_mask].res;
        __atomic_store_n(cq_head, head + 1, __ATOMIC_RELEASE);
        if (results[step] < 0) {
            fprintf(stderr, "step %d: %s\n", step, strerror(-results[step]));
            return 3;
        }
    }
    buf[results[1]] = 0;
    printf("read through io_uring: %s\n", buf);
    return 0;
}
