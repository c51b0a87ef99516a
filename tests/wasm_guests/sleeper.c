/* Blocks inside a WASI call (poll_oneoff) for argv[1] seconds (default 1000). */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv) {
    int seconds = argc > 1 ? atoi(argv[1]) : 1000;
    printf("sleeping %d\n", seconds);
    fflush(stdout);
    sleep(seconds);
    printf("woke\n");
    return 0;
}
