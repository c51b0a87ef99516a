/* Traps: "unreachable" (default; what abort() is in wasi-libc), "overflow" (unbounded
 * recursion), "oob" (a load far outside linear memory). */
#include <stdio.h>
#include <string.h>

static volatile int depth;

static int recurse(int n) {
    volatile char pad[64];
    pad[n % 64] = (char)n;
    depth++;
    return recurse(n + 1) + pad[0];
}

int main(int argc, char **argv) {
    const char *how = argc > 1 ? argv[1] : "unreachable";
    printf("trapping: %s\n", how);
    fflush(stdout);
    if (strcmp(how, "overflow") == 0)
        return recurse(0);
    if (strcmp(how, "oob") == 0)
        return *(volatile int *)0xfffffff0u;
    __builtin_trap();
}
