/* Allocates and touches 1 MiB chunks: until malloc fails (prints it, exit 3), or argv[1] MiB.
 * With argv[2]: after the first argv[1] MiB prints "ready", waits for a line on stdin, then
 * allocates argv[2] MiB more. Pointers are kept, so nothing is optimised away. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static char *volatile keep[65536];
static long got;

static int allocate(long mib) {
    for (long i = 0; i < mib && got < 65536; i++) {
        char *p = malloc(1 << 20);
        if (!p) {
            printf("malloc failed after %ld MiB\n", got);
            return 3;
        }
        memset(p, 1, 1 << 20);
        keep[got++] = p;
    }
    return 0;
}

int main(int argc, char **argv) {
    long first = argc > 1 ? atol(argv[1]) : 65536;
    if (allocate(first))
        return 3;
    printf("allocated %ld MiB\n", got);
    if (argc > 2) {
        char line[16];
        printf("ready\n");
        fflush(stdout);
        if (!fgets(line, sizeof line, stdin))
            return 4;
        if (allocate(atol(argv[2])))
            return 3;
        printf("allocated %ld MiB\n", got);
    }
    return 0;
}
